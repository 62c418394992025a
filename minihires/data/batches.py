"""EntityGrid-QA for training: step-indexed batches of images, each with several questions.

Training data is a pure function of (seed, step, rank): the batch of step t on rank r of
W is the B samples `entitygrid.stream(start, cfg, r, W)` yields from
start = seed * SEED_STRIDE + t * B * W. So ranks draw disjoint seeds, no seed is seen
twice in a run, and a resumed run draws exactly the batches an uninterrupted one would
(nothing about the data needs saving).

Each training image gets up to `turns` questions in one sequence: the sample's own question
first, then other questions the same image answers (`entitygrid.questions_about`) in an order
fixed by the sample's seed. The image is encoded once for all of them, so extra turns add
supervision for a few text tokens each. By default they are packed after the shared image
prompt so that each question sees the image but not the others (`minihires.shared_prefix`),
exactly as a test question does; `chat=True` makes them one LLaVA-Instruct conversation
instead, where a later turn can copy what an earlier answer said (after "What is at the top?
red stripes", "Where are the red stripes?" needs no image). Both ours; `docs/results.md` measures them.

Images are rendered once per batch and turned into crops once (`model.image_inputs`), in the
training process: at 64 x 64 pixels that is cheap beside a step, so there is no background
loader (ours: simpler and deterministic).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from minihires.data import entitygrid
from minihires.model import Batch, collate, image_inputs, slicing
from minihires.model.config import ModelConfig

SEED_STRIDE = 10_000_000   # training seeds of run seed s start at s * SEED_STRIDE
MAX_RUN_SEED = entitygrid.TEST_SEED_BASE // SEED_STRIDE - 1   # keeps every stream below the test range


def data_config(model_cfg: ModelConfig, **overrides) -> entitygrid.EntityGridConfig:
    """The EntityGrid-QA canvas for a model: slices of the ViT's image_size, 2 x 2 of them.

    overrides: other EntityGridConfig fields (entity_size, jitter, tasks, ...). Without
    `tasks`, a model whose thumbnail is not the box average gets the three pattern tasks only:
    a bicubic thumbnail shows a board's break, so continuity would not measure fragmentation
    there (`minihires.data.entities`).
    """
    if overrides.get("tasks") is None and model_cfg.thumbnail_filter != "box":
        overrides["tasks"] = entitygrid.TASKS[:3]
    return entitygrid.EntityGridConfig(slice_size=model_cfg.vit.image_size, **overrides)


def batch_start(seed: int, step: int, batch_size: int, world_size: int = 1) -> int:
    """First stream seed of training step `step` (0-based) for run seed `seed`."""
    if not isinstance(seed, int) or not 0 <= seed <= MAX_RUN_SEED:
        raise ValueError(f"seed must be an int in 0..{MAX_RUN_SEED}, got {seed!r}")
    if step < 0 or batch_size < 1 or world_size < 1:
        raise ValueError(f"need step >= 0, batch_size >= 1, world_size >= 1; got "
                         f"{step}, {batch_size}, {world_size}")
    return seed * SEED_STRIDE + step * batch_size * world_size


def train_samples(seed: int, step: int, batch_size: int, cfg: entitygrid.EntityGridConfig,
                  rank: int = 0, world_size: int = 1) -> list[entitygrid.Sample]:
    """The `batch_size` samples of training step `step` on `rank` (see the module doc)."""
    start = batch_start(seed, step, batch_size, world_size)
    return list(itertools.islice(entitygrid.stream(start, cfg, rank, world_size), batch_size))


def conversation(sample: entitygrid.Sample, turns: int,
                 cfg: entitygrid.EntityGridConfig | None = None) -> list[tuple[str, str]]:
    """The (question, answer) turns of a training sample: its own first, then up to
    turns - 1 others about the same image, drawn without repeats by the sample's seed."""
    if not isinstance(turns, int) or turns < 1:
        raise ValueError(f"turns must be an int >= 1, got {turns!r}")
    others = [(q, a) for q, a, _ in entitygrid.questions_about(sample.entities, cfg)
              if q != sample.question]
    random.Random(f"conversation {sample.seed}").shuffle(others)   # not the sample's own draws
    return [(sample.question, sample.answer)] + others[:turns - 1]


def make_batch(samples: Sequence[entitygrid.Sample], tokenizer, model_cfg: ModelConfig,
               turns: int = 1, cfg: entitygrid.EntityGridConfig | None = None,
               chat: bool = False) -> Batch:
    """Samples -> a right-padded training Batch (answers as labels), `turns` questions per image:
    packed so that each sees the image prompt but not the others (`Tokenizer.questions`), or,
    with chat=True, as one LLaVA conversation where each sees the earlier ones."""
    examples = []
    for s in samples:
        crops, grid = image_inputs(s.image, model_cfg)                  # (n, 3, S, S), (r, c)
        pairs = conversation(s, turns, cfg)
        if chat:
            examples.append((crops, grid, *tokenizer.conversation(pairs)))
        else:
            examples.append((crops, grid, *tokenizer.questions(pairs)))  # + segments
    return collate(examples, tokenizer.pad_id)


def max_answer_tokens(tokenizer, cfg: entitygrid.EntityGridConfig) -> int:
    """The longest answer of the benchmark in tokens, plus one for eos."""
    return 1 + max(len(tokenizer.encode(a)) for a in entitygrid.answer_vocabulary(cfg))


def visual_tokens(model_cfg: ModelConfig, cfg: entitygrid.EntityGridConfig) -> int:
    """Image tokens the LLM reads for one EntityGrid-QA canvas."""
    grid = slicing.layout_grid(cfg.width, cfg.height, model_cfg)
    return slicing.num_image_tokens(grid, model_cfg)
