"""`python experiments/lookup.py`: the tiny LLaMA's lookup, with perfect image tokens.

An experiment outside the package. Finding one of two entities from its description ("Where
are the red stripes?") is what the main job learns last (docs/results.md). This lab asks how
long the LLM alone needs to learn that lookup, with the vision tower taken away and perfect
image tokens in its place. The LLM reads `slots` image tokens, each the sum of three
learned embeddings, as `crop_embedding` / `crop_grid_embedding` add a token's place to what
it shows:

    token i  = place[i] + colour[c_i] + class[k_i]       (colour/class "empty" where no entity)
    sequence = <s> P P | token 0 .. token slots-1 | P P colour-word class-word | A A A
    target   = the place word of the entity asked for, predicted at the last A

which is "USER: <image>\\n Where are the red stripes? ASSISTANT:" with P, A standing for the
template's other tokens. `entities` of the slots hold an entity (4 colours x 8 classes, as
EntityGrid-QA), at random slots; as in `entitygrid._specs`, half the time the others share
the asked entity's colour, so only the class tells them apart. The answer is found only by
matching the question's two words against the image tokens (associative recall).

It prints, for each number of image tokens and seed, the first evaluated step at which
held-out accuracy reaches 90%; docs/results.md gives the measured table and its command.
Choices are ours: constant lr after a 60-step linear warmup, AdamW with `train`'s betas and
weight decay 0.01 on every parameter, gradient clipping at 1, batch 64, and the same held-out
batch of 512 questions at every evaluation.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minihires.cli.errors import ArgumentParser, command, user_input
from minihires.data.entities import CLASSES as CLASS_NAMES
from minihires.data.entities import COLOURS as COLOUR_NAMES
from minihires.model.config import tiny
from minihires.model.llama import Llama

COLOURS, CLASSES = len(COLOUR_NAMES), len(CLASS_NAMES)      # as EntityGrid-QA: 4 and 8
# token ids of the synthetic vocabulary: colour words from 20, class words from 30, place words
# from 50 up to the tiny LLaMA's vocabulary
BOS, PROMPT, ANSWER, COLOUR_WORD, CLASS_WORD, PLACE_WORD = 1, 6, 5, 20, 30, 50
assert COLOUR_WORD + COLOURS <= CLASS_WORD and CLASS_WORD + CLASSES <= PLACE_WORD
MAX_SLOTS = tiny().llama.vocab_size - PLACE_WORD


class LookupLab(nn.Module):
    """The tiny preset's LLaMA plus the three image-token embedding tables."""

    def __init__(self, slots: int, token_shift: int = 0):
        super().__init__()
        cfg = dataclasses.replace(tiny().llama, token_shift=token_shift)   # 0: plain LLaMA
        self.llm = Llama(cfg)
        D = cfg.hidden_size
        self.place = nn.Parameter(torch.randn(slots, D) * D ** -0.5)          # as crop embeddings
        self.colour = nn.Parameter(torch.randn(COLOURS + 1, D) * D ** -0.5)  # last row: empty
        self.cls = nn.Parameter(torch.randn(CLASSES + 1, D) * D ** -0.5)

    def forward(self, colour: torch.Tensor, cls: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
        """colour, cls [B, slots] (COLOURS / CLASSES = empty), asked [B, 2] word ids
        -> logits [B, V] at the answer position."""
        B = colour.shape[0]
        img = self.place + self.colour[colour] + self.cls[cls]                 # (B, slots, D)
        ids = lambda *cols: torch.cat(cols, 1)                                 # noqa: E731
        fill = lambda v, n: torch.full((B, n), v, dtype=torch.long)            # noqa: E731
        before = self.llm.embed(ids(fill(BOS, 1), fill(PROMPT, 2)))            # (B, 3, D)
        after = self.llm.embed(ids(fill(PROMPT, 2), asked, fill(ANSWER, 3)))   # (B, 7, D)
        x = torch.cat([before, img, after], 1)                                 # (B, 10 + slots, D)
        return self.llm(x)[:, -1]                                              # (B, V)


def make_batch(g: torch.Generator, B: int, slots: int, entities: int):
    """Random images and questions -> (colour, cls [B, slots], asked [B, 2], target [B])."""
    rnd = lambda *shape, hi: torch.randint(0, hi, shape, generator=g)          # noqa: E731
    where = torch.rand(B, slots, generator=g).argsort(1)[:, :entities]         # (B, n) distinct slots
    col = rnd(B, entities, hi=COLOURS)
    kls = torch.rand(B, CLASSES, generator=g).argsort(1)[:, :entities]         # distinct classes
    same = torch.rand(B, generator=g) < 0.5                                    # others share the colour
    col[same, 1:] = col[same, :1]
    colour = torch.full((B, slots), COLOURS)
    cls = torch.full((B, slots), CLASSES)
    rows = torch.arange(B)[:, None]
    colour[rows, where], cls[rows, where] = col, kls
    t = rnd(B, hi=entities)                                                    # which entity is asked
    r = torch.arange(B)
    asked = torch.stack([COLOUR_WORD + col[r, t], CLASS_WORD + kls[r, t]], 1)  # (B, 2)
    return colour, cls, asked, PLACE_WORD + where[r, t]


def check(slots, entities=2, steps=1, seed=0, every=1, lr=1e-3, batch_size=64) -> None:
    """Raise ValueError naming the first bad argument of `run`."""
    if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slots must be an int in 1..{MAX_SLOTS}, got {slots!r}")
    if not isinstance(entities, int) or not 1 <= entities <= min(slots, CLASSES):
        raise ValueError(f"entities must be an int in 1..min(slots, {CLASSES}), got {entities!r}")
    if not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    for name, v in (("steps", steps), ("every", every), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in 0..2**31-1, got {seed!r}")


def run(slots: int, entities: int = 2, steps: int = 1500, seed: int = 0, every: int = 100,
        lr: float = 1e-3, batch_size: int = 64, progress=None, bar: bool = False,
        token_shift: int = 0) -> list[tuple[int, float, float]]:
    """Train a fresh lab; -> [(step, train loss, held-out accuracy)] every `every` steps.
    progress(step, loss, acc) is called at each evaluation; bar shows a tqdm progress bar."""
    check(slots, entities, steps, seed, every, lr, batch_size)
    torch.manual_seed(seed)
    lab = LookupLab(slots, token_shift)
    opt = torch.optim.AdamW(lab.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    held_out = make_batch(torch.Generator().manual_seed(10**6 + seed), 512, slots, entities)
    out = []
    for step in tqdm(range(1, steps + 1), disable=not bar, leave=False, unit="step",
                     desc=f"{slots} slots, seed {seed}"):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 60)                             # warmup, then constant
        colour, cls, asked, target = make_batch(g, batch_size, slots, entities)
        loss = F.cross_entropy(lab(colour, cls, asked), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lab.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                colour, cls, asked, target = held_out
                acc = (lab(colour, cls, asked).argmax(-1) == target).float().mean().item()
            out.append((step, loss.item(), acc))
            if progress is not None:
                progress(step, loss.item(), acc)
    return out


def steps_to(curve: list[tuple[int, float, float]], accuracy: float) -> int | None:
    """The first evaluated step at which held-out accuracy reached `accuracy` (None: never)."""
    return next((s for s, _, a in curve if a >= accuracy), None)


@command
def cli_lookup(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="python experiments/lookup.py",
        description="Associative recall among image tokens without the vision tower: steps "
                    "the tiny LLaMA needs to find an entity by its colour and class.")
    p.add_argument("--slots", type=int, nargs="+", default=[2, 4, 9, 16],
                   help="image tokens per image, one run each (default 2 4 9 16)")
    p.add_argument("--entities", type=int, default=2, help="entities per image (default 2)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--token-shift", type=int, default=0, choices=range(9), metavar="N",
                   help="the LLM's token shift (default 0, plain LLaMA, as the tables in "
                        "docs/results.md; the tiny preset's is 3)")
    p.add_argument("--verbose", action="store_true", help="print every evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    with user_input():
        for slots in args.slots:
            for seed in args.seeds:
                check(slots, args.entities, args.steps, seed, args.every, args.lr)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(f"lookup lab: {args.entities} entities, {args.steps} steps x 64 questions, lr {args.lr}; "
          f"steps until held-out accuracy >= 90% (chance {100 / args.entities:.0f}%)")
    print(f"{'slots':>6} {'seed':>5} {'steps to 90%':>13} {'final acc %':>12} {'time s':>7}")
    show = (lambda s, l, a: print(f"    step {s}: loss {l:.3f}, acc {100 * a:.1f}%")) \
        if args.verbose else None
    for slots in args.slots:
        for seed in args.seeds:
            t0 = time.perf_counter()
            curve = run(slots, args.entities, args.steps, seed, args.every, args.lr,
                        progress=show, bar=not args.quiet, token_shift=args.token_shift)
            hit = steps_to(curve, 0.9)
            print(f"{slots:>6} {seed:>5} {hit if hit else f'> {args.steps}':>13} "
                  f"{100 * curve[-1][2]:>12.1f} {time.perf_counter() - t0:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_lookup(sys.argv[1:]))
