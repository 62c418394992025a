"""Run folders: what `train` writes and what `eval`, `ask` and `--resume` read.

    RUN_DIR/
      config.json        {"model": ModelConfig, "train": TrainConfig, "data": EntityGridConfig}
      tokenizer.model    the sentencepiece model (with <image>)
      model.safetensors  the weights (portable: eval, ask)
      train_state.pt     resume state: step, weights, optimizer, RNG (torch.save)
      metrics.json       test-split scores, wall times, steps, seed

Every file is written atomically (a temporary file in the same folder, then os.replace),
so an interrupted run never leaves a half-written checkpoint: a reader sees the old file
or the new one. The resume state carries its own copy of the weights so that one
os.replace moves weights, optimizer and step together (ours: two files could disagree
after a crash between their writes).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .entitygrid import EntityGridConfig
from .model import HiResLLaVA
from .tokenizer import Tokenizer

CONFIG, TOKENIZER, WEIGHTS, STATE, METRICS = (
    "config.json", "tokenizer.model", "model.safetensors", "train_state.pt", "metrics.json")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then move tmp_path over `path` in one os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: dict,
                data_cfg: EntityGridConfig, tokenizer: Tokenizer) -> None:
    from dataclasses import asdict
    write_json(run_dir / CONFIG, {"model": model_cfg.to_dict(), "train": train_cfg,
                                  "data": asdict(data_cfg)})
    atomic_write(run_dir / TOKENIZER, tokenizer.save)


def save_weights(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS,
                 lambda tmp: save_file(state, tmp, metadata={"step": str(step)}))


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               step: int, extra: dict | None = None) -> None:
    """The resume state after `step` optimizer steps (+ `extra`: plain Python values)."""
    state = {**(extra or {}), "step": step,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_write(run_dir / STATE, lambda tmp: torch.save(state, tmp))


def load_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {STATE}: it is not a resumable run folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def check_run_dir(run_dir, *files: str) -> Path:
    """The run folder as a Path, or a clear FileNotFoundError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (or is not a folder)")
    missing = [f for f in files if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"run folder {run_dir} lacks {', '.join(missing)}: "
                                f"is it a folder written by `python -m minihires train`?")
    return run_dir


def load_config(run_dir) -> tuple[ModelConfig, dict, EntityGridConfig]:
    """(model config, train config dict, data config) of a run folder."""
    run_dir = check_run_dir(run_dir, CONFIG)
    try:
        d = json.loads((run_dir / CONFIG).read_text())
        return (ModelConfig.from_dict(d["model"]), d["train"], EntityGridConfig(**d["data"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_dir / CONFIG} is not a valid run config: {e}") from None


def load_run(run_dir, device: str | torch.device = "cpu") -> tuple[HiResLLaVA, Tokenizer, dict]:
    """The trained model (eval mode, on `device`), its tokenizer and the whole config."""
    run_dir = check_run_dir(run_dir, CONFIG, TOKENIZER, WEIGHTS)
    model_cfg, train_cfg, data_cfg = load_config(run_dir)
    tokenizer = Tokenizer.load(run_dir / TOKENIZER)
    model = HiResLLaVA(model_cfg)
    model.load_state_dict(load_file(run_dir / WEIGHTS))
    model.to(device).eval()
    return model, tokenizer, {"model": model_cfg, "train": train_cfg, "data": data_cfg}
