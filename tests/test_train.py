"""minihires train / eval: run folder, metrics, atomic checkpoints, resume = uninterrupted,
eval reproduces train's numbers, step-indexed data, the lr schedule, bad input."""
import dataclasses
import json
import math
import random
import re

import pytest
import torch
from conftest import TRAINED_RUN_ARGS
from safetensors.torch import load_file

from minihires.cli.eval import cli_eval
from minihires.cli.train import cli_train
from minihires.data import batches as data
from minihires.data import entitygrid
from minihires.model import HiResLLaVA
from minihires.training import checkpoint as ckpt
from minihires.training import evaluate as scoring
from minihires.training.train import (
    TrainConfig,
    build,
    lr_at,
    make_optimizer,
    param_hash,
)

SMALL = ["--batch-size", "4", "--eval-n", "9", "--quiet"]
METRIC_KEYS = {"accuracy", "recognition", "position", "counting", "on_seam", "off_seam",
               "discrepancy", "wall_time_s", "train_time_s", "eval_time_s", "steps", "seed",
               "visual_tokens", "counts"}


@pytest.fixture(scope="module")
def run(trained_run):
    """The session's shared smoke run through the command line (conftest.TRAINED_RUN_ARGS)."""
    return trained_run


def test_run_folder_contents(run):
    flag = lambda name: int(TRAINED_RUN_ARGS[TRAINED_RUN_ARGS.index(name) + 1])  # noqa: E731
    steps, every = flag("--steps"), flag("--ckpt-every")
    assert steps % every                      # the last step is no multiple of --ckpt-every ...
    names = {p.name for p in run.iterdir()}
    assert names == {ckpt.CONFIG, ckpt.TOKENIZER, ckpt.WEIGHTS, ckpt.STATE, ckpt.MANIFEST,
                     ckpt.METRICS}
    cfg = json.loads((run / ckpt.CONFIG).read_text())
    assert set(cfg) == {"model", "train", "data"}
    assert cfg["train"]["steps"] == steps and cfg["train"]["batch_size"] == flag("--batch-size")
    assert cfg["data"]["slice_size"] == cfg["model"]["vit"]["image_size"]
    metrics = json.loads((run / ckpt.METRICS).read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == steps and metrics["counts"]["total"] == flag("--eval-n")
    assert metrics["discrepancy"] == pytest.approx(metrics["off_seam"] - metrics["on_seam"])
    assert torch.load(run / ckpt.STATE, weights_only=True)["step"] == steps  # ... yet saved


def test_weights_match_state_and_metrics(run):
    model, _, _ = ckpt.load_run(run)
    state = torch.load(run / ckpt.STATE, weights_only=True)
    for k, v in load_file(run / ckpt.WEIGHTS).items():
        assert torch.equal(v, state["model"][k]), k
    assert param_hash(model) == json.loads((run / ckpt.METRICS).read_text())["param_hash"]


def test_eval_reproduces_metrics(run, capsys):
    saved = json.loads((run / ckpt.METRICS).read_text())
    model, tok, cfg = ckpt.load_run(run)
    scores, _ = scoring.evaluate(model, tok, cfg["data"], saved["eval_n"])
    for k in ("accuracy", "recognition", "position", "counting", "on_seam", "off_seam"):
        assert scores[k] == saved[k], k
    capsys.readouterr()
    assert cli_eval([str(run)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("  ") and line.split()}
    for name, key in (("overall", "accuracy"), ("recognition", "recognition"),
                      ("on-seam", "on_seam"), ("off-seam", "off_seam")):
        assert rows[name][0] == f"{saved[key]:.1f}", name
    # --by-entities: the per-task rows add up to the task's accuracy
    assert cli_eval([str(run), "--by-entities"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("accuracy by entities"):].splitlines()
    for task in entitygrid.TASKS:
        [line] = [l for l in table if l.split() and l.split()[0] == task]
        cells = [(float(a), int(n.strip("()"))) for a, n in re.findall(r"([\d.]+) \(\s*(\d+)\)", line)]
        right = sum(round(a * n / 100) for a, n in cells)
        assert sum(n for _, n in cells) == saved["counts"][task]
        assert right == saved["correct"][task], task
    # --by-answer: per true answer and seam side, the counting rows add up to the task's score
    assert cli_eval([str(run), "--by-answer"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("accuracy by true answer"):].splitlines()
    cells = [(float(a), int(n)) for l in table if l.split() and l.split()[0] == "counting"
             for a, n in re.findall(r"([\d.]+) \(\s*(\d+)\)", l)]
    assert cells and sum(n for _, n in cells) == saved["counts"]["counting"]
    assert sum(round(a * n / 100) for a, n in cells) == saved["correct"]["counting"]
    # --attention: one table per question kind, a row per layer and head (minihires.probe)
    assert cli_eval([str(run), "--attention", "--n", "36"]) == 0    # both kinds with two entities
    out = capsys.readouterr().out
    for task in ("position", "recognition"):
        assert f"attention mass from the answer position, {task}, two entities" in out
    L = cfg["model"].llama.num_hidden_layers
    assert len(re.findall(r"^  L\d+ H\d+ +[\d.]+ +[\d.]+ +[\d.]+$", out, re.M)) == \
        2 * L * cfg["model"].llama.num_attention_heads


def test_by_entities_counts_per_task_and_entity_number():
    samples = entitygrid.test_split(27)
    answers = [s.answer if i % 2 else "wrong" for i, s in enumerate(samples)]
    table = scoring.by_entities(answers, samples)
    for task in entitygrid.TASKS:
        mine = [(i, s) for i, s in enumerate(samples) if s.task == task]
        assert sum(t for _, t in table[task].values()) == len(mine)
        for n, (right, total) in table[task].items():
            group = [i for i, s in mine if len(s.entities) == n]
            assert total == len(group) and right == sum(i % 2 for i in group)
    assert "1 entity" in scoring.by_entities_table(table)
    with pytest.raises(ValueError, match="differ in length"):
        scoring.by_entities(answers[:-1], samples)


def test_by_answer_counts_per_true_answer_and_seam_side():
    samples = entitygrid.test_split(60)
    answers = [s.answer if i % 3 else "wrong" for i, s in enumerate(samples)]
    tally = scoring.Tally()
    tally.add(answers, samples)
    table = tally.by_answer()
    for task in entitygrid.TASKS:
        mine = [(i, s) for i, s in enumerate(samples) if s.task == task]
        assert sum(t for _, t in table[task].values()) == len(mine)
        for (answer, on), (right, total) in table[task].items():
            group = [i for i, s in mine if s.answer == answer and s.on_seam == on]
            assert total == len(group) and right == sum(i % 3 > 0 for i in group)
    text = scoring.by_answer_table(table)
    assert {"counting", "continuity"} <= {l.split()[0] for l in text.splitlines()[2:]}
    assert "recognition" not in text                # many answers: not in the table


def test_resume_equals_uninterrupted(tmp_path, caplog):
    """6 steps straight vs 3 steps, stop, resume 3: bitwise-equal weights and optimizer."""
    args = ["--steps", "6", "--ckpt-every", "2", "--eval-n", "3", "--batch-size", "4", "--quiet"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_train([*args, "--out", str(straight)]) == 0
    assert cli_train([*args, "--out", str(split), "--stop-at", "3"]) == 0
    assert f"--resume {split}" in caplog.text          # the log tells how to continue
    assert torch.load(split / ckpt.STATE, weights_only=True)["step"] == 3
    assert not (split / ckpt.METRICS).exists()
    assert cli_train(["--resume", str(split), "--quiet"]) == 0
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(split / ckpt.WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / ckpt.STATE, weights_only=True)["optimizer"]["state"]
    sb = torch.load(split / ckpt.STATE, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    ma, mb = (json.loads((d / ckpt.METRICS).read_text()) for d in (straight, split))
    assert ma["param_hash"] == mb["param_hash"] and ma["accuracy"] == mb["accuracy"]


def test_freeze_vision_at_stops_the_vision_side_and_resumes_across_it(tmp_path):
    """--freeze-vision-at 2: from step 2 the ViT, SRA adapters and sampler keep their
    weights while the rest trains; stopping at the freeze and resuming is bitwise the
    uninterrupted run."""
    args = ["--steps", "4", "--freeze-vision-at", "2", "--eval-n", "0", "--batch-size", "2",
            "--quiet"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_train([*args, "--out", str(straight)]) == 0
    assert cli_train([*args, "--out", str(split), "--stop-at", "2"]) == 0
    at_freeze = load_file(split / ckpt.WEIGHTS)
    assert cli_train(["--resume", str(split), "--quiet"]) == 0
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(split / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    vision = [k for k in a if k.startswith(("vision_tower.", "sampler."))]
    assert vision and any(k.startswith("vision_tower.sra.") for k in vision)
    assert all(torch.equal(a[k], at_freeze[k]) for k in vision)
    rest = [k for k in a if k not in vision]
    assert all(not torch.equal(a[k], at_freeze[k]) for k in rest
               if k.startswith(("language_model.", "multi_modal_projector.")))
    assert json.loads((straight / ckpt.METRICS).read_text())["freeze_vision_at"] == 2


def test_different_seeds_differ(tmp_path):
    outs = [tmp_path / f"s{s}" for s in (0, 1)]
    for s, out in zip((0, 1), outs):
        assert cli_train(["--steps", "2", "--seed", str(s), "--eval-n", "0", "--out", str(out),
                          "--batch-size", "2", "--quiet"]) == 0
    a, b = (load_file(o / ckpt.WEIGHTS) for o in outs)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_training_stream_holds_up_to_train_max_entities_and_the_test_split_two(tmp_path):
    """The training images for recognition and position hold 1..train_max_entities entities;
    the test split (and the data config saved for eval) keeps EntityGridConfig's 1..2."""
    assert cli_train(["--steps", "1", "--eval-n", "0", "--batch-size", "2", "--quiet",
                      "--train-max-entities", "4", "--out", str(tmp_path / "r")]) == 0
    _, saved, data_cfg = ckpt.load_config(tmp_path / "r")
    assert saved["train_max_entities"] == 4 and data_cfg.max_entities == 2
    cfg = dataclasses.replace(data_cfg, max_entities=4)
    counts = {len(s.entities) for s in data.train_samples(0, 0, 200, cfg) if s.task != "counting"}
    assert counts == {1, 2, 3, 4}
    assert {len(s.entities) for s in entitygrid.test_split(60, data_cfg)
            if s.task != "counting"} == {1, 2}


def test_span_words_writes_each_answer_as_one_piece():
    """--span-words: every EntityGrid-QA answer is one piece (two at most without), and decodes
    back either way."""
    for span, longest in ((True, 1), (False, 2)):
        _, cfg, tok = build(TrainConfig(span_words=span))
        lengths = [len(tok.encode(a)) for a in entitygrid.answer_vocabulary(cfg)]
        assert max(lengths) == longest
        assert all(tok.decode(tok.encode(a)) == a for a in entitygrid.answer_vocabulary(cfg))


def test_chat_turns_flag_is_saved_and_resumed(tmp_path):
    """--chat-turns trains on conversations (other weights than the packed default), is kept
    in config.json and metrics.json, and a run folder saved before the flags existed resumes
    as it was trained: a conversation, with pieces that end at spaces, and no token shift."""
    args = ["--steps", "2", "--eval-n", "0", "--batch-size", "2", "--turns", "3", "--quiet"]
    before = ["--chat-turns", "--no-span-words", "--token-shift", "0"]   # as before the flags
    outs = {c: tmp_path / ("chat" if c else "packed") for c in (True, False)}
    for c, out in outs.items():
        assert cli_train([*args, *(before if c else []), "--out", str(out)]) == 0
        assert json.loads((out / ckpt.METRICS).read_text())["chat_turns"] is c
        assert ckpt.load_config(out)[1]["chat_turns"] is c
        assert ckpt.load_config(out)[1]["span_words"] is not c          # on by default
    a, b = (load_file(o / ckpt.WEIGHTS) for o in outs.values())
    assert not all(torch.equal(a[k], b[k]) for k in a)
    old = tmp_path / "old"                                   # stopped, then the keys removed
    assert cli_train([*args, *before, "--out", str(old), "--stop-at", "1"]) == 0
    cfg = json.loads((old / ckpt.CONFIG).read_text())
    for key in ("chat_turns", "span_words", "train_max_entities", "freeze_vision_at",
                "token_shift"):
        del cfg["train"][key]
    del cfg["model"]["llama"]["token_shift"]                 # a plain LLaMA then
    (old / ckpt.CONFIG).write_text(json.dumps(cfg))
    assert cli_train(["--resume", str(old), "--quiet"]) == 0
    assert load_file(old / ckpt.WEIGHTS).keys() == a.keys()
    assert all(torch.equal(load_file(old / ckpt.WEIGHTS)[k], a[k]) for k in a)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    ckpt.write_json(path, {"v": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]      # no temporary file left


def test_train_samples_are_step_indexed_and_disjoint():
    cfg = entitygrid.EntityGridConfig()
    seen, drawn = set(), {}
    for step in range(3):
        for rank in range(2):
            seeds = [s.seed for s in data.train_samples(7, step, 4, cfg, rank, 2)]
            assert len(seeds) == 4 and not seen & set(seeds)
            seen |= set(seeds)
            drawn[step, rank] = seeds
    # a step's samples depend on (run seed, step, rank) alone: not on the steps drawn before
    # (a resume starts mid-stream) nor on the global random state
    random.seed(123)
    torch.manual_seed(123)
    assert [s.seed for s in data.train_samples(7, 1, 4, cfg, 1, 2)] == drawn[1, 1]
    assert not seen & {s.seed for s in data.train_samples(8, 1, 4, cfg, 1, 2)}   # another run's
    assert not any(entitygrid.is_test_seed(s) for s in seen)


def test_conversations_start_with_the_sample_question():
    cfg = entitygrid.EntityGridConfig()
    samples = data.train_samples(0, 0, 40, cfg)
    random.seed(123)                          # the global random state plays no part
    for s in samples:
        every = [(q, a) for q, a, _ in entitygrid.questions_about(s.entities, cfg)]
        again = entitygrid.sample(s.seed, cfg)                            # drawn anew from its seed
        for turns in (1, 2, 3, 20):
            conv = data.conversation(s, turns, cfg)
            assert conv[0] == (s.question, s.answer)
            assert len(conv) == min(turns, len(every)) and len(set(conv)) == len(conv)
            assert set(conv) <= set(every)
            assert data.conversation(again, turns, cfg) == conv           # fixed by the seed
            assert data.conversation(s, turns + 1, cfg)[:turns] == conv   # more turns extend it
    # the extra turns are not always in the same order
    assert len({tuple(q for q, _ in data.conversation(s, 20, cfg)) for s in samples}) > 10
    with pytest.raises(ValueError, match="turns must be an int >= 1"):
        data.conversation(samples[0], 0, cfg)


def test_make_batch_labels_every_turn():
    tc = TrainConfig()
    model_cfg, cfg, tok = build(tc)
    samples = data.train_samples(0, 0, 6, cfg)
    one = data.make_batch(samples, tok, model_cfg)
    three = data.make_batch(samples, tok, model_cfg, 3, cfg)
    assert torch.equal(one.pixel_values, three.pixel_values) and one.grids == three.grids
    for b, s in enumerate(samples):
        conv = data.conversation(s, 3, cfg)
        labels = three.labels[b][three.labels[b] != -100].tolist()
        assert labels.count(tok.eos_id) == len(conv)
        assert tok.decode(labels) == " ".join(a for _, a in conv)
        assert one.labels[b][one.labels[b] != -100].tolist() == tok.encode(s.answer, eos=True)


def test_make_batch_packs_the_questions_unless_chat():
    """Default: each question after the shared image prompt, in its own segment; chat=True:
    the LLaVA conversation, no segments. One turn is the same batch either way."""
    tc = TrainConfig()
    model_cfg, cfg, tok = build(tc)
    samples = data.train_samples(0, 0, 4, cfg)
    packed = data.make_batch(samples, tok, model_cfg, 3, cfg)
    chat = data.make_batch(samples, tok, model_cfg, 3, cfg, chat=True)
    assert chat.segment_ids is None and packed.segment_ids is not None
    for b, s in enumerate(samples):
        conv = data.conversation(s, 3, cfg)
        n = int(packed.attention_mask[b].sum())
        seg = packed.segment_ids[b, :n].tolist()
        assert (seg, packed.input_ids[b, :n].tolist()) == tuple(reversed(tok.questions(conv)[::2]))
        assert max(seg) == len(conv)
        for lab in (packed.labels[b], chat.labels[b]):          # the same answers either way
            assert tok.decode(lab[lab != -100].tolist()) == " ".join(a for _, a in conv)
    one, one_chat = (data.make_batch(samples, tok, model_cfg, 1, cfg, chat=c) for c in (0, 1))
    assert torch.equal(one.input_ids, one_chat.input_ids)


def test_packed_questions_score_as_if_asked_alone():
    """The model's loss on a packed batch of 3 questions per image equals the loss of the
    same questions asked one per row (each with its image), token for token."""
    tc = TrainConfig()
    model_cfg, cfg, tok = build(tc)
    torch.manual_seed(0)
    model = HiResLLaVA(model_cfg).double().eval()
    samples = data.train_samples(0, 0, 3, cfg)
    packed = data.make_batch(samples, tok, model_cfg, 3, cfg)
    rows = []
    for s in samples:
        crops, grid = data.image_inputs(s.image, model_cfg)
        rows += [(crops, grid, *tok.chat(q, a)) for q, a in data.conversation(s, 3, cfg)]
    alone = data.collate(rows, tok.pad_id)
    with torch.no_grad():
        kw = packed.kwargs()
        kw["pixel_values"] = kw["pixel_values"].double()
        lp, _ = model(**kw)
        kw = alone.kwargs()
        kw["pixel_values"] = kw["pixel_values"].double()
        la, _ = model(**kw)
    # gather (logits at the position before each answer token) in order, for both layouts
    def answer_logits(logits, input_ids, labels, n_img):
        out = []
        for b in range(labels.shape[0]):
            idx = (labels[b] != -100).nonzero().flatten() + n_img - 1 - 1   # spliced, shifted
            out.append(logits[b, idx])
        return torch.cat(out)
    n_img = model.num_image_tokens(packed.grids[0])
    torch.testing.assert_close(answer_logits(lp, packed.input_ids, packed.labels, n_img),
                               answer_logits(la, alone.input_ids, alone.labels, n_img),
                               rtol=0, atol=1e-9)


def test_packed_batches_with_bad_segments_are_named():
    tc = TrainConfig()
    model_cfg, cfg, tok = build(tc)
    model = HiResLLaVA(model_cfg)
    samples = data.train_samples(0, 0, 2, cfg)
    batch = data.make_batch(samples, tok, model_cfg, 3, cfg)
    bad = batch.segment_ids.clone()
    bad[batch.input_ids == tok.image_id] = 1                       # image inside a question
    with pytest.raises(ValueError, match="shared prefix"):
        model(**{**batch.kwargs(), "segment_ids": bad})
    with pytest.raises(ValueError, match="segment_ids must be shaped like input_ids"):
        model(**{**batch.kwargs(), "segment_ids": batch.segment_ids[:, :-1]})
    crops, grid = data.image_inputs(samples[0].image, model_cfg)
    ids, labels, segments = tok.questions(data.conversation(samples[0], 3, cfg))
    with pytest.raises(ValueError, match="segments must be given for every example"):
        data.collate([(crops, grid, ids, labels, segments), (crops, grid, ids, labels)], tok.pad_id)


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(55, tc) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(100, tc) == pytest.approx(1e-4)
    lrs = [lr_at(s, tc) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_vision_lr_scale_applies_to_the_vit_encoder_only():
    """The ViT's embeddings and blocks learn at lr * vision_lr_scale; the SliceRestore
    adapters, sampler, projector, crop embedding and LLM at lr; one step moves them so."""
    tc = TrainConfig(steps=1, warmup_steps=0, lr=1e-2, vision_lr_scale=0.0)
    cfg, _, _ = build(tc)
    model = HiResLLaVA(cfg)
    opt = make_optimizer(model, tc)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(scale) == len(trainable)                                 # each one, once
    for name, p in trainable:
        encoder = name.startswith("vision_tower.") and not name.startswith("vision_tower.sra.")
        assert scale[id(p)] == (0.0 if encoder else 1.0), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for g in opt.param_groups:
        g["lr"] = tc.lr * g["lr_scale"]
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "vision_tower.embeddings.patch_embedding.weight" not in moved
    assert {"vision_tower.sra.1.proj.weight", "crop_embedding",
            "multi_modal_projector.linear_1.weight"} <= moved


def test_crop_embedding_switch():
    assert TrainConfig().model_config().crop_embedding                 # the tiny preset's
    cfg = TrainConfig(crop_embedding=False).model_config()
    m = HiResLLaVA(cfg)
    assert not cfg.crop_embedding and not hasattr(m, "crop_embedding")
    assert not hasattr(m, "crop_grid_embedding")


def test_sra_layers_switch_places_the_adapters():
    assert TrainConfig().model_config().vit.sra_layers == (0, 1, 2)    # the tiny preset's
    cfg = TrainConfig(sra_layers=[0, 2]).model_config()
    assert cfg.vit.sra_layers == (0, 2)
    assert sorted(HiResLLaVA(cfg).vision_tower.sra.keys()) == ["0", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be an int >= 1"),
    (["--sra-layers", "3"], "vit.sra_layers has block 3, but only blocks 0..2"),
    (["--sra-layers", "x"], "expected block numbers like 0,1"),
    (["--sra-layers", "1,1"], "a block is listed twice"),
    (["--batch-size", "-1"], "batch_size must be an int >= 1"),
    (["--turns", "0"], "turns must be an int >= 1"),
    (["--threads", "0"], "threads must be an int in 1..1024 or None"),
    (["--threads", "100000"], "threads must be an int in 1..1024 or None"),   # not a crash
    (["--lr", "0"], "lr must be a positive number"),
    (["--vision-lr-scale", "-1"], "vision_lr_scale must be a number >= 0"),
    (["--seed", "-3"], "seed must be an int in 0.."),
    (["--overlap", "1.5"], "overlap must be in [0, 1)"),
    (["--overlap", "0.25"], "--overlap: overlap 0.25 needs use_sra=False"),  # SRA is on by default
    (["--compression", "max"], "invalid choice"),
    (["--preset", "huge"], "invalid choice"),
    (["--eval-n", "-1"], "eval_n must be an int >= 0"),
    (["--freeze-vision-at", "-1"], "freeze_vision_at must be an int >= 0 or None"),
    (["--train-max-entities", "0"], r"train_max_entities must be an int in 1..9"),
    (["--train-max-entities", "10"], r"train_max_entities must be an int in 1..9"),
    (["--resume", "/nonexistent/run"], "does not exist"),
    (["--resume", "/nonexistent/run", "--steps", "5"], "drop --steps"),
    (["--stop-at", "0"], "--stop-at must be >= 1"),
])
def test_train_bad_flags(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_train([*argv, "--out", str(tmp_path / "x")] if "--resume" not in argv else argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_refuses_existing_run_and_cuda_without_gpu(run, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_train(["--out", str(run), *SMALL])
    assert "already holds a run" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli_train(["--device", "cuda", "--out", str(tmp_path / "g"), *SMALL])
        assert "no CUDA GPU" in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_starts_at_step_0(tmp_path, capsys):
    """A run stopped before its first checkpoint (config.json and tokenizer.model only) resumes
    from step 0 with its saved config, to the uninterrupted run's weights; a folder with
    weights but no resume state is refused, naming train_state.pt."""
    args = ["--steps", "2", "--batch-size", "2", "--eval-n", "0", "--quiet"]
    straight = tmp_path / "straight"
    assert cli_train([*args, "--out", str(straight)]) == 0
    for keep in ([ckpt.CONFIG, ckpt.TOKENIZER], [ckpt.CONFIG]):
        half = tmp_path / f"half{len(keep)}"
        half.mkdir()
        for name in keep:
            (half / name).write_bytes((straight / name).read_bytes())
        assert cli_train(["--resume", str(half), "--quiet"]) == 0
        a, b = load_file(straight / ckpt.WEIGHTS), load_file(half / ckpt.WEIGHTS)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (half / ckpt.TOKENIZER).read_bytes() == (straight / ckpt.TOKENIZER).read_bytes()
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for name in (ckpt.CONFIG, ckpt.TOKENIZER, ckpt.WEIGHTS):
        (orphan / name).write_bytes((straight / name).read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_train(["--resume", str(orphan)])
    assert ckpt.STATE in capsys.readouterr().err


def test_eval_renders_the_split_one_batch_at_a_time(run, monkeypatch):
    """eval never holds more rendered samples than one batch (it once rendered all of --n
    first): every predict call sees at most batch_size samples rendered ahead of it."""
    rendered = {"n": 0}
    answered = {"n": 0}
    real_sample, real_predict = entitygrid.sample, scoring.predict

    def counting_sample(seed, cfg=None):
        rendered["n"] += 1
        return real_sample(seed, cfg)

    def checking_predict(model, tok, samples, *a, **kw):
        assert rendered["n"] - answered["n"] <= 4, (rendered, answered)
        answered["n"] += len(samples)
        return real_predict(model, tok, samples, *a, **kw)

    monkeypatch.setattr(entitygrid, "sample", counting_sample)
    monkeypatch.setattr(scoring, "predict", checking_predict)
    assert cli_eval([str(run), "--n", "10", "--batch-size", "4", "--by-entities"]) == 0
    assert rendered["n"] == answered["n"] == 10


def test_eval_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_eval([str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_eval([str(tmp_path)])
    assert "lacks config.json" in capsys.readouterr().err
