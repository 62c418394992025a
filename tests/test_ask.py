"""minihires ask RUN_DIR IMAGE QUESTION on exported EntityGrid-QA test images: one answer
per question, equal to the batched evaluation's answer; clear errors on bad input."""
import pytest

from minihires.cli.ask import cli_ask
from minihires.cli.entitygrid import cli_entitygrid
from minihires.data import entitygrid
from minihires.training import checkpoint as ckpt
from minihires.training import evaluate as scoring


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run                      # the session's shared run (conftest)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert cli_entitygrid(["--split", "test", "--n", "6", "--out", str(out)]) == 0
    return out, entitygrid.load_export(out)


def test_ask_answers_exported_questions(run, exported, capsys):
    folder, records = exported
    capsys.readouterr()
    answers = []
    for rec in records:
        assert cli_ask([str(run), str(folder / rec["image"]), rec["question"],
                        "--device", "cpu"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].strip(), f"no answer to {rec['question']!r}"
        answers.append(out[0].strip())
    # the same answers as the batched, left-padded evaluation on the same PNG files
    model, tok, cfg = ckpt.load_run(run)
    batch = scoring.predict(model, tok, [dict(r, image=str(folder / r["image"])) for r in records],
                         batch_size=len(records), max_new_tokens=64)
    assert answers == batch
    # and scoring the export's records works on these answers
    assert entitygrid.score(answers, records)["counts"]["total"] == len(records)


def test_ask_bad_inputs(run, exported, tmp_path, capsys):
    folder, records = exported
    image = str(folder / records[0]["image"])
    bogus = tmp_path / "not_an_image.png"
    bogus.write_text("hello")

    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            cli_ask(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err

    fails([str(run), str(bogus), "What is at the top?", "--device", "cpu"],
          "not a recognised image format")
    fails([str(run), str(tmp_path / "missing.png"), "What?", "--device", "cpu"],
          "image file not found")
    fails([str(tmp_path / "no_run"), image, "What?", "--device", "cpu"], "does not exist")
    fails([str(tmp_path), image, "What?", "--device", "cpu"], "lacks")
    fails([str(run), image], "expected RUN_DIR IMAGE QUESTION")          # no question
