"""EntityGrid-QA: a synthetic benchmark for fragmentation (our design; docs/design.md).

A canvas of rows x cols slices of S pixels holds one to three entities at nine positions
(centres at 1/6, 1/2, 5/6 of width and height). On the default 2x2 slicing the five
positions with a 1/2 coordinate lie on a seam, so their entities are cut between slices.
Classes differ only in 1-pixel detail that the thumbnail loses (see `minihires.entities`).

Four tasks, one question per image:
    recognition  "What is at the top left?"         -> "red stripes"
    position     "Where are the red stripes?"       -> "top left"
    counting     "How many entities have stripes?"  -> "two"
    continuity   "Is the board at the top broken?"  -> "yes" / "no"

The first three are answered by any fragment of an entity (each slice of a cut entity shows
its whole pattern); continuity is not: a board (`entities.draw_board`) is broken when its
lines shift at its split line, each half alone looks the same for both answers, a seam-cut
board is split along the seam, and the thumbnail shows every board alike. So on-seam
continuity questions are what fragmentation costs, and what SliceRestore has to restore.

Choices that are ours, not the paper's: the pattern classes and colours, the question
templates, one to `max_entities` entities for recognition/position and one to
`max_count` for counting (counted entities plus distractors of other classes), a position
question's distractor sharing the target's colour half the time (so the answer hinges on
class detail), `on_seam` from the drawn pixel box (for counting: any counted entity), and the boards of
the continuity task (1 to `max_entities` per image, each broken with probability 1/2).

Determinism: everything is drawn from `random.Random(seed)`, so a seed gives the same
pixels and question on any machine. Test seeds live in a reserved range that the training
stream skips; a test seed also fixes its task and position (i % k, i // k % 9 for the k
tasks of `cfg.tasks`), so any 9k consecutive test samples are balanced over tasks x
positions. The default tasks are all four wherever continuity boards fit the canvas (the
default 2 x 2 canvas; `boards_fit`), else the first three; `EntityGridConfig(tasks=...)` or
`entitygrid --tasks` picks others.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from minihires.data.entities import (BOARD, CLASSES, COLOURS, POSITIONS, Entity, boards_fit,
                                     check_board_geometry, place, place_board, render)

TASKS = ("recognition", "position", "counting", "continuity")
POSITION_NAMES = tuple(POSITIONS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RECOGNITION_Q = "What is at the {position}?"          # -> "{colour} {cls}"
POSITION_Q = "Where are the {colour} {cls}?"         # -> position name
COUNTING_Q = "How many entities have {cls}?"         # -> number word
CONTINUITY_Q = "Is the board at the {position} broken?"   # -> "yes" / "no"
YES_NO = ("yes", "no")
TEST_SEED_BASE = 2**40     # test seeds: [TEST_SEED_BASE, TEST_SEED_BASE + TEST_SEED_SPAN)
TEST_SEED_SPAN = 2**24
MAX_CANVAS_PIXELS = 89_478_485   # `entitygrid --out`: as slicing.MAX_PIXELS, what ask/eval read


@dataclass(frozen=True)
class EntityGridConfig:
    """Canvas geometry and sampling knobs. The canvas is cols*S wide and rows*S high."""
    slice_size: int = 32          # S: the ViT image_size of the `tiny` preset
    rows: int = 2
    cols: int = 2
    entity_size: float = 0.5      # entity side as a fraction of S (16 px at S = 32)
    jitter: int = 2               # max offset of an entity's centre, pixels per axis
    max_entities: int = 2         # recognition and position images hold 1..max_entities
    max_count: int = 3            # counting images hold 1..max_count entities
    background: tuple[int, int, int] = (0, 0, 0)
    tasks: tuple[str, ...] | None = None   # what training draws and the test split cycles;
                                           # None: all four where boards fit the canvas
                                           # (`boards_fit`), else the first three

    @property
    def width(self) -> int:
        return self.cols * self.slice_size

    @property
    def height(self) -> int:
        return self.rows * self.slice_size

    @property
    def entity_px(self) -> int:
        return max(3, round(self.entity_size * self.slice_size))

    def __post_init__(self):
        for name in ("slice_size", "rows", "cols", "jitter", "max_entities", "max_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.slice_size < 8:
            raise ValueError(f"slice_size must be >= 8 pixels, got {self.slice_size}")
        if not (1 <= self.rows <= 16 and 1 <= self.cols <= 16):
            raise ValueError(f"rows and cols must be in 1..16, got {self.rows}x{self.cols}")
        if not isinstance(self.entity_size, (int, float)) or isinstance(self.entity_size, bool):
            raise TypeError(f"entity_size must be a number, got {type(self.entity_size).__name__}")
        if not 0 < self.entity_size <= 1:
            raise ValueError(f"entity_size must be in (0, 1], got {self.entity_size}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        for name in ("max_entities", "max_count"):
            if not 1 <= getattr(self, name) <= len(POSITIONS):
                raise ValueError(f"{name} must be in 1..{len(POSITIONS)}, "
                                 f"got {getattr(self, name)}")
        bg = self.background
        if (not isinstance(bg, (tuple, list)) or len(bg) != 3
                or not all(isinstance(v, int) and 0 <= v <= 255 for v in bg)):
            raise ValueError(f"background must be three ints in 0..255, got {bg!r}")
        object.__setattr__(self, "background", tuple(bg))   # a list from JSON becomes a tuple
        tasks = self.tasks
        if tasks is None:
            tasks = TASKS if boards_fit(self.slice_size, self.rows, self.cols,
                                        self.entity_px) else TASKS[:3]
        if (isinstance(tasks, str) or not isinstance(tasks, (tuple, list)) or not tasks
                or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks)):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks!r}")
        object.__setattr__(self, "tasks", tuple(tasks))
        if "continuity" in tasks:
            check_board_geometry(self.slice_size, self.rows, self.cols, self.entity_px)
        # Every jittered box inside the canvas, neighbouring positions never touching.
        e, j = self.entity_px, self.jitter
        for axis, extent in (("width", self.width), ("height", self.height)):
            starts = [extent * k // 6 - e // 2 for k in (1, 3, 5)]   # as entities.place
            lo, hi = [s - j for s in starts], [s + e + j for s in starts]   # hi exclusive
            if lo[0] < 0 or hi[2] > extent:
                raise ValueError(
                    f"entities of {e} px (entity_size={self.entity_size}) with jitter={j} "
                    f"leave the canvas {axis} of {extent} px; shrink entity_size or jitter")
            if hi[0] >= lo[1] or hi[1] >= lo[2]:
                raise ValueError(
                    f"entities of {e} px with jitter={j} could touch at neighbouring "
                    f"positions along the canvas {axis} of {extent} px; "
                    f"shrink entity_size or jitter")


@dataclass
class Sample:
    image: Image.Image                # RGB, cfg.width x cfg.height
    question: str
    answer: str
    task: str
    on_seam: bool
    entities: list[Entity]            # in raster order of position
    targets: tuple[int, ...]          # indices into entities the question is about
    seed: int

    @property
    def positions(self) -> list[str]:
        return [self.entities[i].position for i in self.targets]


# ---------------------------------------------------------------------------- sampling

def is_test_seed(seed: int) -> bool:
    return TEST_SEED_BASE <= seed < TEST_SEED_BASE + TEST_SEED_SPAN


def _check_seed(seed, name: str = "seed") -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be >= 0, got {seed}")


def _config(cfg) -> EntityGridConfig:
    if cfg is None:
        return EntityGridConfig()
    if not isinstance(cfg, EntityGridConfig):
        raise TypeError(f"cfg must be an EntityGridConfig, got {type(cfg).__name__}")
    return cfg


def _specs(rng: random.Random, cfg: EntityGridConfig, task: str, anchor: str):
    """(cls, colour, position[, broken]) tuples, target indices among them, question, answer."""
    classes, colours = list(CLASSES), list(COLOURS)
    others = [p for p in POSITIONS if p != anchor]
    if task == "continuity":
        n = rng.randint(1, cfg.max_entities)
        specs = [(BOARD, rng.choice(colours), p, rng.random() < 0.5)
                 for p in [anchor] + rng.sample(others, n - 1)]
        return specs, [0], CONTINUITY_Q.format(position=anchor), YES_NO[not specs[0][3]]
    if task == "counting":
        cls = rng.choice(classes)
        k = rng.randint(1, cfg.max_count)
        n = rng.randint(k, cfg.max_count)
        places = [anchor] + rng.sample(others, n - 1)
        distractors = [c for c in classes if c != cls]
        specs = [(cls if i < k else rng.choice(distractors), rng.choice(colours), p)
                 for i, p in enumerate(places)]
        return specs, range(k), COUNTING_Q.format(cls=cls), NUMBER_WORDS[k]
    n = rng.randint(1, cfg.max_entities)
    target = (rng.choice(classes), rng.choice(colours), anchor)
    specs = [target]
    for p in rng.sample(others, n - 1):
        if task == "position" and rng.random() < 0.5:   # same colour: only class tells apart
            specs.append((rng.choice([c for c in classes if c != target[0]]), target[1], p))
        else:
            spec = (rng.choice(classes), rng.choice(colours), p)
            # position: a twin of the target (same colour and class) would be ambiguous
            while task == "position" and spec[:2] == target[:2]:
                spec = (rng.choice(classes), rng.choice(colours), p)
            specs.append(spec)
    if task == "recognition":
        return specs, [0], RECOGNITION_Q.format(position=anchor), f"{target[1]} {target[0]}"
    return specs, [0], POSITION_Q.format(colour=target[1], cls=target[0]), anchor


def sample(seed: int, cfg: EntityGridConfig | None = None) -> Sample:
    """The sample of `seed`: the same image bytes and question on any machine."""
    _check_seed(seed)
    cfg = _config(cfg)
    rng = random.Random(seed)
    if is_test_seed(seed):          # balanced: task and anchor position follow the index
        i, k = seed - TEST_SEED_BASE, len(cfg.tasks)
        task, anchor = cfg.tasks[i % k], POSITION_NAMES[i // k % len(POSITIONS)]
    else:
        task, anchor = rng.choice(cfg.tasks), rng.choice(POSITION_NAMES)
    specs, targets, question, answer = _specs(rng, cfg, task, anchor)
    placed = [place_board(col, p, cfg, rest[0], rng) if c == BOARD else
              place(c, col, p, cfg, rng.randint(-cfg.jitter, cfg.jitter),
                    rng.randint(-cfg.jitter, cfg.jitter)) for c, col, p, *rest in specs]
    order = sorted(range(len(placed)), key=lambda i: POSITION_NAMES.index(placed[i].position))
    entities = [placed[i] for i in order]
    targets = tuple(sorted(order.index(t) for t in targets))
    return Sample(image=render(entities, cfg), question=question, answer=answer, task=task,
                  on_seam=any(entities[t].on_seam for t in targets), entities=entities,
                  targets=targets, seed=seed)


def questions_about(entities: Sequence[Entity], cfg: EntityGridConfig | None = None
                    ) -> list[tuple[str, str, str]]:
    """Every benchmark question an image of these entities answers: (question, answer, task).

    Recognition for each entity, position for each entity no other shares colour and class
    with, counting for each class present at most cfg.max_count times (so every answer is
    in `answer_vocabulary(cfg)`); for boards, continuity for each board. Training conversations draw extra turns from
    these (`minihires.data.conversation`); the test split asks one question per image.
    """
    cfg = _config(cfg)
    boards = [e for e in entities if e.cls == BOARD]
    entities = [e for e in entities if e.cls != BOARD]
    pairs = [(e.colour, e.cls) for e in entities]
    counts = {c: sum(e.cls == c for e in entities) for c in dict.fromkeys(e.cls for e in entities)}
    out = [(RECOGNITION_Q.format(position=e.position), f"{e.colour} {e.cls}", "recognition")
           for e in entities]
    out += [(POSITION_Q.format(colour=e.colour, cls=e.cls), e.position, "position")
            for e in entities if pairs.count((e.colour, e.cls)) == 1]
    out += [(COUNTING_Q.format(cls=c), NUMBER_WORDS[k], "counting")
            for c, k in counts.items() if k <= cfg.max_count]
    out += [(CONTINUITY_Q.format(position=e.position), YES_NO[not e.broken], "continuity")
            for e in boards]
    return out


def stream(start_seed: int = 0, cfg: EntityGridConfig | None = None,
           rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
    """Training samples forever: rank r takes seeds start + r, start + r + world_size, ...

    Ranks therefore never share a seed, and test seeds are skipped.
    """
    _check_seed(start_seed, "start_seed")
    if is_test_seed(start_seed):
        raise ValueError(f"start_seed {start_seed} lies in the reserved test-seed range "
                         f"[{TEST_SEED_BASE}, {TEST_SEED_BASE + TEST_SEED_SPAN})")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
    cfg = _config(cfg)
    seed, end = start_seed + rank, TEST_SEED_BASE + TEST_SEED_SPAN
    while True:
        if is_test_seed(seed):       # jump past the test range, keeping seed % world_size
            seed += -(-(end - seed) // world_size) * world_size
        yield sample(seed, cfg)
        seed += world_size


def test_seeds(n: int) -> range:
    """Seeds of the fixed test split of n samples."""
    if not isinstance(n, int) or not 1 <= n <= TEST_SEED_SPAN:
        raise ValueError(f"n must be an int in 1..{TEST_SEED_SPAN}, got {n!r}")
    return range(TEST_SEED_BASE, TEST_SEED_BASE + n)


test_seeds.__test__ = False   # not a pytest test


def test_split(n: int, cfg: EntityGridConfig | None = None) -> list[Sample]:
    """The fixed test split: balanced over tasks x positions in every 9 * len(cfg.tasks)."""
    cfg = _config(cfg)
    return [sample(s, cfg) for s in test_seeds(n)]


test_split.__test__ = False


# ------------------------------------------------------------------------- vocabulary

def answer_vocabulary(cfg: EntityGridConfig | None = None) -> list[str]:
    """Every possible answer string."""
    cfg = _config(cfg)
    return ([f"{colour} {cls}" for cls in CLASSES for colour in COLOURS] + list(POSITIONS)
            + list(NUMBER_WORDS[1:cfg.max_count + 1])
            + (list(YES_NO) if "continuity" in cfg.tasks else []))


def question_texts(cfg: EntityGridConfig | None = None) -> Iterator[str]:
    """Every possible question, then every answer: the tokenizer's training text."""
    cfg = _config(cfg)
    yield from (RECOGNITION_Q.format(position=p) for p in POSITIONS)
    yield from (POSITION_Q.format(colour=colour, cls=cls) for cls in CLASSES for colour in COLOURS)
    yield from (COUNTING_Q.format(cls=cls) for cls in CLASSES)
    if "continuity" in cfg.tasks:
        yield from (CONTINUITY_Q.format(position=p) for p in POSITIONS)
    yield from answer_vocabulary(cfg)


# --------------------------------------------------------------------------- scoring

_SYNONYMS = {"centre": "center"}   # British spelling accepted


def normalize(answer: str) -> str:
    """Lowercase, punctuation to spaces, no articles, single spaces, digits to words."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    words = re.sub(r"[^\w\s]|_", " ", answer.lower()).split()
    out = []
    for w in words:
        if w in ("a", "an", "the"):
            continue
        if w.isdigit() and int(w) < len(NUMBER_WORDS):
            w = NUMBER_WORDS[int(w)]
        out.append(_SYNONYMS.get(w, w))
    return " ".join(out)


def _field(s, name):
    return s[name] if isinstance(s, Mapping) else getattr(s, name)


GROUPS = ("all", *TASKS, "on_seam", "off_seam",
          *(f"{t}/{side}" for t in TASKS for side in ("on_seam", "off_seam")))


def score(predictions: Sequence[str], samples: Sequence) -> dict:
    """Exact-match accuracy (percent) after `normalize`, overall, per task and per seam side.

    samples: `Sample`s or mappings with answer, task, on_seam (e.g. questions.jsonl rows).
    discrepancy = off-seam minus on-seam accuracy, in points; `seam` holds the same per task
    ({task: {"on_seam", "off_seam", "discrepancy"}}). A group without samples scores None.
    """
    predictions, samples = list(predictions), list(samples)
    if len(predictions) != len(samples):
        raise ValueError(f"predictions and samples differ in length: "
                         f"{len(predictions)} vs {len(samples)}")
    if not samples:
        raise ValueError("score needs at least one sample")
    groups = {g: [0, 0] for g in GROUPS}                                # [correct, total]
    for pred, s in zip(predictions, samples):
        ok = normalize(pred) == normalize(_field(s, "answer"))
        task = _field(s, "task")
        if task not in TASKS:
            raise ValueError(f"sample task must be one of {TASKS}, got {task!r}")
        side = "on_seam" if _field(s, "on_seam") else "off_seam"
        for g in ("all", task, side, f"{task}/{side}"):
            groups[g][0] += ok
            groups[g][1] += 1
    return summarize({g: c for g, (c, _) in groups.items()}, {g: t for g, (_, t) in groups.items()})


def summarize(correct: Mapping[str, int], counts: Mapping[str, int]) -> dict:
    """`score`'s result from its tallies: correct and total per group ("all", each task, each
    seam side, each "task/side"), e.g. summed over batches."""
    acc = {g: (100.0 * correct[g] / t if t else None) for g, t in counts.items()}
    gap = lambda on, off: None if on is None or off is None else off - on   # noqa: E731
    seam = {t: {"on_seam": acc[f"{t}/on_seam"], "off_seam": acc[f"{t}/off_seam"],
                "discrepancy": gap(acc[f"{t}/on_seam"], acc[f"{t}/off_seam"])} for t in TASKS}
    return {"accuracy": acc["all"], **{g: acc[g] for g in (*TASKS, "on_seam", "off_seam")},
            "discrepancy": gap(acc["on_seam"], acc["off_seam"]), "seam": seam,
            "counts": {("total" if g == "all" else g): t for g, t in counts.items()},
            "correct": {("total" if g == "all" else g): c for g, c in correct.items()}}


# ---------------------------------------------------------------------------- export

EXPORT_QUESTIONS, EXPORT_CONFIG = "questions.jsonl", "config.json"
_EXPORT_IMAGE = re.compile(r"\d{6,}\.png")


def export(samples: Iterable[Sample], out_dir, cfg: EntityGridConfig | None = None,
           progress=None) -> list[dict]:
    """Write images/NNNNNN.png and questions.jsonl (and config.json if cfg is given).

    Returns the JSONL records; progress(i) is called after each sample.
    """
    return list(_export(samples, out_dir, cfg, progress))


def _export(samples: Iterable[Sample], out_dir, cfg: EntityGridConfig | None = None,
            progress=None) -> Iterator[dict]:
    """`export`, one record at a time (the command line keeps none of them). questions.jsonl
    is created first, so a folder an export has touched is always recognisable as one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / EXPORT_QUESTIONS, "w", encoding="utf-8") as f:
        (out / "images").mkdir(exist_ok=True)
        if cfg is not None:
            (out / EXPORT_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        for i, s in enumerate(samples):
            name = f"images/{i:06d}.png"
            s.image.save(out / name, format="PNG")
            rec = {"image": name, "question": s.question, "answer": s.answer, "task": s.task,
                   "positions": s.positions, "on_seam": s.on_seam, "seed": s.seed,
                   "entities": [{"class": e.cls, "colour": e.colour, "position": e.position,
                                 "bbox": list(e.bbox), "on_seam": e.on_seam}
                                for e in s.entities]}
            f.write(json.dumps(rec) + "\n")
            yield rec
            if progress is not None:
                progress(i + 1)


def is_export(folder) -> bool:
    """Whether `folder` holds an EntityGrid-QA export (its questions.jsonl)."""
    return (Path(folder) / EXPORT_QUESTIONS).is_file()


def remove_export(folder) -> int:
    """Delete the files an export wrote in `folder` (questions.jsonl, config.json,
    images/NNNNNN.png, and images/ if that leaves it empty), nothing else; -> files removed."""
    folder, n = Path(folder), 0
    for name in (EXPORT_QUESTIONS, EXPORT_CONFIG, "llava.json", "tokenizer.model"):
        if (folder / name).is_file():
            (folder / name).unlink()
            n += 1
    images = folder / "images"
    if images.is_dir():
        for p in images.iterdir():
            if _EXPORT_IMAGE.fullmatch(p.name) and p.is_file():
                p.unlink()
                n += 1
        if not any(images.iterdir()):
            images.rmdir()
    return n


def load_export(out_dir) -> list[dict]:
    """The records of questions.jsonl; each record's image path is relative to out_dir."""
    path = Path(out_dir) / EXPORT_QUESTIONS
    if not path.is_file():
        raise FileNotFoundError(f"no questions.jsonl in {out_dir}")
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}, line {i}: not a JSON record ({e})") from None
    return records


def check_export_dir(out: Path, force: bool) -> None:
    """ValueError (naming --out) unless `out` may receive an export: absent, an empty
    folder, or, with force, a previous export (whose files the export then replaces)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if is_export(out):
            if not force:
                raise ValueError(f"--out {out} already holds an export; pass --force to "
                                 "overwrite it")
        elif any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no EntityGrid-QA export "
                             "(questions.jsonl); choose an empty or new folder (--force "
                             "replaces only a previous export)")
    else:
        parent = next((p for p in out.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is not a folder")
