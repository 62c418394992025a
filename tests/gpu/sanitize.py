"""Every minihires kernel once, small, for compute-sanitizer (tests/gpu/run.sh runs it under
memcheck, racecheck and synccheck).

    python tests/gpu/sanitize.py [--device cuda|cpu]

Runs stitch and split (v1; v2 at each vector width, aligned and misaligned; a batch of more
images than one launch takes) and window_attn_pool forward and backward (v1 and every v2
variant: vector and scalar lanes, 1, 2 and 4 chunks per lane, more than 16 keys, misaligned
pointers), in every dtype, and checks each result against the reference (computed on the
CPU, so the sanitizer has only the kernels to watch), so a wrong answer fails the run as well
as a memory error. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so
that every tensor is its own allocation and memcheck sees an access past a tensor's end.
--device cpu runs the same calls on the CPU kernels (the dry run checks the script so).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from minihires.ops import reference as ref

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# head sizes d reaching every window_attn_pool variant (csrc/cuda/window_attn_pool.cu, plan_for):
# scalar lanes (odd d) with 1, 2, 4 chunks; 16-byte vectors with 1, 2, 4 chunks; rows too long (v1)
HEAD_SIZES = {torch.float32: (7, 33, 97, 64, 256, 512, 129), torch.float64: (33, 64, 128, 256, 258),
              torch.float16: (5, 41, 97, 64, 512, 520), torch.bfloat16: (5, 41, 97, 64, 512, 520)}


def misaligned_like(x: torch.Tensor) -> torch.Tensor:
    """A copy of x whose data starts one element into its allocation (breaks 16-byte alignment)."""
    base = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = base[1:].view(x.shape)
    y.copy_(x)
    return y


def check(got, want, what, rtol):
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    tol = rtol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"{what}: max error {err:.3g} > {tol:.3g}")


def run_stitch(device: str) -> int:
    m = torch.ops.minihires
    launches = 0
    few = [(1, 1), (2, 3), (3, 2)]
    many = [(1 + i % 3, 1 + i % 2) for i in range(300)]  # more images than one launch holds
    for dtype in DTYPES:
        for grids, C in ((few, 1), (few, 5), (few, 64), (many, 3)):
            flat = [v for g in grids for v in g]
            n = sum(r * c for r, c in grids)
            x = torch.randn(n, 2, 3, C, device=device).to(dtype)
            want = ref.stitch(x.cpu(), grids)
            for src in (x, misaligned_like(x)):
                for stitch_op, split_op in ((m.stitch, m.split), (m.stitch_naive, m.split_naive)):
                    packed = stitch_op(src, flat)
                    back = split_op(misaligned_like(packed), flat, 2, 3)
                    if not (torch.equal(packed.cpu(), want) and torch.equal(back.cpu(), x.cpu())):
                        raise AssertionError(f"stitch/split differ from the reference ({dtype}, C = {C})")
                    launches += 2
    return launches


def run_window(device: str) -> int:
    m = torch.ops.minihires
    launches = 0
    for dtype in DTYPES:
        rtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
        cases = [(d, (2, 1), False) for d in HEAD_SIZES[dtype]] + [(16, (5, 4), False), (64, (2, 2), True)]
        for d, (kh, kw), misaligned in cases:  # (5, 4): 20 keys, more than the backward caches
            gen = torch.Generator().manual_seed(d)
            q = torch.randn(1, 2, 2, 2, d, generator=gen).to(device=device, dtype=dtype)
            k = torch.randn(1, 2 * kh, 2 * kw, 2, d, generator=gen).to(device=device, dtype=dtype)
            v = torch.randn(1, 2 * kh, 2 * kw, 2, d, generator=gen).to(device=device, dtype=dtype)
            g = torch.randn(1, 2, 2, 2, d, generator=gen).to(device=device, dtype=dtype)
            if misaligned:
                q, k, v, g = (misaligned_like(t) for t in (q, k, v, g))
            q64, k64, v64 = (t.cpu().double().requires_grad_() for t in (q, k, v))
            out64 = ref.window_attn_pool(q64, k64, v64, (kh, kw))
            grads64 = torch.autograd.grad(out64, (q64, k64, v64), g.cpu().double())
            for fwd, bwd in ((m.window_attn_pool, m.window_attn_pool_backward),
                             (m.window_attn_pool_naive, m.window_attn_pool_backward_naive)):
                out, lse = fwd(q, k, v, kh, kw, d ** -0.5)
                grads = bwd(g, q, k, v, lse, kh, kw, d ** -0.5)
                what = f"{fwd._qualified_op_name}({dtype}, d = {d}, window {kh}x{kw})"
                check(out, out64, what + " out", rtol)
                for name, a, b in zip(("dq", "dk", "dv"), grads, grads64):
                    check(a, b, f"{what} {name}", rtol)
                launches += 2
    return launches


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    launches = run_stitch(args.device) + run_window(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize: {launches} minihires kernel calls on {args.device}, every result as the reference's, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
