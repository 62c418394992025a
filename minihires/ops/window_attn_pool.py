"""window_attn_pool: the kernel front (checks, backend choice, fake kernels, autograd).

The core of the Self-Mining sampler: each pooled query (n, i, j, head) attends with
softmax(scale * q.k) only to the kh*kw keys of its own window (i, j), so compression keeps
position. q [N, Hq, Wq, nh, d], k, v [N, Hq*kh, Wq*kw, nh, d] -> [N, Hq, Wq, nh, d].

Kernels: csrc/cpu/window_attn_pool.cpp, csrc/cuda/window_attn_pool.cu (index math in
csrc/kernels/window_attn_pool.h). The forward op also returns lse [N, Hq, Wq, nh], the
log-sum-exp of each query's logits (float32; float64 for float64 input): the backward
recomputes the logits from q and k and gets the probabilities as exp(s - lse), so it saves
q, k, v and lse, not the probabilities and not the output (ours, see the C++ comments).
Reference twin: minihires.ops.reference.window_attn_pool.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from . import reference
from ._extension import LOADED, use_kernel
from .checks import check_window_attn_pool, normalize_window



def _check_args(q, k, v, window, scale) -> tuple[int, int, float]:
    """Validated (kh, kw, scale); ValueError / TypeError naming the bad argument."""
    seq = isinstance(window, (tuple, list, torch.Size))
    items = tuple(window) if seq else (window,)
    if any(isinstance(x, bool) or not hasattr(type(x), "__index__") for x in items):
        raise TypeError(f"window must be an int or a (kh, kw) pair of ints, got {window!r}")
    items = tuple(operator.index(x) for x in items)  # numpy / torch integers -> int
    kh, kw = normalize_window(items if seq else items[0])
    check_window_attn_pool(q, k, v, (kh, kw))
    d = q.shape[-1]
    if d <= 0:
        raise ValueError(f"q must have head size d > 0, got shape {tuple(q.shape)}")
    if scale is None:
        return kh, kw, d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return kh, kw, float(scale)


def window_attn_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | Sequence[int],
                     scale: float | None = None) -> torch.Tensor:
    """Each query (n, i, j, head) attends only to the kh*kw keys of window (i, j).

    q [N, Hq, Wq, nh, d], k, v [N, Hq*kh, Wq*kw, nh, d], window (kh, kw) or an int (square);
    scale defaults to d^-0.5. Returns [N, Hq, Wq, nh, d] in q's dtype.
    """
    kh, kw, scale = _check_args(q, k, v, window, scale)
    if use_kernel("window_attn_pool", q):
        out, _ = torch.ops.minihires.window_attn_pool(q, k, v, kh, kw, scale)
        return out
    return reference.window_attn_pool(q, k, v, (kh, kw), scale)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if LOADED and hasattr(torch.ops.minihires, "window_attn_pool"):
    # Fake (meta) kernels: shapes and dtypes only, the same checks as the C++ ones.
    @torch.library.register_fake("minihires::window_attn_pool")
    def _forward_fake(q, k, v, kh, kw, scale):
        check_window_attn_pool(q, k, v, normalize_window((kh, kw)))
        return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=_acc_dtype(q.dtype))

    @torch.library.register_fake("minihires::window_attn_pool_backward")
    def _backward_fake(grad_out, q, k, v, lse, kh, kw, scale):
        check_window_attn_pool(q, k, v, normalize_window((kh, kw)))
        if grad_out.shape != q.shape:
            raise ValueError(f"grad_out must have q's shape {tuple(q.shape)}, got {tuple(grad_out.shape)}")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_fake("minihires::window_attn_pool_naive")(_forward_fake)
    torch.library.register_fake("minihires::window_attn_pool_backward_naive")(_backward_fake)

    # Autograd: the backward kernel, fed what the forward saved (q, k, v and lse).
    def _make_autograd(backward_op):
        def setup_context(ctx, inputs, output):
            q, k, v, kh, kw, scale = inputs
            _, lse = output
            ctx.mark_non_differentiable(lse)  # a by-product for the backward, not a result
            ctx.save_for_backward(q, k, v, lse)
            ctx.kh, ctx.kw, ctx.scale = kh, kw, scale

        def backward(ctx, grad_out, _grad_lse):
            q, k, v, lse = ctx.saved_tensors
            if grad_out is None:
                return None, None, None, None, None, None
            dq, dk, dv = backward_op(grad_out, q, k, v, lse, ctx.kh, ctx.kw, ctx.scale)
            return dq, dk, dv, None, None, None

        return backward, setup_context

    for _fwd, _bwd in (("window_attn_pool", torch.ops.minihires.window_attn_pool_backward),
                       ("window_attn_pool_naive", torch.ops.minihires.window_attn_pool_backward_naive)):
        _backward, _setup = _make_autograd(_bwd)
        torch.library.register_autograd(f"minihires::{_fwd}", _backward, setup_context=_setup)
