"""The LLaVA-format reader (minihires.data.llava) and `train --data` on the EntityGrid export.

- multi-turn rows: loss on the assistant turns only, exactly `Tokenizer.conversation`;
- text-only rows: the template without the image, mixed with image rows in one batch;
- malformed rows: an error naming the row (index and id), or, with skip_bad, skipped and
  counted; a JSON syntax error names the row; the file is read incrementally;
- the DataLoader yields the same batches for any number of workers, and shards by rank;
- the EntityGrid export trained through --data feeds the same samples as the built-in
  stream (`train --chat-turns`): the per-step losses agree.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from minihires.cli.train import cli_train
from minihires.data import llava
from minihires.data.entitygrid import (
    EntityGridConfig,
    answer_vocabulary,
    question_texts,
)
from minihires.model import IGNORE, HiResLLaVA
from minihires.model.config import tiny
from minihires.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(question_texts(EntityGridConfig()), 256, span_words=True)


def conv(*texts):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


def write(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return path


def test_rows_streams_with_small_reads(tmp_path, monkeypatch):
    rows = [{"id": str(i), "conversations": conv("What is at the top?", "red " * i)}
            for i in range(50)]
    path = write(tmp_path / "d.json", rows)
    monkeypatch.setattr(llava, "_CHUNK", 7)             # rows span many reads
    assert list(llava.rows(path)) == rows
    assert llava.count_rows(path) == 50
    write(tmp_path / "e.json", [])
    assert list(llava.rows(tmp_path / "e.json")) == []


def test_multi_turn_labels_only_the_answers(tok):
    image, turns = llava.check_row({"id": "a", "image": "x.png", "conversations": conv(
        "<image>\nWhat is at the top?", "red stripes", "Where are the red stripes?", "top")}, 0)
    assert image == "x.png" and turns == [("What is at the top?", "red stripes"),
                                          ("Where are the red stripes?", "top")]
    ids, labels = llava.encode(tok, turns)
    assert (ids, labels) == tok.conversation(turns)
    answers = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert answers == tok.encode("red stripes", eos=True) + tok.encode("top", eos=True)
    # <image> at the end of the first turn (LLaVA data has both) is moved to the template's place
    _, turns2 = llava.check_row({"image": "x.png", "conversations": conv(
        "What is at the top?\n<image>", "red stripes")}, 0)
    assert turns2 == [("What is at the top?", "red stripes")]


def test_text_only_rows_mix_with_image_rows(tok, tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64), "white").save(tmp_path / "w.png")
    path = write(tmp_path / "d.json", [
        {"id": "t", "conversations": conv("What is at the top?", "red stripes")},
        {"id": "i", "image": "w.png", "conversations": conv("<image>\nWhat is at the top?", "two")},
    ])
    cfg = tiny()
    cfg.image_token_index = tok.image_id
    batch = next(iter(llava.LlavaStream(path, tmp_path, tok, cfg, batch_size=2)))
    assert batch.grids == [(2, 2)] and tok.image_id not in batch.input_ids[0].tolist()
    ids, labels = llava.encode(tok, [("What is at the top?", "red stripes")], image=False)
    assert batch.input_ids[0, :len(ids)].tolist() == ids and tok.image_id not in ids
    assert [i for i, lab in zip(ids, labels) if lab != IGNORE] == tok.encode("red stripes", eos=True)
    torch.manual_seed(0)
    model = HiResLLaVA(cfg)
    _, loss = model(**batch.kwargs())
    loss.backward()
    assert torch.isfinite(loss) and model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    # a batch of text rows only still runs (and gives zero gradient to) the vision side
    model.zero_grad()
    text = next(iter(llava.LlavaStream(path, tmp_path, tok, cfg, batch_size=1)))
    _, loss = model(**text.kwargs())
    loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() == 0


BAD = [
    ({"conversations": conv("hi")}, "must alternate"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "conversations[0].from must be 'human'"),
    ({"conversations": conv("hi", 3)}, "conversations[1].value must be a string"),
    ({"image": "x.png", "conversations": conv("hi", "a")}, "no <image>"),
    ({"conversations": conv("<image>\nhi", "a")}, "holds 1 <image>"),
    ({"image": "x.png", "conversations": conv("<image><image>hi", "a")}, "holds 2 <image>"),
    ([1, 2], "must be a JSON object"),
    ({"conversations": []}, "non-empty list"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_malformed_row_is_named(row, message):
    if isinstance(row, dict):
        row = {"id": "r7", **row}
    with pytest.raises(ValueError, match="row 3") as e:
        llava.check_row(row, 3)
    assert message in str(e.value)
    if isinstance(row, dict):
        assert "'r7'" in str(e.value)


def test_bad_rows_error_or_skip_and_count(tok, tmp_path):
    good = {"id": "g", "conversations": conv("What is at the top?", "red stripes")}
    path = write(tmp_path / "d.json", [good, {"id": "b1", "conversations": conv("x")}, good,
                                       {"id": "b2", "image": "missing.png",
                                        "conversations": conv("<image>\nq", "a")}, good])
    cfg = tiny()
    with pytest.raises(ValueError, match=r"row 1 \(id 'b1'\).*--skip-bad-rows"):
        next(iter(llava.LlavaStream(path, tmp_path, tok, cfg, batch_size=3)))
    stream = llava.LlavaStream(path, tmp_path, tok, cfg, batch_size=3, skip_bad=True)
    batch = next(iter(stream))
    assert batch.input_ids.shape[0] == 3 and stream.skipped == 2
    (tmp_path / "s.json").write_text('[{"conversations": [}, ]')
    with pytest.raises(ValueError, match="row 0: not valid JSON"):
        list(llava.rows(tmp_path / "s.json"))
    (tmp_path / "o.json").write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="not a JSON array"):
        list(llava.rows(tmp_path / "o.json"))


def test_cli_bad_row_is_one_error_line(tmp_path, capsys):
    path = write(tmp_path / "d.json", [{"id": "zz", "conversations": conv("q")}])
    with pytest.raises(SystemExit) as e:
        cli_train(["--data", str(path), "--steps", "1", "--batch-size", "1", "--quiet",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "id 'zz'" in err
    assert len(err.splitlines()) == 1


def test_workers_and_ranks_shard_without_changing_batches(tok, tmp_path):
    names = answer_vocabulary()[:12]
    path = write(tmp_path / "d.json", [
        {"id": str(i), "conversations": conv("What is at the top?", a)} for i, a in enumerate(names)])
    cfg = tiny()

    def firsts(workers, rank=0, world=1, start=0):
        s = llava.LlavaStream(path, None, tok, cfg, batch_size=2, rank=rank, world=world,
                              start=start)
        it = iter(DataLoader(s, batch_size=None, num_workers=workers))
        return [tok.decode([i for i in next(it).labels[0].tolist() if i >= 0]).strip()
                for _ in range(5)]

    assert firsts(0) == firsts(2) == [names[i] for i in (0, 2, 4, 6, 8)]
    assert firsts(0, start=2)[0] == names[4]
    assert firsts(0, rank=1, world=2)[:3] == [names[i] for i in (1, 5, 9)]


def test_export_through_data_matches_the_built_in_stream(tmp_path):
    """Same seed, steps and samples: `train --chat-turns` vs `train --data <export>`."""
    from minihires.cli.entitygrid import cli_entitygrid
    steps, batch = 3, 4
    assert cli_entitygrid(["--split", "train", "--n", str(steps * batch), "--turns", "5",
                           "--format", "llava", "--out", str(tmp_path / "eg")]) == 0
    common = ["--steps", str(steps), "--batch-size", str(batch), "--eval-n", "0", "--quiet",
              "--threads", "1"]
    assert cli_train(["--chat-turns", "--turns", "5", "--vit-init", "none", *common,
                      "--out", str(tmp_path / "a")]) == 0       # from scratch, as --data starts
    assert cli_train(["--data", str(tmp_path / "eg" / "llava.json"), "--image-folder",
                      str(tmp_path / "eg"), "--tokenizer", str(tmp_path / "eg" / "tokenizer.model"),
                      *common, "--out", str(tmp_path / "b")]) == 0
    built_in = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["losses"]
    through_data = json.loads((tmp_path / "b" / "train_state.json").read_text())["losses"]
    assert through_data == pytest.approx(built_in, rel=1e-5)


def test_eval_data_scores_the_export_as_the_test_split(trained_run, tmp_path, capsys):
    """`eval RUN --data` on the exported test split gives the test split's accuracy."""
    from minihires.cli.entitygrid import cli_entitygrid
    from minihires.cli.eval import cli_eval
    from minihires.training import checkpoint as ckpt
    from minihires.training import evaluate as scoring
    assert cli_entitygrid(["--split", "test", "--n", "9", "--format", "llava",
                           "--out", str(tmp_path / "t")]) == 0
    model, tok, cfg = ckpt.load_run(trained_run)
    ours = scoring.evaluate_llava(model, tok, tmp_path / "t" / "llava.json", tmp_path / "t",
                                  batch_size=4, max_new_tokens=8)
    split, _ = scoring.evaluate(model, tok, cfg["data"], 9, 4)
    assert ours["n"] == 9 and ours["accuracy"] == pytest.approx(split["accuracy"])
    capsys.readouterr()
    assert cli_eval([str(trained_run), "--data", str(tmp_path / "t" / "llava.json"),
                     "--image-folder", str(tmp_path / "t"), "--threads", "1"]) == 0
    assert f"{ours['accuracy']:5.1f}" in capsys.readouterr().out


def test_rows_end_of_file_bom_and_empty(tmp_path):
    """Text after the array's ']' is an error (it was silently ignored); a UTF-8 BOM is
    skipped; an empty file says so; a syntax error counts its position from the row."""
    good = {"id": "g", "conversations": conv("What is at the top?", "red stripes")}
    (tmp_path / "a.json").write_text(json.dumps([good]) + "\n xyz")
    with pytest.raises(ValueError, match=r"text after the array's closing '\]'"):
        list(llava.rows(tmp_path / "a.json"))
    (tmp_path / "e.json").write_text("[] x")
    with pytest.raises(ValueError, match="closing"):
        list(llava.rows(tmp_path / "e.json"))
    (tmp_path / "b.json").write_text("\ufeff" + json.dumps([good]), encoding="utf-8")
    assert list(llava.rows(tmp_path / "b.json")) == [good]
    (tmp_path / "z.json").write_text("  \n")
    with pytest.raises(ValueError, match="z.json: empty"):
        list(llava.rows(tmp_path / "z.json"))
    (tmp_path / "t.json").write_text(json.dumps([good]) + "\n" * 3 + '[{"id": }')
    with pytest.raises(ValueError, match="text after"):
        list(llava.rows(tmp_path / "t.json"))
    (tmp_path / "s.json").write_text("[" + json.dumps(good) + ', {"id": }]')
    with pytest.raises(ValueError, match="row 1: not valid JSON .* at character 7 of the row"):
        list(llava.rows(tmp_path / "s.json"))


def test_bad_row_in_a_worker_keeps_its_one_line_message(tok, tmp_path):
    """DataLoader re-raises a worker's BadData with the worker's traceback as its text; the
    message stays the row's (it was the whole traceback folded into the `error:` line)."""
    path = write(tmp_path / "d.json", [{"id": "w1", "conversations": conv("q")}])
    stream = llava.LlavaStream(path, None, tok, tiny(), batch_size=1)
    with pytest.raises(llava.BadData) as e:
        next(iter(DataLoader(stream, batch_size=None, num_workers=1)))
    assert str(e.value).startswith(f"{path}: row 0 (id 'w1'): conversations has 1 turns")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("text, flags", [
    ('[{"id": "a", "conversations": []}, ', []),                  # tokenizer trained on it
    ('[{"id": "a", "conversations": []}, ', ["--epochs", "1"]),   # rows counted
    ('{"id": "a"}', []),
])
def test_cli_unreadable_data_file_is_one_error_line(tmp_path, capsys, text, flags):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(SystemExit) as e:
        cli_train(["--data", str(tmp_path / "d.json"), *flags, "--batch-size", "1",
                   "--threads", "1", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path / 'd.json'}: ")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--turns", "3"], "--turns: for the built-in EntityGrid-QA training"),
    (["--freeze-vision-at", "1", "--chat-turns"], "--chat-turns, --freeze-vision-at: for"),
    (["--lm-steps", "5"], "--lm-steps: for the built-in EntityGrid-QA training"),
    (["--fsdp"], "--fsdp shards the model over torchrun's processes"),
    (["--epochs", "1", "--steps", "2"], "--epochs sets --steps: give one of them"),
    (["--warmup-ratio", "0.1", "--warmup-steps", "2"], "--warmup-ratio sets --warmup-steps"),
])
def test_cli_flags_that_a_data_run_would_ignore(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = write(tmp_path / "d.json", [{"id": "g", "conversations": conv("q", "a")}])
    with pytest.raises(SystemExit) as e:
        cli_train(["--data", str(path), *flags, "--quiet", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-folder", "."], "--image-folder applies to --data only"),
    (["--max-new-tokens", "4"], "--max-new-tokens applies to --data only"),
    (["--data", "q.json", "--by-entities"], "--by-entities, --by-answer and --attention apply to"),
    (["--data", "q.json", "--by-answer"], "--by-entities, --by-answer and --attention apply to"),
])
def test_eval_flags_of_the_other_mode_are_errors(tmp_path, capsys, flags, message):
    from minihires.cli.eval import cli_eval
    with pytest.raises(SystemExit) as e:
        cli_eval([str(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_export_flags_are_checked_before_the_folder_is_touched(tmp_path, capsys):
    """`entitygrid --force --turns 0` emptied an existing export, then rejected --turns; a bad
    --vocab-size failed after every image was written, as an error of --out."""
    from minihires.cli.entitygrid import cli_entitygrid
    out = tmp_path / "eg"
    assert cli_entitygrid(["--n", "2", "--format", "llava", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    for flags, message in ((["--force", "--turns", "0"], "--turns must be >= 1"),
                           (["--force", "--vocab-size", "3"], "--vocab-size must be >= 8")):
        with pytest.raises(SystemExit) as e:
            cli_entitygrid(["--n", "2", "--format", "llava", "--out", str(out), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(SystemExit):
        cli_entitygrid(["--n", "2", "--format", "llava", "--vocab-size", "3",
                        "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
