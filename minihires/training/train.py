"""`python -m minihires train`: HiRes-LLaVA on EntityGrid-QA, then the test table.

    tokenizer  <- trained in-process on every question and answer text (entitygrid.question_texts)
    model      <- preset (default tiny) + ablation switches, random init from --seed; the
                  vision tower then starts from pretrained weights (vit_init: by default the
                  shipped encoder that fits the model, `minihires.training.encoders`); with
                  lm_steps the LLM first learns the lookup on scenes in words (pretrain_lm)
    for step in 0..steps-1:
        batch  <- step-indexed slice of the on-the-fly stream (data.train_samples), each image
                  with `turns` questions about it (data.conversation), packed so that each
                  sees the image but not the others (minihires.model.shared_prefix)
        loss   <- next-token cross-entropy on answer tokens; AdamW, warmup + cosine lr
    speed      <- the FLOPs of a step, counted once before the loop, against a float32 matmul
                  timed at the start of the run (minihires.analysis.flops): model-FLOPs
                  utilisation, printed with samples/s and kept in metrics.json
    metrics    <- greedy KV-cache answers on the fixed test split (scoring.evaluate)

The whole model trains (ViT, SliceRestore, sampler, projector, LLaMA). Only the ViT and its
adapters start pretrained, as LLaVA's CLIP does (vit_init None: from scratch too); lm_steps
adds a language stage (`minihires.training.pretrain_lm`, counted as training time).
Budgets are counted in steps, not seconds, so a result does not depend on how busy the
machine is. Under `torchrun` the same code runs DistributedDataParallel (gloo on CPU, nccl
on GPU); each rank draws its own seeds and only rank 0 writes. The process group's life
(bounded waits, a failing rank stopping the others, every rank leaving it together
before rank 0 evaluates) is `minihires.training.distributed`'s. A run folder is checked and
written by `minihires.training.checkpoint`: a resume goes only forward, and a step whose loss
is not finite stops the run (`Diverged`) before it can write a checkpoint.

Choices that are ours: the schedule (linear warmup, cosine to min_lr_ratio * lr), AdamW
betas (0.9, 0.98), weight decay on matrices only, gradient clipping at 1, bf16 autocast on
GPU only, several questions per training image that do not see each other (`turns`,
`chat_turns`, see `minihires.data.batches`), tokenizer pieces that may cross spaces
(`span_words`: on this closed vocabulary each answer, place and entity becomes one piece),
and `vision_lr_scale`: the ViT encoder (embeddings and blocks; not the SliceRestore
adapters) learns at a fraction of the peak lr. Why (our reading): at the full lr the
from-scratch ViT soon becomes a colour detector (colour answers the easy half of every
question) and the pattern class, which is what slices are for, fades from its tokens before
the LLM has learned to read it.

Threads: torch's default, one per core (torchrun sets OMP_NUM_THREADS=1 per rank). When the
cores are shared (another busy process, two runs side by side) pass --threads 1: OpenMP
threads spin waiting for a busy core. A run is bitwise repeatable for one machine and thread
count, not across thread counts (docs/results.md, "Determinism").
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minihires.analysis import flops
from minihires.data import batches as data
from minihires.data.entitygrid import (
    POSITIONS,
    TEST_SEED_SPAN,
    EntityGridConfig,
    question_texts,
)
from minihires.model import HiResLLaVA
from minihires.model.config import COMPRESSIONS, PRESETS, ModelConfig, preset
from minihires.model.tokenizer import Tokenizer
from minihires.training import checkpoint as ckpt
from minihires.training import distributed
from minihires.training import encoders
from minihires.training import evaluate as scoring
from minihires.training.encoders import BUNDLED
from minihires.training.pretrain_lm import first_step, lookup_accuracy, pretrain_lm
from minihires.training.pretrain_vit import load_vit
from minihires.training.progress import bar as progress_bar

log = logging.getLogger(__name__)   # messages for the user; the command line shows them
MAX_THREADS = 1024                  # torch.set_num_threads crashes the process far above it

@dataclass
class TrainConfig:
    """Everything a run depends on besides the model preset (saved in config.json)."""
    preset: str = "tiny"
    steps: int = 1000
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
    eval_n: int = 720              # test samples; 0 skips the evaluation
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
    whole_canvas: bool | None = None      # the native-resolution control (ModelConfig)
    sra_layers: list[int] | None = None   # ViT blocks SliceRestore follows (vit.sra_layers)
    thumbnail_filter: str | None = None   # "bicubic" or "box" (ModelConfig)
    token_shift: int | None = None        # the LLM's token shift, 0 = off (llama.token_shift)
    tasks: list[str] | None = None        # EntityGrid-QA tasks; None: all four
    vit_init: str | None = BUNDLED        # the ViT's start: BUNDLED (the shipped encoder that
                                          # fits the model, `encoders`), a `pretrain-vit --out`
                                          # file, or None (from scratch)
    vit_init_sha256: str | None = None    # that file's SHA-256, recorded when the run starts
    lm_steps: int = 0                     # language-stage steps before the main job (pretrain_lm)
    # the real-model path (`minihires.training.recipe`): LLaVA-format data instead of the
    # built-in stream; everything below needs `data`
    data: str | None = None               # a LLaVA-format JSON file
    image_folder: str | None = None       # its images' root
    skip_bad_rows: bool = False           # skip (and count) malformed rows instead of failing
    tokenizer: str | None = None          # a tokenizer.model for a model from scratch
    init_from_hf: list[str] | None = None  # [CLIP vision folder, LLaMA folder]
    init_from_llava: str | None = None    # a LLaVA-1.5 folder
    init_from_run: str | None = None      # a run folder (stage 1 -> stage 2)
    stage: str = "full"                   # full, pretrain or finetune (recipe.set_stage)
    train_vision: bool = False            # finetune: the ViT encoder trains too
    grad_accum: int = 1                   # micro-batches per optimizer step
    epochs: float | None = None           # sets steps from the file's rows and global batch
    warmup_ratio: float | None = None     # sets warmup_steps as a fraction of steps
    fsdp: bool = False                    # FSDP2 under torchrun (else DDP)
    grad_checkpointing: bool = False      # recompute each block's activations in backward
    workers: int = 0                      # DataLoader worker processes

    def validate(self) -> None:
        """ValueError naming the first field with a wrong type or value."""
        def need(check, name, what):
            try:
                ok = bool(check(getattr(self, name)))
            except TypeError:               # e.g. a string from an edited config.json
                ok = False
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v, lo, hi=None):
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= (hi or v)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(lambda v: isinstance(v, str) and v in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "turns", "eval_batch_size", "ckpt_every"):
            need(lambda v: is_int(v, 1), name, "an int >= 1")
        need(lambda v: is_int(v, 1, len(POSITIONS)), "train_max_entities",
             f"an int in 1..{len(POSITIONS)} (one entity per place)")
        need(lambda v: v is None or is_int(v, 1, MAX_THREADS), "threads",
             f"an int in 1..{MAX_THREADS} or None")
        need(lambda v: is_int(v, 0, TEST_SEED_SPAN), "eval_n",
             f"an int >= 0 and at most {TEST_SEED_SPAN} (the test split's size)")
        need(lambda v: is_int(v, 0), "warmup_steps", "an int >= 0")
        need(lambda v: v is None or is_int(v, 0), "freeze_vision_at", "an int >= 0 or None")
        need(lambda v: is_int(v, 0, data.MAX_RUN_SEED), "seed",
             f"an int in 0..{data.MAX_RUN_SEED}")
        need(lambda v: is_int(v, 8), "vocab_size", "an int >= 8")
        need(lambda v: is_num(v) and v > 0, "lr", "a positive number")
        need(lambda v: is_num(v) and 0 <= v <= 1, "min_lr_ratio", "in [0, 1]")
        need(lambda v: is_num(v) and v >= 0, "weight_decay", "a number >= 0")
        need(lambda v: is_num(v) and v > 0, "grad_clip", "a positive number")
        need(lambda v: is_num(v) and v >= 0, "vision_lr_scale", "a number >= 0")
        for name in ("chat_turns", "span_words"):
            need(lambda v: isinstance(v, bool), name, "true or false")
        for name in ("use_slices", "use_sra", "crop_embedding"):
            need(lambda v: v is None or isinstance(v, bool), name, "true, false or None")
        need(lambda v: v is None or is_int(v, 0, 8), "token_shift", "an int in 0..8 or None")
        need(lambda v: v is None or v in COMPRESSIONS, "compression",
             f"one of {COMPRESSIONS} or None")
        need(lambda v: v is None or (is_num(v) and 0 <= v < 1), "overlap", "in [0, 1)")
        need(lambda v: v is None or (isinstance(v, (list, tuple))
                                     and all(is_int(b, 0) for b in v)),
             "sra_layers", "a list of block numbers >= 0 or None")
        self.model_config()     # the switches must fit the preset (e.g. overlap needs no SRA)
        need(lambda v: is_int(v, 0), "lm_steps", "an int >= 0")
        if self.lm_steps and self.data is not None:
            raise ValueError("lm_steps teaches the LLM on EntityGrid-QA scenes in words, for the "
                             "built-in stream's model; it cannot be combined with data")
        if self.lm_steps and self.tasks is not None and "position" not in self.tasks:
            raise ValueError(f"lm_steps teaches position questions, but the run's tasks "
                             f"{self.tasks} ask none")
        need(lambda v: v is None or isinstance(v, str) and v, "vit_init", "a path or None")
        need(lambda v: v is None or (self.vit_init not in (None, BUNDLED) and isinstance(v, str)
                                     and re.fullmatch(r"[0-9a-f]{64}", v)),
             "vit_init_sha256", "None or, with vit_init, 64 hex digits")
        if self.vit_init not in (None, BUNDLED) and self.data is not None:
            raise ValueError("vit_init starts the built-in stream's model from `pretrain-vit` "
                             "weights; a --data run initialises with --init-from-hf/-llava/-run")
        self._validate_data(need, is_int, is_num)
        if self.tasks is not None:
            try:
                EntityGridConfig(tasks=self.tasks)
            except ValueError as e:
                raise ValueError(str(e)) from None          # "tasks must be ..."
        need(lambda v: isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v), "device",
             "'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device is {self.device!r} but no CUDA GPU is available")
            if int(self.device.partition(":")[2] or 0) >= torch.cuda.device_count():
                raise ValueError(f"device is {self.device!r} but there are only "
                                 f"{torch.cuda.device_count()} CUDA GPU(s)")

    def _validate_data(self, need, is_int, is_num) -> None:
        """The real-model fields: they need `data`; files and folders exist."""
        from minihires.training.recipe import STAGES
        for name in ("data", "image_folder", "tokenizer", "init_from_llava", "init_from_run"):
            need(lambda v: v is None or isinstance(v, str) and v, name, "a path or None")
        need(lambda v: v is None or (isinstance(v, list) and len(v) == 2
                                     and all(isinstance(x, str) for x in v)),
             "init_from_hf", "two folders [VISION_DIR, LLM_DIR]")
        need(lambda v: v in STAGES, "stage", f"one of {STAGES}")
        for name in ("grad_accum",):
            need(lambda v: is_int(v, 1), name, "an int >= 1")
        need(lambda v: is_int(v, 0), "workers", "an int >= 0")
        need(lambda v: v is None or is_num(v) and v > 0, "epochs", "a positive number")
        need(lambda v: v is None or is_num(v) and 0 <= v < 1, "warmup_ratio", "in [0, 1)")
        for name in ("skip_bad_rows", "train_vision", "fsdp", "grad_checkpointing"):
            need(lambda v: isinstance(v, bool), name, "true or false")
        if self.data is None:
            given = [n for n in ("image_folder", "tokenizer", "init_from_hf", "init_from_llava",
                                 "init_from_run", "epochs", "warmup_ratio")
                     if getattr(self, n) is not None]
            given += [n for n in ("skip_bad_rows", "train_vision", "fsdp", "grad_checkpointing")
                      if getattr(self, n)]
            given += [n for n, d in (("stage", "full"), ("grad_accum", 1), ("workers", 0))
                      if getattr(self, n) != d]
            if given:
                raise ValueError(f"{given[0]} needs data (a LLaVA-format file); the built-in "
                                 "EntityGrid-QA stream trains the tiny model "
                                 "(export it with `entitygrid --format llava`)")
            return
        if not Path(self.data).is_file():
            raise ValueError(f"data {self.data} does not exist (or is not a file)")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            raise ValueError(f"image_folder {self.image_folder} does not exist (or is not a folder)")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer {self.tokenizer} does not exist (or is not a file)")
        if sum(x is not None for x in (self.init_from_hf, self.init_from_llava,
                                       self.init_from_run)) > 1:
            raise ValueError("init_from_hf, init_from_llava and init_from_run exclude each other")
        if self.init_from_run is not None and not (Path(self.init_from_run) / "config.json").is_file():
            raise ValueError(f"init_from_run {self.init_from_run} is not a run folder")
        if self.tokenizer is not None and (self.init_from_hf or self.init_from_llava
                                           or self.init_from_run):
            raise ValueError("tokenizer is for a model from scratch; an initialised model "
                             "uses its LLM folder's tokenizer.model")
        for folder in (self.init_from_hf or []) + [self.init_from_llava or ""]:
            if folder and not (Path(folder) / "config.json").is_file():
                raise ValueError(f"init folder {folder} has no config.json (not a Hugging Face "
                                 "model folder)")
        if self.token_shift is not None and self.init_from_run:
            raise ValueError("token_shift comes with the weights of init_from_run (its "
                             "config.json); leave it unset")
        if self.token_shift and (self.init_from_hf or self.init_from_llava):
            raise ValueError("token_shift needs an LLM trained with it; LLaMA weights loaded "
                             "from a Hugging Face folder have none (leave it unset or 0)")
        if self.stage != "finetune" and self.train_vision:
            raise ValueError("train_vision applies to stage finetune only")

    def model_config(self) -> ModelConfig:
        """The preset with the ablation switches that are set; validated (ValueError)."""
        cfg = preset(self.preset)
        switches = {k: getattr(self, k)
                    for k in ("use_slices", "use_sra", "compression", "overlap", "crop_embedding",
                              "whole_canvas", "thumbnail_filter")}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in switches.items() if v is not None})
        if self.sra_layers is not None:
            cfg = dataclasses.replace(cfg, vit=dataclasses.replace(
                cfg.vit, sra_layers=tuple(self.sra_layers)))
        if self.token_shift is not None:
            cfg = dataclasses.replace(cfg, llama=dataclasses.replace(
                cfg.llama, token_shift=self.token_shift))
        cfg.validate()
        return cfg


def check_vit_init(tc: TrainConfig) -> None:
    """ValueError (or FileNotFoundError) unless tc.vit_init's weights fit the model tc builds."""
    from minihires.model.vit import VisionTransformer
    cfg = tc.model_config()
    vit = VisionTransformer(cfg.vit, cfg.sra if cfg.sra_runs else None)   # as HiResLLaVA builds it
    load_vit(vit, tc.vit_init, tc.vit_init_sha256)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def ignore_unused_sra_layers(built: ModelConfig, saved: ModelConfig) -> None:
    """Give `built` the adapter places of `saved` when `built` runs no adapters: unused
    places are no part of the model, so a run saved under another default still matches."""
    if not built.sra_runs:
        built.vit = dataclasses.replace(built.vit, sra_layers=saved.vit.sra_layers)


def run_data_config(tc: TrainConfig, model_cfg: ModelConfig) -> EntityGridConfig:
    """The EntityGrid-QA config a run of `tc` draws from: its tasks, or the model's default."""
    return data.data_config(model_cfg, **({} if tc.tasks is None else {"tasks": tuple(tc.tasks)}))


def build(tc: TrainConfig, tokenizer: Tokenizer | None = None
          ) -> tuple[ModelConfig, EntityGridConfig, Tokenizer]:
    """Model config (paired with the tokenizer), data config and the tokenizer: trained
    (deterministic), or the given one (a resumed run's own)."""
    model_cfg = tc.model_config()
    data_cfg = run_data_config(tc, model_cfg)
    if tokenizer is None:
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
    backward through it, so later steps are cheaper (docs/results.md gives the step times).
    The optimizer keeps their state; AdamW skips parameters without a gradient."""
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


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient; no checkpoint was written after it."""


def run_tokenizer(run_dir: Path, tc: TrainConfig, manifest: dict | None) -> Tokenizer:
    """The tokenizer a run trained with: its tokenizer.model, or, when that file is missing
    or damaged, the one `build` trains again if it is byte for byte the file the checkpoint's
    manifest names (then `train` rewrites the file). ValueError naming the file otherwise."""
    path = run_dir / ckpt.TOKENIZER
    if path.is_file() and ckpt.matches_manifest(run_dir, ckpt.TOKENIZER, manifest):
        return ckpt.load_tokenizer(path)
    want = (manifest or {}).get("files", {}).get(ckpt.TOKENIZER)
    if want is not None:
        rebuilt = build(tc)[2]
        if hashlib.sha256(rebuilt.model_proto).hexdigest() == want["sha256"]:
            return rebuilt
        ckpt.verify(run_dir, ckpt.TOKENIZER, manifest)    # raises, naming the file
    raise ValueError(f"{path} is missing; the run's checkpoint cannot be resumed without the "
                     "tokenizer it was trained with")


def load_resume(run_dir, tc: TrainConfig, stop_at: int | None = None
                ) -> tuple[dict | None, Tokenizer | None]:
    """(resume state, the run's tokenizer) of a run folder, checked against `tc` (its saved
    TrainConfig) and `stop_at`; (None, None) when the run stopped before its first checkpoint
    (it then starts again at step 0). ValueError naming the file or field when the folder
    cannot be resumed as it is."""
    run_dir = Path(run_dir)
    manifest = ckpt.read_manifest(run_dir)
    if not (run_dir / ckpt.STATE).is_file():
        if manifest is not None or (run_dir / ckpt.WEIGHTS).is_file():
            raise ValueError(f"{run_dir} has a checkpoint but no {ckpt.STATE} (removed?): "
                             "it can be evaluated but not resumed")
        return None, None
    state = ckpt.load_state(run_dir)
    step, path = state["step"], run_dir / ckpt.STATE
    if step > tc.steps:
        raise ValueError(f"{run_dir / ckpt.CONFIG}: train.steps = {tc.steps} is below the step "
                         f"of the run's checkpoint ({step}); a run cannot be shortened once "
                         "its weights are past that step")
    if stop_at is not None and stop_at < step:
        raise ValueError(f"--stop-at {stop_at} is below the step of the run's checkpoint "
                         f"({step}); a resumed run can only go forward")
    tokenizer = run_tokenizer(run_dir, tc, manifest)
    model_cfg = tc.model_config()
    model_cfg.image_token_index = tokenizer.image_id
    saved_model_cfg = ckpt.load_config(run_dir)[0]
    ignore_unused_sra_layers(model_cfg, saved_model_cfg)
    if saved_model_cfg != model_cfg:
        raise ValueError(f"{run_dir / ckpt.CONFIG}: its model section is not the model its "
                         "train section (and tokenizer.model) build; was it edited?")
    if tokenizer.vocab_size > model_cfg.llama.vocab_size:
        raise ValueError(f"{run_dir / ckpt.TOKENIZER} has {tokenizer.vocab_size} pieces, more "
                         f"than llama.vocab_size = {model_cfg.llama.vocab_size}")
    # the weights and the optimizer state fit the model (checked on the meta device)
    model = ckpt.build_model(model_cfg, run_dir / ckpt.CONFIG)
    ckpt.check_tensors(model, state["model"], path)
    opt = make_optimizer(model, tc)
    try:
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    if k != "step" and isinstance(v, torch.Tensor) and v.shape != p.shape:
                        raise ValueError(f"optimizer state {k} is {tuple(v.shape)} for a "
                                         f"parameter of {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{path}: its optimizer state does not fit the model of "
                         f"{ckpt.CONFIG} ({e})") from None
    return state, tokenizer


def train(tc: TrainConfig, out: str | os.PathLike, resume: bool = False,
          stop_at: int | None = None, progress: bool = True) -> dict | None:
    """Train (or resume) a run into folder `out`; return its metrics (None if stopped early).

    stop_at: stop after this many steps as an interruption would (checkpoint, no eval).
    Under torchrun every rank calls this (`minihires.training.distributed`: every rank trains, all of
    them meet at a barrier and leave the process group together, then rank 0 alone evaluates
    and writes metrics.json); ranks other than 0 return None. Raises Diverged when a step's
    loss or gradient is not finite (the last checkpoint is kept).
    """
    tc.validate()
    tc = encoders.resolve(tc)                   # BUNDLED -> the shipped file's path, or None
    out = Path(out)
    if tc.data is not None:                     # the real-model path
        from minihires.training import recipe
        return recipe.train_data(tc, out, resume, stop_at, progress)
    with distributed.session(tc.device) as dd:
        step, losses, train_time, hashes, speed, model, model_cfg, data_cfg, tokenizer = (
            _train_ranks(tc, out, resume, stop_at, progress, dd))
    # every rank has left the process group: rank 0 evaluates and writes alone
    rank, world, device = dd.rank, dd.world, dd.device
    if step < tc.steps or rank != 0:
        if rank == 0:
            log.warning(f"stopped after step {step} of {tc.steps}; continue with "
                        f"`python -m minihires train --resume {out}`")
        return None
    if tc.lm_steps:                               # what is left of the stage's lookup
        speed["lm_lookup_end"] = lookup_accuracy(model, tokenizer, data_cfg)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    metrics = {"steps": tc.steps, "seed": tc.seed, "batch_size": tc.batch_size,
               "world_size": world, "samples_seen": tc.steps * tc.batch_size * world,
               "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
               "visual_tokens": data.visual_tokens(model_cfg, data_cfg),
               "train_time_s": train_time, "device": str(device),
               "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "preset": tc.preset, "use_slices": model_cfg.use_slices,
               "use_sra": model_cfg.use_sra, "compression": model_cfg.compression,
               "sra_layers": list(model_cfg.vit.sra_layers) if model_cfg.sra_runs else None,
               "overlap": model_cfg.overlap, "crop_embedding": model_cfg.crop_embedding,
               "token_shift": model_cfg.llama.token_shift,
               "vision_lr_scale": tc.vision_lr_scale, "freeze_vision_at": tc.freeze_vision_at,
               "turns": tc.turns,
               "chat_turns": tc.chat_turns, "span_words": tc.span_words,
               "train_max_entities": tc.train_max_entities, "tasks": list(data_cfg.tasks),
               "lm_steps": tc.lm_steps,
               "whole_canvas": model_cfg.whole_canvas,
               "thumbnail_filter": model_cfg.thumbnail_filter,
               "param_hash": param_hash(model), "rank_param_hashes": hashes, **speed}
    if tc.eval_n:
        t0 = time.perf_counter()
        model.eval()
        with progress_bar(tc.eval_n, unit="q", desc="eval", disable=not progress) as ebar:
            scores, _ = scoring.evaluate(model, tokenizer, data_cfg, tc.eval_n, tc.eval_batch_size,
                                      autocast, ebar.update)
        metrics.update(scores, eval_n=tc.eval_n, eval_time_s=time.perf_counter() - t0)
    metrics["wall_time_s"] = metrics["train_time_s"] + metrics.get("eval_time_s", 0.0)
    ckpt.write_json(out / ckpt.METRICS, metrics)
    return metrics


def _language_stage(tc: TrainConfig, model, opt, tokenizer, train_cfg, out: Path, rank: int,
                    world: int, progress: bool) -> tuple[float, float]:
    """Run the language stage (`pretrain_lm`), then write a step-0 checkpoint holding its
    result, so that a resume never repeats it. -> (its seconds, its lookup accuracy)."""
    t0 = time.perf_counter()
    try:
        with progress_bar(tc.lm_steps, unit="step", desc="language stage",
                          disable=not progress or rank != 0) as lbar:
            pretrain_lm(model, tokenizer, train_cfg, tc.lm_steps, tc.seed,
                        first_step(tc.steps, tc.batch_size, world), lr=tc.lr,
                        progress=lambda t, v: lbar.update(1))
    except FloatingPointError as e:
        raise Diverged(f"{e}; the run folder holds no weights: start a new run with a lower "
                       "--lr") from None
    except KeyboardInterrupt:
        if rank == 0:
            log.warning(f"interrupted during the language stage; `python -m minihires train "
                        f"--resume {out}` starts it again")
        raise
    seconds = time.perf_counter() - t0
    lookup = lookup_accuracy(model, tokenizer, train_cfg)
    if rank == 0:
        ckpt.save_checkpoint(out, model, opt, 0, extra={"train_time_s": seconds,
                                                        "lm_time_s": seconds,
                                                        "lm_lookup": lookup, "losses": []})
    return seconds, lookup


def _train_ranks(tc: TrainConfig, out: Path, resume: bool, stop_at: int | None,
                 progress: bool, dd: distributed.Session):
    """The part of `train` every rank runs, inside the process group: set up, the loop, the
    last checkpoint and the check that the ranks agree. The DistributedDataParallel wrappers
    live only in this frame, so they are released before the group is destroyed.
    -> (step, losses, train time, rank hashes, speed (`speed_metrics`), model, model config,
    data config, tokenizer)."""
    rank, world, device = dd.rank, dd.world, dd.device
    if device.type == "cpu" and tc.threads is not None:
        torch.set_num_threads(tc.threads)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    # this machine's limit, with these threads, in the dtype the step's matmuls run in
    peak = flops.matmul_peak(dtype=autocast or torch.float32, device=device)

    state, saved_tokenizer = load_resume(out, tc, stop_at) if resume else (None, None)
    model_cfg, data_cfg, tokenizer = build(tc, saved_tokenizer)
    train_cfg = dataclasses.replace(data_cfg, max_entities=tc.train_max_entities)  # the stream's
    torch.manual_seed(tc.seed)
    model = HiResLLaVA(model_cfg)
    if tc.vit_init is not None and state is None:    # a resumed run has its own weights
        load_vit(model.vision_tower, tc.vit_init, tc.vit_init_sha256)
    model = model.to(device)
    opt = make_optimizer(model, tc)
    start, losses = 0, []
    if rank == 0:
        if not resume:
            ckpt.claim_run_dir(out)
            ckpt.save_config(out, model_cfg, dataclasses.asdict(tc), data_cfg, tokenizer)
        else:
            ckpt.clean_temporaries(out)
            path = out / ckpt.TOKENIZER               # missing or damaged (see run_tokenizer),
            if not path.is_file() or path.read_bytes() != tokenizer.model_proto:
                ckpt.atomic_write(path, tokenizer.save)   # or never written: nothing trained
    lm_time, lm_lookup = 0.0, None
    if tc.lm_steps and state is None:
        lm_time, lm_lookup = _language_stage(tc, model, opt, tokenizer, train_cfg, out, rank,
                                             world, progress)
    train_time = lm_time                # the stage counts as training time
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state)
        start, train_time, losses = state["step"], state["train_time_s"], state["losses"]
        lm_time, lm_lookup = state.get("lm_time_s", 0.0), state.get("lm_lookup")
        if rank == 0:
            ckpt.repair(out, state)            # weights and manifest lag after a kill
        del state

    def wrap() -> torch.nn.Module:
        """DDP over the parameters that train now (DDP fixes its set when it is built)."""
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.local_rank] if device.type == "cuda" else None)

    frozen, ddp = False, wrap()         # the loop freezes at freeze_vision_at, or at once on
                                        # resuming past it
    saved_at = start

    def save(step: int) -> None:
        nonlocal saved_at
        if rank == 0:
            ckpt.save_checkpoint(out, model, opt, step, extra={"train_time_s": train_time,
                                                               "lm_time_s": lm_time,
                                                               "lm_lookup": lm_lookup,
                                                               "losses": losses[-100:]})
        saved_at = step

    def get_batch(step: int):
        samples = data.train_samples(tc.seed, step, tc.batch_size, train_cfg, rank, world)
        return data.make_batch(samples, tokenizer, model_cfg, tc.turns, train_cfg,
                               tc.chat_turns).to(device)

    def count_flops(step: int) -> int:
        """FLOPs of a forward and backward on step's batch, outside the timed loop; the
        gradients it leaves are dropped and the RNG is untouched, so training is unchanged."""
        batch = get_batch(step)

        def forward_backward():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                _, loss = model(**batch.kwargs())
            loss.backward()
        total = flops.step_flops(forward_backward)[0]
        model.zero_grad(set_to_none=True)
        return total

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = progress_bar(tc.steps, initial=start, unit="step", desc="train",
                       disable=not progress or rank != 0)
    model.train()
    step = start
    step_flops = {}                     # FLOPs a step, counted once per phase: {frozen: FLOPs}
    done_flops, done_time = 0, 0.0      # model FLOPs and seconds of this process's steps
    try:
        for step in range(start, end):
            if not frozen and tc.freeze_vision_at is not None and step >= tc.freeze_vision_at:
                frozen = True
                freeze_vision(model)
                ddp = wrap()
            if frozen not in step_flops:
                step_flops[frozen] = count_flops(step)
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batch = get_batch(step)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                _, loss = ddp(**batch.kwargs())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            value = loss.item()
            # DDP averages the gradients, so a non-finite loss on any rank makes the norm
            # non-finite on every rank: all of them stop here, before the step
            if not (math.isfinite(value) and math.isfinite(norm)):
                raise Diverged(
                    f"training diverged at step {step + 1}: loss {value}, gradient norm {norm} "
                    f"(lr {lr:.3g}); nothing was saved after step {saved_at}"
                    + (f", whose checkpoint in {out} is kept" if saved_at else "")
                    + ". Try a lower --lr")
            opt.step()
            seconds = time.perf_counter() - t0
            train_time += seconds
            done_time += seconds
            done_flops += step_flops[frozen]
            losses.append(value)
            if (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                save(step + 1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}",
                            samples_s=f"{(step + 1 - start) * tc.batch_size * world / done_time:.0f}",
                            mfu=f"{flops.utilisation(done_flops, done_time, peak):.0%}",
                            refresh=False)
            bar.update(1)
        step = end
    except KeyboardInterrupt:
        bar.close()
        save(step)
        if rank == 0:
            log.warning(f"interrupted after step {step}; continue with "
                        f"`python -m minihires train --resume {out}`")
        raise
    bar.close()
    save(step)

    hashes = None
    if world > 1:                                  # ranks must hold the same weights
        hashes = dd.all_gather(param_hash(model))
        if len(set(hashes)) != 1:
            raise RuntimeError(f"ranks diverged: parameter hashes {hashes}")
    del ddp
    speed = speed_metrics(step_flops, done_flops, done_time, peak,
                          (step - start) * tc.batch_size * world)
    speed["lm_time_s"] = lm_time          # the language stage's share of train_time_s
    if tc.lm_steps:
        speed["lm_lookup"] = lm_lookup    # after the stage (train() adds it at the end)
    return step, losses, train_time, hashes, speed, model, model_cfg, data_cfg, tokenizer


def speed_metrics(step_flops: dict[bool, int], done_flops: int, done_time: float, peak: float,
                  samples: int) -> dict:
    """The speed fields of metrics.json, over the steps this process ran (a resumed run: those
    since the resume): samples/s, model FLOPs a step (forward + backward, per rank;
    `step_flops_frozen` after --freeze-vision-at), achieved FLOP/s, the float32 matmul peak
    measured at the start of the run, and their ratio `mfu` (minihires.analysis.flops)."""
    if not done_time:
        return {}
    out = {"samples_per_s": samples / done_time, "achieved_flop_s": done_flops / done_time,
           "matmul_peak_flop_s": peak, "mfu": flops.utilisation(done_flops, done_time, peak)}
    if False in step_flops:
        out["step_flops"] = step_flops[False]
    if True in step_flops:
        out["step_flops_frozen"] = step_flops[True]
    return out
