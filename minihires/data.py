"""EntityGrid-QA for training and evaluation: step-indexed batches, batched scoring, the table.

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
red stripes", "Where are the red stripes?" needs no image). Both ours; README measures them.

Images are rendered once per batch and turned into crops once (`model.image_inputs`); at
64 x 64 pixels that costs ~0.5 ms a sample, a few percent of a training step, so there is
no background loader (ours: simpler and deterministic).

Evaluation answers the fixed test split with batched greedy KV-cache generation
(`HiResLLaVA.generate`) and scores it with `entitygrid.score`, one batch at a time (`Tally`
adds the batches up), so the split is never held in memory whole.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch

from . import entitygrid, slicing
from .config import ModelConfig
from .model import Batch, HiResLLaVA, collate, image_inputs

SEED_STRIDE = 10_000_000   # training seeds of run seed s start at s * SEED_STRIDE
MAX_RUN_SEED = entitygrid.TEST_SEED_BASE // SEED_STRIDE - 1   # keeps every stream below the test range


def data_config(model_cfg: ModelConfig, **overrides) -> entitygrid.EntityGridConfig:
    """The EntityGrid-QA canvas for a model: slices of the ViT's image_size, 2 x 2 of them.

    overrides: other EntityGridConfig fields (entity_size, jitter, ...).
    """
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
    grid = slicing.plan(cfg.width, cfg.height, model_cfg.vit.image_size, model_cfg.max_slices)
    return slicing.num_image_tokens(grid, model_cfg)


@torch.no_grad()
def predict(model: HiResLLaVA, tokenizer, samples: Sequence, batch_size: int = 128,
            max_new_tokens: int = 8, autocast_dtype: torch.dtype | None = None,
            progress=None) -> list[str]:
    """Greedy answers (KV cache) to each sample's question about its image, in batches.

    samples: `Sample`s (PIL image) or records with "image" (a path) and "question".
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    get = lambda s, k: s[k] if isinstance(s, dict) else getattr(s, k)   # noqa: E731
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            answers += model.generate([get(s, "image") for s in chunk],
                                      [get(s, "question") for s in chunk], tokenizer,
                                      max_new_tokens=max_new_tokens)
        if progress is not None:
            progress(len(chunk))
    return answers


def split_batches(n: int, cfg: entitygrid.EntityGridConfig, batch_size: int):
    """The first n samples of the fixed test split, rendered batch_size at a time (so any n
    fits in memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = entitygrid.test_seeds(n)
    for i in range(0, n, batch_size):
        yield [entitygrid.sample(s, cfg) for s in seeds[i:i + batch_size]]


class Tally:
    """Running scores of answered samples, batch after batch: the same numbers as
    `entitygrid.score` and `by_entities` on all of them, without keeping any sample."""

    def __init__(self):
        self.groups = {g: [0, 0] for g in ("all", *entitygrid.TASKS, "on_seam", "off_seam")}
        self.cells: dict = {t: {} for t in entitygrid.TASKS}      # task -> {entities: [c, t]}

    def add(self, answers: Sequence[str], samples: Sequence) -> None:
        if len(answers) != len(samples):
            raise ValueError(f"answers and samples differ in length: "
                             f"{len(answers)} vs {len(samples)}")
        if not samples:
            return
        s = entitygrid.score(answers, samples)
        for g, (c, t) in self.groups.items():
            key = "total" if g == "all" else g
            self.groups[g] = [c + s["correct"][key], t + s["counts"][key]]
        for a, smp in zip(answers, samples):
            if isinstance(smp, entitygrid.Sample):
                cell = self.cells[smp.task].setdefault(len(smp.entities), [0, 0])
                cell[0] += entitygrid.normalize(a) == entitygrid.normalize(smp.answer)
                cell[1] += 1

    def scores(self) -> dict:
        """As `entitygrid.score` of every sample added."""
        if not self.groups["all"][1]:
            raise ValueError("score needs at least one sample")
        acc = {g: (100.0 * c / t if t else None) for g, (c, t) in self.groups.items()}
        on, off = acc["on_seam"], acc["off_seam"]
        return {"accuracy": acc["all"],
                **{g: acc[g] for g in (*entitygrid.TASKS, "on_seam", "off_seam")},
                "discrepancy": None if on is None or off is None else off - on,
                "counts": {("total" if g == "all" else g): t for g, (_, t) in self.groups.items()},
                "correct": {("total" if g == "all" else g): c for g, (c, _) in self.groups.items()}}

    def by_entities(self) -> dict:
        """As `by_entities`: {task: {entities: (correct, total)}}."""
        return {t: {n: tuple(c) for n, c in sorted(cells.items())}
                for t, cells in self.cells.items()}


def evaluate(model: HiResLLaVA, tokenizer, cfg: entitygrid.EntityGridConfig, n: int,
             batch_size: int = 128, autocast_dtype: torch.dtype | None = None,
             progress=None, on_batch=None) -> tuple[dict, Tally]:
    """Score the model on the first n samples of the fixed test split -> (metrics, tally).

    The split is rendered, answered and scored one batch at a time; on_batch(samples,
    answers) sees each batch (e.g. `eval --attention`)."""
    tally = Tally()
    max_new = max_answer_tokens(tokenizer, cfg)
    for samples in split_batches(n, cfg, batch_size):
        answers = predict(model, tokenizer, samples, batch_size, max_new, autocast_dtype,
                          progress)
        tally.add(answers, samples)
        if on_batch is not None:
            on_batch(samples, answers)
    return tally.scores(), tally


def score_samples(model: HiResLLaVA, tokenizer, cfg: entitygrid.EntityGridConfig,
                  samples: Sequence[entitygrid.Sample], batch_size: int = 128,
                  autocast_dtype: torch.dtype | None = None, progress=None
                  ) -> tuple[dict, list[str]]:
    """Answer and score already rendered samples -> (metrics, answers)."""
    answers = predict(model, tokenizer, samples, batch_size, max_answer_tokens(tokenizer, cfg),
                      autocast_dtype, progress)
    return entitygrid.score(answers, samples), answers


def _pct(v) -> str:
    return "   -" if v is None else f"{v:5.1f}"


def results_table(m: dict, title: str = "EntityGrid-QA test split") -> str:
    """The per-task / seam table that train and eval print."""
    c = m.get("counts", {})
    rows = [("overall", m.get("accuracy"), c.get("total")),
            ("recognition", m.get("recognition"), c.get("recognition")),
            ("position", m.get("position"), c.get("position")),
            ("counting", m.get("counting"), c.get("counting")),
            ("on-seam", m.get("on_seam"), c.get("on_seam")),
            ("off-seam", m.get("off_seam"), c.get("off_seam"))]
    lines = [f"{title} (n={m.get('eval_n', c.get('total'))})", f"  {'':<22}{'acc %':>7}{'n':>7}"]
    lines += [f"  {name:<22}{_pct(acc):>7}{n if n is not None else '-':>7}" for name, acc, n in rows]
    d = m.get("discrepancy")
    lines.append(f"  {'discrepancy (off-on)':<22}{'   -' if d is None else f'{d:+5.1f}':>7}  points")
    lines.append(f"  {'visual tokens / image':<22}{m.get('visual_tokens', '-'):>7}")
    if "train_time_s" in m:
        lines.append(f"  {'wall time':<22}{m.get('wall_time_s', 0):>7.0f}  s (train "
                     f"{m['train_time_s']:.0f} s, {m['steps']} steps x {m['batch_size']}"
                     f"{' x ' + str(m['world_size']) + ' ranks' if m.get('world_size', 1) > 1 else ''}"
                     f"; eval {m.get('eval_time_s', 0):.0f} s)")
    return "\n".join(lines)


def by_entities(answers: Sequence[str], samples: Sequence[entitygrid.Sample]) -> dict:
    """Accuracy per task and per number of entities in the image: {task: {n: (correct, total)}}.

    Separates reading one entity from telling two apart (README, "Where it stands").
    """
    if len(answers) != len(samples):
        raise ValueError(f"answers and samples differ in length: {len(answers)} vs {len(samples)}")
    tally = Tally()
    tally.add(answers, samples)
    return tally.by_entities()


def by_entities_table(table: dict) -> str:
    """`by_entities` as text: accuracy % (questions) per task and entity count."""
    ns = sorted({n for cells in table.values() for n in cells})
    lines = ["accuracy by entities in the image, % (questions)",
             f"  {'':<14}" + "".join(f"{f'{n} entit' + ('y' if n == 1 else 'ies'):>15}" for n in ns)]
    for task, cells in table.items():
        row = [f"{100 * cells[n][0] / cells[n][1]:5.1f} ({cells[n][1]:>4})" if n in cells else "-"
               for n in ns]
        lines.append(f"  {task:<14}" + "".join(f"{c:>15}" for c in row))
    return "\n".join(lines)
