"""Several questions in one sequence that share the image prompt but do not see each other.

Training asks `turns` questions about each image. As one LLaVA conversation, turn k reads every
earlier question and answer, and those text tokens name the very colours, classes and places
a later question asks about, so the model can learn to answer from the text instead of the
image (our reading; docs/results.md measures it). Packed this way instead, each question
reads the image prompt and itself only, exactly what a single test question sees, while the
image is still encoded once:

    tokens    <s> USER : _ [image tokens] | \\n Q1 ASSISTANT: A1 </s> | \\n Q2 ASSISTANT: A2 </s> |
    segment    0   0   0 0  0 ... 0       |  1  1 ...            1    |  2  2 ...            2    |
    position   0   1   2 3  4 ...  P-1    |  P  P+1 ...               |  P  P+1 ...               |

segment_ids [B, S]: 0 for the shared prefix (it must come first), k >= 1 for question k, each
segment contiguous. A token sees the earlier tokens of the prefix and of its own segment; its
position counts on from the prefix's length P as if its question followed the prefix alone.
One segment after the prefix gives plain causal attention and positions 0..S-1. Ours: the paper
trains on LLaVA conversations.
"""
from __future__ import annotations

import torch


def check(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None,
          shape: tuple[int, int]) -> None:
    """Shape (`shape`: the tokens' (B, S), already attention_mask's), dtype and layout checks,
    so a malformed packing fails loudly, not silently."""
    if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"segment_ids must be (B, T) = {tuple(shape)}, "
                         f"got {tuple(getattr(segment_ids, 'shape', ()))}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
    real = torch.ones_like(segment_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    seg = segment_ids.masked_fill(~real, 0)
    if bool((seg < 0).any()):
        raise ValueError("segment_ids must be >= 0 (0 = the shared prefix)")
    # over real tokens, ids never decrease: the prefix first, each question contiguous
    running = torch.cummax(seg, dim=1).values                          # (B, S)
    if bool(((seg != running) & real).any()):
        raise ValueError("segment_ids must not decrease along a row: the shared prefix "
                         "(segment 0) first, then each question's tokens contiguous")


def positions(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, S] rotary positions: the prefix counts 0, 1, ...; each question restarts after it."""
    real = torch.ones_like(segment_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    seg = segment_ids.masked_fill(~real, -1)                           # padding: no segment
    n_seg = int(seg.max()) + 1
    onehot = (seg[..., None] == torch.arange(n_seg, device=seg.device)).long()  # (B, S, n_seg)
    within = (onehot.cumsum(1) * onehot).sum(-1) - 1                   # (B, S) index in own segment
    prefix_len = onehot[..., 0].sum(1, keepdim=True)                   # (B, 1) P
    pos = within + torch.where(seg > 0, prefix_len, 0)                 # (B, S)
    return pos.clamp(min=0)                                            # padding -> 0


def allowed(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, S, S] boolean SDPA mask: query i sees key j iff j <= i, key j is not padding, and
    key j is in the prefix or in i's segment. Every query sees itself (no empty row)."""
    B, S = segment_ids.shape
    idx = torch.arange(S, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]                              # (S, S)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]          # (B, S, S)
    prefix = (segment_ids == 0)[:, None, :]                            # (B, 1, S) keys
    ok = causal[None] & (same | prefix)                                # (B, S, S)
    if attention_mask is not None:
        ok = ok & attention_mask.bool()[:, None, :]
    ok = ok | torch.eye(S, dtype=torch.bool, device=segment_ids.device)[None]
    return ok[:, None]                                                 # (B, 1, S, S)
