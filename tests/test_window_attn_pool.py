"""window_attn_pool kernels (C++ CPU, CUDA v1/v2) against the float64 reference.

Accuracy rule (DESIGN.md section 3): float32 within 1e-5 relative error (max abs error over
max abs value) of a float64 reference; bfloat16/float16 at most twice the reference's own
error in that precision (the reference run in that dtype vs float64). Fresh allocations
are poisoned with NaN, so an element a kernel forgets to write fails.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minihires import ops
from minihires.ops import reference
from minihires.ops._extension import has_kernel

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
KERNEL = has_kernel("window_attn_pool", "cpu")
needs_kernel = pytest.mark.skipif(not KERNEL, reason="minihires._C not built (pip install --no-build-isolation -e .)")
examples = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
fwd_op, bwd_op = "window_attn_pool", "window_attn_pool_backward"
# The hypothesis tests run on the CPU here and on the GPU too where tests/gpu/run.sh runs them.
ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda(fwd_op, bwd_op))])


# --- helpers ------------------------------------------------------------------------------
def make(shape, dtype, device, gen, layout="contiguous"):
    """Random tensor of `shape`; 'strided' and 'permuted' give non-contiguous views."""
    if layout == "strided":   # every other channel of a wider tensor
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)\
            .to(device=device, dtype=dtype)[..., ::2]
    if layout == "permuted":  # stored [N, W, H, nh, d], viewed as [N, H, W, nh, d]
        s = list(shape)
        s[1], s[2] = s[2], s[1]
        return torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def problem(n, hq, wq, kh, kw, nh, d, dtype, device="cpu", seed=0, layouts=("contiguous",) * 3):
    gen = torch.Generator().manual_seed(seed)
    q = make((n, hq, wq, nh, d), dtype, device, gen, layouts[0])
    k = make((n, hq * kh, wq * kw, nh, d), dtype, device, gen, layouts[1])
    v = make((n, hq * kh, wq * kw, nh, d), dtype, device, gen, layouts[2])
    return q, k, v


def err(x, ref64):
    return (x.double().cpu() - ref64.cpu()).abs().max().item() if x.numel() else 0.0


def assert_accurate(got, ref_same_dtype, ref64, what="", grad=False):
    """float32/64: relative error <= 1e-5 / 1e-12; bf16/fp16: <= twice the reference's own
    error in that dtype (floored at half an ulp of the largest value, for tiny tensors).

    grad=True (ours): a gradient element can be a small difference of larger terms
    (ds_t = p_t (dp_t - D) when the dp_t are close), where the float32 reference's own error
    exceeds 1e-5 relative; float32 gradients may then be off by up to 4x that error."""
    assert not got.isnan().any(), f"{what}: NaN in the output (an unwritten element?)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    e = err(got, ref64)
    if got.dtype in LOW:
        tol = max(2 * err(ref_same_dtype, ref64), 0.5 * torch.finfo(got.dtype).eps * scale)
    elif got.dtype == torch.float32:
        tol = max(1e-5 * scale, 4 * err(ref_same_dtype, ref64) if grad else 0.0)
    else:
        tol = 1e-12 * scale
    assert e <= tol, f"{what}: max error {e:.3g} > tolerance {tol:.3g} ({got.dtype})"


def ref_lse(q, k, window, scale):
    """float64 log-sum-exp of each query's window logits, for checking the saved lse."""
    n, hq, wq, nh, d = q.shape
    kh, kw = window
    kwin = k.double().reshape(n, hq, kh, wq, kw, nh, d).permute(0, 1, 3, 5, 2, 4, 6)  # (N, Hq, Wq, nh, kh, kw, d)
    kwin = kwin.reshape(n, hq, wq, nh, kh * kw, d)                                     # (N, Hq, Wq, nh, T, d)
    return (torch.einsum("nijhd,nijhtd->nijht", q.double(), kwin) * scale).logsumexp(-1)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
                   st.integers(1, 3), st.one_of(st.integers(1, 20), st.sampled_from([32, 33, 64])))
layouts = st.tuples(*[st.sampled_from(["contiguous", "strided", "permuted"])] * 3)
scales = st.one_of(st.none(), st.floats(0.05, 2.0))


# --- the reference itself ------------------------------------------------------------------
@examples
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3),
                       st.integers(1, 3), st.integers(1, 2), st.integers(1, 5)),
       seed=st.integers(0, 2**16), scale=scales)
def test_naive_loops_check_the_reference(shape, seed, scale):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, torch.float64, seed=seed)
    want = reference.window_attn_pool_naive(q, k, v, (kh, kw), scale)
    torch.testing.assert_close(reference.window_attn_pool(q, k, v, (kh, kw), scale), want, rtol=1e-12, atol=1e-12)


# --- forward ------------------------------------------------------------------------------
@needs_kernel
@ON_DEVICES
@examples
@given(shape=shapes, dtype=st.sampled_from(DTYPES), lay=layouts, seed=st.integers(0, 2**16), scale=scales,
       naive=st.booleans())
def test_forward_matches_reference(poison, device, shape, dtype, lay, seed, scale, naive):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, device, seed=seed, layouts=lay)
    ref64 = reference.window_attn_pool(q.double(), k.double(), v.double(), (kh, kw), scale)
    ref_dt = reference.window_attn_pool(q, k, v, (kh, kw), scale)
    sc = d ** -0.5 if scale is None else scale
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    out, lse = op(q, k, v, kh, kw, sc)
    assert out.dtype == dtype and out.shape == q.shape
    assert_accurate(out, ref_dt, ref64, "naive" if naive else "fast")
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse(q, k, (kh, kw), sc), rtol=1e-5, atol=1e-5)
    if not naive:  # the public front runs the same kernel
        assert torch.equal(ops.window_attn_pool(q, k, v, (kh, kw), scale), out)


@needs_kernel
def test_backend_is_the_cpu_kernel():
    assert ops.backend("window_attn_pool", "cpu") == "cpu kernel"


# --- backward -----------------------------------------------------------------------------
def grads(fn, q, k, v, g):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), g)


@needs_kernel
@ON_DEVICES
@examples
@given(shape=shapes, dtype=st.sampled_from(DTYPES), lay=layouts, seed=st.integers(0, 2**16),
       scale=scales, naive=st.booleans())
def test_gradients_match_reference_autograd(poison, device, shape, dtype, lay, seed, scale, naive):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, device, seed=seed, layouts=lay)
    g = make(q.shape, dtype, device, torch.Generator().manual_seed(seed + 1), lay[0])
    sc = d ** -0.5 if scale is None else scale
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    got = grads(lambda a, b, c: op(a, b, c, kh, kw, sc)[0], q, k, v, g)
    ref_fn = lambda a, b, c: reference.window_attn_pool(a, b, c, (kh, kw), scale)  # noqa: E731
    want64 = grads(ref_fn, q.double(), k.double(), v.double(), g.double())
    want_dt = grads(ref_fn, q, k, v, g)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want_dt, want64):
        assert a.shape == c.shape and a.dtype == dtype
        assert_accurate(a, b, c, name, grad=True)


@needs_kernel
@pytest.mark.parametrize("naive", [False, True])
def test_gradcheck_float64(naive):
    q, k, v = problem(2, 2, 3, 2, 3, 2, 5, torch.float64, seed=3, layouts=("permuted", "strided", "contiguous"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if naive:
        fn = lambda a, b, c: torch.ops.minihires.window_attn_pool_naive(a, b, c, 2, 3, 0.7)[0]  # noqa: E731
    else:
        fn = lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 3), 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# --- torch.library integration ------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("name", ["window_attn_pool", "window_attn_pool_naive"])
def test_opcheck(name):
    q, k, v = problem(2, 2, 2, 2, 1, 2, 6, torch.float32, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(getattr(torch.ops.minihires, name).default, (q, k, v, 2, 1, 0.4))
    out, lse = getattr(torch.ops.minihires, name)(q, k, v, 2, 1, 0.4)
    bwd = getattr(torch.ops.minihires, name.replace("pool", "pool_backward"))
    torch.library.opcheck(bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse, 2, 1, 0.4))


@needs_kernel
def test_torch_compile_fullgraph():
    q, k, v = problem(2, 3, 2, 2, 2, 2, 8, torch.float32, seed=9)

    def loss(q, k, v):
        return ops.window_attn_pool(q, k, v, 2).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    want = grads(loss, q, k, v, torch.tensor(1.0))
    got = grads(compiled, q, k, v, torch.tensor(1.0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- properties ---------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_1x1_returns_v(poison, dtype):
    q, k, v = problem(2, 3, 4, 1, 1, 2, 7, dtype, seed=1)
    assert torch.equal(ops.window_attn_pool(q, k, v, 1), v)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_keys_give_the_window_mean(poison, dtype):
    n, hq, wq, kh, kw, nh, d = 2, 2, 3, 3, 2, 2, 5
    q, _, v = problem(n, hq, wq, kh, kw, nh, d, dtype, seed=2)
    one_key = torch.randn(n, hq, 1, wq, 1, nh, d, dtype=dtype)                       # (N, Hq, 1, Wq, 1, nh, d)
    k = one_key.expand(n, hq, kh, wq, kw, nh, d).reshape(n, hq * kh, wq * kw, nh, d)  # same key in each window
    mean = v.reshape(n, hq, kh, wq, kw, nh, d).mean(dim=(2, 4))                        # (N, Hq, Wq, nh, d)
    torch.testing.assert_close(ops.window_attn_pool(q, k, v, (kh, kw)), mean)


@needs_kernel
def test_each_query_sees_only_its_window(poison):
    """Changing the keys/values of one window changes that window's output only."""
    q, k, v = problem(1, 3, 3, 2, 2, 1, 4, torch.float64, seed=4)
    out = ops.window_attn_pool(q, k, v, 2)
    k2, v2 = k.clone(), v.clone()
    k2[0, 2:4, 4:6] += 1.0   # window (1, 2)
    v2[0, 2:4, 4:6] -= 3.0
    changed = (ops.window_attn_pool(q, k2, v2, 2) != out).any(dim=(-1, -2))[0]  # (Hq, Wq)
    want = torch.zeros(3, 3, dtype=torch.bool)
    want[1, 2] = True
    assert torch.equal(changed, want)


@needs_kernel
def test_empty_batch(poison):
    q, k, v = problem(0, 3, 2, 2, 2, 2, 4, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ops.window_attn_pool(q, k, v, 2)
    assert out.shape == (0, 3, 2, 2, 4)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# --- bad input ----------------------------------------------------------------------------
BAD = [
    ("does not tile", lambda q, k, v: (q, k[:, :-1], v[:, :-1], 2)),
    ("heads, d", lambda q, k, v: (q[..., :1, :], k, v, 2)),
    ("heads, d", lambda q, k, v: (q[..., :3], k, v, 2)),
    ("same shape", lambda q, k, v: (q, k, v[..., :3], 2)),
    ("share a dtype", lambda q, k, v: (q.double(), k, v, 2)),
    ("float32, float64", lambda q, k, v: (q.int(), k.int(), v.int(), 2)),
    ("must be positive", lambda q, k, v: (q, k, v, 0)),
    ("must be positive", lambda q, k, v: (q, k, v, (2, -1))),
    ("window must be", lambda q, k, v: (q, k, v, 2.0)),
    ("window must be", lambda q, k, v: (q, k, v, (2, 2, 1))),
    ("window must be", lambda q, k, v: (q, k, v, (2,))),
    ("one device", lambda q, k, v: (q.to("meta"), k, v, 2)),
    ("N = ", lambda q, k, v: (q[:1], k, v, 2)),
    ("must be [N, H, W", lambda q, k, v: (q[0], k, v, 2)),
]


@pytest.mark.parametrize("match, mutate", BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_clear_error(match, mutate):
    q, k, v = problem(2, 2, 2, 2, 2, 2, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=re.escape(match)):
        ops.window_attn_pool(*mutate(q, k, v))


def test_bad_scale_and_empty_head():
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        ops.window_attn_pool(q, k, v, 2, scale=float("nan"))
    with pytest.raises(ValueError, match="head size d"):
        ops.window_attn_pool(q[..., :0], k[..., :0], v[..., :0], 2)


@needs_kernel
def test_cpp_checks_guard_direct_calls():
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    with pytest.raises(RuntimeError, match="does not tile"):
        torch.ops.minihires.window_attn_pool(q, k, v, 3, 2, 0.5)
    with pytest.raises(RuntimeError, match="must be positive"):
        torch.ops.minihires.window_attn_pool_naive(q, k, v, 0, 2, 0.5)
    out, lse = torch.ops.minihires.window_attn_pool(q, k, v, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.minihires.window_attn_pool_backward(out, q, k, v, lse.double(), 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="grad_out must have"):
        torch.ops.minihires.window_attn_pool_backward(out[:, :1], q, k, v, lse, 2, 2, 0.5)


# --- CUDA (run by tests/gpu/run.sh on a machine with a GPU) -------------------------------
CUDA_CASES = [  # (n, hq, wq, kh, kw, nh, d): vector path, scalar path (odd d), v1 fallback, >16 keys
    (2, 3, 2, 2, 2, 4, 64), (1, 2, 3, 2, 3, 3, 33), (1, 2, 2, 1, 2, 2, 8), (1, 1, 2, 2, 2, 1, 520),
    (1, 2, 1, 5, 4, 2, 16), (3, 4, 4, 3, 3, 2, 1),
]


@pytest.mark.cuda(fwd_op, bwd_op)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_v1_v2_and_reference_agree(poison, case, dtype):
    n, hq, wq, kh, kw, nh, d = case
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, "cuda", seed=sum(case), layouts=("contiguous", "permuted",
                                                                                        "contiguous"))
    g = torch.randn_like(q)
    ref_fn = lambda a, b, c: reference.window_attn_pool(a, b, c, (kh, kw))  # noqa: E731
    want64 = grads(ref_fn, q.double(), k.double(), v.double(), g.double())
    want_dt = grads(ref_fn, q, k, v, g)
    out64 = ref_fn(q.double(), k.double(), v.double())
    for name in ("window_attn_pool", "window_attn_pool_naive"):
        fn = lambda a, b, c: getattr(torch.ops.minihires, name)(a, b, c, kh, kw, d ** -0.5)[0]  # noqa: E731
        assert_accurate(fn(q, k, v), ref_fn(q, k, v), out64, f"{name} forward")
        for gname, a, b, c in zip(("dq", "dk", "dv"), grads(fn, q, k, v, g), want_dt, want64):
            assert_accurate(a, b, c, f"{name} {gname}", grad=True)


@pytest.mark.cuda(fwd_op, bwd_op)
def test_cuda_misaligned_pointers_take_the_scalar_path(poison):
    """A storage offset of one element breaks 16-byte alignment: v2 must fall back to scalar loads."""
    base = torch.randn(1 + 2 * 2 * 2 * 64, device="cuda")
    k = base[1:].view(1, 2, 2, 2, 64)                                  # (1, 2, 2, 2, 64), contiguous, offset 4 B
    q = torch.randn(1, 1, 1, 2, 64, device="cuda")
    v, g = torch.randn_like(k), torch.randn_like(q)
    torch.testing.assert_close(ops.window_attn_pool(q, k, v, 2), reference.window_attn_pool(q, k, v, 2))
    for a, b in zip(grads(lambda *x: ops.window_attn_pool(*x, 2), q, k, v, g),
                    grads(lambda *x: reference.window_attn_pool(*x, 2), q, k, v, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda(fwd_op, bwd_op)
def test_cuda_gradcheck_and_opcheck():
    q, k, v = problem(2, 2, 3, 2, 3, 2, 5, torch.float64, "cuda", seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 3)), (q, k, v))
    torch.library.opcheck(torch.ops.minihires.window_attn_pool.default, (q.float(), k.float(), v.float(), 2, 3, 0.5))


@pytest.mark.cuda(fwd_op, bwd_op)
def test_cuda_matches_cpu_kernel():
    q, k, v = problem(2, 4, 4, 2, 2, 4, 64, torch.float32, seed=12)
    out_cpu = ops.window_attn_pool(q, k, v, 2)
    torch.testing.assert_close(ops.window_attn_pool(q.cuda(), k.cuda(), v.cuda(), 2).cpu(), out_cpu,
                               rtol=1e-5, atol=1e-6)
