"""Every user error of every command is one line, `error: ...`, naming the flag, file or field,
with exit status 2 and no traceback (minihires.cli_errors). The cases are the ones an attacker
found plus their neighbours: bad flags, damaged files, folders that are not what they claim."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minihires.cli import main
from minihires.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "checkpoint.json"      # a run folder's checkpoint manifest (checkpoint.MANIFEST)


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run):
    """A trained run folder (the session's shared one: damage copies of it, never it), an
    exported image, and a scratch folder for damaged copies."""
    base = tmp_path_factory.mktemp("cli")
    run = trained_run
    assert main(["entitygrid", "--n", "2", "--out", str(base / "eg")]) == 0
    (base / "file").write_text("not a folder")
    return {"run": run, "image": base / "eg" / "images" / "000000.png", "base": base}


def damaged(world, name: str, edit) -> Path:
    """A copy of the run folder, changed by edit(folder)."""
    d = world["base"] / "damaged" / name
    if not d.exists():
        d.mkdir(parents=True)
        for p in world["run"].iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        edit(d)
    return d


def legacy(edit):
    """As `edit`, on a folder without checkpoint.json (written before manifests): the loader
    itself must then name the damaged file."""
    def both(d):
        (d / MANIFEST).unlink(missing_ok=True)
        edit(d)
    return both


def put(name: str, data: bytes | str):
    def edit(d):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return edit


def cut(name: str, keep: int):
    def edit(d):
        (d / name).write_bytes((d / name).read_bytes()[:keep])
    return edit


def config(change):
    def edit(d):
        cfg = json.loads((d / ckpt.CONFIG).read_text())
        change(cfg)
        (d / ckpt.CONFIG).write_text(json.dumps(cfg))
    return edit


def hf_folder(world, name: str, cfg_edit=None, index=None) -> Path:
    """A small LLaVA folder in the HF layout (config, tokenizer, an index), no weights;
    cfg_edit changes the config dict, or is the config.json text itself."""
    d = world["base"] / "hf" / name
    if d.exists():
        return d
    d.mkdir(parents=True)
    cfg = {"model_type": "llava", "image_token_index": 4,
           "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
           "text_config": {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "max_position_embeddings": 256}}
    if callable(cfg_edit):
        cfg_edit(cfg)
    (d / "config.json").write_text(cfg_edit if isinstance(cfg_edit, str) else json.dumps(cfg))
    (d / "tokenizer.model").write_bytes((world["run"] / ckpt.TOKENIZER).read_bytes())
    (d / "model.safetensors.index.json").write_text(json.dumps(index if index is not None
                                                               else {"metadata": {}}))
    return d


def f_image(world, value: float) -> Path:
    path = world["base"] / f"float_{value}.tiff"
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    a[2, 3] = value
    Image.fromarray(a, mode="F").save(path)
    return path


S = "What is at the top left?"
CASES = {
    # ask
    "ask: a folder as IMAGE": lambda w: (["ask", str(w["run"]), str(w["image"].parent), S],
                                         [str(w["image"].parent), "is a folder"]),
    "ask: RUN_DIR is a file": lambda w: (["ask", str(w["base"] / "file"), str(w["image"]), S],
                                         [str(w["base"] / "file")]),
    "ask: float image with inf": lambda w: (["ask", str(w["run"]), str(f_image(w, np.inf)), S],
                                            ["float_inf.tiff", "non-finite"]),
    "ask: --temperature nan": lambda w: (["ask", str(w["run"]), str(w["image"]), S,
                                          "--temperature", "nan"], ["--temperature"]),
    "ask: --top-p 0": lambda w: (["ask", str(w["run"]), str(w["image"]), S, "--top-p", "0"],
                                 ["--top-p"]),
    "ask: --device bogus": lambda w: (["ask", str(w["run"]), str(w["image"]), S,
                                       "--device", "bogus"], ["--device", "bogus"]),
    "ask: --device meta": lambda w: (["ask", str(w["run"]), str(w["image"]), S,
                                      "--device", "meta"], ["--device", "meta"]),
    "ask: --max-new-tokens past the context": lambda w: (
        ["ask", str(w["run"]), str(w["image"]), S, "--max-new-tokens", "100000"],
        ["max_new_tokens", "max_position_embeddings"]),
    "ask: <image> in the question": lambda w: (["ask", str(w["run"]), str(w["image"]),
                                                "<image> hi"], ["<image>"]),
    "ask: zero-byte weights": lambda w: (
        ["ask", str(damaged(w, "zw", put(ckpt.WEIGHTS, b""))), str(w["image"]), S],
        [ckpt.WEIGHTS]),
    "ask: zero-byte weights, no manifest": lambda w: (
        ["ask", str(damaged(w, "lzw", legacy(put(ckpt.WEIGHTS, b"")))), str(w["image"]), S],
        [ckpt.WEIGHTS, "not a readable safetensors"]),
    "ask: garbage weights, no manifest": lambda w: (
        ["ask", str(damaged(w, "lgw", legacy(put(ckpt.WEIGHTS, b"\x10" + b"\0" * 7 + b"{junk")))),
         str(w["image"]), S], [ckpt.WEIGHTS, "not a readable safetensors"]),
    "ask: truncated weights, no manifest": lambda w: (
        ["ask", str(damaged(w, "ltw", legacy(cut(ckpt.WEIGHTS, 5000)))), str(w["image"]), S],
        [ckpt.WEIGHTS, "not a readable safetensors"]),
    "ask: weights of another model": lambda w: (
        ["ask", str(damaged(w, "ow", legacy(config(
            lambda c: c["model"]["llama"].update(num_hidden_layers=2))))), str(w["image"]), S],
        [ckpt.WEIGHTS, "does not hold the model of config.json"]),
    # eval
    "eval: zero-byte tokenizer": lambda w: (
        ["eval", str(damaged(w, "zt", put(ckpt.TOKENIZER, b""))), "--n", "3"], [ckpt.TOKENIZER]),
    "eval: zero-byte tokenizer, no manifest": lambda w: (
        ["eval", str(damaged(w, "lzt", legacy(put(ckpt.TOKENIZER, b"")))), "--n", "3"],
        [ckpt.TOKENIZER, "empty"]),
    "eval: junk tokenizer, no manifest": lambda w: (
        ["eval", str(damaged(w, "ljt", legacy(put(ckpt.TOKENIZER, b"junk" * 50)))), "--n", "3"],
        [ckpt.TOKENIZER, "cannot read the tokenizer"]),
    "eval: --n 100000000": lambda w: (["eval", str(w["run"]), "--n", "100000000"], ["--n"]),
    "eval: --n 0": lambda w: (["eval", str(w["run"]), "--n", "0"], ["--n"]),
    "eval: --batch-size 0": lambda w: (["eval", str(w["run"]), "--batch-size", "0"],
                                       ["--batch-size"]),
    "eval: --device bogus": lambda w: (["eval", str(w["run"]), "--device", "bogus"], ["--device"]),
    "eval: --threads 0": lambda w: (["eval", str(w["run"]), "--threads", "0"], ["--threads"]),
    "eval: config.json not JSON": lambda w: (
        ["eval", str(damaged(w, "cj", put(ckpt.CONFIG, "{oops")))], [ckpt.CONFIG]),
    "eval: a size written as a string": lambda w: (
        ["eval", str(damaged(w, "cs", config(
            lambda c: c["model"]["llama"].update(hidden_size="128"))))],
        [ckpt.CONFIG, "model.llama.hidden_size"]),
    "eval: a vast layer count": lambda w: (
        ["eval", str(damaged(w, "cl", config(
            lambda c: c["model"]["llama"].update(num_hidden_layers=10 ** 7))))],
        [ckpt.CONFIG, "num_hidden_layers"]),
    "eval: train.eval_n not a number": lambda w: (
        ["eval", str(damaged(w, "ce", config(lambda c: c["train"].update(eval_n="x"))))],
        ["train.eval_n"]),
    "eval: a damaged manifest": lambda w: (
        ["eval", str(damaged(w, "cm", put(MANIFEST, "[]")))], [MANIFEST]),
    # train
    "train: --resume of a zero-byte tokenizer, no manifest": lambda w: (
        ["train", "--resume", str(damaged(w, "rzt", legacy(put(ckpt.TOKENIZER, b"")))), "--quiet"],
        [ckpt.TOKENIZER]),
    "train: --resume of a corrupt train_state.pt": lambda w: (
        ["train", "--resume", str(damaged(w, "rcs", put(ckpt.STATE, b"garbage"))), "--quiet"],
        [ckpt.STATE, "not a readable resume state"]),
    "train: --resume of a truncated train_state.pt": lambda w: (
        ["train", "--resume", str(damaged(w, "rts", cut(ckpt.STATE, 3000))), "--quiet"],
        [ckpt.STATE]),
    "train: --resume of a foreign train_state.pt": lambda w: (
        ["train", "--resume", str(damaged(w, "rfs", lambda d: torch.save({"a": 1}, d / ckpt.STATE))),
         "--quiet"], [ckpt.STATE, "not a minihires resume state"]),
    "train: --resume of a state for another model": lambda w: (
        ["train", "--resume", str(damaged(w, "rom", lambda d: torch.save(
            {**torch.load(d / ckpt.STATE, weights_only=True), "model": {"w": torch.zeros(2)}},
            d / ckpt.STATE))), "--quiet"], [ckpt.STATE, "does not hold the model"]),
    "train: --resume with a malformed RNG state": lambda w: (
        ["train", "--resume", str(damaged(w, "rng", lambda d: torch.save(
            {**torch.load(d / ckpt.STATE, weights_only=True), "rng_cpu": torch.zeros(3)},
            d / ckpt.STATE))), "--quiet"], [ckpt.STATE, "rng_cpu"]),
    "train: --resume with an unknown train key": lambda w: (
        ["train", "--resume", str(damaged(w, "ruk", config(lambda c: c["train"].update(foo=1)))),
         "--quiet"], [ckpt.CONFIG, "foo"]),
    "train: --resume with lr written as a string": lambda w: (
        ["train", "--resume", str(damaged(w, "rlr", config(lambda c: c["train"].update(lr="x")))),
         "--quiet"], [ckpt.CONFIG, "train.lr"]),
    "train: --resume of a file": lambda w: (["train", "--resume", str(w["base"] / "file")],
                                            ["--resume", str(w["base"] / "file")]),
    "train: --out inside a file": lambda w: (
        ["train", "--out", str(w["base"] / "file" / "sub"), "--steps", "1"], ["--out"]),
    "train: --device bogus": lambda w: (
        ["train", "--out", str(w["base"] / "t1"), "--device", "bogus"], ["--device"]),
    "train: --device cuda:x": lambda w: (
        ["train", "--out", str(w["base"] / "t2"), "--device", "cuda:x"], ["--device"]),
    "train: --eval-n past the test split": lambda w: (
        ["train", "--out", str(w["base"] / "t3"), "--eval-n", "100000000"], ["--eval-n"]),
    "train: --lr nan": lambda w: (["train", "--out", str(w["base"] / "t4"), "--lr", "nan"],
                                  ["--lr"]),
    "train: an unknown flag": lambda w: (["train", "--bogus"], ["--bogus"]),
    # entitygrid
    "entitygrid: --slice-size 100000": lambda w: (
        ["entitygrid", "--slice-size", "100000", "--out", str(w["base"] / "e1")],
        ["--slice-size 100000"]),
    "entitygrid: --out inside a file": lambda w: (
        ["entitygrid", "--n", "2", "--out", str(w["base"] / "file" / "sub")], ["--out"]),
    "entitygrid: --out a file": lambda w: (
        ["entitygrid", "--n", "2", "--out", str(w["base"] / "file")], ["--out"]),
    "entitygrid: --out a run folder, even with --force": lambda w: (
        ["entitygrid", "--n", "2", "--force", "--out", str(w["run"])], ["--out", "not empty"]),
    # ablate, tokens, lookup
    "ablate: --out an existing folder": lambda w: (        # refused before any training
        ["ablate", "--steps", "1", "--batch-size", "1", "--eval-n", "1", "--variants",
         "thumbnail", "--quiet", "--runs", str(w["base"] / "a1"), "--out", str(w["base"])],
        ["--out"]),
    "ablate: --runs a file": lambda w: (["ablate", "--runs", str(w["base"] / "file")],
                                        ["--runs"]),
    "ablate: --device bogus": lambda w: (
        ["ablate", "--device", "bogus", "--runs", str(w["base"] / "a2")], ["device"]),
    "tokens: --size 0x5": lambda w: (["tokens", "--size", "0x5"], ["--size"]),
    "tokens: --preset nope": lambda w: (["tokens", "--preset", "nope"], ["preset"]),
    # HF folders (ask --hf-llava)
    "ask --hf-llava: config.json not JSON": lambda w: (
        ["ask", "--hf-llava", str(hf_folder(w, "bj", "{oops")), str(w["image"]), S],
        ["config.json", "not valid JSON"]),
    "ask --hf-llava: a size written as a string": lambda w: (
        ["ask", "--hf-llava", str(hf_folder(w, "ss", lambda c: c["text_config"].update(
            hidden_size="32"))), str(w["image"]), S], ["hidden_size"]),
    "ask --hf-llava: index without weight_map": lambda w: (
        ["ask", "--hf-llava", str(hf_folder(w, "wm")), str(w["image"]), S, "--device", "cpu"],
        ["model.safetensors.index.json", "weight_map"]),
    "ask --hf-llava: rope scaling with the older type key": lambda w: (
        ["ask", "--hf-llava", str(hf_folder(w, "rs", lambda c: c["text_config"].update(
            rope_scaling={"type": "linear", "factor": 2.0}))), str(w["image"]), S],
        ["rope_scaling"]),
    "unknown command": lambda w: (["nope"], ["unknown command 'nope'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_named_error_line(case, world, capsys):
    argv, needles = CASES[case](world)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_entitygrid_refusing_a_run_folder_leaves_it_unchanged(world):
    before = {p.name: p.read_bytes() for p in world["run"].iterdir()}
    for extra in ([], ["--force"]):
        with pytest.raises(SystemExit):
            main(["entitygrid", "--n", "2", "--out", str(world["run"]), *extra])
    assert {p.name: p.read_bytes() for p in world["run"].iterdir()} == before


@pytest.mark.parametrize("argv", [["eval", "RUN", "--n", "0"], ["ask", "RUN", "IMAGE_DIR", "q"]])
def test_the_command_line_itself_prints_no_traceback(argv, world):
    argv = [{"RUN": str(world["run"]), "IMAGE_DIR": str(world["image"].parent)}.get(a, a)
            for a in argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "minihires", *argv], capture_output=True,
                          text=True, env=env, cwd=world["base"], timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()][0].startswith("error: ")
