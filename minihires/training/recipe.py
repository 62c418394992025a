"""`train --data FILE.json`: the real-model path (LLaVA-format data, pretrained initialisation,
the two-stage recipe, gradient accumulation, FSDP2), beside the tiny built-in loop of `train`.

    tokenizer, model <- --init-from-hf VISION_DIR LLM_DIR (fresh SRA, sampler, projector),
                        --init-from-llava DIR (fresh SRA, sampler), or from scratch (preset);
                        a resumed run: its own config.json, tokenizer.model and checkpoint
    stage            <- which parameters train (`set_stage`)
    wrap             <- FSDP2 (--fsdp under torchrun), DDP (torchrun), or the plain model
    for step:
        grad_accum micro-batches of batch_size rows per rank (`data.llava.LlavaStream`)
        loss = sum of the answer tokens' cross-entropy / the step's answer tokens over every
               rank and micro-batch: a step is one global batch, whatever the world size
               and the accumulation (the test checks 2 processes against 1)
        clip at grad_clip, AdamW, warmup + cosine (`train.lr_at`)
    checkpoints      <- DCP shards + train_state.json every ckpt_every steps (`fsdp.save`);
                        model.safetensors + checkpoint.json at the end, for eval and ask

The stages (LLaVA-1.5's recipe, with HiRes-LLaVA's new modules in the connector):
    pretrain   SRA, sampler, projector, image embeddings; ViT and LLM frozen
    finetune   the same + the LLM (+ the ViT encoder with train_vision)
    full       everything (the tiny model from scratch)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from minihires.data import batches as data
from minihires.data import llava
from minihires.model import IGNORE, HiResLLaVA, hf
from minihires.model.tokenizer import Tokenizer
from minihires.training import checkpoint as ckpt
from minihires.training import distributed, fsdp

log = logging.getLogger(__name__)

STAGES = ("full", "pretrain", "finetune")
CONNECTOR = ("vision_tower.sra.", "sampler.", "multi_modal_projector.",
             *HiResLLaVA.IMAGE_EMBEDDINGS)


def trainable(name: str, stage: str, train_vision: bool = False) -> bool:
    """Whether parameter `name` trains in `stage` (see the module doc)."""
    if stage == "full" or name.startswith(CONNECTOR):
        return True
    if name.startswith("language_model."):
        return stage == "finetune"
    if name.startswith("vision_tower."):
        return stage == "finetune" and train_vision
    raise ValueError(f"parameter {name} belongs to no part of the model the stages name")


def set_stage(model: torch.nn.Module, stage: str, train_vision: bool = False) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    for name, p in model.named_parameters():   # what the model froze itself (the ViT's
        p.requires_grad_(p.requires_grad and trainable(name, stage, train_vision))  # unused
                                                  # tail) stays frozen


def resolve(tc, rows: int) -> object:
    """tc with steps from epochs (rows of the file / global batch) and warmup_steps from
    warmup_ratio, where those are set."""
    world = distributed.environment()[1]
    steps = tc.steps
    if tc.epochs is not None:
        steps = max(1, math.ceil(tc.epochs * rows / (tc.batch_size * tc.grad_accum * world)))
    warmup = tc.warmup_steps
    if tc.warmup_ratio is not None:
        warmup = math.ceil(tc.warmup_ratio * steps)
    return dataclasses.replace(tc, steps=steps, warmup_steps=warmup)


@contextlib.contextmanager
def reading(what: str):
    """ValueError / OSError while reading a folder or file the user named -> BadData, which
    the command line reports as one `error: <what>: ...` line."""
    try:
        yield
    except llava.BadData:
        raise
    except (ValueError, OSError) as e:
        raise llava.BadData(f"{what}: {e}") from e


def data_tokenizer(tc) -> Tokenizer:
    """A tokenizer trained on --data's questions and answers. A file that cannot be read is
    BadData, raised here: raised inside sentencepiece's reader, it would come back wrapped in
    sentencepiece's own error."""
    bad: list[llava.BadData] = []

    def texts():
        try:
            yield from llava.texts(tc.data)
        except llava.BadData as e:
            bad.append(e)

    try:
        tokenizer = Tokenizer.train(texts(), tc.vocab_size, span_words=tc.span_words)
    except ValueError:
        if bad:
            raise bad[0] from None
        raise
    if bad:
        raise bad[0]
    return tokenizer


def build_model(tc, out: Path, resume: bool) -> tuple[HiResLLaVA, Tokenizer]:
    """The model (float32, CPU) and its tokenizer, as the module doc says. A folder or file
    that cannot be read is BadData naming its flag."""
    if resume:
        with reading(f"--resume {out}"):
            model_cfg = ckpt.load_config(out)[0]
            tokenizer = ckpt.load_tokenizer(out / ckpt.TOKENIZER)
        torch.manual_seed(tc.seed)
        return HiResLLaVA(model_cfg), tokenizer
    template = tc.model_config()
    torch.manual_seed(tc.seed)
    if tc.init_from_hf:
        vision_dir, llm_dir = tc.init_from_hf
        with reading(f"--init-from-hf {vision_dir} {llm_dir}"):
            tokenizer = hf.load_tokenizer(llm_dir)
            model = hf.hires_from_hf(vision_dir, llm_dir, template)
        model.cfg.image_token_index = tokenizer.image_id
    elif tc.init_from_llava:
        with reading(f"--init-from-llava {tc.init_from_llava}"):
            model, tokenizer = (hf.hires_from_llava(tc.init_from_llava, template),
                                hf.load_tokenizer(tc.init_from_llava))
            if tokenizer.image_id != model.cfg.image_token_index:
                raise ValueError(f"the tokenizer's <image> id is {tokenizer.image_id}, "
                                 f"config.json's {model.cfg.image_token_index}")
    elif tc.init_from_run:                     # stage 2 from stage 1's run folder
        with reading(f"--init-from-run {tc.init_from_run}"):
            model, tokenizer, _ = ckpt.load_run(tc.init_from_run)
    else:
        if tc.tokenizer:
            with reading(f"--tokenizer {tc.tokenizer}"):
                tokenizer = ckpt.load_tokenizer(tc.tokenizer)
        else:
            tokenizer = data_tokenizer(tc)
        template.image_token_index = tokenizer.image_id
        torch.manual_seed(tc.seed)
        model = HiResLLaVA(template)
    text_ids = tokenizer.vocab_size - (tokenizer.image_id == tokenizer.vocab_size - 1)
    if text_ids > model.cfg.llama.vocab_size:
        raise llava.BadData(f"the tokenizer has {text_ids} text pieces, more than the LLM's "
                            f"vocab_size {model.cfg.llama.vocab_size}")
    return model.train(), tokenizer


def train_data(tc, out, resume: bool = False, stop_at: int | None = None,
               progress: bool = True) -> dict | None:
    """Train (or resume) a --data run into `out`; -> metrics on rank 0 after the last step,
    None otherwise (stopped early, or another rank). Raises train.Diverged on a non-finite
    loss or gradient."""
    out = Path(out)
    if tc.epochs is not None or tc.warmup_ratio is not None:
        tc = resolve(tc, llava.count_rows(tc.data) if tc.epochs is not None else 0)
    with distributed.session(tc.device) as dd:
        result = _ranks(tc, out, resume, stop_at, progress, dd)
    if result is None or dd.rank != 0:
        return None
    ckpt.write_json(out / ckpt.METRICS, result)
    return result


def autocast_dtype(device: torch.device, fsdp_on: bool, world: int) -> torch.dtype | None:
    """bf16 autocast on a GPU, except where FSDP2's mixed-precision policy computes in bf16
    already (sharded: more than one rank; `fsdp.shard` is not applied to one)."""
    if device.type != "cuda" or (fsdp_on and world > 1):
        return None
    return torch.bfloat16


def _ranks(tc, out: Path, resume: bool, stop_at, progress: bool, dd):
    from minihires.training.train import Diverged, lr_at, make_optimizer, param_hash
    rank, world, device = dd.rank, dd.world, dd.device
    if device.type == "cpu" and tc.threads is not None:
        torch.set_num_threads(tc.threads)
    autocast = autocast_dtype(device, tc.fsdp, world)
    state = fsdp.read_progress(out) if resume else None
    model, tokenizer = build_model(tc, out, resume and state is not None)
    model_cfg = model.cfg
    if rank == 0 and not resume:
        ckpt.claim_run_dir(out)
        ckpt.save_config(out, model_cfg, dataclasses.asdict(tc), data.data_config(model_cfg),
                         tokenizer)
    set_stage(model, tc.stage, tc.train_vision)
    model.to(device)
    if tc.grad_checkpointing:
        fsdp.checkpoint_blocks(model)
    wrapped = model
    if world > 1 and tc.fsdp:
        fsdp.shard(model, world, device)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.local_rank] if device.type == "cuda" else None)
    opt = make_optimizer(model, tc)
    start, train_time, losses = 0, 0.0, []
    global_batch = tc.batch_size * tc.grad_accum * world
    if state is not None:
        if state.get("global_batch", global_batch) != global_batch:
            raise ValueError(
                f"{out}: the run's global batch is {state['global_batch']} rows, this resume's "
                f"{tc.batch_size} x {tc.grad_accum} x {world} rank(s) = {global_batch}; pass "
                "--batch-size and --grad-accum so that their product x ranks is "
                f"{state['global_batch']}")
        if rank == 0:                      # batch-size / grad-accum may change with the world
            config = ckpt.load_config(out)
            ckpt.write_json(out / ckpt.CONFIG, {"model": config[0].to_dict(),
                                                "train": dataclasses.asdict(tc),
                                                "data": dataclasses.asdict(config[2])})
        fsdp.load(out, model, opt, state)
        start, train_time, losses = state["step"], state["train_time_s"], state["losses"]

    stream = llava.LlavaStream(tc.data, tc.image_folder, tokenizer, model_cfg, tc.batch_size,
                               rank, world, start * tc.grad_accum, tc.skip_bad_rows)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=tc.workers))
    params = [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> None:
        fsdp.save(out, model, opt, step, {"train_time_s": train_time, "losses": losses,
                                          "world": world, "global_batch": global_batch}, rank)

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not progress or rank != 0, desc=f"train {tc.stage}")
    step = start
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        micro = [next(batches) for _ in range(tc.grad_accum)]
        count = torch.tensor([float(sum(int((b.labels != IGNORE).sum()) for b in micro))])
        total_loss = torch.zeros(1)
        if world > 1:
            count = count.to(device)
            dist.all_reduce(count)
        opt.zero_grad(set_to_none=True)
        for b in micro:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                _, loss = wrapped(**b.to(device).kwargs(), reduction="sum")
            # FSDP and DDP average gradients over ranks: scale by world to sum them
            (loss * (world / count.to(loss.device))).backward()
            total_loss += loss.detach().float().cpu()
        if world > 1:
            total_loss = total_loss.to(device)
            dist.all_reduce(total_loss)
        value = float(total_loss) / float(count)
        norm = fsdp.clip_grad_norm(params, tc.grad_clip)
        if not (math.isfinite(value) and math.isfinite(norm)):
            raise Diverged(f"training diverged at step {step + 1}: loss {value}, gradient norm "
                           f"{norm} (lr {lr:.3g}); the last checkpoint in {out} is kept. Try a "
                           "lower --lr")
        opt.step()
        train_time += time.perf_counter() - t0
        losses.append(value)
        if (step + 1) % tc.ckpt_every == 0 and step + 1 < end:
            save(step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}")
    step = end
    bar.close()
    if step > start or state is None:
        save(step)
    del batches
    weights = fsdp.full_weights(model) if world > 1 and tc.fsdp else (
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    if rank == 0:
        fsdp.write_weights(out, weights, step)
    if step < tc.steps:
        if rank == 0:
            log.warning(f"stopped after step {step} of {tc.steps}; continue with "
                        f"`python -m minihires train --resume {out}`")
        return None
    hashes = dd.all_gather(param_hash(model)) if world > 1 and not tc.fsdp else None
    del wrapped
    digest = hashlib.sha256()
    for name, t in sorted(weights.items()):            # = train.param_hash of the weights
        digest.update(name.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return {"steps": tc.steps, "seed": tc.seed, "stage": tc.stage, "world_size": world,
            "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
            "global_batch": tc.batch_size * tc.grad_accum * world, "fsdp": tc.fsdp,
            "losses": losses, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "train_time_s": train_time, "skipped_rows_rank0": stream.skipped
            if tc.workers == 0 else None, "device": str(device),
            "param_hash": digest.hexdigest(),
            "rank_param_hashes": hashes}
