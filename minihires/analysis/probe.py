"""Where the LLM looks when it answers: attention from the answer position to each entity.

A question about one of two entities ("Where are the red stripes?") is answered most directly
by an attention head that, at the position predicting the first answer token, prefers the
visual tokens of the entity asked about over those of the other one. `entity_attention`
measures that on the samples it is given (`eval --attention`: the fixed test split): for
every layer and head, the mean attention mass on tokens that cover only the target entity, and
on tokens that cover only the other entity (docs/results.md quotes it per run). Equal
masses mean no head tells the two apart at that position; a model can still route the
choice through other positions and layers, which this probe does not see.

The attention weights are recomputed from each layer's own q/k projections in a forward
pre-hook (the model itself runs fused scaled_dot_product_attention and keeps no weights),
so nothing in `minihires.model.llama` changes for the probe.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from minihires.data import entitygrid
from minihires.model import HiResLLaVA, prepare, slicing, uses_slices
from minihires.model.llama import Attention, apply_rotary


def token_boxes(cfg, grid: tuple[int, int], width: int, height: int) -> list:
    """The canvas box (x0, y0, x1, y1) of every visual token in the model's layout order
    (`HiResLLaVA.encode_images`): thumbnail h x h, newline, then per slice row its slices'
    h x h tokens left to right and a newline. Newlines are None."""
    if cfg.mode != "hires":
        raise ValueError("token_boxes follows the 'hires' layout; this model is in "
                         f"{cfg.mode!r} mode")
    if cfg.overlap:
        raise ValueError(f"token_boxes assumes slices that tile the image; overlap is {cfg.overlap}")
    h = slicing.tokens_per_side(cfg)
    r, c = grid
    cell = lambda x0, y0, w, hh: [(x0 + j * w / h, y0 + i * hh / h,      # noqa: E731
                                   x0 + (j + 1) * w / h, y0 + (i + 1) * hh / h)
                                  for i in range(h) for j in range(h)]
    boxes = cell(0, 0, width, height) + [None]                # thumbnail covers the canvas
    if uses_slices(cfg):
        sw, sh = width / c, height / r
        for row in range(r):
            for col in range(c):
                boxes += cell(col * sw, row * sh, sw, sh)
            boxes.append(None)
    assert len(boxes) == slicing.num_image_tokens(grid, cfg), "boxes != layout"
    return boxes


def last_row_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """[B, nh, T]: the attention weights of the last position of a fresh causal sequence,
    recomputed from the layer's q/k projections (x is the layer's input, after its norm)."""
    B, T, _ = x.shape
    hs, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_head
    q = attn.q_proj(x[:, -1:]).view(B, 1, nh, hs).transpose(1, 2)      # (B, nh, 1, hs)
    k = attn.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)             # (B, nkv, T, hs)
    q = apply_rotary(q, cos[:, -1:], sin[:, -1:])
    k = apply_rotary(k, cos, sin).repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
    # the last position may attend to every earlier one: no mask needed
    return ((q @ k.transpose(-1, -2)) * hs ** -0.5).softmax(-1)[:, :, 0]   # (B, nh, T)


def _covers(box, bbox) -> bool:
    return box is not None and box[0] < bbox[2] and box[2] > bbox[0] \
        and box[1] < bbox[3] and box[3] > bbox[1]


@torch.no_grad()
def entity_attention(model: HiResLLaVA, tokenizer, samples: Sequence[entitygrid.Sample]
                     ) -> torch.Tensor:
    """[layers, heads, 2]: mean attention mass from the answer position on visual tokens that
    cover only the target entity (0) and only the other entity (1), over two-entity samples."""
    picked = [s for s in samples if len(s.entities) == 2 and len(s.targets) == 1]
    if not picked:
        raise ValueError("entity_attention needs samples with two entities and one target "
                         "(recognition or position questions)")
    rows: list[torch.Tensor] = []

    def grab(attn: Attention, args):
        x, cos, sin = args[0], args[1], args[2]                  # (1, T, D), (1, T, hs) x 2
        rows.append(last_row_attention(attn, x, cos, sin)[0])     # (nh, T)

    model.eval()
    device = next(model.parameters()).device
    hooks = [m.register_forward_pre_hook(grab) for m in model.language_model.modules()
             if isinstance(m, Attention)]
    total = None
    try:
        for s in picked:
            rows.clear()
            batch = prepare([s.image], [s.question], tokenizer, model.cfg).to(device)
            model(**batch.kwargs())
            ids = batch.input_ids[0].tolist()
            start = ids.index(tokenizer.image_id)                # first visual token
            boxes = token_boxes(model.cfg, batch.grids[0], s.image.width, s.image.height)
            t = s.entities[s.targets[0]].bbox
            o = s.entities[1 - s.targets[0]].bbox
            only_t = torch.tensor([_covers(b, t) and not _covers(b, o) for b in boxes])
            only_o = torch.tensor([_covers(b, o) and not _covers(b, t) for b in boxes])
            a = torch.stack(rows)[:, :, start:start + len(boxes)].float().cpu()  # (L, nh, n_img)
            mass = torch.stack([a[..., only_t].sum(-1), a[..., only_o].sum(-1)], -1)
            total = mass if total is None else total + mass
    finally:
        for hk in hooks:
            hk.remove()
    return total / len(picked)


def entity_attention_table(mass: torch.Tensor, title: str) -> str:
    """`entity_attention` as text, one line per layer and head."""
    lines = [title, f"  {'':<10}{'target':>9}{'other':>9}{'ratio':>8}"]
    for layer in range(mass.shape[0]):
        for head in range(mass.shape[1]):
            t, o = mass[layer, head].tolist()
            lines.append(f"  L{layer} H{head:<6}{t:>9.3f}{o:>9.3f}{t / max(o, 1e-9):>8.2f}")
    return "\n".join(lines)
