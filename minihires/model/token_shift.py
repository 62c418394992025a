"""Token shift: before every decoder block, each token adds a per-channel weighted copy of the
block inputs of its n nearest visible predecessors (ours, on the tiny preset only).

    x'_t = x_t + sum_{d=1..n} w_d * x_{pred_d(t)}        w: [n, D] per block, pred_d below

Why. A position question ("Where are the red stripes? ASSISTANT:") is answered at the last
token, three tokens after the description it asks about. A plain decoder must first learn a
head that brings the description to the answer position and then a head that matches it
against the image tokens, and neither helps the loss until both exist, so a small model
trained from scratch waits at chance for a long time (docs/history.md). With the shift, the
answer position's own input already holds the description, so one head's match is enough. The same idea appears as RWKV's token shift,
the short causal convolutions of H3 and Based, and Canon layers; this is a depthwise causal
convolution of kernel n + 1 whose centre tap is the residual itself. A pretrained LLaMA learned
its copying heads long ago, so the `paper` preset and loaded weights keep it off (n = 0).

pred_d(t) is the token that the attention mask lets t see whose rotary position is t's minus d
(none if no such token). Defining it by positions, not by index in the tensor, makes a packed
question (`minihires.model.shared_prefix`) look back into the image prompt rather than into
the previous question, makes a left-padded row give the row's own result, and lets the KV
cache continue a sequence exactly (it keeps every block's inputs and the positions).
"""
from __future__ import annotations

import torch
import torch.nn as nn

INIT_STD = 0.3   # the taps' initial spread (ours; docs/design.md)


def predecessors(positions: torch.Tensor, key_positions: torch.Tensor,
                 visible: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Where each query's d-th predecessor sits among the keys, d = 1..n.

    positions (B, T) of the queries; key_positions (B, S) of every key (cached ones first);
    visible (B or 1, T, S) bool, what the attention mask lets each query see.
    -> n pairs (index (B, T) into S, found (B, T) bool); index is 0 where nothing is found.
    """
    gap = positions[:, :, None] - key_positions[:, None, :]          # (B, T, S)
    out = []
    for d in range(1, n + 1):
        hit = (gap == d) & visible                                   # (B, T, S) at most one True
        out.append((hit.int().argmax(-1), hit.any(-1)))              # (B, T), (B, T)
    return out


class TokenShift(nn.Module):
    """x + sum_d weight[d-1] * keys[predecessor d]: the shift in front of one block."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * INIT_STD)   # (n, D) one tap per distance

    def forward(self, x: torch.Tensor, keys: torch.Tensor,
                preds: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x (B, T, D) this block's inputs; keys (B, S, D) the cached inputs then x; preds from
        `predecessors`. -> (B, T, D)."""
        D = x.shape[-1]
        for w, (index, found) in zip(self.weight, preds):
            prev = keys.gather(1, index[..., None].expand(-1, -1, D))  # (B, T, D)
            x = x + w * prev.masked_fill(~found[..., None], 0)
        return x
