"""`python -m minihires train`: flags -> TrainConfig, a run folder claimed or resumed, then `train`."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from minihires.cli.errors import ArgumentParser, UserError, command, user_input
from minihires.data.entitygrid import TASKS, EntityGridConfig
from minihires.data.llava import BadData
from minihires.model.config import COMPRESSIONS, PRESETS, THUMBNAIL_FILTERS
from minihires.training import checkpoint as ckpt
from minihires.training import distributed, encoders
from minihires.training.encoders import BUNDLED
from minihires.training.evaluate import results_table
from minihires.training.fsdp import read_progress
from minihires.training.pretrain_vit import BadWeights, file_sha256
from minihires.training.train import (Diverged, TrainConfig, check_vit_init, load_resume,
                                      run_data_config, train)

_CONFIG_FLAGS = ("preset", "steps", "batch_size", "turns", "chat_turns", "lr", "vision_lr_scale",
                 "freeze_vision_at", "lm_steps",
                 "seed", "eval_n", "span_words", "train_max_entities",
                 "compression", "overlap", "use_slices", "use_sra", "crop_embedding",
                 "token_shift", "whole_canvas", "sra_layers", "thumbnail_filter", "tasks",
                 "vit_init",
                 "warmup_steps", "ckpt_every",
                 "data", "image_folder", "skip_bad_rows", "tokenizer", "init_from_hf",
                 "init_from_llava", "stage", "train_vision", "grad_accum", "epochs",
                 "warmup_ratio", "fsdp", "grad_checkpointing", "workers", "init_from_run",
                 "weight_decay", "min_lr_ratio")
_BUILT_IN = ("turns", "chat_turns", "tasks", "train_max_entities", "freeze_vision_at",
             "vit_init", "lm_steps")
# ^ the built-in EntityGrid-QA stream's flags, which a --data run would ignore
_RESHAPE = ("batch_size", "grad_accum")   # --resume of a --data run on another world size
_PATHS = ("data", "image_folder", "tokenizer", "init_from_llava", "init_from_run", "vit_init")


def block_list(value: str) -> list[int]:
    """"0,2" -> [0, 2]; the model config checks the blocks exist."""
    try:
        blocks = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 0,1, got {value!r}")
    if len(set(blocks)) != len(blocks):
        raise argparse.ArgumentTypeError(f"a block is listed twice in {value!r}")
    return sorted(blocks)


@command
def cli_train(argv: list[str]) -> int:
    d = TrainConfig()
    p = ArgumentParser(
        prog="python -m minihires train",
        description="Train HiRes-LLaVA on EntityGrid-QA (the ViT from the shipped pretrained "
                    "encoder, the rest from scratch), then score the test split.")
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
    p.add_argument("--lm-steps", type=int, default=None, metavar="N",
                   help="first teach the LLM the lookup on scenes given as words, for N steps "
                        f"(the language stage; default {d.lm_steps})")
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
    p.add_argument("--token-shift", type=int, default=None, metavar="N",
                   help="the LLM mixes each block's input with its N previous tokens' "
                        "(default: the preset's; tiny: 3, paper: 0); 0 turns it off")
    p.add_argument("--compression", choices=COMPRESSIONS, default=None,
                   help="token compression per crop (default: the preset's, sms)")
    p.add_argument("--overlap", type=float, default=None,
                   help="fraction of a slice shared with its neighbour (default 0); "
                        "needs --no-sra")
    p.add_argument("--whole-canvas", dest="whole_canvas", action="store_const", const=True,
                   help="control: one ViT pass over each image's whole canvas of slices "
                        "(nothing is cut); needs --no-sra")
    p.add_argument("--sra-layers", type=block_list, default=None, metavar="B1,B2,...",
                   help="ViT blocks (0-based) that a SliceRestore adapter follows "
                        "(default: the preset's; tiny: 0,1,2)")
    p.add_argument("--thumbnail-filter", choices=THUMBNAIL_FILTERS, default=None,
                   help="how the image shrinks to the thumbnail (default: the preset's; "
                        "tiny: box)")
    p.add_argument("--tasks", type=lambda v: [t.strip() for t in v.split(",")], default=None,
                   metavar="T1,T2,...", help=f"EntityGrid-QA tasks from {','.join(TASKS)} "
                   f"(default: {','.join(EntityGridConfig().tasks)})")
    p.add_argument("--vit-init", metavar="FILE|none", default=None,
                   help="start the vision tower from these weights (`pretrain-vit --out`; "
                        "adapters they lack start new), or none: from scratch (default: the "
                        "shipped encoder that fits the model, minihires/weights)")
    r = p.add_argument_group("the real model (recipes/README.md): LLaVA-format data, "
                             "initialisation, the two stages, FSDP2")
    r.add_argument("--data", metavar="FILE.json", default=None,
                   help="train on a LLaVA-format conversation file instead of the built-in "
                        "EntityGrid-QA stream")
    r.add_argument("--image-folder", metavar="DIR", default=None,
                   help="the root the rows' image paths are relative to")
    r.add_argument("--skip-bad-rows", dest="skip_bad_rows", action="store_const", const=True,
                   help="skip and count malformed rows (default: a malformed row is an error)")
    r.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="a tokenizer.model for a model from scratch (default: trained on "
                        "--data's texts)")
    r.add_argument("--init-from-hf", nargs=2, metavar=("VISION_DIR", "LLM_DIR"), default=None,
                   help="CLIP vision + LLaMA/Vicuna folders; fresh SRA, sampler, projector")
    r.add_argument("--init-from-llava", metavar="DIR", default=None,
                   help="a LLaVA-1.5 folder; fresh SRA and sampler")
    r.add_argument("--init-from-run", metavar="RUN_DIR", default=None,
                   help="a run folder's weights and tokenizer (stage 2 from stage 1)")
    r.add_argument("--weight-decay", type=float, default=None,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    r.add_argument("--min-lr-ratio", type=float, default=None,
                   help=f"the cosine ends at lr x this (default {d.min_lr_ratio})")
    r.add_argument("--stage", choices=("full", "pretrain", "finetune"), default=None,
                   help="pretrain: SRA, sampler, projector, image embeddings only; finetune: "
                        "also the LLM; full: everything (default)")
    r.add_argument("--train-vision", dest="train_vision", action="store_const", const=True,
                   help="finetune: train the ViT encoder too")
    r.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="micro-batches per step: global batch = batch-size x N x ranks")
    r.add_argument("--epochs", type=float, default=None,
                   help="set --steps from the file's rows and the global batch")
    r.add_argument("--warmup-ratio", type=float, default=None,
                   help="set --warmup-steps as this fraction of the steps (LLaVA: 0.03)")
    r.add_argument("--fsdp", dest="fsdp", action="store_const", const=True,
                   help="under torchrun: FSDP2 (fully_shard per block; bf16 on GPU) instead "
                        "of DDP; checkpoints are sharded (DCP)")
    r.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const",
                   const=True, help="recompute each block's activations in the backward")
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default 0)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run with its saved configuration")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps as an interruption would (resume later)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in _CONFIG_FLAGS if getattr(args, k) is not None
                 and k not in _RESHAPE]
        if given or args.out is not None:
            p.error(f"--resume continues the run's saved configuration; drop {', '.join(given) or '--out'}")
        with user_input("--resume: "):
            out = ckpt.check_run_dir(args.resume, ckpt.CONFIG)
            saved_model, saved, saved_data = ckpt.load_config(out)
            saved.setdefault("chat_turns", True)     # run folders from before packing chatted
            saved.setdefault("span_words", False)    # and ended every piece at a space
            # and from before the token shift, a plain LLaMA (the model section says which)
            saved.setdefault("token_shift", saved_model.llama.token_shift)
            saved.setdefault("vit_init", None)       # and before --vit-init, from scratch
            if saved.get("data") is None:            # None meant the defaults of its day: the
                for k, v in (("sra_layers", list(saved_model.vit.sra_layers)),   # model and
                             ("thumbnail_filter", saved_model.thumbnail_filter),  # data it
                             ("tasks", list(saved_data.tasks))):                 # built say
                    if saved.get(k) is None:
                        saved[k] = v
            saved.update({k: getattr(args, k) for k in ("device", "threads")
                          if getattr(args, k) is not None})
            reshape = {k: getattr(args, k) for k in _RESHAPE if getattr(args, k) is not None}
            if reshape and saved.get("data") is None:
                raise ValueError("--batch-size and --grad-accum can change on --resume only "
                                 "for a --data run (to keep its global batch on another "
                                 "number of processes)")
            saved.update(reshape)
            try:
                tc = TrainConfig(**saved)
            except TypeError as e:
                raise ValueError(f"{out / ckpt.CONFIG}: train section: {e}") from None
    else:
        given = {k: getattr(args, k) for k in (*_CONFIG_FLAGS, "device", "threads")
                 if getattr(args, k) is not None}
        ignored = [f"--{k.replace('_', '-')}" for k in _BUILT_IN if k in given]
        if args.data is not None and ignored:
            p.error(f"{', '.join(ignored)}: for the built-in EntityGrid-QA training, which "
                    "--data replaces (questions per image and tasks of an export: `entitygrid "
                    "--format llava --turns N --tasks ...`)")
        for a, b in (("epochs", "steps"), ("warmup_ratio", "warmup_steps")):
            if a in given and b in given:            # the first would silently win
                p.error(f"--{a.replace('_', '-')} sets --{b.replace('_', '-')}: give one of them")
        if args.fsdp and "WORLD_SIZE" not in os.environ:
            p.error("--fsdp shards the model over torchrun's processes: run under `torchrun "
                    "--nproc_per_node=N -m minihires train ...`, or drop --fsdp")
        if given.get("vit_init") == "none":
            given["vit_init"] = None                 # the ViT from scratch
        for k in _PATHS:                         # absolute: a resume may start elsewhere
            if k in given and given[k] not in (None, BUNDLED):
                given[k] = os.path.abspath(given[k])
        if "init_from_hf" in given:
            given["init_from_hf"] = [os.path.abspath(f) for f in given["init_from_hf"]]
        tc = TrainConfig(**given)
    try:
        tc.validate()
    except ValueError as e:                 # name the flag, or the file the value came from
        name = str(e).split()[0]
        if getattr(args, name, None) is not None:
            raise UserError(f"--{name.replace('_', '-')}: {e}") from None
        raise UserError(f"{out / ckpt.CONFIG}: train.{e}" if args.resume else str(e)) from None
    if args.resume is None and tc.vit_init is not None:   # every rank, before any folder
        with user_input("--vit-init: " if args.vit_init is not None else ""):
            tc = encoders.resolve(tc)            # the shipped file that fits and its SHA-256
    if args.resume is None and tc.vit_init is not None:
        with user_input("--vit-init: "):         # a shipped file is hashed once, by resolve
            tc = dataclasses.replace(tc, vit_init_sha256=tc.vit_init_sha256
                                     or file_sha256(tc.vit_init))
            check_vit_init(tc)
    if args.stop_at is not None and args.stop_at < 1:
        p.error(f"--stop-at must be >= 1, got {args.stop_at}")
    rank = distributed.environment()[0]
    if args.resume is not None:
        with user_input("--resume: "):
            if tc.data is None:                        # every check, before any rank starts
                state, _ = load_resume(out, tc, args.stop_at)
                if state is None and tc.vit_init is not None:     # it starts from the file
                    try:
                        check_vit_init(tc)
                    except (ValueError, OSError) as e:
                        raise ValueError(f"the run has no checkpoint yet, so it starts again "
                                         f"from --vit-init {tc.vit_init}: {e}") from None
            else:
                progress = read_progress(out)
                world = distributed.environment()[1]
                want = (progress or {}).get("global_batch")
                if want is not None and tc.batch_size * tc.grad_accum * world != want:
                    raise ValueError(
                        f"the run's global batch is {want} rows; on {world} rank(s) pass "
                        f"--batch-size and --grad-accum whose product is {want / world:g} "
                        f"(now {tc.batch_size} x {tc.grad_accum})")
                if progress is not None and args.stop_at is not None \
                        and args.stop_at < progress["step"]:
                    raise ValueError(f"--stop-at {args.stop_at} is below the step of the run's "
                                     f"checkpoint ({progress['step']})")
    elif rank == 0:                                    # only rank 0 writes the folder
        with user_input():
            out = ckpt.claim_run_dir(args.out)
    else:
        out = Path(args.out or "runs")                 # not written by this rank

    if rank == 0 and tc.data is not None:
        print(f"minihires train: --data {tc.data}, stage {tc.stage}, "
              f"{'epochs ' + str(tc.epochs) if tc.epochs else str(tc.steps) + ' steps'} x "
              f"{tc.batch_size} rows x {tc.grad_accum} micro-batches x "
              f"{distributed.environment()[1]} rank(s), lr {tc.lr}, seed {tc.seed}, "
              f"{_engine(tc.fsdp, distributed.environment()[1])}, device {tc.device} -> {out}")
    elif rank == 0:
        model_cfg = tc.model_config()
        print(f"minihires train: preset {tc.preset}, {tc.steps} steps x {tc.batch_size} images "
              f"x {tc.turns} questions{' (one conversation)' if tc.chat_turns else ''}, "
              f"lr {tc.lr}, seed {tc.seed}, device {tc.device}"
              + (f", {tc.threads or torch.get_num_threads()} thread(s)" if tc.device == "cpu" else "")
              + f" -> {out}\n  model: slices={model_cfg.use_slices} sra="
              + (f"blocks {','.join(map(str, model_cfg.vit.sra_layers))} "
                 if model_cfg.sra_runs else "False ")
              + f"compression={model_cfg.compression} overlap={model_cfg.overlap} "
              f"crop_embedding={model_cfg.crop_embedding} "
              f"token_shift={model_cfg.llama.token_shift} vision_lr_scale={tc.vision_lr_scale}"
              + (" whole_canvas=True" if model_cfg.whole_canvas else "")
              + (f" thumbnail={model_cfg.thumbnail_filter}"
                 if model_cfg.thumbnail_filter != "bicubic" else "")
              + f"\n  tasks: {', '.join(run_data_config(tc, model_cfg).tasks)}"
              + (f"\n  vision tower from {tc.vit_init}" if tc.vit_init else "")
              + (f"\n  language stage: {tc.lm_steps} steps first" if tc.lm_steps else ""))
    try:
        metrics = train(tc, out, resume=args.resume is not None, stop_at=args.stop_at,
                        progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    except (Diverged, BadData, BadWeights) as e:     # BadWeights: the --vit-init file changed
        raise UserError(str(e)) from e
    if metrics is not None and tc.data is not None:
        print(f"trained {metrics['steps']} steps, global batch {metrics['global_batch']} rows, "
              f"final loss {metrics['final_loss']:.4f}, {metrics['train_time_s']:.1f} s; "
              f"score with `python -m minihires eval {out} --data FILE.json --image-folder DIR`")
        print(f"wrote {out}/ ({', '.join(sorted(os.listdir(out)))})")
    elif metrics is not None:
        print(results_table(metrics))
        print(f"wrote {out}/ ({', '.join(sorted(os.listdir(out)))})")
    return 0


def _engine(fsdp: bool, world: int) -> str:
    if world == 1:
        return "one process"
    return "FSDP2" if fsdp else "DDP"
