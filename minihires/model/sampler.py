"""Token compression per crop: the Self-Mining sampler (SMS) and plain average pooling.

A crop's g x g tokens are too many for the LLM once an image has several slices. SMS
shrinks them by a window k per side, keeping each output token tied to its place:

    q0 = avgpool_k(x)                                  queries mined from the tokens themselves
    Q  = Wq LN(q0);  K, V = Wk LN(x), Wv LN(x)         split into heads
    y  = q0 + Wo window_attn_pool(Q, K, V, k)          query (i, j) attends only to window (i, j)
    y  = y + MLP(LN(y))                                [B, g/k, g/k, D]

Wo and the MLP's output layer are zero-initialised (ours), so at init SMS equals
average pooling exactly and learns what to add to it. The windowed attention is
`minihires.ops.window_attn_pool` (a compiled kernel when built, else the PyTorch
reference); `use_kernel = False` forces the reference, for checking one against the other.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihires import ops
from minihires.model.config import COMPRESSIONS, SMSConfig
from minihires.ops import reference


def avg_pool_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, g, g, D] -> [B, g/k, g/k, D]: mean over each k x k window."""
    if x.dim() != 4:
        raise ValueError(f"x must be crop tokens [B, h, w, D], got shape {tuple(x.shape)}")
    B, H, W, D = x.shape
    if H % k or W % k:
        raise ValueError(f"token grid {H} x {W} is not a multiple of the window {k}")
    x = x.reshape(B, H // k, k, W // k, k, D)                           # (B, H/k, k, W/k, k, D)
    return x.mean(dim=(2, 4))                                           # (B, H/k, W/k, D)


class AvgPoolSampler(nn.Module):
    """compression="avg": average pooling only (the ablation's baseline for SMS)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_tokens(x, self.window)


class SelfMiningSampler(nn.Module):
    """x [B, g, g, D] -> [B, g/k, g/k, D] with window attention pooling."""

    def __init__(self, dim: int, cfg: SMSConfig, eps: float = 1e-5):
        super().__init__()
        cfg.validate(width=dim)
        self.window = cfg.window
        self.n_head = cfg.num_heads
        self.use_kernel = True
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        hidden = int(dim * cfg.mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.fc1):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        for m in (self.o_proj, self.fc2):                               # SMS == avg pool at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, nh = self.window, self.n_head
        q0 = avg_pool_tokens(x, k)                                      # (B, H/k, W/k, D)
        B, Hq, Wq, D = q0.shape
        H, W = Hq * k, Wq * k
        q = self.q_proj(self.norm_q(q0)).view(B, Hq, Wq, nh, D // nh)   # (B, H/k, W/k, nh, hs)
        xn = self.norm_kv(x)
        kk = self.k_proj(xn).view(B, H, W, nh, D // nh)                 # (B, H, W, nh, hs)
        vv = self.v_proj(xn).view(B, H, W, nh, D // nh)                 # (B, H, W, nh, hs)
        pool = ops.window_attn_pool if self.use_kernel else reference.window_attn_pool
        a = pool(q, kk, vv, (k, k))                                     # (B, H/k, W/k, nh, hs)
        y = q0 + self.o_proj(a.reshape(B, Hq, Wq, D))                   # (B, H/k, W/k, D)
        return y + self.fc2(F.gelu(self.fc1(self.norm_mlp(y))))


def build_sampler(compression: str, dim: int, cfg: SMSConfig) -> nn.Module:
    """The compressor for ModelConfig.compression, one of COMPRESSIONS: "sms", "avg" or
    "none" (identity)."""
    if compression == "sms":
        return SelfMiningSampler(dim, cfg)
    if compression == "avg":
        return AvgPoolSampler(cfg.window)
    if compression == "none":
        return nn.Identity()
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
