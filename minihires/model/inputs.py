"""What the model eats: an image -> crops and grid, (ids, labels) -> a padded `Batch`.

    image_inputs(image, cfg)   one image -> crops [1 + r*c, 3, S, S] (thumbnail, then slices
                               row-major; the thumbnail alone when slices are off) and (r, c)
    collate(examples, pad_id)  [(crops, grid, ids, labels[, segments])] -> Batch
    prepare(images, questions, tokenizer, cfg[, answers])   both, via the chat template
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from minihires.model import slicing
from minihires.model.config import ModelConfig

IGNORE = -100


@dataclass
class Batch:
    """What `HiResLLaVA.forward` consumes (`prepare`/`collate` build it).

    input_ids, attention_mask, labels: [B, T], right-padded, one <image> per row;
    labels = IGNORE (-100) except on answer tokens (same positions as input_ids);
    pixel_values: every image's crops one after the other [sum_i n_i, 3, S, S], n_i = 1 + r_i*c_i
    (thumbnail, then slices row-major), or n_i = 1 (thumbnail) when slices are off;
    grids: each image's (r_i, c_i);
    segment_ids: [B, T] or None: several questions packed after the shared image prompt
    (`minihires.model.shared_prefix`; 0 = the prompt through <image>, k = question k).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    pixel_values: torch.Tensor
    grids: list[tuple[int, int]]
    segment_ids: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels),
                     mv(self.pixel_values), list(self.grids), mv(self.segment_ids))

    def kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    labels=self.labels, pixel_values=self.pixel_values, grids=self.grids,
                    segment_ids=self.segment_ids)


def uses_slices(cfg: ModelConfig) -> bool:
    return cfg.mode == "hires" and cfg.use_slices


def image_inputs(image, cfg: ModelConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image (path or PIL) -> (crops [n, 3, S, S], grid). Cache these to save CPU time."""
    img = slicing.load_image(image)
    S = cfg.vit.image_size
    grid = slicing.plan(img.width, img.height, S, cfg.max_slices)       # the canvas
    # (crops, the grid of slices that the layout sees: more windows than `grid` with overlap)
    return (slicing.crops(img, grid if uses_slices(cfg) else None, S, cfg.overlap,
                          cfg.thumbnail_filter), slicing.slice_grid(grid, cfg.overlap))


def collate(examples: Sequence[tuple], pad_id: int) -> Batch:
    """[(crops, grid, ids, labels or None[, segments])] -> a right-padded Batch.

    segments (`Tokenizer.questions`), when the examples carry them, become segment_ids."""
    if not examples:
        raise ValueError("collate needs at least one example")
    input_ids, attention_mask, labels, segment_ids = pad_rows([ex[2:] for ex in examples],
                                                              pad_id)
    pixel_values = torch.cat([ex[0] for ex in examples], dim=0)        # (sum n_i, 3, S, S)
    return Batch(input_ids, attention_mask, labels, pixel_values, [tuple(ex[1]) for ex in examples],
                 segment_ids)


def pad_rows(rows: Sequence[tuple], pad_id: int):
    """[(ids, labels or None[, segments])] -> right-padded (input_ids, attention_mask, labels
    or None, segment_ids or None), each [B, T]: the text half of `collate`."""
    B, T = len(rows), max(len(row[0]) for row in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    has_labels = rows[0][1] is not None
    labels = torch.full((B, T), IGNORE, dtype=torch.long) if has_labels else None
    has_segments = len(rows[0]) > 2 and rows[0][2] is not None
    segment_ids = torch.zeros((B, T), dtype=torch.long) if has_segments else None
    for b, (ids, lab, *seg) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        if has_labels:
            if lab is None or len(lab) != n:
                raise ValueError(f"example {b}: labels must be given for every example and "
                                 f"match its ids in length")
            labels[b, :n] = torch.as_tensor(lab, dtype=torch.long)
        if has_segments:
            if not seg or seg[0] is None or len(seg[0]) != n:
                raise ValueError(f"example {b}: segments must be given for every example and "
                                 f"match its ids in length")
            segment_ids[b, :n] = torch.as_tensor(seg[0], dtype=torch.long)
    return input_ids, attention_mask, labels, segment_ids


def prepare(images: Sequence, questions: Sequence[str], tokenizer, cfg: ModelConfig,
            answers: Sequence[str] | None = None) -> Batch:
    """(images, questions[, answers]) -> Batch, via the tokenizer's chat template."""
    if len(images) != len(questions) or (answers is not None and len(answers) != len(images)):
        raise ValueError(f"got {len(images)} images, {len(questions)} questions"
                         + ("" if answers is None else f", {len(answers)} answers")
                         + ": they must be equally many")
    examples = []
    for i, (image, q) in enumerate(zip(images, questions)):
        crops, grid = image_inputs(image, cfg)
        ids, labels = tokenizer.chat(q, None if answers is None else answers[i])
        examples.append((crops, grid, ids, labels if answers is not None else None))
    return collate(examples, tokenizer.pad_id)


