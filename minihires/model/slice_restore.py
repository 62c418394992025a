"""SliceRestore adapter (SRA): let slice tokens see across the seams between slices.

Inside the ViT each slice is encoded alone, so a token next to a seam never sees the
token on the other side. After chosen blocks the adapter puts every image's slice tokens
back on one canvas, mixes them there, and splits them back into slices:

    F      = stitch(slice tokens)                               [r*g, c*g, D] per image
    local  = depthwise conv k x k (F)                           neighbours across seams
    global = upsample_bilinear(MHSA(LN(avgpool_s(F))))          whole-image context
    x_slices += split(Linear(local + global))                   Linear zero-initialised

The output Linear starts at zero, so the adapter is the identity at init and a
pretrained ViT keeps its behaviour until the adapter learns something.

Choices that are ours (the paper does not give them):
- Canvases whose side is not a multiple of s are pooled with ceil_mode=True: the last
  window is partial and averages only the tokens it covers (no padding counted).
- Upsampling is bilinear with align_corners=False back to the exact canvas size.
- Conv and attention use biases; the LayerNorm is only on the global branch, as drawn.
- Batches mixing grids: canvases of the same shape are processed together, one group per
  distinct grid (the ragged stitch/split kernels handle the packing).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihires import ops
from minihires.model.config import SRAConfig
from minihires.ops.checks import normalize_grids


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over a token sequence [B, T, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, "SRAConfig.validate checks the heads divide the width"
        self.n_head = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        nh = self.n_head
        qkv = self.qkv(x).view(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])          # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)                              # (B, T, D)
        return self.out_proj(y)


class SliceRestore(nn.Module):
    """x_slices [Ns, h, w, D] + grids [(r_i, c_i)] -> restored slices, same shape."""

    def __init__(self, dim: int, cfg: SRAConfig, eps: float = 1e-5):
        super().__init__()
        cfg.validate(width=dim)
        self.downsample = cfg.downsample
        self.local = nn.Conv2d(dim, dim, cfg.kernel_size, padding=cfg.kernel_size // 2,
                               groups=dim)                              # depthwise
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, cfg.num_heads)
        self.proj = nn.Linear(dim, dim)
        for m in (self.local, self.attn.qkv, self.attn.out_proj):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.proj.weight)                                # identity at init
        nn.init.zeros_(self.proj.bias)

    def fuse(self, canvas: torch.Tensor) -> torch.Tensor:
        """local + global for same-shaped canvases [G, D, Hc, Wc] -> [G, Hc, Wc, D]."""
        G, D, Hc, Wc = canvas.shape
        s = self.downsample
        local = self.local(canvas)                                      # (G, D, Hc, Wc)
        pooled = F.avg_pool2d(canvas, s, ceil_mode=True)                # (G, D, hp, wp)
        hp, wp = pooled.shape[-2:]
        t = pooled.flatten(2).transpose(1, 2)                           # (G, hp*wp, D)
        t = self.attn(self.norm(t))                                     # (G, hp*wp, D)
        t = t.transpose(1, 2).reshape(G, D, hp, wp)                     # (G, D, hp, wp)
        glob = F.interpolate(t, size=(Hc, Wc), mode="bilinear", align_corners=False)  # (G, D, Hc, Wc)
        return (local + glob).permute(0, 2, 3, 1)                       # (G, Hc, Wc, D)

    def forward(self, x: torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
        grids = normalize_grids(grids)
        if x.dim() != 4:
            raise ValueError(f"x must be slice tokens [Ns, h, w, D], got shape {tuple(x.shape)}")
        Ns, h, w, D = x.shape
        if Ns == 0:
            return x
        packed = ops.stitch(x, grids)                                   # (sum r*h*c*w, D)
        views = ops.canvases(packed, grids, h, w)                       # [(r*h, c*w, D)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, rc in enumerate(grids):
            groups.setdefault(rc, []).append(i)
        fused: list[torch.Tensor | None] = [None] * len(grids)
        for idx in groups.values():
            canvas = torch.stack([views[i] for i in idx]).permute(0, 3, 1, 2)  # (G, D, r*h, c*w)
            out = self.fuse(canvas)                                     # (G, r*h, c*w, D)
            for j, i in enumerate(idx):
                fused[i] = out[j].reshape(-1, D)                        # (r*h*c*w, D)
        delta = self.proj(torch.cat(fused, dim=0))                      # (sum r*h*c*w, D)
        return x + ops.split(delta, grids, h, w)                        # (Ns, h, w, D)
