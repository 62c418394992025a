"""Run folders: what `train` writes and what `eval`, `ask` and `--resume` read.

    RUN_DIR/
      config.json        {"model": ModelConfig, "train": TrainConfig, "data": EntityGridConfig}
      tokenizer.model    the sentencepiece model (with <image>)
      train_state.pt     resume state: step, weights, optimizer, RNG (torch.save)
      model.safetensors  the weights (portable: eval, ask)
      checkpoint.json    the checkpoint's manifest: its step, and the size and sha256 of
                         train_state.pt, model.safetensors and tokenizer.model
      metrics.json       test-split scores, wall times, steps, seed

Every file is written atomically (a temporary `.NAME.*.tmp` in the same folder, then
os.replace), so a reader sees the old file or the new one, never half of one. A checkpoint is
three files: train_state.pt, then model.safetensors, then checkpoint.json, written in that
order, so a kill between two of them leaves files that disagree. The manifest, written last,
tells: `eval` and `ask` load a folder only if model.safetensors (and train_state.pt, when
present) are the files the manifest names (size and sha256); `--resume` starts from
train_state.pt (which carries its own copy of the weights, so one os.replace moves weights,
optimizer and step together) and rewrites model.safetensors and the manifest from it when
they lag. Temporary files left by a kill
are removed by the next checkpoint and by `--resume`. A folder without checkpoint.json was
written before the manifest existed, or stopped before its first checkpoint (then
`--resume` starts at step 0 with the saved config).

Everything read here is checked (ours): unreadable, truncated or foreign files, weights
that do not fit config.json's model, and non-finite weights are ValueErrors naming the file
(and the tensor), never a traceback from deep inside torch or a silent wrong answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from minihires.data.entitygrid import TASKS, EntityGridConfig
from minihires.model import HiResLLaVA
from minihires.model.config import ModelConfig
from minihires.model.tokenizer import Tokenizer

CONFIG, TOKENIZER, WEIGHTS, STATE, MANIFEST, METRICS = (
    "config.json", "tokenizer.model", "model.safetensors", "train_state.pt", "checkpoint.json",
    "metrics.json")
RUN_FILES = (CONFIG, TOKENIZER, STATE, WEIGHTS, MANIFEST, METRICS)
STATE_KEYS = ("step", "model", "optimizer", "rng_cpu", "rng_cuda", "train_time_s", "losses")
# sane bounds on a run's config.json, checked before any model is built from it
MAX_SIZE, MAX_LAYERS = 2 ** 20, 256


# ----------------------------------------------------------------------------- writing

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then move tmp_path over `path` in one os.replace (the file gets
    the permissions of a plainly created one, not mkstemp's owner-only 0600)."""
    _atomic(path, write, os.replace)


def atomic_create(path: str | os.PathLike, write) -> None:
    """As `atomic_write`, but FileExistsError instead of replacing a file that is already at
    `path`, even one another process put there meanwhile (os.link never overwrites)."""
    _atomic(path, write, os.link)


def _atomic(path, write, put) -> None:
    """write(tmp) in path's folder, then put(tmp, path); the temporary never outlives it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        put(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def clean_temporaries(run_dir) -> list[str]:
    """Remove the temporary files a killed write left in a run folder (only ours:
    `.NAME.*.tmp` for NAME a run file); -> their names."""
    removed = []
    for name in RUN_FILES:
        for p in Path(run_dir).glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def save_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: dict,
                data_cfg: EntityGridConfig, tokenizer: Tokenizer) -> None:
    """config.json (it makes the folder a run folder), then tokenizer.model. config.json
    must not exist yet: it is linked into place whole, never over another run's (two runs
    started into one folder: the second gets a ValueError)."""
    path = Path(run_dir) / CONFIG
    text = json.dumps({"model": model_cfg.to_dict(), "train": train_cfg,
                       "data": dataclasses.asdict(data_cfg)}, indent=2) + "\n"
    taken = ValueError(f"{path} appeared while this run was starting: another run is writing "
                       f"into {run_dir}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.link(tmp, path)                 # atomic, and fails if the name is taken
        except FileExistsError:
            raise taken from None
        except OSError:                        # a file system without hard links
            try:
                with open(path, "x") as f:
                    f.write(text)
            except FileExistsError:
                raise taken from None
    finally:
        os.remove(tmp)
    atomic_write(Path(run_dir) / TOKENIZER, tokenizer.save)


def digest(path: str | os.PathLike) -> dict:
    """{"size": bytes, "sha256": hex} of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def check_finite(tensors: dict, where: str) -> None:
    """ValueError naming the first tensor that holds a NaN or an infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name} holds {bad} non-finite value(s) "
                             "(nan or inf)")


def _weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _write_weights(run_dir: Path, weights: dict, step: int) -> None:
    atomic_write(run_dir / WEIGHTS,
                 lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))


def _write_manifest(run_dir: Path, step: int) -> None:
    write_json(run_dir / MANIFEST, {"step": step, "files": {
        name: digest(run_dir / name) for name in (STATE, WEIGHTS, TOKENIZER)}})


def save_checkpoint(run_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, extra: dict | None = None) -> None:
    """The checkpoint after `step` optimizer steps (+ `extra`: plain Python values):
    train_state.pt, model.safetensors, then checkpoint.json. Refuses (ValueError) weights that
    are not finite, so a diverged run never replaces a good checkpoint."""
    run_dir = Path(run_dir)
    weights = _weights(model)
    check_finite(weights, f"checkpoint at step {step} not written: the model")
    clean_temporaries(run_dir)
    state = {**(extra or {}), "step": step, "model": weights,
             "optimizer": optimizer.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_write(run_dir / STATE, lambda tmp: torch.save(state, tmp))
    _write_weights(run_dir, weights, step)
    _write_manifest(run_dir, step)


# ----------------------------------------------------------------------------- reading

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


def _check_fields(obj, where: str) -> None:
    """Every field of a config dataclass has its annotated type (ints within sane bounds)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, hint, name = getattr(obj, f.name), hints[f.name], f"{where}.{f.name}"
        if dataclasses.is_dataclass(v):
            _check_fields(v, name)
            continue
        allowed = typing.get_args(hint) or (hint,)
        if v is None and type(None) in allowed:
            continue
        if int in allowed and isinstance(v, int) and not isinstance(v, bool):
            limit = MAX_LAYERS if "layers" in f.name else MAX_SIZE
            if not -limit <= v <= limit:
                raise ValueError(f"{name} = {v} is out of range (|value| <= {limit})")
        elif float in allowed and isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        elif bool in allowed and isinstance(v, bool) or str in allowed and isinstance(v, str):
            pass
        elif typing.get_origin(hint) is tuple and isinstance(v, tuple):
            if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_LAYERS
                       for x in v):
                raise ValueError(f"{name} must hold layer indices, got {list(v)!r}")
        else:
            raise ValueError(f"{name} has the wrong type: {v!r} ({type(v).__name__})")


def load_config(run_dir) -> tuple[ModelConfig, dict, EntityGridConfig]:
    """(model config, train config dict, data config) of a run folder; ValueError naming
    config.json and the field when it cannot be read or describes no valid model."""
    run_dir = check_run_dir(run_dir, CONFIG)
    path = run_dir / CONFIG
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict)
                                              for k in ("model", "train", "data")):
            raise ValueError("expected an object with model, train and data objects")
        model_cfg = ModelConfig.from_dict(d["model"])
        _check_fields(model_cfg, "model")
        data_cfg = EntityGridConfig(**{"tasks": TASKS[:3], **d["data"]})   # older: three
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path} is not a valid run config: {what}") from None
    return model_cfg, d["train"], data_cfg


def read_manifest(run_dir) -> dict | None:
    """checkpoint.json as {"step": int, "files": {name: {"size", "sha256"}}}, or None if
    the folder has none (written before manifests, or stopped before its first checkpoint)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        ok = (isinstance(m, dict) and isinstance(m.get("step"), int)
              and isinstance(m.get("files"), dict)
              and all(isinstance(v, dict) and isinstance(v.get("size"), int)
                      and isinstance(v.get("sha256"), str) for v in m["files"].values()))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{path} is not a valid checkpoint manifest (the run folder is damaged)")
    return m


def matches_manifest(run_dir, name: str, manifest: dict | None) -> bool:
    """Whether run_dir/name is the file the manifest names (True if it names none)."""
    want = (manifest or {}).get("files", {}).get(name)
    path = Path(run_dir) / name
    if want is None:
        return True
    if not path.is_file() or path.stat().st_size != want["size"]:
        return False
    return digest(path) == want


def verify(run_dir, name: str, manifest: dict | None) -> None:
    """ValueError if run_dir/name is not the file of the manifest's checkpoint."""
    if not matches_manifest(run_dir, name, manifest):
        why = ("the run was stopped while writing a checkpoint, or the file was changed"
               if name in (WEIGHTS, STATE) else "the file was changed or damaged")
        raise ValueError(
            f"{Path(run_dir) / name} is not the file that {Path(run_dir) / MANIFEST} names for "
            f"step {manifest['step']} ({why}); `python -m minihires train --resume {run_dir}` "
            "repairs the folder")


def load_tokenizer(path) -> Tokenizer:
    """Tokenizer.load with errors that name the file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the tokenizer file is empty")
    try:
        return Tokenizer.load(path)
    except (ValueError, OSError, IndexError, RuntimeError) as e:   # sentencepiece's, for junk
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None


def read_weights(path) -> dict:
    """A safetensors file's tensors; ValueError naming the file when it is unreadable
    (truncated, empty, not safetensors) or a tensor is not finite."""
    path = Path(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    check_finite(tensors, str(path))
    return tensors


def weights_step(path) -> int | None:
    """The step a model.safetensors was saved at (its metadata), None if it has none."""
    try:
        with safe_open(path, framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return int(step) if step is not None and step.isdigit() else None


def build_model(model_cfg: ModelConfig, where) -> HiResLLaVA:
    """HiResLLaVA(model_cfg) on the meta device (nothing allocated); ValueError naming
    `where` when the config describes no model."""
    try:
        with torch.device("meta"):
            return HiResLLaVA(model_cfg)
    except (ValueError, TypeError, RuntimeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: cannot build the model it describes ({e})") from None


def check_tensors(model: torch.nn.Module, tensors: dict, where) -> None:
    """ValueError naming `where` and the tensor unless `tensors` has exactly the model's
    state_dict names, each floating point and of the model's shape."""
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(f"{where} does not hold the model of config.json: "
                         + (f"missing {missing[:5]}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {unexpected[:5]}" if unexpected else ""))
    for k, v in want.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(v.shape) or not t.is_floating_point():
            raise ValueError(f"{where}: tensor {k} is {t.dtype} {tuple(t.shape)}, the model "
                             f"of config.json needs {v.dtype} {tuple(v.shape)}")


def fill(model: torch.nn.Module, tensors: dict, where) -> torch.nn.Module:
    """Load `tensors` into a model built on the meta device (assigned, not copied), after
    `check_tensors`."""
    check_tensors(model, tensors, where)
    want = model.state_dict()
    model.load_state_dict({k: t.to(want[k].dtype) for k, t in tensors.items()}, assign=True)
    return model


def load_run(run_dir, device: str | torch.device = "cpu") -> tuple[HiResLLaVA, Tokenizer, dict]:
    """The trained model (eval mode, on `device`), its tokenizer and the whole config.

    model.safetensors (and train_state.pt, when present) must be the files of the folder's
    last complete checkpoint (checkpoint.json), and the weights must fit config.json's model
    and be finite."""
    run_dir = check_run_dir(run_dir, CONFIG, TOKENIZER, WEIGHTS)
    model_cfg, train_cfg, data_cfg = load_config(run_dir)
    manifest = read_manifest(run_dir)
    for name in (WEIGHTS, TOKENIZER) + ((STATE,) if (run_dir / STATE).is_file() else ()):
        verify(run_dir, name, manifest)
    if manifest is None and (run_dir / STATE).is_file():      # folders from before manifests
        state = load_state(run_dir, mmap=True)
        if weights_step(run_dir / WEIGHTS) not in (None, state["step"]):
            raise ValueError(f"{run_dir / WEIGHTS} holds the weights of step "
                             f"{weights_step(run_dir / WEIGHTS)} but {run_dir / STATE} is at "
                             f"step {state['step']}: `python -m minihires train --resume "
                             f"{run_dir}` rewrites it")
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    model = fill(build_model(model_cfg, run_dir / CONFIG), read_weights(run_dir / WEIGHTS),
                 run_dir / WEIGHTS)
    model.to(device).eval()
    return model, tokenizer, {"model": model_cfg, "train": train_cfg, "data": data_cfg}


def load_state(run_dir, mmap: bool = False) -> dict:
    """train_state.pt, checked: a dict with every resume key, an int step and finite weights.
    ValueError naming the file when it is unreadable, truncated or not ours."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {STATE}: it is not a resumable run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:      # torch.load raises many types for a damaged or foreign file
        detail = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{path}: not a readable resume state, damaged or not written by "
                         f"`train` ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else []
        raise ValueError(f"{path} is not a minihires resume state"
                         + (f" (lacks {missing})" if missing else ""))
    rng = state["rng_cpu"]
    checks = {
        "step": isinstance(state["step"], int) and state["step"] >= 0,
        "model": isinstance(state["model"], dict)
        and all(isinstance(v, torch.Tensor) for v in state["model"].values()),
        "optimizer": isinstance(state["optimizer"], dict),
        "rng_cpu": isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
        and rng.shape == torch.get_rng_state().shape,
        "rng_cuda": isinstance(state["rng_cuda"], list),
        "train_time_s": isinstance(state["train_time_s"], (int, float)),
        "losses": isinstance(state["losses"], list)
        and all(isinstance(v, (int, float)) for v in state["losses"]),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{path} is not a minihires resume state ({', '.join(bad)} "
                         "malformed)")
    if not mmap:
        check_finite(state["model"], str(path))
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def repair(run_dir, state: dict) -> bool:
    """After a kill between the files of a checkpoint: rewrite model.safetensors and
    checkpoint.json from the resume state `state` if they do not describe it; -> whether it
    did. (train_state.pt is written first and atomically, so it is the newest whole state.)"""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if (manifest is not None and manifest["step"] == state["step"]
            and all(matches_manifest(run_dir, n, manifest) for n in (STATE, WEIGHTS))):
        return False
    _write_weights(run_dir, {k: v.contiguous() for k, v in state["model"].items()}, state["step"])
    _write_manifest(run_dir, state["step"])
    return True


# ----------------------------------------------------------------------------- new folders

def is_run_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _is_temporary(name: str) -> bool:
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in RUN_FILES)


def check_new_run_dir(path, flag: str = "--out") -> Path:
    """A folder a new run may write into: absent, or an existing folder that is empty (but for
    temporary files a killed run left, which are removed). ValueError naming `flag` otherwise
    (a run folder: resume it; anything else is not ours to overwrite)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is not a folder")
        if is_run_dir(path):
            raise ValueError(f"{flag} {path} already holds a run; pass --resume {path} or "
                             f"choose another {flag}")
        entries = sorted(p.name for p in path.iterdir() if not _is_temporary(p.name))
        if entries:
            raise ValueError(f"{flag} {path} is not empty and is not a run folder (it holds "
                             f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); "
                             f"choose an empty or new folder")
    else:
        parent = next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is not a folder")
    return path


def claim_run_dir(path=None, root="runs", flag: str = "--out", prefix: str = "") -> Path:
    """Create the folder of a new run and return it. `path` None: `root`/<prefix><timestamp>,
    with -2, -3, ... appended when another run took that name (os.mkdir claims it atomically,
    so two runs started in the same second get two folders)."""
    if path is not None:
        path = check_new_run_dir(path, flag)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
        clean_temporaries(path)
        return path
    base = Path(root) / (prefix + time.strftime("%Y%m%d-%H%M%S"))
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
