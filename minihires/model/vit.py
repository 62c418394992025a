"""A CLIP-style vision transformer, with SliceRestore adapters between its blocks.

    pixels [N, 3, S, S] -> patches [N, g*g, D] (+ class token, + position embeddings)
        -> pre_layrnorm -> blocks (pre-LN attention, pre-LN quick-GELU MLP)
        -> hidden state of `feature_layer` [N, 1 + g*g, D] (token 0 = CLS)

Module and parameter names mirror Hugging Face `CLIPVisionModel`, so real weights load
with a prefix map (HF `vision_model.embeddings.*` -> `embeddings.*`,
`vision_model.pre_layrnorm.*` -> `pre_layrnorm.*`, `vision_model.encoder.layers.{i}.*`
-> `layers.{i}.*`, `vision_model.post_layernorm.*` -> `post_layernorm.*`; HF's
`embeddings.position_ids` buffer is not kept). `post_layernorm` exists for loading only:
the features are a hidden state, as in LLaVA. It and the blocks after `feature_layer` are
frozen (requires_grad False): they are never on the path to the features.

Hidden states are indexed as in HF: 0 = embeddings after pre_layrnorm, i = output of
block i-1, -1 = last block, -2 = penultimate. Only the blocks up to `feature_layer` run.

The SliceRestore adapters (ours: where they sit) run after the blocks listed in
`sra_layers`, on the slice crops only: the thumbnail crops and every CLS token pass
through unchanged. Which crops are slices is told by `grids` (see `forward`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihires.model.config import SRAConfig, ViTConfig
from minihires.model.slice_restore import SliceRestore
from minihires.ops.checks import normalize_grids


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class VisionEmbeddings(nn.Module):
    """Patchify (conv without bias), prepend the class token, add position embeddings."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.position_embedding = nn.Embedding(self.grid * self.grid + 1, D)

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings [1 + gh*gw, D]; bicubic-interpolated if (gh, gw) != (g, g)."""
        pos = self.position_embedding.weight                           # (1 + g*g, D)
        g, D = self.grid, pos.shape[1]
        if (gh, gw) == (g, g):
            return pos
        patch = pos[1:].reshape(1, g, g, D).permute(0, 3, 1, 2)      # (1, D, g, g)
        patch = F.interpolate(patch.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, D)  # (gh*gw, D)
        return torch.cat([pos[:1], patch], dim=0)                      # (1 + gh*gw, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                               # (N, gh*gw, D)
        cls = self.class_embedding.to(x.dtype).expand(N, 1, -1)        # (N, 1, D)
        x = torch.cat([cls, x], dim=1)                                 # (N, 1 + gh*gw, D)
        return x + self.positions(gh, gw)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (CLIP's layout)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        nh = self.n_head
        q = self.q_proj(x).view(N, T, nh, D // nh).transpose(1, 2)    # (N, nh, T, hs)
        k = self.k_proj(x).view(N, T, nh, D // nh).transpose(1, 2)    # (N, nh, T, hs)
        v = self.v_proj(x).view(N, T, nh, D // nh).transpose(1, 2)    # (N, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)                    # (N, nh, T, hs)
        y = y.transpose(1, 2).reshape(N, T, D)                         # (N, T, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """CLIP vision tower; `sra` (a SRAConfig) adds SliceRestore adapters after `cfg.sra_layers`."""

    def __init__(self, cfg: ViTConfig, sra: SRAConfig | None = None):
        super().__init__()
        cfg.validate()
        L, D = cfg.num_hidden_layers, cfg.hidden_size
        self.cfg = cfg
        self.feature_index = cfg.feature_index              # hidden-state index, 0..L
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(L)])
        self.post_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)   # loading only
        self.apply(_init_weights)
        # never on the feature path: frozen, so DistributedDataParallel sees no unused parameters
        for m in [self.post_layernorm, *self.layers[self.feature_index:]]:
            m.requires_grad_(False)
        # adapters after the init above, so their zero-initialised output layers stay zero
        self.sra = nn.ModuleDict()
        if sra is not None:
            for i in cfg.sra_layers:                      # each feeds the features (validate)
                self.sra[str(i)] = SliceRestore(D, sra, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, grids: Sequence[Sequence[int]] | None = None,
                      num_blocks: int | None = None) -> list[torch.Tensor]:
        """HF-style hidden states [N, 1 + gh*gw, D], indices 0..num_blocks (default: all blocks).

        grids: the slicing grids (r_i, c_i) of the LAST sum(r_i*c_i) crops, which are
        slices in image order, row-major; the crops before them (thumbnails) are never
        touched by the adapters. None or []: no crop is a slice, adapters skipped.
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else None
            raise ValueError(f"pixel_values must be a [N, 3, H, W] tensor, got shape {shape}")
        H, W = pixel_values.shape[-2:]
        P = self.cfg.patch_size
        if H % P or W % P:
            raise ValueError(f"pixel_values is {H} x {W}: not a multiple of patch_size {P}")
        gh, gw = H // P, W // P
        grids = normalize_grids(grids) if grids else []
        N, n_slices = pixel_values.shape[0], sum(r * c for r, c in grids)
        if n_slices > N:
            raise ValueError(f"grids {grids} hold {n_slices} slices but pixel_values has "
                             f"only {N} crops")
        n_other = N - n_slices
        num_blocks = len(self.layers) if num_blocks is None else num_blocks

        x = self.pre_layrnorm(self.embeddings(pixel_values))            # (N, 1 + gh*gw, D)
        states = [x]
        for i in range(num_blocks):
            x = self.layers[i](x)
            if str(i) in self.sra and n_slices:
                D = x.shape[-1]
                s = x[n_other:, 1:].reshape(n_slices, gh, gw, D)        # (Ns, gh, gw, D)
                s = self.sra[str(i)](s, grids).reshape(n_slices, gh * gw, D)
                s = torch.cat([x[n_other:, :1], s], dim=1)              # (Ns, 1 + gh*gw, D)
                x = torch.cat([x[:n_other], s], dim=0)                  # (N, 1 + gh*gw, D)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor,
                grids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """The hidden state of `feature_layer`: [N, 1 + gh*gw, D], token 0 = CLS."""
        return self.hidden_states(pixel_values, grids, num_blocks=self.feature_index)[-1]


def _init_weights(m: nn.Module) -> None:
    """Small normal init (std 0.02) for training from scratch; LayerNorms at 1/0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
