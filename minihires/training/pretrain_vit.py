"""Pretraining the tiny ViT before the main job, as CLIP is pretrained before LLaVA meets it.

The continuity task's boards (`data.entities.draw_board`) are hard to learn from the
language model's loss alone: nothing tells the encoder which pixels to compare. So the
encoder can be taught first, with a linear head and labelled entities, in two stages:

    slices   single S x S slices holding one whole entity, off the seams: a board (whole or
             broken) or a pattern entity (its class); the head reads the mean patch token.
    canvas   from the slices stage's file: whole canvases with one entity anywhere, encoded
             the way the variant that will load the file encodes them: R x C slices each
             alone, with SliceRestore adapters after `sra_layers` (none, or some blocks), or
             (`whole`) one pass over the uncut canvas. The head reads the mean of the tokens
             that cover the entity, wherever the slices put them.

Labels: 0 whole board, 1 broken board, 2 + the index of a pattern class in `CLASSES`. Half
the samples are boards and half pattern entities, in any colour. Held-out accuracy on boards
is split by where they sit: a seam-cut board is what fragmentation costs the encoder.

`train --vit-init FILE` (and `ablate --vit-init / --sra-vit-init`) start the main job's
vision tower from a saved file (`load_vit`). Every arm of the canvas stage starts from the
same file and, at one seed, sees the same samples in the same order (one rng); they differ in
the encoder's view of the canvas and, as building the adapters first draws from torch's
generator, in the linear head's random start.

Choices that are ours, not the paper's: the two stages and the linear heads; AdamW at lr 1e-3;
64 slices or 32 canvases a step; 512 held-out samples from seed + 99. The ViT is built as the
tiny preset builds it (so a seed gives the preset's initial weights); in the slices stage its
adapters have nothing to do (one slice has no neighbours) and stay out of the saved file.
Three files made this way ship with the package (`minihires.training.encoders`).
"""
from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from pathlib import Path

import torch

from minihires.data import entities
from minihires.data.entitygrid import EntityGridConfig
from minihires.model import slicing
from minihires.model.config import tiny
from minihires.model.vit import VisionTransformer

STAGES = ("slices", "canvas")
CFG = EntityGridConfig(tasks=("continuity",))        # the default 2 x 2 canvas, 16-px boards
OFF_SEAM = ("top left", "top right", "bottom left", "bottom right")
LABELS = ("whole board", "broken board", *entities.CLASSES)


def _entity(rng, cfg: EntityGridConfig, position: str | None = None
            ) -> tuple[entities.Entity, int]:
    """One entity and its label: a pattern entity (jittered as in EntityGrid-QA) or a board,
    each half the time, in any colour; at `position`, or (None) at an off-seam position drawn
    after the entity's kind and colour."""
    names, colours = list(entities.CLASSES), list(entities.COLOURS)
    if rng.random() < 0.5:
        cls = rng.choice(names)
        j = cfg.jitter
        e = entities.place(cls, rng.choice(colours), position or rng.choice(OFF_SEAM), cfg,
                           rng.randint(-j, j), rng.randint(-j, j))
        return e, 2 + names.index(cls)
    broken = rng.random() < 0.5
    colour = rng.choice(colours)
    return entities.place_board(colour, position or rng.choice(OFF_SEAM), cfg, broken, rng), \
        int(broken)


def slice_batch(rng, n: int, cfg: EntityGridConfig = CFG):
    """n slices, each the one that holds a whole off-seam entity:
    (x [n, 3, S, S], label [n], on_seam [n] (all False), None)."""
    xs, ys = [], []
    for _ in range(n):
        e, label = _entity(rng, cfg)
        k = 1 + (e.bbox[1] // cfg.slice_size) * cfg.cols + e.bbox[0] // cfg.slice_size
        x = slicing.crops(entities.render([e], cfg), (cfg.rows, cfg.cols), cfg.slice_size,
                          0.0, "box")                                   # (1 + R*C, 3, S, S)
        xs.append(x[k])
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys), torch.zeros(n, dtype=torch.bool), None


def canvas_batch(rng, n: int, cfg: EntityGridConfig = CFG, patch: int = tiny().vit.patch_size):
    """n canvases with one entity at any position: (x [n*R*C, 3, S, S], the slices of each
    canvas in raster order; label [n]; on_seam [n]; mask [n, R*g, C*g], the patch tokens the
    entity touches, g = S // patch)."""
    R, C, S = cfg.rows, cfg.cols, cfg.slice_size
    g = S // patch
    xs, ys, seams, masks = [], [], [], []
    for _ in range(n):
        e, label = _entity(rng, cfg, rng.choice(list(entities.POSITIONS)))
        x = slicing.crops(entities.render([e], cfg), (R, C), S, 0.0, "box")   # (1 + R*C, 3, S, S)
        xs.append(x[1:])                                                    # drop the thumbnail
        x0, y0, x1, y1 = e.bbox
        mask = torch.zeros(R * g, C * g, dtype=torch.bool)
        mask[y0 // patch:(y1 - 1) // patch + 1, x0 // patch:(x1 - 1) // patch + 1] = True
        ys.append(label)
        seams.append(e.on_seam)
        masks.append(mask)
    return torch.cat(xs), torch.tensor(ys), torch.tensor(seams), torch.stack(masks)


def canvas_tokens(vit: VisionTransformer, x: torch.Tensor, grid: tuple[int, int],
                  whole: bool = False) -> torch.Tensor:
    """Slices [n*R*C, 3, S, S] -> their patch tokens laid out on the canvas [n, R*g, C*g, D]:
    each slice encoded alone (with SRA across each canvas's grid, if the ViT has adapters), or
    (`whole`) one pass over the stitched canvas, nothing cut."""
    R, C = grid
    S = x.shape[-1]
    n = x.shape[0] // (R * C)
    if whole:
        x = x.reshape(n, R, C, 3, S, S).permute(0, 3, 1, 4, 2, 5)        # (n, 3, R, S, C, S)
        t = vit(x.reshape(n, 3, R * S, C * S))[:, 1:]                   # (n, R*g*C*g, D)
        return t.reshape(n, R * S // vit.cfg.patch_size, C * S // vit.cfg.patch_size, -1)
    t = vit(x, [(R, C)] * n)[:, 1:]                                     # (n*R*C, g*g, D)
    g = int(t.shape[1] ** 0.5)
    t = t.reshape(n, R, C, g, g, -1).permute(0, 1, 3, 2, 4, 5)          # (n, R, g, C, g, D)
    return t.reshape(n, R * g, C * g, -1)                               # (n, R*g, C*g, D)


def build_vit(sra_layers: tuple[int, ...] | None = None, init: dict | None = None
              ) -> VisionTransformer:
    """The tiny ViT with adapters after `sra_layers` (None: the preset's), from the weights
    `init` (adapters it lacks stay new) or fresh; ValueError if `init` does not fit."""
    m = tiny()
    if sra_layers is not None:
        m.vit.sra_layers = tuple(sra_layers)
    vit = VisionTransformer(m.vit, m.sra)
    if init is not None:
        fit(vit, init, f"the tiny ViT with SRA after {list(m.vit.sra_layers) or 'no block'}")
    return vit


def fit(vit: torch.nn.Module, weights: dict, what: str) -> None:
    """Load ViT `weights` into `vit`: every encoder weight must be there, and adapters only
    if `vit` has the same ones (adapters missing from the file stay new); else ValueError."""
    own = vit.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith("sra.")]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        said = [f"{name} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("wrong shape", shapes)) if keys]
        raise ValueError(f"these weights do not fit {what}: " + "; ".join(said))
    vit.load_state_dict(weights, strict=False)


class BadWeights(ValueError):
    """A weights file that cannot start this ViT: unreadable, not ours, or not the one a run
    recorded. The commands report it as one line, also when a run meets it mid-way."""


def _weights(data: bytes, path) -> dict:
    """The state dict in the bytes of a file that `pretrain-vit --out` wrote; BadWeights
    naming the file unless they hold a dict of finite, dense, floating-point tensors."""
    try:
        weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:                  # pickle, zip and torch errors all mean "not ours"
        raise BadWeights(f"{path} is not a weights file that torch.save wrote "
                         f"({type(e).__name__})") from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise BadWeights(f"{path} holds no ViT weights (a dict of tensors)")
    for k, v in weights.items():
        kind = ("meta" if v.is_meta else str(v.layout) if v.layout != torch.strided
                else None if v.is_floating_point() else str(v.dtype))
        if kind is not None:
            raise BadWeights(f"{path}: {k} is a {kind} tensor, not dense floating-point weights")
        if not torch.isfinite(v).all():
            raise BadWeights(f"{path}: {k} holds NaN or infinite values")
    return weights


def read_weights(path) -> dict:
    """The state dict in a file that `pretrain-vit --out` wrote (`_weights`); OSError when the
    file cannot be read (FileNotFoundError, IsADirectoryError, ...)."""
    return _weights(Path(path).read_bytes(), path)


def file_sha256(path) -> str:
    """The hex SHA-256 of a file: what a run records of the weights it started from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_vit(vit: torch.nn.Module, path, sha256: str | None = None) -> None:
    """Start `vit` from the file at `path`; with `sha256`, the bytes read must be the ones a
    run recorded. Every failure is a BadWeights that names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadWeights(f"cannot read {path}: {e.strerror or e}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BadWeights(f"{path} has changed since the run recorded it (sha256 "
                         f"{sha256[:16]}..., now {hashlib.sha256(data).hexdigest()[:16]}...); "
                         "put the run's file back")
    try:
        fit(vit, _weights(data, path), f"this model's ViT ({path})")
    except BadWeights:
        raise
    except ValueError as e:                 # fit: the weights do not fit this ViT
        raise BadWeights(str(e)) from None


def pretrain(stage: str, steps: int, sra_layers: tuple[int, ...] = (), init: dict | None = None,
             whole: bool = False, seed: int = 0, batch: int | None = None, every: int = 100,
             progress: Callable[[str], None] = print):
    """Train the ViT and a linear head for `steps` steps of `stage`;
    -> (vit, [(step, board acc on-seam, off-seam, class acc)]), accuracies in [0, 1], nan
    where the held-out set has none (the slices stage has no seam-cut boards)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "slices" and (sra_layers or whole):
        raise ValueError("the slices stage sees one slice at a time: no adapters, no whole canvas")
    if whole and sra_layers:
        raise ValueError("a whole-canvas pass cuts nothing, so it takes no adapters")
    torch.manual_seed(seed)
    vit = build_vit(None if stage == "slices" else sra_layers, init)
    head = torch.nn.Linear(vit.cfg.hidden_size, len(LABELS))
    opt = torch.optim.AdamW([p for p in [*vit.parameters(), *head.parameters()]
                             if p.requires_grad], lr=1e-3)
    grid = (CFG.rows, CFG.cols)
    draw = slice_batch if stage == "slices" else canvas_batch
    batch = batch or (64 if stage == "slices" else 32)
    rng = random.Random(seed)
    tx, ty, tseam, tmask = draw(random.Random(seed + 99), 512)
    tboard = ty < 2

    def logits(x, mask):
        if mask is None:                                     # the mean patch token of a slice
            return head(vit(x, None)[:, 1:].mean(1))
        t = canvas_tokens(vit, x, grid, whole)                          # (n, R*g, C*g, D)
        w = mask.unsqueeze(-1).to(t.dtype)                              # (n, R*g, C*g, 1)
        return head((t * w).sum((1, 2)) / w.sum((1, 2)))                # mean of the entity's

    def held_out() -> list[float]:
        with torch.no_grad():
            if tmask is None:
                pred = logits(tx, None).argmax(1)
            else:                                           # 64 canvases at a time
                k = grid[0] * grid[1]
                pred = torch.cat([logits(tx[i * k:(i + 64) * k], tmask[i:i + 64]).argmax(1)
                                  for i in range(0, len(ty), 64)])
        ok = pred == ty
        return [ok[sel].float().mean().item() if sel.any() else float("nan")
                for sel in (tboard & tseam, tboard & ~tseam, ~tboard)]

    curve = []
    for step in range(1, steps + 1):
        x, y, _, mask = draw(rng, batch)
        loss = torch.nn.functional.cross_entropy(logits(x, mask), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}: training "
                                     "diverged (or started from weights that make it so)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps and not all(torch.isfinite(q).all() for q in vit.parameters()):
            raise FloatingPointError(f"the weights are not finite after step {step}: training "
                                     "diverged")
        if step % every == 0 or step == steps:
            acc = held_out()
            curve.append((step, *acc))
            boards = (f"boards {100 * acc[1]:.1f}%" if stage == "slices" else
                      f"boards on-seam {100 * acc[0]:.1f}%, off-seam {100 * acc[1]:.1f}%")
            progress(f"step {step}/{steps}: loss {loss.item():.3f}, held-out {boards}, "
                     f"classes {100 * acc[2]:.1f}%")
    return vit, curve


def saved_weights(vit: VisionTransformer, stage: str) -> dict:
    """What `pretrain-vit --out` writes: the ViT's state dict, without the unused adapter of
    the slices stage."""
    return {k: v for k, v in vit.state_dict().items()
            if stage != "slices" or not k.startswith("sra.")}
