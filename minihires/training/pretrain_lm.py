"""The language stage: the tiny LLaMA learns the lookup on scenes given as words.

LLaVA starts from a pretrained LLM (Vicuna) that already finds things in its context; ours
starts from random weights, and in the main job that lookup ("Where are the red stripes?":
find the entity the words describe among the image tokens, say where it is) is the last
thing to form; without the token shift (`--token-shift 0`) often not within the budget
(docs/results.md, "The lookup experiment"). This stage teaches the LLM that skill first, from
words alone, in cheap steps (no vision side, short sequences): `train --lm-steps N`, off by
default, measured before the token shift.

A *scene in words* stands where the image goes: one token per entity, the sum of the word
embeddings of its name and its place,

    scene token  = embed("red stripes") + embed("top left")   (sums over pieces if several)
    sequence     = the chat prompt with the scene's tokens at <image>, then the question

and the LLM (its embeddings included) learns to answer position questions about it. Nothing
else trains; the vision side never runs. The main job then starts from these LLM weights.
What that buys is measured in docs/results.md ("A language stage"): the stage teaches the
lookup, and the main job, as it stands, unlearns it.

Choices that are ours, not the paper's: the stage itself, the scene tokens (sums of word
embeddings, in raster order of place, entities only), its data (training samples from the
seeds after the last one the main job draws; position questions only, one per scene, 64
scenes a step), AdamW at `lr` after a 10% warmup, then constant, weight decay 0.01 on every
parameter and gradient clipping at 1 (as experiments/lookup.py), on the language model
alone. Boards (the continuity task) have no words for what their answer depends on.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from minihires.data import batches
from minihires.data.entities import BOARD
from minihires.data.entitygrid import EntityGridConfig, Sample, test_split
from minihires.model.inputs import IGNORE, pad_rows

TEXT_TASKS = ("recognition", "position", "counting")   # the tasks a scene in words can answer
STAGE_TASKS = ("position",)    # what the stage teaches: the lookup, the main job's last skill
LOOKUP_SPLIT = 900             # test-split samples whose two-entity scenes `lookup_accuracy` asks
STAGE_BATCH = 64               # scenes a step
STAGE_WEIGHT_DECAY = 0.01      # on every parameter, as experiments/lookup.py
STAGE_GRAD_CLIP = 1.0


def scene_config(cfg: EntityGridConfig, tasks=STAGE_TASKS) -> EntityGridConfig:
    """The training data config, asking only `tasks` (a scene in words cannot answer
    continuity: its boards have no words for what the answer depends on)."""
    if not tasks or any(t not in TEXT_TASKS for t in tasks):
        raise ValueError(f"the language stage's tasks must be some of {TEXT_TASKS}, "
                         f"got {tasks!r}")
    return dataclasses.replace(cfg, tasks=tuple(tasks))


def scene_embeds(sample: Sample, tokenizer, embed: torch.Tensor) -> torch.Tensor:
    """[n, Dl]: one token per entity of the sample (boards skipped), in raster order:
    the summed embeddings of the pieces of "colour class" plus those of its place name."""
    rows = []
    for e in sample.entities:
        if e.cls == BOARD:
            continue
        ids = tokenizer.encode(f"{e.colour} {e.cls}") + tokenizer.encode(e.position)
        rows.append(embed[torch.tensor(ids, device=embed.device)].sum(0))   # (Dl,)
    return torch.stack(rows)                                           # (n, Dl)


def scene_batch(model, tokenizer, samples: list[Sample], turns: int, cfg: EntityGridConfig):
    """(inputs_embeds [B, L, Dl], attention mask [B, L], labels [B, L], segment ids [B, L]):
    each sample's questions packed after the chat prompt, its scene in words at <image>."""
    rows = [tokenizer.questions(batches.conversation(s, turns, cfg)) for s in samples]
    input_ids, mask, labels, segments = pad_rows(rows, tokenizer.pad_id)     # (B, T) each
    embed = model.language_model.embed_tokens.weight                   # (V, Dl)
    scenes = [scene_embeds(s, tokenizer, embed) for s in samples]      # [n_b, Dl] each
    dev = embed.device
    return model.build_inputs(input_ids.to(dev), mask.to(dev), scenes, tokenizer.image_id,
                              labels.to(dev), "right", segments.to(dev))


def scene_loss(model, tokenizer, samples: list[Sample], turns: int,
               cfg: EntityGridConfig) -> torch.Tensor:
    """Mean next-token cross-entropy on the answers about the samples' scenes in words."""
    return model.language_loss(*scene_batch(model, tokenizer, samples, turns, cfg))[1]


def first_step(main_steps: int, batch_size: int, world_size: int = 1) -> int:
    """The stage's first step of STAGE_BATCH samples in its run's stream: the first whose
    seeds lie after every seed the main job draws (main_steps x batch_size x world_size)."""
    return main_steps * -(-batch_size * world_size // STAGE_BATCH)


def pretrain_lm(model, tokenizer, cfg: EntityGridConfig, steps: int, seed: int, start: int,
                turns: int = 1, lr: float = 1e-3, tasks=STAGE_TASKS, progress=None
                ) -> list[float]:
    """Train `model.language_model` for `steps` steps on scenes in words; -> the losses.

    Step t takes the STAGE_BATCH samples of step start + t of run seed `seed`'s stream
    (`batches.train_samples`); `first_step` gives a start past the main job's samples.
    progress(step, loss) is called after each step. Raises FloatingPointError on a loss or
    gradient that is not finite."""
    cfg = scene_config(cfg, tasks)
    params = list(model.language_model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=STAGE_WEIGHT_DECAY)
    warmup = max(1, steps // 10)
    losses = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (t + 1) / warmup)
        samples = batches.train_samples(seed, start + t, STAGE_BATCH, cfg)
        loss = scene_loss(model, tokenizer, samples, turns, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, STAGE_GRAD_CLIP))
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(norm)):
            raise FloatingPointError(f"the language stage diverged at step {t + 1}: loss "
                                     f"{value}, gradient norm {norm}")
        opt.step()
        losses.append(value)
        if progress is not None:
            progress(t + 1, value)
    model.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def lookup_accuracy(model, tokenizer, cfg: EntityGridConfig, n: int = LOOKUP_SPLIT) -> float:
    """Percent of the two-entity scenes in words, among the first n samples of the test split
    drawn with position as its only task, whose position question is answered exactly
    (teacher-forced: every answer piece and the end of the answer are the model's most likely
    next token). A guess between the two scores about 50; an untrained LLM about 0."""
    cfg = dataclasses.replace(scene_config(cfg), max_entities=2)   # the test split's 1..2
    held_out = [s for s in test_split(n, cfg) if len(s.entities) == 2]
    if not held_out:
        raise ValueError(f"the first {n} test samples hold no scene with two entities")
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(held_out), 128):
        embeds, mask, labels, seg = scene_batch(model, tokenizer, held_out[i:i + 128], 1, cfg)
        logits = model.language_loss(embeds, mask, None, seg)[0]           # (b, L, V)
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]           # (b, L-1) each
        right += int(((pred == target) | (target == IGNORE)).all(1).sum())
    model.train(was_training)
    return 100.0 * right / len(held_out)
