"""The language stage (minihires.training.pretrain_lm): scenes in words, what trains, that the
lookup is learned from them, and `train --lm-steps` (time counted, resume, bad values)."""
import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minihires.cli.train import cli_train
from minihires.data import batches
from minihires.data.entities import BOARD
from minihires.data.entitygrid import TASKS, EntityGridConfig, sample, test_split
from minihires.model import HiResLLaVA
from minihires.model.inputs import IGNORE
from minihires.training import checkpoint as ckpt
from minihires.training import pretrain_lm as P
from minihires.training import train as T
from minihires.training.train import TrainConfig, build


@pytest.fixture(scope="module")
def setup():
    model_cfg, data_cfg, tok = build(TrainConfig())
    torch.manual_seed(0)
    return HiResLLaVA(model_cfg), tok, data_cfg


def test_a_scene_is_one_token_per_entity_the_sum_of_its_words(setup):
    """Boards are left out: a scene mixing them (none of the tasks draws one) keeps the rest."""
    model, tok, _ = setup
    E = model.language_model.embed_tokens.weight
    cfg = EntityGridConfig(tasks=TASKS)
    scenes = [sample(k, cfg) for k in range(60)]
    boards = [e for s in scenes for e in s.entities if e.cls == BOARD][:2]
    entities = [e for s in scenes for e in s.entities if e.cls != BOARD][:3]
    assert len(boards) == 2 and len(entities) == 3
    mixed = dataclasses.replace(scenes[0], entities=[boards[0], *entities, boards[1]])
    rows = P.scene_embeds(mixed, tok, E)
    assert rows.shape == (3, E.shape[1])
    for row, e in zip(rows, entities):
        ids = tok.encode(f"{e.colour} {e.cls}") + tok.encode(e.position)
        assert torch.allclose(row, sum(E[i] for i in ids))


def test_the_scene_sits_where_the_image_goes_and_only_answers_are_labelled(setup):
    model, tok, cfg = setup
    samples = batches.train_samples(0, 0, 3, P.scene_config(cfg))
    embeds, mask, labels, seg = P.scene_batch(model, tok, samples, 2, P.scene_config(cfg))
    E = model.language_model.embed_tokens.weight
    for b, s in enumerate(samples):
        ids, lab, _ = tok.questions(batches.conversation(s, 2, P.scene_config(cfg)))
        p = ids.index(tok.image_id)                          # the <image> token's place
        scene = P.scene_embeds(s, tok, E)                    # (n, Dl)
        n = scene.shape[0]
        assert torch.equal(embeds[b, p:p + n], scene)
        assert torch.equal(embeds[b, :p], E[torch.tensor(ids[:p])])
        assert int(mask[b].sum()) == len(ids) - 1 + n
        kept = labels[b][labels[b] != IGNORE].tolist()
        assert kept == [v for v in lab if v != IGNORE]
        assert (seg[b, :p + n] == 0).all()


def test_the_stage_trains_the_language_model_alone_and_repeats_bitwise(setup):
    _, tok, cfg = setup
    model_cfg = build(TrainConfig())[0]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = HiResLLaVA(model_cfg)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        losses = P.pretrain_lm(m, tok, cfg, 3, seed=0, start=1200)
        after = m.state_dict()
        lm = [k for k in after if k.startswith("language_model.")]
        assert lm and all(not torch.equal(after[k], before[k]) for k in lm
                          if not k.endswith("norm.weight"))
        assert all(torch.equal(after[k], before[k]) for k in after if k not in lm)
        assert all(p.grad is None for p in m.parameters())
        runs.append((losses, after))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.slow
def test_the_stage_teaches_the_lookup(setup):
    """After 1500 steps (seed 0, about two minutes) the LLM finds the entity asked about
    among two on held-out scenes, where a guess between the two scores about half and the
    untrained model nothing."""
    _, tok, cfg = setup
    torch.manual_seed(0)
    m = HiResLLaVA(build(TrainConfig())[0])
    assert P.lookup_accuracy(m, tok, cfg) < 20
    P.pretrain_lm(m, tok, cfg, 1500, seed=0, start=P.first_step(1200, 32))
    assert P.lookup_accuracy(m, tok, cfg) > 90


def test_lookup_accuracy_asks_two_entity_scenes_of_the_test_split(setup, monkeypatch):
    """It scores the test split's two-entity position questions, each once: a language model
    that predicts every answer scores 100 less one question's share for one wrong answer."""
    model, tok, cfg = setup
    held = [s for s in test_split(P.LOOKUP_SPLIT, P.scene_config(cfg)) if len(s.entities) == 2]
    assert 80 <= len(held) < P.LOOKUP_SPLIT and all(s.task == "position" for s in held)
    seen, real = [], P.scene_batch

    def spy(*args):
        out = real(*args)
        seen.append((args[2], out[2]))                      # (samples, labels [b, L])
        return out

    def oracle(embeds, **kw):                               # logits [b, L, V]
        samples, labels = seen[-1]
        nxt = torch.cat([labels[:, 1:], labels[:, :1]], 1).clamp(min=0)    # (b, L)
        for b, s in enumerate(samples):
            if s.seed == held[0].seed:
                nxt[b] = 0                                  # this one answers wrongly
        return F.one_hot(nxt, model.cfg.llama.vocab_size).float()
    monkeypatch.setattr(P, "scene_batch", spy)
    monkeypatch.setattr(model.language_model, "forward", oracle)
    assert P.lookup_accuracy(model, tok, cfg) == pytest.approx(100 * (len(held) - 1) / len(held))
    assert [s.seed for samples, _ in seen for s in samples] == [s.seed for s in held]


def test_scene_config_refuses_tasks_without_words():
    cfg = EntityGridConfig(tasks=TASKS)
    assert P.scene_config(cfg).tasks == P.STAGE_TASKS
    assert P.scene_config(cfg, ("recognition", "counting")).tasks == ("recognition", "counting")
    for bad in ((), ("continuity",), ("position", "colour")):
        with pytest.raises(ValueError, match="language stage's tasks must be some of"):
            P.scene_config(cfg, bad)


def test_train_lm_steps_counts_its_time_and_resumes_bitwise(tmp_path, monkeypatch):
    """--lm-steps runs before step 1 and its time is in train_time_s; a run stopped at its
    first checkpoint resumes to the uninterrupted run's weights without a second stage."""
    args = ["--steps", "4", "--ckpt-every", "2", "--lm-steps", "3", "--batch-size", "2",
            "--eval-n", "0", "--quiet"]
    straight, split, plain = tmp_path / "straight", tmp_path / "split", tmp_path / "plain"
    assert cli_train([*args, "--out", str(straight)]) == 0
    assert cli_train([*args, "--out", str(split), "--stop-at", "2"]) == 0
    calls = []
    monkeypatch.setattr(T, "pretrain_lm", lambda *a, **k: calls.append(1) or P.pretrain_lm(*a, **k))
    assert cli_train(["--resume", str(split), "--quiet"]) == 0
    assert calls == []                                  # the checkpoint holds its result
    monkeypatch.undo()
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(split / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli_train([*args[:4], *args[6:], "--out", str(plain)]) == 0
    c = load_file(plain / ckpt.WEIGHTS)
    assert not torch.equal(a["language_model.embed_tokens.weight"],
                           c["language_model.embed_tokens.weight"])
    assert json.loads((straight / ckpt.CONFIG).read_text())["train"]["lm_steps"] == 3
    for run, stage in ((straight, True), (split, True), (plain, False)):
        m = json.loads((run / ckpt.METRICS).read_text())
        assert m["lm_steps"] == (3 if stage else 0)
        assert (0 < m["lm_time_s"] < m["train_time_s"]) if stage else m["lm_time_s"] == 0


def test_a_crash_after_the_stage_resumes_without_repeating_it(tmp_path, monkeypatch):
    """The stage's result is checkpointed as step 0: a run that dies at its first main step
    resumes from it (the stage is not run again) to the uninterrupted run's weights."""
    args = ["--steps", "2", "--lm-steps", "3", "--batch-size", "2", "--eval-n", "0", "--quiet"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert cli_train([*args, "--out", str(straight)]) == 0
    real_batch = T.data.make_batch

    def boom(*a, **k):
        raise RuntimeError("the machine went away")
    monkeypatch.setattr(T.data, "make_batch", boom)
    with pytest.raises(RuntimeError, match="went away"):
        cli_train([*args, "--out", str(crashed)])
    state = torch.load(crashed / ckpt.STATE, weights_only=True)
    assert state["step"] == 0 and state["lm_time_s"] > 0 and state["lm_lookup"] is not None
    monkeypatch.setattr(T.data, "make_batch", real_batch)
    calls = []
    monkeypatch.setattr(T, "pretrain_lm", lambda *a, **k: calls.append(1))
    assert cli_train(["--resume", str(crashed), "--quiet"]) == 0
    assert calls == []
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(crashed / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stage_draws_seeds_after_the_main_job():
    """Whatever the main job's batch and world size, the stage's first seed lies past the last
    one the main job draws, and at 1200 steps it is step 1200 of 64 scenes."""
    assert P.first_step(1200, 32) == 1200
    for steps, batch, world in ((1200, 32, 1), (10, 128, 1), (7, 32, 3), (5, 65, 2)):
        main_end = batches.batch_start(0, steps, batch, world)          # first seed not drawn
        assert batches.batch_start(0, P.first_step(steps, batch, world), P.STAGE_BATCH) >= main_end


@pytest.mark.parametrize("argv, message", [
    (["--lm-steps", "-1"], "lm_steps must be an int >= 0"),
    (["--lm-steps", "x"], "--lm-steps: invalid int value"),
    (["--lm-steps", "2", "--tasks", "continuity"], "lm_steps teaches position questions"),
])
def test_train_refuses_bad_lm_steps(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_train([*argv, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_prints_the_lookup_and_keeps_it_apart_from_the_training_mix(tmp_path, capsys):
    """The table's language-stage line; the lookup is scored on the test split's two-entity
    scenes even when training images hold up to three entities."""
    out = tmp_path / "run"
    assert cli_train(["--steps", "1", "--lm-steps", "2", "--batch-size", "2", "--eval-n", "9",
                      "--train-max-entities", "3", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "language stage: 2 steps first" in printed
    m = json.loads((out / ckpt.METRICS).read_text())
    assert 0 <= m["lm_lookup"] <= 100 and 0 <= m["lm_lookup_end"] <= 100
    assert re.search(rf"language-stage lookup +{m['lm_lookup_end']:.1f}  % on scenes in words "
                     rf"at the end \({m['lm_lookup']:.1f} after the stage", printed)
