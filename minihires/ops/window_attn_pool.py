"""window_attn_pool: the kernel front (checks, backend choice, fake kernels, autograd).

The core of the Self-Mining sampler: each pooled query (n, i, j, head) attends with
softmax(scale * q.k) only to the kh*kw keys of its own window (i, j), so compression keeps
position. q [N, Hq, Wq, nh, d], k, v [N, Hq*kh, Wq*kw, nh, d] -> [N, Hq, Wq, nh, d].

Kernels: csrc/cpu/window_attn_pool.cpp, csrc/cuda/window_attn_pool.cu (explained in
csrc/README.md). The forward op also returns lse [N, Hq, Wq, nh], the log-sum-exp of each
query's logits (float32; float64 for float64 input): the backward recomputes the logits
from q and k and gets the probabilities as exp(s - lse), so it saves q, k, v and lse, not
the probabilities and not the output. Second derivatives (create_graph=True) go through the
reference's differentiable math instead of the backward kernel (see `_make_autograd`).
Reference twin: minihires.ops.reference.window_attn_pool.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from ._extension import LOADED, use_kernel
from .checks import (
    check_window_attn_pool,
    check_window_attn_pool_backward,
    normalize_window,
    resolve_scale,
)


def _check_args(q, k, v, window, scale) -> tuple[int, int, float]:
    """Validated (kh, kw, scale); ValueError / TypeError naming the bad argument."""
    kh, kw = normalize_window(window)
    check_window_attn_pool(q, k, v, (kh, kw))
    return kh, kw, resolve_scale(scale, q.shape[-1])


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
    # Fake (meta) kernels: shapes and dtypes only, after the checks of the C++ kernels
    # (csrc/checks.h), so both accept and reject the same input.
    @torch.library.register_fake("minihires::window_attn_pool")
    def _forward_fake(q, k, v, kh, kw, scale):
        check_window_attn_pool(q, k, v, normalize_window((kh, kw)))
        resolve_scale(scale, q.shape[-1])
        return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=_acc_dtype(q.dtype))

    @torch.library.register_fake("minihires::window_attn_pool_backward")
    def _backward_fake(grad_out, q, k, v, lse, kh, kw, scale):
        check_window_attn_pool(q, k, v, normalize_window((kh, kw)))
        resolve_scale(scale, q.shape[-1])
        check_window_attn_pool_backward(grad_out, q, lse)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_fake("minihires::window_attn_pool_naive")(_forward_fake)
    torch.library.register_fake("minihires::window_attn_pool_backward_naive")(_backward_fake)

    def _differentiable_grads(grad_out, q, k, v, kh, kw, scale):
        """(dq, dk, dv) as a graph autograd can differentiate again: the reference's math,
        differentiated with create_graph=True. Used only when the backward itself is being
        recorded (torch.autograd.grad(..., create_graph=True)), for second derivatives."""
        leaves = [x if x.requires_grad else x.detach().requires_grad_() for x in (q, k, v)]
        with torch.enable_grad():
            out = reference.window_attn_pool(*leaves, (kh, kw), scale)
            return torch.autograd.grad(out, leaves, grad_out, create_graph=True)

    # Autograd: the backward kernel, fed what the forward saved (q, k, v and lse). The
    # backward kernel is not itself differentiable, so when autograd records the backward
    # (create_graph=True: grad mode is on inside it), the gradients come from the reference's
    # math instead, which autograd can differentiate a second time.
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
            if torch.is_grad_enabled():
                dq, dk, dv = _differentiable_grads(grad_out, q, k, v, ctx.kh, ctx.kw, ctx.scale)
            else:
                dq, dk, dv = backward_op(grad_out, q, k, v, lse, ctx.kh, ctx.kw, ctx.scale)
            return dq, dk, dv, None, None, None

        return backward, setup_context

    def _backward_not_differentiable(ctx, *grads):
        raise RuntimeError("minihires::window_attn_pool_backward is not differentiable: for second derivatives, "
                           "differentiate ops.window_attn_pool with torch.autograd.grad(..., create_graph=True), "
                           "which records differentiable math instead of this kernel")

    for _suffix in ("", "_naive"):
        _backward, _setup = _make_autograd(getattr(torch.ops.minihires, "window_attn_pool_backward" + _suffix))
        torch.library.register_autograd(f"minihires::window_attn_pool{_suffix}", _backward, setup_context=_setup)
        # A direct call of the backward op on inputs that need gradients: differentiating
        # through it raises the error above, instead of torch's silent zeros.
        torch.library.register_autograd(f"minihires::window_attn_pool_backward{_suffix}",
                                        _backward_not_differentiable, setup_context=lambda ctx, inputs, output: None)
