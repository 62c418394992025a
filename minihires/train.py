"""`python -m minihires train`: HiRes-LLaVA from scratch on EntityGrid-QA, then the test table.

    tokenizer  <- trained in-process on every question and answer text (entitygrid.question_texts)
    model      <- preset (default tiny) + ablation switches, random init from --seed
    for step in 0..steps-1:
        batch  <- step-indexed slice of the on-the-fly stream (data.train_samples), each image
                  with `turns` questions about it (data.conversation), packed so that each
                  sees the image but not the others (minihires.shared_prefix)
        loss   <- next-token cross-entropy on answer tokens; AdamW, warmup + cosine lr
    metrics    <- greedy KV-cache answers on the fixed test split (data.evaluate)

The whole model trains (ViT, SliceRestore, sampler, projector, LLaMA); nothing is
pretrained. Budgets are counted in steps, not seconds, so a result does not depend on how
busy the machine is. Under `torchrun` the same code runs DistributedDataParallel (gloo on
CPU, nccl on GPU); each rank draws its own seeds and only rank 0 writes.

Choices that are ours: the schedule (linear warmup, cosine to min_lr_ratio * lr), AdamW
betas (0.9, 0.98), weight decay on matrices only, gradient clipping at 1, bf16 autocast on
GPU only, several questions per training image that do not see each other (`turns`,
`chat_turns`, see `minihires.data`), tokenizer pieces that may cross spaces (`span_words`:
on this closed vocabulary each answer, place and entity becomes one piece), and
`vision_lr_scale`: the ViT encoder (embeddings and blocks; not the SliceRestore adapters)
learns at a fraction of the peak lr. Measured with the previous defaults (tiny, seed 0, 1000
steps, one question per image): recognition 11% with --vision-lr-scale 1, 77% with 0.1.
Our reading, from probes made while tuning: at the full lr the ViT soon becomes a colour
detector (colour answers the easy half of every question) and the pattern class, which is
what slices are for, fades from its tokens before the LLM has learned to read it.

Threads: torch's default, one per core (torchrun sets OMP_NUM_THREADS=1 per rank). Measured
on the 2-core machine (tiny preset, 32 images x 3 questions a step, median step time over 10
steps of this loop; `train --turns 3 --steps 30 --eval-n 0 --threads N` shows the rate):
with the cores idle, 2 threads 0.33 s a step and 1 thread 0.57 s; with another busy process
on the machine, 2 threads 1.17 s (OpenMP threads spin waiting for the busy core) and 1 thread
0.59 s. So pass --threads 1 when the cores are shared, e.g. two runs side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt
from . import data
from .data import results_table
from .config import PRESETS, ModelConfig, preset
from .entitygrid import POSITIONS, EntityGridConfig, question_texts
from .model import HiResLLaVA
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """Everything a run depends on besides the model preset (saved in config.json)."""
    preset: str = "tiny"
    steps: int = 1200
    batch_size: int = 32           # images per step per rank
    turns: int = 5                 # questions per training image (data.conversation)
    chat_turns: bool = False       # True: the turns as one conversation, each sees the
                                   # earlier ones; False: each sees only the image prompt
    lr: float = 1e-3
    min_lr_ratio: float = 0.05     # cosine ends at lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.01
    vision_lr_scale: float = 0.1   # the vision tower learns at lr * this (see the docstring)
    freeze_vision_at: int | None = None  # from this step on the vision side (ViT, SRA,
                                   # sampler) is frozen: no backward through it, cheaper steps
    grad_clip: float = 1.0
    seed: int = 0
    vocab_size: int = 256          # tokenizer pieces (an upper bound)
    span_words: bool = True        # tokenizer pieces may cross spaces: every answer one piece
    train_max_entities: int = 2    # training recognition/position images hold 1..this many
                                   # entities (the test split: 1..2, EntityGridConfig)
    eval_n: int = 540              # test samples; 0 skips the evaluation
    eval_batch_size: int = 180
    ckpt_every: int = 200          # steps between resume checkpoints
    threads: int | None = None     # CPU threads; None keeps torch's (a thread per core,
                                   # or OMP_NUM_THREADS, which torchrun sets to 1)
    device: str = "cpu"
    # ablation switches; None keeps the preset's value
    use_slices: bool | None = None
    use_sra: bool | None = None
    crop_embedding: bool | None = None
    compression: str | None = None
    overlap: float | None = None

    def validate(self) -> None:
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        need(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "turns", "eval_batch_size", "ckpt_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "an int >= 1")
        need(isinstance(self.train_max_entities, int)
             and 1 <= self.train_max_entities <= len(POSITIONS), "train_max_entities",
             f"an int in 1..{len(POSITIONS)} (one entity per place)")
        need(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             "threads", "an int >= 1 or None")
        need(isinstance(self.eval_n, int) and self.eval_n >= 0, "eval_n", "an int >= 0")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
             "an int >= 0")
        need(self.freeze_vision_at is None
             or (isinstance(self.freeze_vision_at, int) and self.freeze_vision_at >= 0),
             "freeze_vision_at", "an int >= 0 or None")
        need(isinstance(self.seed, int) and 0 <= self.seed <= data.MAX_RUN_SEED, "seed",
             f"an int in 0..{data.MAX_RUN_SEED}")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(0 <= self.vision_lr_scale and math.isfinite(self.vision_lr_scale),
             "vision_lr_scale", "a number >= 0")
        need(self.compression in (None, "sms", "avg", "none"), "compression",
             "'sms', 'avg' or 'none'")
        need(self.overlap is None or 0 <= self.overlap < 1, "overlap", "in [0, 1)")
        need(self.device == "cpu" or self.device.startswith("cuda"), "device",
             "'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but no CUDA GPU is available")

    def model_config(self) -> ModelConfig:
        cfg = preset(self.preset)
        switches = {k: getattr(self, k)
                    for k in ("use_slices", "use_sra", "compression", "overlap", "crop_embedding")}
        return dataclasses.replace(cfg, **{k: v for k, v in switches.items() if v is not None})


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build(tc: TrainConfig) -> tuple[ModelConfig, EntityGridConfig, Tokenizer]:
    """Model config (paired with the tokenizer), data config and the trained tokenizer."""
    model_cfg = tc.model_config()
    data_cfg = data.data_config(model_cfg)
    tokenizer = Tokenizer.train(question_texts(data_cfg), tc.vocab_size,
                                span_words=tc.span_words)
    if tokenizer.vocab_size > model_cfg.llama.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than "
                         f"llama.vocab_size = {model_cfg.llama.vocab_size}")
    model_cfg.image_token_index = tokenizer.image_id
    return model_cfg, data_cfg, tokenizer


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only. The ViT encoder's groups (its embeddings and
    blocks, not the SliceRestore adapters) carry lr_scale = tc.vision_lr_scale; the loop sets
    each group's lr to lr_at(step) * lr_scale."""
    tower = model.vision_tower if hasattr(model, "vision_tower") else torch.nn.Module()
    vision = {id(p) for n, p in tower.named_parameters() if not n.startswith("sra.")}
    groups = []
    for is_vision, scale in ((False, 1.0), (True, tc.vision_lr_scale)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in vision) == is_vision]
        groups += [{"params": [p for p in params if p.dim() >= 2],    # matrices, embeddings
                    "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2],     # biases, norms, vectors
                    "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, 0.98),
                             eps=1e-8)


def freeze_vision(model: HiResLLaVA) -> None:
    """Stop training the vision side (ViT, SRA adapters, sampler): autograd then skips the
    backward through it, a third of a tiny-preset CPU step (`train --steps 60 --eval-n 0`,
    train time / 60 at 2 threads: 0.35 s, and 0.23 s with --freeze-vision-at 0). The optimizer keeps their state; AdamW skips parameters
    without a gradient."""
    for module in (model.vision_tower, getattr(model, "sampler", None)):
        if module is not None:
            module.requires_grad_(False)


def param_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal hashes = bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def train(tc: TrainConfig, out: str | os.PathLike, resume: bool = False,
          stop_at: int | None = None, progress: bool = True) -> dict | None:
    """Train (or resume) a run into folder `out`; return its metrics (None if stopped early).

    stop_at: stop after this many steps as an interruption would (checkpoint, no eval).
    Under torchrun every rank calls this; ranks other than 0 return None.
    """
    tc.validate()
    out = Path(out)
    rank, world, local_rank = _distributed()
    device = torch.device(tc.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and tc.threads is not None:
        torch.set_num_threads(tc.threads)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    model_cfg, data_cfg, tokenizer = build(tc)
    train_cfg = dataclasses.replace(data_cfg, max_entities=tc.train_max_entities)  # the stream's
    torch.manual_seed(tc.seed)
    model = HiResLLaVA(model_cfg).to(device)
    opt = make_optimizer(model, tc)
    start, train_time, losses = 0, 0.0, []
    if resume:
        state = ckpt.load_state(out)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state)
        start, train_time, losses = state["step"], state["train_time_s"], state["losses"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(out, model_cfg, dataclasses.asdict(tc), data_cfg, tokenizer)

    def wrap() -> torch.nn.Module:
        """DDP over the parameters that train now (DDP fixes its set when it is built)."""
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    frozen, ddp = False, wrap()         # the loop freezes at freeze_vision_at, or at once on
                                        # resuming past it

    def save(step: int) -> None:
        if rank == 0:
            ckpt.save_state(out, model, opt, step, extra={"train_time_s": train_time,
                                                          "losses": losses[-100:]})
            ckpt.save_weights(out, model, step)

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not progress or rank != 0, desc="train")
    model.train()
    step = start
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            if not frozen and tc.freeze_vision_at is not None and step >= tc.freeze_vision_at:
                frozen = True
                freeze_vision(model)
                ddp = wrap()
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            samples = data.train_samples(tc.seed, step, tc.batch_size, train_cfg, rank, world)
            batch = data.make_batch(samples, tokenizer, model_cfg, tc.turns, train_cfg,
                                    tc.chat_turns).to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                _, loss = ddp(**batch.kwargs())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            train_time += time.perf_counter() - t0
            losses.append(loss.item())
            if (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                save(step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}",
                            samples_s=f"{(step + 1 - start) * tc.batch_size * world / train_time:.0f}")
        step = end
    except KeyboardInterrupt:
        bar.close()
        save(step)
        if rank == 0:
            print(f"\ninterrupted after step {step}; continue with "
                  f"`python -m minihires train --resume {out}`", file=sys.stderr)
        raise
    bar.close()
    save(step)

    hashes = None
    if world > 1:                                  # ranks must hold the same weights
        hashes = [None] * world
        dist.all_gather_object(hashes, param_hash(model))
        if len(set(hashes)) != 1:
            raise RuntimeError(f"ranks diverged: parameter hashes {hashes}")
    if step < tc.steps or rank != 0:
        if rank == 0:
            print(f"stopped after step {step} of {tc.steps}; continue with "
                  f"`python -m minihires train --resume {out}`")
        return None

    metrics = {"steps": tc.steps, "seed": tc.seed, "batch_size": tc.batch_size,
               "world_size": world, "samples_seen": tc.steps * tc.batch_size * world,
               "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
               "visual_tokens": data.visual_tokens(model_cfg, data_cfg),
               "train_time_s": train_time, "device": str(device),
               "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "preset": tc.preset, "use_slices": model_cfg.use_slices,
               "use_sra": model_cfg.use_sra, "compression": model_cfg.compression,
               "overlap": model_cfg.overlap, "crop_embedding": model_cfg.crop_embedding,
               "vision_lr_scale": tc.vision_lr_scale, "freeze_vision_at": tc.freeze_vision_at,
               "turns": tc.turns,
               "chat_turns": tc.chat_turns, "span_words": tc.span_words,
               "train_max_entities": tc.train_max_entities,
               "param_hash": param_hash(model), "rank_param_hashes": hashes}
    if tc.eval_n:
        t0 = time.perf_counter()
        model.eval()
        with tqdm(total=tc.eval_n, unit="q", desc="eval", dynamic_ncols=True,
                  disable=not progress) as ebar:
            scores, _ = data.evaluate(model, tokenizer, data_cfg, tc.eval_n, tc.eval_batch_size,
                                      autocast, ebar.update)
        metrics.update(scores, eval_n=tc.eval_n, eval_time_s=time.perf_counter() - t0)
    metrics["wall_time_s"] = metrics["train_time_s"] + metrics.get("eval_time_s", 0.0)
    ckpt.write_json(out / ckpt.METRICS, metrics)
    return metrics


# ---------------------------------------------------------------------------- command line

_CONFIG_FLAGS = ("preset", "steps", "batch_size", "turns", "chat_turns", "lr", "vision_lr_scale",
                 "freeze_vision_at",
                 "seed", "eval_n", "span_words", "train_max_entities",
                 "compression", "overlap", "use_slices", "use_sra", "crop_embedding",
                 "warmup_steps", "ckpt_every")


def cli_train(argv: list[str]) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m minihires train",
        description="Train HiRes-LLaVA from scratch on EntityGrid-QA, then score the test split.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"(default {d.preset})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step per rank (default {d.batch_size})")
    p.add_argument("--turns", type=int, default=None,
                   help=f"questions per training image (default {d.turns})")
    p.add_argument("--chat-turns", dest="chat_turns", action="store_const", const=True,
                   help="ask an image's questions as one conversation, each seeing the earlier "
                        "questions and answers (default: each sees only the image prompt)")
    p.add_argument("--span-words", dest="span_words", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="let tokenizer pieces cross spaces, so each answer is one piece "
                        "(default); --no-span-words ends every piece at a space")
    p.add_argument("--train-max-entities", type=int, default=None, metavar="N",
                   help="training recognition/position images hold 1..N entities "
                        f"(default {d.train_max_entities}; the test split holds 1..2)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--vision-lr-scale", type=float, default=None,
                   help=f"the vision tower's lr as a fraction of --lr (default {d.vision_lr_scale})")
    p.add_argument("--freeze-vision-at", type=int, default=None, metavar="STEP",
                   help="freeze the vision tower and sampler from STEP on (default: never)")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"(default {d.warmup_steps})")
    p.add_argument("--seed", type=int, default=None, help=f"init and data seed (default {d.seed})")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core)")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--eval-n", type=int, default=None,
                   help=f"test samples to score, 0 = none (default {d.eval_n})")
    p.add_argument("--ckpt-every", type=int, default=None, help=f"(default {d.ckpt_every})")
    p.add_argument("--no-slices", dest="use_slices", action="store_const", const=False,
                   help="ablation: thumbnail only")
    p.add_argument("--no-sra", dest="use_sra", action="store_const", const=False,
                   help="ablation: no SliceRestore adapter")
    p.add_argument("--no-crop-embedding", dest="crop_embedding", action="store_const",
                   const=False, help="ablation: no learned crop embedding on the visual tokens")
    p.add_argument("--compression", choices=("sms", "avg", "none"), default=None,
                   help="token compression per crop (default: the preset's, sms)")
    p.add_argument("--overlap", type=float, default=None,
                   help="fraction of a slice shared with its neighbour (default 0)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run with its saved configuration")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps as an interruption would (resume later)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in _CONFIG_FLAGS if getattr(args, k) is not None]
        if given or args.out is not None:
            p.error(f"--resume continues the run's saved configuration; drop {', '.join(given) or '--out'}")
        try:
            run_dir = ckpt.check_run_dir(args.resume, ckpt.CONFIG, ckpt.TOKENIZER, ckpt.STATE)
            _, saved, _ = ckpt.load_config(run_dir)
            saved.setdefault("chat_turns", True)     # run folders from before packing chatted
            saved.setdefault("span_words", False)    # and ended every piece at a space
            tc = TrainConfig(**saved)
        except (FileNotFoundError, ValueError, TypeError) as e:
            p.error(f"--resume: {e}")
        for k in ("device", "threads"):
            if getattr(args, k) is not None:
                setattr(tc, k, getattr(args, k))
        out = run_dir
    else:
        tc = TrainConfig(**{k: getattr(args, k) for k in (*_CONFIG_FLAGS, "device", "threads")
                            if getattr(args, k) is not None})
        out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if out.exists() and not out.is_dir():
            p.error(f"--out {out} exists and is not a folder")
        if (out / ckpt.CONFIG).exists():
            p.error(f"--out {out} already holds a run; pass --resume {out} or choose another --out")
    try:
        tc.validate()
    except ValueError as e:
        p.error(str(e))
    if args.stop_at is not None and args.stop_at < 1:
        p.error(f"--stop-at must be >= 1, got {args.stop_at}")

    rank = _distributed()[0]
    if rank == 0:
        model_cfg = tc.model_config()
        print(f"minihires train: preset {tc.preset}, {tc.steps} steps x {tc.batch_size} images "
              f"x {tc.turns} questions{' (one conversation)' if tc.chat_turns else ''}, "
              f"lr {tc.lr}, seed {tc.seed}, device {tc.device}"
              + (f", {tc.threads or torch.get_num_threads()} thread(s)" if tc.device == "cpu" else "")
              + f" -> {out}\n  model: slices={model_cfg.use_slices} sra={model_cfg.use_sra} "
              f"compression={model_cfg.compression} overlap={model_cfg.overlap} "
              f"crop_embedding={model_cfg.crop_embedding} vision_lr_scale={tc.vision_lr_scale}")
    try:
        metrics = train(tc, out, resume=args.resume is not None, stop_at=args.stop_at,
                        progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None:
        print(results_table(metrics))
        print(f"wrote {out}/ ({', '.join(sorted(os.listdir(out)))})")
    return 0
