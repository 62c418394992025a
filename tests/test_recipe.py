"""The two-stage recipe on tiny random HF folders: `--stage pretrain` changes exactly the
connector (SRA, sampler, projector, image embeddings) and nothing else; `--stage finetune`
also the LLM, the ViT only with --train-vision; `--init-from-llava` keeps LLaVA's projector.
Plus the memory estimate of the paper preset's stage 2 on 8 x 80 GB."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from llava_fixtures import export, hf_folders

from minihires.analysis import memory
from minihires.cli.train import cli_train
from minihires.model import hf
from minihires.training import recipe
from minihires.training.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "hf").mkdir()
    vision, llm, llava_dir = hf_folders(root / "hf")
    return root, vision, llm, llava_dir, export(root / "eg", n=6, turns=2)


def changed(tc: TrainConfig, out) -> set[str]:
    before, _ = recipe.build_model(tc, out, resume=False)
    after = load_file(out / "model.safetensors")
    return {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}


@pytest.mark.parametrize("stage, extra", [("pretrain", []), ("finetune", []),
                                          ("finetune", ["--train-vision"])])
def test_stage_changes_exactly_its_parameters(folders, tmp_path, stage, extra):
    root, vision, llm, _, data = folders
    out = tmp_path / "run"
    args = ["--data", str(data), "--image-folder", str(root / "eg"), "--init-from-hf",
            str(vision), str(llm), "--stage", stage, *extra, "--steps", "3", "--batch-size",
            "2", "--warmup-steps", "1", "--quiet", "--threads", "1", "--out", str(out)]
    assert cli_train(args) == 0
    tc = TrainConfig(data=str(data), image_folder=str(root / "eg"),
                     init_from_hf=[str(vision), str(llm)], stage=stage,
                     train_vision=bool(extra))
    model, _ = recipe.build_model(tc, out, resume=False)
    named = {n for n, p in model.named_parameters()
             if p.requires_grad and recipe.trainable(n, stage, bool(extra))}
    got = changed(tc, out)
    assert got == named
    assert any(n.startswith("vision_tower.sra.") for n in got)
    assert any(n.startswith("sampler.") for n in got)
    assert any(n.startswith("language_model.") for n in got) == (stage == "finetune")
    vit = {n for n in got if n.startswith("vision_tower.") and ".sra." not in n}
    assert bool(vit) == bool(extra)


def test_init_from_llava_keeps_its_projector(folders):
    *_, llava_dir, _ = folders
    # the tiny LLaVA feeds feature_layer -2, so blocks 0 and 1 can take adapters
    model = hf.hires_from_llava(llava_dir, TrainConfig(sra_layers=[1]).model_config())
    ref = hf.load_llava_model(llava_dir)
    assert model.cfg.mode == "hires" and hasattr(model, "sampler")
    for name in ("multi_modal_projector.linear_1.weight", "language_model.norm.weight",
                 "vision_tower.layers.0.mlp.fc1.weight"):
        assert torch.equal(model.state_dict()[name], ref.state_dict()[name])


def test_paper_stage2_fits_8x80gb():
    est = memory.estimate("paper", stage="finetune", world=8, micro_batch=16,
                          grad_checkpointing=True, fsdp=True)
    assert est["fits"] and est["total_gb"] < 80
    for key in ("params_gb", "grads_gb", "optimizer_gb", "activations_gb"):
        assert est[key] > 0
    # the same without sharding (DDP) does not fit: every GPU holds all 7B x 16 bytes
    ddp = memory.estimate("paper", stage="finetune", world=8, micro_batch=16,
                          grad_checkpointing=True, fsdp=False)
    assert not ddp["fits"] and ddp["total_gb"] > 100
    no_ckpt = memory.estimate("paper", stage="finetune", world=8, micro_batch=16,
                              grad_checkpointing=False, fsdp=True)
    assert no_ckpt["activations_gb"] > 4 * est["activations_gb"]
    assert "fits" in memory.format_estimate(est)


def test_stage2_starts_from_a_stage1_run(folders, tmp_path):
    root, vision, llm, _, data = folders
    common = ["--data", str(data), "--image-folder", str(root / "eg"), "--steps", "1",
              "--batch-size", "2", "--quiet", "--threads", "1"]
    assert cli_train([*common, "--init-from-hf", str(vision), str(llm), "--stage", "pretrain",
                      "--out", str(tmp_path / "s1")]) == 0
    assert cli_train([*common, "--init-from-run", str(tmp_path / "s1"), "--stage", "finetune",
                      "--lr", "2e-5", "--weight-decay", "0", "--min-lr-ratio", "0",
                      "--out", str(tmp_path / "s2")]) == 0
    tc = TrainConfig(data=str(data), image_folder=str(root / "eg"),
                     init_from_run=str(tmp_path / "s1"), stage="finetune")
    start, _ = recipe.build_model(tc, tmp_path / "s2", resume=False)
    s1 = load_file(tmp_path / "s1" / "model.safetensors")
    assert all(torch.equal(v, s1[k]) for k, v in start.state_dict().items())


def test_autocast_on_one_gpu_even_with_fsdp():
    """--fsdp on one process shards nothing, so FSDP2's bf16 policy is not applied: autocast
    must be (it was off: a one-GPU --fsdp run computed in fp32)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert recipe.autocast_dtype(cuda, fsdp_on=True, world=1) == torch.bfloat16
    assert recipe.autocast_dtype(cuda, fsdp_on=False, world=4) == torch.bfloat16
    assert recipe.autocast_dtype(cuda, fsdp_on=True, world=2) is None     # FSDP2's policy
    assert recipe.autocast_dtype(cpu, fsdp_on=False, world=1) is None


def test_unreadable_init_folder_or_tokenizer_is_one_error_line(folders, tmp_path, capsys):
    root, _, _, _, data = folders
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "config.json").write_text("{}")
    (tmp_path / "tok.model").write_text("not a sentencepiece model")
    common = ["--data", str(data), "--image-folder", str(root / "eg"), "--steps", "1",
              "--batch-size", "1", "--quiet", "--threads", "1"]
    for flags, message in ((["--init-from-run", str(tmp_path / "notrun")], "--init-from-run"),
                           (["--tokenizer", str(tmp_path / "tok.model")], "--tokenizer")):
        with pytest.raises(SystemExit) as e:
            cli_train([*common, *flags, "--out", str(tmp_path / message[2:])])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: {message} ")
        assert len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--gpu-gb", "0"], "--gpu-gb must be > 0"),
    (["--stage", "pretrain", "--train-vision"], "--train-vision applies to --stage finetune"),
    (["--seq-len", "100"], "does not hold the image's 723 visual tokens"),
])
def test_memory_rejects_what_train_would(capsys, flags, message):
    from minihires.cli.memory import cli_memory
    with pytest.raises(SystemExit) as e:
        cli_memory(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
