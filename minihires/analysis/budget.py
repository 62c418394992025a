"""`python -m minihires tokens`: what an image of a given size costs, method by method.

For each image size and three ways of feeding it to the same ViT + LLM (a preset):

    LLaVA-1.5     the image squashed to one S x S crop, all g*g patch tokens (576 at 336 px)
    LLaVA-NeXT    "anyres": a base crop + the crops of the best grid-pinpoint resolution,
                  padding tokens removed, one newline token per token row
    HiRes-LLaVA   as configured: thumbnail + r x c slices (`slicing.plan`), SRA inside the
                  ViT, the sampler's compressed tokens, newlines after rows of slices

we count the visual tokens per image, the ViT FLOPs (plus SliceRestore), the connector
FLOPs (sampler + projector), the LLM prefill FLOPs for the visual tokens plus a text prompt
of `PROMPT_TOKENS` tokens (ours: a LLaVA-1.5-style question), and the KV cache that prefill
leaves (float16). HiRes-LLaVA's token count comes from `slicing.num_image_tokens`, the
one function the model itself asserts, never a second formula.

FLOPs are 2 x the multiply-adds of matrix products and convolutions, the convention of
torch.utils.flop_counter (the tests check these formulas against it); norms, softmax and
pooling are not counted. Attention is counted dense (T x T): a causal kernel skips about
half of the LLM's attention products. LLaVA-NeXT's pinpoints are its documented list
[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] (height, width), scaled by
S / 336 for presets whose crop is not 336 px (ours, so the tiny preset has a table too).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from minihires.model import HiResLLaVA, slicing, uses_slices
from minihires.model.config import LlamaConfig, ModelConfig, ViTConfig

PROMPT_TOKENS = 64            # text tokens around the image (system prompt + question)
KV_BYTES = 2                  # float16 keys and values
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (h, w)


# ----------------------------------------------------------------------------- token counts

def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's rule: the (h, w) pinpoint that keeps the most of the image's pixels
    after an aspect-preserving downscale, ties to the least wasted area."""
    best, best_eff, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def llava_next_tokens(width: int, height: int, vit: ViTConfig) -> tuple[int, tuple[int, int]]:
    """(visual tokens, grid) for LLaVA-NeXT: base g*g + unpadded grid tokens + one newline per
    token row of the grid canvas (as transformers' LlavaNext processor counts them)."""
    S, g = vit.image_size, vit.grid
    pins = [[h * S // 336, w * S // 336] for h, w in NEXT_PINPOINTS]
    bh, bw = select_best_resolution(height, width, pins)
    rows, cols = bh // S, bw // S
    cur_h, cur_w = rows * g, cols * g                        # token canvas before unpadding
    if width / height > cur_w / cur_h:                       # wider: padding rows top and bottom
        cur_h -= 2 * ((cur_h - int(round(height * cur_w / width, 7))) // 2)
    else:                                                    # taller: padding columns
        cur_w -= 2 * ((cur_w - int(round(width * cur_h / height, 7))) // 2)
    return g * g + cur_h * cur_w + cur_h, (rows, cols)


def hires_tokens(width: int, height: int, cfg: ModelConfig) -> tuple[int, tuple[int, int]]:
    """(visual tokens, grid) for HiRes-LLaVA as configured (`slicing.plan`, `num_image_tokens`)."""
    grid = slicing.layout_grid(width, height, cfg)
    return slicing.num_image_tokens(grid, cfg), grid


# ----------------------------------------------------------------------------- FLOPs

def vit_flops(vit: ViTConfig, crops: int, grid: tuple[int, int] = (1, 1)) -> int:
    """Patch embedding + the blocks up to `feature_layer`, on `crops` inputs of r*S x c*S
    pixels each (grid (r, c); (1, 1): ordinary S x S crops). Attention grows with the
    square of the tokens, so one pass over a 2 x 2 canvas costs more than four slices."""
    D, I, P, g = vit.hidden_size, vit.intermediate_size, vit.patch_size, vit.grid
    n = grid[0] * grid[1] * g * g                            # patches per input
    T = 1 + n                                                # tokens per input, CLS included
    blocks = vit.feature_layer % (vit.num_hidden_layers + 1)
    patch = 2 * n * D * 3 * P * P
    block = 8 * T * D * D + 4 * T * T * D + 4 * T * D * I    # q,k,v,o + QK^T, AV + MLP
    return crops * (patch + blocks * block)


def sra_flops(cfg: ModelConfig, grid: tuple[int, int]) -> int:
    """SliceRestore adapters on one image's slice canvas (r*g x c*g tokens)."""
    if not cfg.sra_runs:
        return 0
    D, g, s, k = cfg.vit.hidden_size, cfg.vit.grid, cfg.sra.downsample, cfg.sra.kernel_size
    Hc, Wc = grid[0] * g, grid[1] * g
    Tc, Tp = Hc * Wc, math.ceil(Hc / s) * math.ceil(Wc / s)  # canvas, pooled tokens
    one = (2 * Tc * D * k * k                                # depthwise conv (local)
           + 8 * Tp * D * D + 4 * Tp * Tp * D               # qkv, out_proj, attention (global)
           + 2 * Tc * D * D)                                 # output Linear
    return len(cfg.vit.sra_layers) * one


def connector_flops(cfg: ModelConfig, crops: int, tokens_in: int) -> int:
    """Sampler on each crop (hires) + projector on the `tokens_in` tokens it receives."""
    Dv, Dl = cfg.vit.hidden_size, cfg.llama.hidden_size
    sampler = 0
    if cfg.mode == "hires" and cfg.compression == "sms":
        g, k = cfg.vit.grid, cfg.sms.window
        Tq, Tk, hidden = (g // k) ** 2, g * g, int(Dv * cfg.sms.mlp_ratio)
        sampler = crops * (4 * Tq * Dv * Dv + 4 * Tk * Dv * Dv   # q, o; k, v projections
                           + 4 * Tq * k * k * Dv                 # window attention
                           + 4 * Tq * Dv * hidden)               # MLP
    return sampler + tokens_in * (2 * Dv * Dl + 2 * Dl * Dl)


def llm_prefill_flops(llama: LlamaConfig, T: int) -> int:
    """One forward over T tokens: attention and MLP of every layer, and the LM head."""
    D, I, V = llama.hidden_size, llama.intermediate_size, llama.vocab_size
    kv = llama.num_key_value_heads * (D // llama.num_attention_heads)
    layer = 2 * T * D * (2 * D + 2 * kv) + 4 * T * T * D + 6 * T * D * I
    return llama.num_hidden_layers * layer + 2 * T * D * V


def kv_cache_bytes(llama: LlamaConfig, T: int, bytes_per: int = KV_BYTES) -> int:
    """Keys and values of every layer, plus each block's inputs when the LLM has a token shift
    (the cache keeps them to shift the next token)."""
    head_dim = llama.hidden_size // llama.num_attention_heads
    per_token = 2 * llama.num_key_value_heads * head_dim                # K and V, one layer
    if llama.token_shift:
        per_token += llama.hidden_size                                  # the block's input
    return llama.num_hidden_layers * per_token * T * bytes_per


# ----------------------------------------------------------------------------- the table

@dataclasses.dataclass
class Row:
    image: str
    method: str
    grid: str
    crops: int
    tokens: int
    vit: int
    connector: int
    llm: int
    kv: int


def budget(width: int, height: int, cfg: ModelConfig, prompt: int = PROMPT_TOKENS) -> list[Row]:
    """The three methods' rows for one image size."""
    g, llama, image = cfg.vit.grid, cfg.llama, f"{width}x{height}"

    def row(method, grid, crops, tokens, vit, conn):
        T = tokens + prompt
        return Row(image, method, grid, crops, tokens, vit, conn,
                   llm_prefill_flops(llama, T), kv_cache_bytes(llama, T))

    base = dataclasses.replace(cfg, mode="llava15")
    n15 = slicing.num_image_tokens((1, 1), base)
    rows = [row("LLaVA-1.5", "-", 1, n15, vit_flops(cfg.vit, 1), connector_flops(base, 1, n15))]
    n_next, (r, c) = llava_next_tokens(width, height, cfg.vit)
    crops = 1 + r * c
    rows.append(row("LLaVA-NeXT", f"{r}x{c}", crops, n_next, vit_flops(cfg.vit, crops),
                    connector_flops(base, crops, crops * g * g)))     # projected before unpad
    n_hi, grid = hires_tokens(width, height, cfg)
    crops = 1 + grid[0] * grid[1] if uses_slices(cfg) else 1
    h = slicing.tokens_per_side(cfg)
    vit = (vit_flops(cfg.vit, 1) + vit_flops(cfg.vit, 1, grid) if cfg.whole_canvas
           else vit_flops(cfg.vit, crops) + sra_flops(cfg, grid))  # thumbnail + one canvas pass
    rows.append(row("HiRes-LLaVA", f"{grid[0]}x{grid[1]}", crops, n_hi, vit,
                    connector_flops(cfg, crops, crops * h * h)))
    return rows


def si(n: float, unit: str = "") -> str:
    """1.83e12 -> '1.83 T': three significant digits and an SI prefix."""
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def count_str(n: int) -> str:
    """Parameter counts as usually published: 6.74 B, 303.5 M, 21.6 K."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{2 if suffix == 'B' else 1}f} {suffix}"
    return str(n)


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def format_table(rows: list[Row]) -> str:
    head = ("image", "method", "grid", "crops", "visual tokens", "ViT FLOPs", "connector FLOPs",
            "LLM prefill FLOPs", "KV cache")
    body = [(r.image, r.method, r.grid, str(r.crops), str(r.tokens), si(r.vit), si(r.connector),
             si(r.llm), mib(r.kv)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# ----------------------------------------------------------------------------- parameters

PUBLISHED = {"vision tower": "0.3B (CLIP ViT-L/14)", "language model": "6.7B (LLaMA-7B)"}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = HiResLLaVA(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sra = count(model.vision_tower.sra)
    parts = {"vision tower": count(model.vision_tower) - sra, "SliceRestore adapters": sra,
             "sampler": count(model.sampler) if hasattr(model, "sampler") else 0,
             "projector + newline": count(model.multi_modal_projector)
             + sum(getattr(model, n).numel() for n in HiResLLaVA.IMAGE_EMBEDDINGS
                   if hasattr(model, n)),
             "language model": count(model.language_model)}
    parts["total"] = count(model)
    return parts


def format_params(cfg: ModelConfig, name: str) -> str:
    parts = parameter_counts(cfg)
    lines = [f"parameters of preset {name} (meta device):"]
    for part, n in parts.items():
        pub = f"   published: {PUBLISHED[part]}" if name == "paper" and part in PUBLISHED else ""
        lines.append(f"  {part:<22} {count_str(n):>8}{pub}")
    return "\n".join(lines)
