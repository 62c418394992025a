"""`python experiments/seam_pretrain.py`: the ViT on whole sliced canvases, with or without SRA.

The second stage of the seam-board experiment (`seam_boards.py` holds the boards and the first
stage, `probe`). `probe` teaches a ViT inside one slice, where no board is ever cut. Here the
same ViT sees the whole 2 x 2 canvas the way the main job slices it: four 32-px slices, each
encoded alone, with SliceRestore adapters after the chosen blocks (`--sra-layers 0,1,2`) or
none (`--sra-layers none`). A linear head reads the mean of the tokens that cover the entity,
wherever its slices put them, and says whole or broken (and, with --classes, which pattern).

This measures fragmentation at the encoder, away from the language model: a seam-cut board of
kind C shows each slice a side whose distribution is the same for both answers, so without
SRA only a sum of per-slice features reaches the head; with SRA a token at the seam can look
across it. Held-out accuracy is split into on-seam and off-seam boards.

`--whole` runs the ViT once over the uncut canvas instead, as the whole-canvas control does.
Every arm starts from the same `probe --save` weights and sees the same samples in the same
order (one rng); only the encoder's view of the canvas differs. `--save` writes the ViT with
its adapters, which `seam_boards.py ablate --encoder` (no adapters) or `--sra-encoder` loads
into the variants of its kind.
Choices are ours: AdamW at lr 1e-3, batch 32 canvases, 512 held-out canvases.
"""
from __future__ import annotations

import random
import sys
import time

import seam_boards as SB
import torch
from PIL import Image, ImageDraw

from minihires.cli.errors import ArgumentParser, command, user_input
from minihires.data import entities
from minihires.model import slicing
from minihires.model.config import tiny
from minihires.model.vit import VisionTransformer

CFG = SB.CFG
R, C, S = CFG.rows, CFG.cols, CFG.slice_size


def canvas_batch(board: str, rng, n: int, classes: bool = False):
    """n canvases with one entity anywhere: (slices [n*R*C, 3, S, S] in raster order per
    canvas, label [n], on_seam [n], is_board [n], mask [n, R*g, C*g] of the tokens that cover
    the entity). Labels as `SB.slice_batch`: 0 whole, 1 broken, 2 + class index."""
    P = tiny().vit.patch_size
    g = S // P
    xs, ys, seams, boards, masks = [], [], [], [], []
    names, colours = list(entities.CLASSES), list(entities.COLOURS)
    for _ in range(n):
        image = Image.new("RGB", (CFG.width, CFG.height))
        position = rng.choice(list(entities.POSITIONS))
        if classes and rng.random() < 0.5:
            cls = rng.choice(names)
            e = entities.place(cls, rng.choice(colours), position, CFG,
                               rng.randint(-CFG.jitter, CFG.jitter),
                               rng.randint(-CFG.jitter, CFG.jitter))
            entities.draw_entity(ImageDraw.Draw(image), e.cls, e.colour, e.bbox)
            label = 2 + names.index(cls)
        else:
            broken = rng.random() < 0.5
            colour = rng.choice(colours) if classes else "red"
            e = SB.place(board)(colour, position, CFG, broken, rng)
            SB.draw(board)(ImageDraw.Draw(image), e.colour, e.bbox, e.split)
            label = int(broken)
        xs.append(slicing.crops(image, (R, C), S, 0.0, "box")[1:])     # (R*C, 3, S, S)
        x0, y0, x1, y1 = e.bbox
        mask = torch.zeros(R * g, C * g, dtype=torch.bool)
        mask[y0 // P:(y1 - 1) // P + 1, x0 // P:(x1 - 1) // P + 1] = True   # patches it touches
        ys.append(label)
        seams.append(e.on_seam)
        boards.append(label < 2)
        masks.append(mask)
    return (torch.cat(xs), torch.tensor(ys), torch.tensor(seams), torch.tensor(boards),
            torch.stack(masks))


def canvas_tokens(vit: VisionTransformer, x: torch.Tensor, whole: bool = False) -> torch.Tensor:
    """Slices [n*R*C, 3, S, S] -> the patch tokens on their canvases [n, R*g, C*g, D]: each
    slice encoded alone, or (`whole`) one pass over the stitched canvas, nothing cut."""
    n = x.shape[0] // (R * C)
    if whole:
        x = x.reshape(n, R, C, 3, S, S).permute(0, 3, 1, 4, 2, 5)        # (n, 3, R, S, C, S)
        t = vit(x.reshape(n, 3, R * S, C * S))[:, 1:]                   # (n, R*g*C*g, D)
        return t.reshape(n, R * S // vit.cfg.patch_size, C * S // vit.cfg.patch_size, -1)
    t = vit(x, [(R, C)] * n)[:, 1:]                                     # (n*R*C, g*g, D)
    g = int(t.shape[1] ** 0.5)
    t = t.reshape(n, R, C, g, g, -1).permute(0, 1, 3, 2, 4, 5)          # (n, R, g, C, g, D)
    return t.reshape(n, R * g, C * g, -1)                               # (n, R*g, C*g, D)


def build_vit(sra_layers: tuple[int, ...], init: dict | None = None) -> VisionTransformer:
    """The tiny ViT with adapters after `sra_layers`, from `init` (ViT weights, e.g. a `probe
    --save` state dict; adapters it lacks stay new) or fresh; ValueError if `init` misfits."""
    m = tiny()
    m.vit.sra_layers = tuple(sra_layers)
    vit = VisionTransformer(m.vit, m.sra)
    if init is not None:
        missing, unexpected = vit.load_state_dict(init, strict=False)
        if unexpected or any(not k.startswith("sra.") for k in missing):
            raise ValueError(f"these weights do not fit the tiny ViT with SRA after "
                             f"{list(sra_layers)}: missing {missing}, unexpected {unexpected}")
    return vit


def pretrain(board: str, steps: int, sra_layers: tuple[int, ...], init: dict | None = None,
             seed: int = 0, every: int = 100, batch: int = 32, classes: bool = False,
             whole: bool = False, progress=print):
    """Train `build_vit(sra_layers, init)` and a linear head on `canvas_batch` (`whole`: the
    ViT over the whole canvas, as the whole-canvas control runs it);
    -> (vit, [(step, on-seam board acc, off-seam board acc, class acc)])."""
    if whole and sra_layers:
        raise ValueError("a whole-canvas pass cuts nothing, so it takes no adapters")
    torch.manual_seed(seed)
    vit = build_vit(sra_layers, init)
    head = torch.nn.Linear(vit.cfg.hidden_size, 2 + len(entities.CLASSES) * classes)
    opt = torch.optim.AdamW([p for p in [*vit.parameters(), *head.parameters()]
                             if p.requires_grad], lr=1e-3)
    rng = random.Random(seed)
    tx, ty, tseam, tboard, tmask = canvas_batch(board, random.Random(seed + 99), 512, classes)

    def logits(x, mask):                             # mean of the entity's tokens
        t = canvas_tokens(vit, x, whole)                                # (n, R*g, C*g, D)
        w = mask.unsqueeze(-1).to(t.dtype)                              # (n, R*g, C*g, 1)
        return head((t * w).sum((1, 2)) / w.sum((1, 2)))                # (n, classes)
    curve = []
    for step in range(1, steps + 1):
        x, y, _, _, mask = canvas_batch(board, rng, batch, classes)
        loss = torch.nn.functional.cross_entropy(logits(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                ok = torch.cat([logits(tx[i * R * C:(i + 64) * R * C], tmask[i:i + 64])
                                .argmax(1) for i in range(0, len(ty), 64)]) == ty
            acc = [ok[sel].float().mean().item() if sel.any() else float("nan")
                   for sel in (tboard & tseam, tboard & ~tseam, ~tboard)]
            curve.append((step, *acc))
            progress(f"step {step}: loss {loss.item():.3f}, held-out boards on-seam "
                     f"{100 * acc[0]:.1f}%, off-seam {100 * acc[1]:.1f}%"
                     + (f", classes {100 * acc[2]:.1f}%" if classes else ""))
    return vit, curve


def layers(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); 'none' -> ()."""
    return () if text == "none" else tuple(int(b) for b in text.split(","))


@command
def cli_seam_pretrain(argv: list[str]) -> int:
    p = ArgumentParser(prog="python experiments/seam_pretrain.py",
                       description="The ViT on whole sliced canvases, with or without SRA.")
    p.add_argument("--board", choices=SB.BOARDS, required=True)
    p.add_argument("--sra-layers", type=layers, required=True, metavar="B1,B2,...|none",
                   help="adapters after these ViT blocks, or none")
    p.add_argument("--init", default=None, help="start from these ViT weights (probe --save)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32, help="canvases per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--classes", action="store_true", help="also teach the pattern classes")
    p.add_argument("--whole", action="store_true",
                   help="one ViT pass over the whole canvas, nothing cut (needs --sra-layers none)")
    p.add_argument("--save", default=None, help="write the ViT and its adapters here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch < 1:
        p.error("--steps, --every and --batch must be >= 1")
    if args.whole and args.sra_layers:
        p.error("--whole cuts nothing, so it takes no adapters: use --sra-layers none")
    if any(b < 0 or b >= tiny().vit.num_hidden_layers for b in args.sra_layers):
        p.error(f"--sra-layers: blocks run 0..{tiny().vit.num_hidden_layers - 1}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    init = None
    if args.init:
        with user_input("--init: "):             # a missing or unreadable file: one error line
            init = torch.load(args.init, weights_only=True)
            build_vit(args.sra_layers, init)     # fits, or one line says what does not
    t = time.time()
    vit, _ = pretrain(args.board, args.steps, args.sra_layers, init, args.seed, args.every,
                      args.batch, args.classes, args.whole)
    what = "whole canvas" if args.whole else f"SRA after {list(args.sra_layers) or 'no block'}"
    print(f"board {args.board}, {what}: "
          f"{args.steps} steps in {time.time() - t:.0f} s")
    if args.save:
        torch.save(vit.state_dict(), args.save)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_seam_pretrain(sys.argv[1:]))
