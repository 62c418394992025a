"""Scale-out for the real model: FSDP2 sharding, activation checkpointing, sharded checkpoints.

    shard(model, world, device)      torch.distributed.fsdp.fully_shard on every ViT block and
                                     every LLaMA layer, then on the root (the adapters, sampler,
                                     projector, embeddings and head); on a GPU with
                                     MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32):
                                     fp32 master weights and Adam state, bf16 compute
    checkpoint_blocks(model)         torch.utils.checkpoint (non-reentrant) around each block's
                                     forward: activations inside a block are recomputed in the
                                     backward instead of kept (parameter names do not change)
    clip_grad_norm(params, max)      the global gradient norm (DTensor-aware), then clipping
    save(run_dir, model, opt, step)  torch.distributed.checkpoint (DCP): every rank writes its
                                     shards to RUN_DIR/dcp/step-NNNNNNNN/; then rank 0 commits
                                     the step in train_state.json
    load(run_dir, model, opt)        DCP reshards on load: a checkpoint written by N processes
                                     resumes on M (FSDP, DDP or one plain process)
    full_weights(model)              the whole model's state dict on rank 0 (a collective)
    consolidate(run_dir)             one process, no process group: the last DCP checkpoint ->
                                     RUN_DIR/model.safetensors (+ manifest) for eval and ask

The commit point of a checkpoint is train_state.json (written atomically by rank 0 after
every rank has finished writing its shards): a kill during a DCP write leaves the previous
checkpoint in force; older step folders are removed after the commit.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.utils.checkpoint import checkpoint

from minihires.training import checkpoint as ckpt

DCP_DIR, PROGRESS = "dcp", "train_state.json"


def blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks: every ViT encoder layer, then every LLaMA layer."""
    return [*model.vision_tower.layers, *model.language_model.layers]


def shard(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """FSDP2 over `world` ranks (see the module doc); the model is sharded in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing on every block (an instance-level forward that recomputes)."""
    for block in blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip gradients to a global norm of max_norm; -> the norm before clipping. With FSDP
    the gradients are DTensor shards: their norm is reduced over the ranks first."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm,
                                         norm)
    return float(norm)


@contextlib.contextmanager
def _quiet():
    """DCP warns that it runs in one process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _states(model, opt):
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def save(run_dir: Path, model, opt, step: int, extra: dict, rank: int) -> None:
    """A sharded checkpoint of model and optimizer after `step` (every rank calls this)."""
    run_dir = Path(run_dir)
    folder = run_dir / DCP_DIR / f"step-{step:08d}"
    if rank == 0 and folder.exists():               # a killed write of this very step
        shutil.rmtree(folder)
    if dist.is_initialized():
        dist.barrier()
    with _quiet():
        dcp.save(_states(model, opt), checkpoint_id=str(folder))
    if dist.is_initialized():
        dist.barrier()                               # every shard is on disk
    if rank == 0:
        ckpt.write_json(run_dir / PROGRESS, {**extra, "step": step,
                                             "dcp": str(folder.relative_to(run_dir))})
        for old in (run_dir / DCP_DIR).iterdir():
            if old.is_dir() and old != folder:
                shutil.rmtree(old)


def read_progress(run_dir) -> dict | None:
    """train_state.json of a sharded run ({"step", "dcp", "losses", ...}), None if absent."""
    path = Path(run_dir) / PROGRESS
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        ok = isinstance(d, dict) and isinstance(d.get("step"), int) and isinstance(d.get("dcp"), str)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{path} is not a sharded run's progress file (damaged?)")
    if not (Path(run_dir) / d["dcp"] / ".metadata").is_file():
        raise ValueError(f"{path} names the checkpoint {d['dcp']}, which is missing or incomplete")
    return d


def load(run_dir, model, opt, progress: dict) -> None:
    """Load the committed checkpoint into model and optimizer (resharded to this run)."""
    state = _states(model, opt)
    with _quiet():
        dcp.load(state, checkpoint_id=str(Path(run_dir) / progress["dcp"]))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_weights(model) -> dict:
    """{name: full CPU tensor} on rank 0 ({} on the others); every rank must call it."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def write_weights(run_dir, weights: dict, step: int) -> None:
    """model.safetensors and its manifest (weights + tokenizer) for eval and ask."""
    run_dir = Path(run_dir)
    ckpt.check_finite(weights, f"model.safetensors at step {step} not written: the model")
    ckpt._write_weights(run_dir, weights, step)
    ckpt.write_json(run_dir / ckpt.MANIFEST, {"step": step, "files": {
        name: ckpt.digest(run_dir / name) for name in (ckpt.WEIGHTS, ckpt.TOKENIZER)}})


def consolidate(run_dir) -> int:
    """RUN_DIR's last sharded checkpoint -> RUN_DIR/model.safetensors, in this one process
    (no process group); -> its step."""
    run_dir = ckpt.check_run_dir(run_dir, ckpt.CONFIG, ckpt.TOKENIZER)
    progress = read_progress(run_dir)
    if progress is None:
        raise FileNotFoundError(f"{run_dir} has no {PROGRESS}: not a sharded (--data) run")
    model_cfg = ckpt.load_config(run_dir)[0]
    from minihires.model import HiResLLaVA
    with torch.device("meta"):
        model = HiResLLaVA(model_cfg)
    model = model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    with _quiet():
        dcp.load(state, checkpoint_id=str(run_dir / progress["dcp"]))
    write_weights(run_dir, {k: v.contiguous() for k, v in state["model"].items()},
                  progress["step"])
    return progress["step"]
