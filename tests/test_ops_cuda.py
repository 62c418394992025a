"""CUDA-only properties of the kernels: streams, CUDA graphs, torch.compile backends, and
tensors of more than 2^31 elements. Every test here is marked `cuda` (skipped without a
GPU; tests/gpu/run.sh runs them); the huge ones are also marked `huge` and run only with
MINIHIRES_HUGE_TESTS=1, which tests/gpu/run.sh sets.
"""
from __future__ import annotations

import bisect

import pytest
import torch

from minihires import ops
from minihires.ops import reference as ref

STITCH = pytest.mark.cuda("stitch", "split")
WINDOW = pytest.mark.cuda("window_attn_pool", "window_attn_pool_backward")
BOTH = pytest.mark.cuda("stitch", "split", "window_attn_pool", "window_attn_pool_backward")
GRIDS = [(1, 1), (2, 3), (3, 2), (1, 4)]  # 17 slices
MANY_GRIDS = [(1 + i % 3, 1 + i % 2) for i in range(300)]  # 300 images: three launches of 128 or fewer


def flat(grids):
    return [v for g in grids for v in g]


def stitch_ops(naive):
    m = torch.ops.minihires
    return (m.stitch_naive, m.split_naive) if naive else (m.stitch, m.split)


def side_stream_warmup(fn, iters=2):
    """Run fn a few times on a side stream before capturing it (as torch.cuda.graph asks)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(s)


# --- streams --------------------------------------------------------------------------------
@BOTH
def test_kernels_run_on_the_current_stream():
    """Inputs written on a side stream after a long GPU sleep: a kernel launched on any
    other stream than the current one would read them before they are written."""
    src = torch.randn(17, 3, 4, 8, device="cuda")
    q_src, k_src = torch.randn(2, 3, 3, 2, 16, device="cuda"), torch.randn(2, 6, 6, 2, 16, device="cuda")
    x, q, k = torch.zeros_like(src), torch.zeros_like(q_src), torch.zeros_like(k_src)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time on s
        x.copy_(src)
        q.copy_(q_src)
        k.copy_(k_src)
        packed = ops.stitch(x, GRIDS)
        back = ops.split(packed, GRIDS, 3, 4)
        naive = torch.ops.minihires.stitch_naive(x, flat(GRIDS))
        out = ops.window_attn_pool(q, k, k, 2)
        out_naive = torch.ops.minihires.window_attn_pool_naive(q, k, k, 2, 2, 0.25)[0]
    s.synchronize()
    assert torch.equal(packed, ref.stitch(src, GRIDS)) and torch.equal(back, src)
    assert torch.equal(naive, packed)
    torch.testing.assert_close(out, ref.window_attn_pool(q_src, k_src, k_src, 2))
    torch.testing.assert_close(out_naive, ref.window_attn_pool(q_src, k_src, k_src, 2))


# --- CUDA graphs --------------------------------------------------------------------------
@STITCH
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
@pytest.mark.parametrize("grids", [GRIDS, MANY_GRIDS], ids=["4-images", "300-images"])
def test_stitch_split_capture_and_replay(naive, grids):
    """Captured stitch/split replay correctly with inputs changed in place between replays;
    two graphs of different grids each keep their own grid tables (kernel arguments)."""
    stitch_op, split_op = stitch_ops(naive)
    n = sum(r * c for r, c in grids)
    other = list(reversed(grids))  # same slice count, another layout
    x = torch.randn(n, 2, 3, 5, device="cuda")
    side_stream_warmup(lambda: split_op(stitch_op(x, flat(grids)), flat(grids), 2, 3))
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        packed = stitch_op(x, flat(grids))
        back = split_op(packed, flat(grids), 2, 3)
    with torch.cuda.graph(g2):
        packed2 = stitch_op(x, flat(other))
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g1.replay()
        g2.replay()
        torch.cuda.synchronize()
        assert torch.equal(packed, ref.stitch(x, grids))
        assert torch.equal(back, x)
        assert torch.equal(packed2, ref.stitch(x, other))


@WINDOW
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_attn_pool_capture_and_replay_forward_and_backward(naive, dtype):
    q = torch.randn(2, 3, 3, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 6, 6, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 6, 6, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 3, 2, 64, device="cuda", dtype=dtype)
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool

    def step():
        out = op(q, k, v, 2, 2, 0.125)[0]
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    side_stream_warmup(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()
    for _ in range(3):
        with torch.no_grad():
            for t in (q, k, v, g):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out64 = ref.window_attn_pool(q64, k64, v64, 2, 0.125)
        want = (out64, *torch.autograd.grad(out64, (q64, k64, v64), g.double()))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for got, w in zip(results, want):
            torch.testing.assert_close(got.double(), w, rtol=tol, atol=tol)


# --- torch.compile backends that capture CUDA graphs -------------------------------------
@BOTH
def test_torch_compile_cudagraphs_backend():
    """fullgraph compile with the cudagraphs backend (AOT autograd + CUDA graph replay, no
    code generation), forward and backward, inputs changed between calls."""
    def f(x, q, k):
        packed = ops.stitch(x, GRIDS)
        return ops.split(packed * 2, GRIDS, 3, 4).sum() + ops.window_attn_pool(q, k, k, 2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="cudagraphs")
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(17, 3, 4, 8, device="cuda", generator=gen, requires_grad=True)
        q = torch.randn(2, 3, 3, 2, 16, device="cuda", generator=gen, requires_grad=True)
        k = torch.randn(2, 6, 6, 2, 16, device="cuda", generator=gen, requires_grad=True)
        got = torch.autograd.grad(compiled(x, q, k), (x, q, k))
        want = torch.autograd.grad(f(x, q, k), (x, q, k))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


# --- more than 2^31 elements (int64 indexing everywhere) ---------------------------------
def packed_to_slice_row(p, grids, h, w, starts):
    """The slice-layout row of packed row p, straight from the definition (csrc/kernels/stitch.h);
    starts[i] = first slice of image i (len(grids) + 1 prefix sums)."""
    i = bisect.bisect_right(starts, p // (h * w)) - 1  # the last image with starts[i]*h*w <= p
    r, c = grids[i]
    y, x = divmod(p - starts[i] * h * w, c * w)
    return ((starts[i] + (y // h) * c + x // w) * h + y % h) * w + x % w


@STITCH
@pytest.mark.huge
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_stitch_split_beyond_2_31_elements(naive):
    # One launch (4 images) over 8193 slices of 64x64 tokens, C = 64: 2^31 + 2^18 elements
    # (4.3 GB in float16), so indices inside the kernels pass 2^31 too.
    grids = [(64, 64), (32, 64), (64, 32), (1, 1)]
    h = w = C = 64
    n = sum(r * c for r, c in grids)
    assert n * h * w * C > 2**31
    stitch_op, split_op = stitch_ops(naive)
    x = torch.randn(n, h, w, C, device="cuda", dtype=torch.float16)
    packed = stitch_op(x, flat(grids))
    rows = n * h * w
    gen = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.randint(0, rows, (2000,), generator=gen), torch.arange(rows - 64, rows),
                        torch.arange(2**31 // C - 64, 2**31 // C + 64)])  # the rows around element 2^31
    starts = [0]
    for r, c in grids:
        starts.append(starts[-1] + r * c)
    slice_rows = torch.tensor([packed_to_slice_row(int(p), grids, h, w, starts) for p in sample])
    assert torch.equal(packed[sample.cuda()], x.view(-1, C)[slice_rows.cuda()])
    assert torch.ops.minihires.last_kernel().endswith("launches=1")
    back = split_op(packed, flat(grids), h, w)
    assert torch.equal(back, x)
    del x, packed, back
    torch.cuda.empty_cache()


@WINDOW
@pytest.mark.huge
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_window_attn_pool_beyond_2_31_elements(naive):
    """k, v of 2^31+ elements: sampled query rows (and the last ones) against a float64
    reference computed on their gathered windows, forward and backward."""
    n, hq, wq, kh, kw, nh, d = 3700, 12, 12, 2, 2, 16, 64  # k: 3700*24*24*16*64 = 2.18e9 elements
    assert n * hq * kh * wq * kw * nh * d > 2**31
    dtype, scale = torch.bfloat16, d ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, hq, wq, nh, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(n, hq * kh, wq * kw, nh, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(n, hq * kh, wq * kw, nh, d, device="cuda", dtype=dtype, generator=gen)
    g = torch.randn(n, hq, wq, nh, d, device="cuda", dtype=dtype, generator=gen)
    suffix = "_naive" if naive else ""
    fwd = getattr(torch.ops.minihires, "window_attn_pool" + suffix)
    bwd = getattr(torch.ops.minihires, "window_attn_pool_backward" + suffix)
    out, lse = fwd(q, k, v, kh, kw, scale)
    dq, dk, dv = bwd(g, q, k, v, lse, kh, kw, scale)

    rows = n * hq * wq * nh
    sample = torch.cat([torch.randint(0, rows, (512,), generator=torch.Generator().manual_seed(1)),
                        torch.arange(rows - 32, rows)]).cuda()
    b, rest = sample // (hq * wq * nh), sample % (hq * wq * nh)
    i, j, head = rest // (wq * nh), (rest // nh) % wq, sample % nh
    a, c = torch.arange(kh, device="cuda"), torch.arange(kw, device="cuda")
    ky = (i[:, None, None] * kh + a[None, :, None]).expand(-1, kh, kw).reshape(-1, kh * kw)  # (R, T)
    kx = (j[:, None, None] * kw + c[None, None, :]).expand(-1, kh, kw).reshape(-1, kh * kw)  # (R, T)
    bb, hh = b[:, None].expand_as(ky), head[:, None].expand_as(ky)

    q64 = q[b, i, j, head].double().requires_grad_()       # (R, d)
    k64 = k[bb, ky, kx, hh].double().requires_grad_()      # (R, T, d)
    v64 = v[bb, ky, kx, hh].double().requires_grad_()
    p = torch.softmax(torch.einsum("rd,rtd->rt", q64, k64) * scale, dim=-1)
    out64 = torch.einsum("rt,rtd->rd", p, v64)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), g[b, i, j, head].double())

    def close(got, want, what):
        tol = 2e-2 * want.abs().max().item()  # bfloat16 results: 8 bits of mantissa
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"

    close(out[b, i, j, head], out64, "out")
    torch.testing.assert_close(lse[b, i, j, head].double(), torch.logsumexp(
        torch.einsum("rd,rtd->rt", q64.detach(), k64.detach()) * scale, -1), rtol=1e-3, atol=1e-3)
    close(dq[b, i, j, head], dq64, "dq")
    close(dk[bb, ky, kx, hh], dk64, "dk")
    close(dv[bb, ky, kx, hh], dv64, "dv")
    del q, k, v, g, out, lse, dq, dk, dv
    torch.cuda.empty_cache()
