"""Scoring on EntityGrid-QA's fixed test split: batched greedy answers, tallies, the tables.

Evaluation answers the test split with batched greedy KV-cache generation
(`HiResLLaVA.generate`) and scores it with `entitygrid.score`, one batch at a time (`Tally`
adds the batches up), so the split is never held in memory whole.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from minihires.data import entitygrid
from minihires.data.batches import max_answer_tokens
from minihires.model import HiResLLaVA


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
    get = lambda s, k: s[k] if isinstance(s, dict) else getattr(s, k)
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


BY_ANSWER_TASKS = ("counting", "continuity")   # tasks whose answers are a few fixed words


class Tally:
    """Running scores of answered samples, batch after batch: the same numbers as
    `entitygrid.score` and `by_entities` on all of them, without keeping any sample."""

    def __init__(self):
        self.groups = {g: [0, 0] for g in entitygrid.GROUPS}          # [correct, total]
        self.cells: dict = {t: {} for t in entitygrid.TASKS}      # task -> {entities: [c, t]}
        self.answers: dict = {t: {} for t in entitygrid.TASKS}    # task -> {(answer, on_seam): [c, t]}

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
                right = entitygrid.normalize(a) == entitygrid.normalize(smp.answer)
                for cell in (self.cells[smp.task].setdefault(len(smp.entities), [0, 0]),
                             self.answers[smp.task].setdefault((smp.answer, smp.on_seam), [0, 0])):
                    cell[0] += right
                    cell[1] += 1

    def scores(self) -> dict:
        """As `entitygrid.score` of every sample added."""
        if not self.groups["all"][1]:
            raise ValueError("score needs at least one sample")
        return entitygrid.summarize({g: c for g, (c, _) in self.groups.items()},
                                    {g: t for g, (_, t) in self.groups.items()})

    def by_entities(self) -> dict:
        """As `by_entities`: {task: {entities: (correct, total)}}."""
        return {t: {n: tuple(c) for n, c in sorted(cells.items())}
                for t, cells in self.cells.items()}

    def by_answer(self) -> dict:
        """{task: {(true answer, on_seam): (correct, total)}}: whether a seam gap is the seam's
        or that of the answers the seam side holds (on-seam counting questions are mostly
        about two or three entities, off-seam ones about one)."""
        return {t: {k: tuple(c) for k, c in sorted(cells.items())}
                for t, cells in self.answers.items()}


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
            ("continuity", m.get("continuity"), c.get("continuity")),
            ("on-seam", m.get("on_seam"), c.get("on_seam")),
            ("off-seam", m.get("off_seam"), c.get("off_seam"))]
    cont = m.get("seam", {}).get("continuity", {})
    rows += [("continuity on-seam", cont.get("on_seam"), c.get("continuity/on_seam")),
             ("continuity off-seam", cont.get("off_seam"), c.get("continuity/off_seam"))]
    lines = [f"{title} (n={m.get('eval_n', c.get('total'))})", f"  {'':<22}{'acc %':>7}{'n':>7}"]
    lines += [f"  {name:<22}{_pct(acc):>7}{n if n is not None else '-':>7}" for name, acc, n in rows
              if n or not name.startswith("continuity")]      # continuity rows when asked
    d = m.get("discrepancy")
    lines.append(f"  {'discrepancy (off-on)':<22}{'   -' if d is None else f'{d:+5.1f}':>7}  points")
    lines.append(f"  {'visual tokens / image':<22}{m.get('visual_tokens', '-'):>7}")
    if "train_time_s" in m:
        lines.append(f"  {'wall time':<22}{m.get('wall_time_s', 0):>7.0f}  s (train "
                     f"{m['train_time_s']:.0f} s, {m['steps']} steps x {m['batch_size']}"
                     f"{' x ' + str(m['world_size']) + ' ranks' if m.get('world_size', 1) > 1 else ''}"
                     f"; eval {m.get('eval_time_s', 0):.0f} s)")
    if m.get("lm_lookup_end") is not None:
        before = m.get("lm_lookup")
        lines.append(f"  {'language-stage lookup':<22}{m['lm_lookup_end']:>7.1f}  % on scenes "
                     f"in words at the end ({'-' if before is None else f'{before:.1f}'} "
                     f"after the stage, {m['lm_time_s']:.0f} s)")
    if "mfu" in m:
        step = m.get("step_flops", m.get("step_flops_frozen", 0))
        lines.append(f"  {'speed':<22}{m['samples_per_s']:>7.0f}  samples/s, {step / 1e9:.1f} "
                     "GFLOP a step (forward + backward)")
        lines.append(f"  {'utilisation (MFU)':<22}{100 * m['mfu']:>7.0f}  % ("
                     f"{m['achieved_flop_s'] / 1e9:.1f} GFLOP/s of a 1024^2 matmul's "
                     f"{m['matmul_peak_flop_s'] / 1e9:.1f} here)")
    return "\n".join(lines)


def by_entities(answers: Sequence[str], samples: Sequence[entitygrid.Sample]) -> dict:
    """Accuracy per task and per number of entities in the image: {task: {n: (correct, total)}}.

    Separates reading one entity from telling two apart (docs/results.md has the figures).
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


def by_answer_table(table: dict, tasks: Sequence[str] = BY_ANSWER_TASKS) -> str:
    """`Tally.by_answer` as text for `tasks` (those with a few fixed answers): accuracy %
    (questions) per true answer, on-seam and off-seam."""
    lines = ["accuracy by true answer and seam side, % (questions)",
             f"  {'':<14}{'answer':<8}{'on-seam':>15}{'off-seam':>15}"]
    for task in tasks:
        cells = table.get(task, {})
        for answer in sorted({a for a, _ in cells}):
            row = [f"{100 * cells[answer, on][0] / cells[answer, on][1]:5.1f} "
                   f"({cells[answer, on][1]:>4})" if (answer, on) in cells else "-"
                   for on in (True, False)]
            lines.append(f"  {task:<14}{answer:<8}" + "".join(f"{c:>15}" for c in row))
    return "\n".join(lines)


def evaluate_llava(model: HiResLLaVA, tokenizer, path, image_folder, batch_size: int = 64,
                   max_new_tokens: int = 32, autocast_dtype: torch.dtype | None = None,
                   n: int | None = None, progress=None) -> dict:
    """Score a LLaVA-format question file: each row's first human turn is asked about its
    image (batched greedy KV-cache generation) and the answer compared with the first gpt
    turn, exactly (`exact`) and after EntityGrid-QA's normalisation (`accuracy`: lower case,
    punctuation and articles removed, digits to number words, as VQA's answer processing).
    Rows with a "task" field are also scored per task. Text-only rows are not asked
    (counted in `skipped_text_only`). Streams the file; `n` caps the rows asked."""
    from pathlib import Path

    from minihires.data import llava
    folder = Path(image_folder) if image_folder is not None else None
    correct = exact = total = text_only = 0
    tasks: dict[str, list[int]] = {}
    pending: list[tuple] = []

    def flush():
        nonlocal correct, exact, total
        if not pending:
            return
        images = [p[0] for p in pending]
        answers = predict(model, tokenizer, [{"image": im, "question": q} for im, q, _, _ in
                                             pending], len(pending), max_new_tokens,
                          autocast_dtype)
        for (_, _, want, task), got in zip(pending, answers):
            ok = entitygrid.normalize(got) == entitygrid.normalize(want)
            correct += ok
            exact += got.strip() == want.strip()
            total += 1
            if task is not None:
                t = tasks.setdefault(str(task), [0, 0])
                t[0] += ok
                t[1] += 1
        if progress is not None:
            progress(len(images))
        pending.clear()

    for i, row in enumerate(llava.rows(path)):
        if n is not None and total + len(pending) >= n:
            break
        image, turns = llava.check_row(row, i)
        if image is None:
            text_only += 1
            continue
        if folder is None:
            raise ValueError(f"{path}: {llava.row_name(row, i)} has an image but no image "
                             "folder was given")
        file = folder / image
        if not file.is_file():
            raise ValueError(f"{path}: {llava.row_name(row, i)}: image {file} does not exist")
        pending.append((str(file), turns[0][0], turns[0][1], row.get("task")))
        if len(pending) == batch_size:
            flush()
    flush()
    if not total:
        raise ValueError(f"{path}: no row with an image to ask")
    return {"accuracy": 100.0 * correct / total, "exact_match": 100.0 * exact / total,
            "n": total, "skipped_text_only": text_only,
            "tasks": {t: 100.0 * c / k for t, (c, k) in tasks.items()}}
