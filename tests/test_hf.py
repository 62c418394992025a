"""minihires.hf against transformers: tiny random models saved with save_pretrained, loaded
with our loaders, compared in float32 (max |ours - theirs| / max |theirs| <= 1e-5)."""
from __future__ import annotations

import dataclasses
import io
import json

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers", reason="parity tests compare against transformers")
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from minihires.cli.ask import cli_ask  # noqa: E402
from minihires.model import HiResLLaVA, hf, prepare  # noqa: E402
from minihires.model.config import tiny  # noqa: E402
from minihires.model.llama import generate  # noqa: E402
from minihires.model.sampler import avg_pool_tokens  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14)
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (biases non-zero, norms not 1) so no tensor is left untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in hf.checkpoint_files(folder):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def resave(src, dst, state: dict, config_edit=None):
    """dst = src's config (optionally edited) with `state` as its one model.safetensors."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors")
    return dst


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(CLIPVisionModel(CLIPVisionConfig(**VISION)), 1)
    return model, save(model, tmp_path_factory.mktemp("clip"))


def test_clip_vision_hidden_states_of_every_layer(clip, tmp_path):
    theirs_model, folder = clip
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        theirs = theirs_model(x, output_hidden_states=True).hidden_states
        ours = hf.load_vit(folder).hidden_states(x)
    assert len(ours) == len(theirs) == VISION["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(a, b) <= TOL, f"hidden state {i}"
    # the older layout (vision_model. prefix, position_ids buffer) loads the same weights
    state = {"vision_model." + k: v for k, v in tensors(folder).items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    old = hf.load_vit(resave(folder, tmp_path / "old", state))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(),
                                                  hf.load_vit(folder).state_dict().values()))


def test_clip_model_vision_half(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    theirs = randomise(CLIPModel(CLIPConfig(vision_config=VISION, text_config=text)), 2)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = theirs.vision_model(x, output_hidden_states=True).hidden_states
        got = hf.load_vit(save(theirs, tmp_path / "clip"), feature_layer=-1).hidden_states(x)
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= TOL


# ----------------------------------------------------------------------------- LLaMA


def hf_llama(seed, **kw):
    torch.manual_seed(seed)
    return randomise(LlamaForCausalLM(LlamaConfig(**{**TEXT, **kw})), seed)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_logits(tmp_path, kv_heads, tied):
    theirs = hf_llama(3, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=5e5)
    ours = hf.load_llama(save(theirs, tmp_path))
    assert ours.cfg.rope_theta == 5e5 and ours.cfg.num_key_value_heads == kv_heads
    assert (ours.lm_head is None) == tied
    ids = torch.randint(0, TEXT["vocab_size"], (2, 24))
    with torch.no_grad():
        assert rel_err(ours(ours.embed(ids)), theirs(ids).logits) <= TOL


def test_sharded_checkpoint(tmp_path):
    theirs = hf_llama(4)
    folder = save(theirs, tmp_path, max_shard_size="20KB")
    assert len(hf.checkpoint_files(folder)) > 2 and (folder / "model.safetensors.index.json").is_file()
    ours = hf.load_llama(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = torch.randint(0, TEXT["vocab_size"], (1, 16))
    ours = ours.float()
    with torch.no_grad():
        assert rel_err(ours(ours.embed(ids)), theirs(ids).logits) < 0.05   # bf16 weights
    full = hf.load_llama(folder)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in
               {k.removeprefix("model."): v for k, v in theirs.state_dict().items()}.items())


# ----------------------------------------------------------------------------- error cases


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(hf_llama(5), tmp_path_factory.mktemp("llama"))


def test_missing_tensor(llama_dir, tmp_path):
    state = tensors(llama_dir)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*layers\.1\.mlp\.up_proj\.weight"):
        hf.load_llama(resave(llama_dir, tmp_path / "x", state))


def test_extra_tensor(llama_dir, tmp_path):
    state = {**tensors(llama_dir), "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"unexpected tensor.*q_proj\.bias"):
        hf.load_llama(resave(llama_dir, tmp_path / "x", state))


def test_wrong_shape(llama_dir, tmp_path):
    state = tensors(llama_dir)
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(48, 32)
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\(48, 32\).*\(64, 32\)"):
        hf.load_llama(resave(llama_dir, tmp_path / "x", state))


def test_tied_head_that_differs(llama_dir, tmp_path):
    def tie(cfg):
        cfg["tie_word_embeddings"] = True
    with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
        hf.load_llama(resave(llama_dir, tmp_path / "x", tensors(llama_dir), tie))


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("head_dim", 16),
    ("model_type", "mistral")])
def test_unsupported_llama_feature(llama_dir, tmp_path, key, value):
    def edit(cfg):
        cfg[key] = value
    name = "rope_parameters.rope_type" if key == "rope_parameters" else key
    with pytest.raises(ValueError, match=f"unsupported config feature {name}="):
        hf.load_llama(resave(llama_dir, tmp_path / "x", tensors(llama_dir), edit))


@pytest.mark.parametrize("key, value, field", [
    # the older "type" key: transformers reads it as rope_type (ignored, logits would differ)
    ("rope_parameters", {"type": "linear", "factor": 2.0, "rope_theta": 1e4},
     "rope_parameters.type"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_scaling", {"type": "dynamic", "factor": 4.0}, "rope_scaling"),
    # a factor (or any other knob) with the default type is scaling too
    ("rope_parameters", {"rope_type": "default", "factor": 2.0, "rope_theta": 1e4},
     "rope_parameters.factor"),
    ("rope_scaling", {"factor": 2.0}, "rope_scaling.factor"),
    ("rope_scaling", "linear", "rope_scaling"),
])
def test_any_rope_scaling_is_refused_however_it_is_spelled(llama_dir, tmp_path, key, value,
                                                           field):
    def edit(cfg):
        cfg[key] = value
    with pytest.raises(ValueError, match=rf"unsupported config feature {field}="):
        hf.load_llama(resave(llama_dir, tmp_path / "x", tensors(llama_dir), edit))


def test_plain_rope_parameters_still_load(llama_dir, tmp_path):
    def edit(cfg):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
        cfg["rope_scaling"] = None
    assert hf.load_llama(resave(llama_dir, tmp_path / "x", tensors(llama_dir), edit)
                         ).cfg.rope_theta == 5e5


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "32", "hidden_size must be an int"),
    ("num_hidden_layers", 2.0, "num_hidden_layers must be an int"),
    ("vocab_size", 0, "vocab_size must be an int"),
    ("num_hidden_layers", 10 ** 6, r"num_hidden_layers must be an int in 1\.\.1024"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("num_key_value_heads", 3, "cannot build the model"),           # 4 % 3
])
def test_bad_llama_config_values_are_named(llama_dir, tmp_path, key, value, match):
    def edit(cfg):
        cfg[key] = value
    with pytest.raises(ValueError, match=match):
        hf.load_llama(resave(llama_dir, tmp_path / "x", tensors(llama_dir), edit))


def test_huge_sizes_are_refused_from_the_headers_before_anything_is_allocated(
        llama_dir, tmp_path, monkeypatch):
    """A config asking for a vast model fails on the header shapes; the model is never
    allocated (to_empty is where allocation happens)."""
    def edit(cfg):
        cfg["hidden_size"], cfg["intermediate_size"] = 2 ** 20, 2 ** 22
        cfg["vocab_size"] = 2 ** 20
        cfg.pop("head_dim", None)
    folder = resave(llama_dir, tmp_path / "x", tensors(llama_dir), edit)

    def no_allocation(self, *a, **kw):
        raise AssertionError("the model was allocated before its shapes were checked")
    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(ValueError, match=r"has shape \(128, 32\), but the model's parameter has "
                                         r"shape \(1048576, 1048576\)"):
        hf.load_llama(folder)


def test_damaged_files_are_named(llama_dir, tmp_path):
    folder = resave(llama_dir, tmp_path / "x", tensors(llama_dir))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        hf.load_llama(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        hf.load_llama(folder)
    (folder / "config.json").write_text((llama_dir / "config.json").read_text())
    weights = folder / "model.safetensors"
    for damage in (b"", b"garbage that is no header", weights.read_bytes()[:4000]):
        weights.write_bytes(damage)
        with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
            hf.load_llama(folder)
    # a shard whose header is whole but whose data is cut short
    save_file({k: v.contiguous() for k, v in tensors(llama_dir).items()}, weights)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: "):
        hf.load_llama(folder)


def test_damaged_sharded_index_is_named(tmp_path):
    folder = save(hf_llama(4), tmp_path / "s", max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index\.json: no weight_map"):
        hf.load_llama(folder)
    index.write_text("{")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        hf.load_llama(folder)
    bad = dict(good, weight_map={**good["weight_map"], "lm_head.weight": "../elsewhere.safetensors"})
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not file names"):
        hf.load_llama(folder)
    first = sorted(set(good["weight_map"].values()))[0]
    index.write_text(json.dumps(good))
    (folder / first).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing from .*{first}"):
        hf.load_llama(folder)


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu"), ("image_size", [56, 28])])
def test_unsupported_clip_feature(clip, tmp_path, key, value):
    def edit(cfg):
        cfg[key] = value
    with pytest.raises(ValueError, match=f"unsupported config feature {key}="):
        hf.load_vit(resave(clip[1], tmp_path / "x", tensors(clip[1]), edit))


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*convert"):
        hf.load_llama(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_llama(tmp_path / "nowhere")


def test_defaults_are_transformers_defaults():
    """Keys a config.json omits get transformers' defaults."""
    llama, clip_vision = LlamaConfig(), CLIPVisionConfig()
    assert all(getattr(llama, k) == v for k, v in hf.LLAMA_DEFAULTS.items()
               if k != "num_key_value_heads")
    assert llama.num_key_value_heads == llama.num_attention_heads
    assert all(getattr(clip_vision, k) == v for k, v in hf.CLIP_VISION_DEFAULTS.items())
    llava_vision = LlavaConfig().vision_config
    assert all(getattr(llava_vision, k) == v for k, v in hf.LLAVA_VISION_DEFAULTS.items())
    assert hf.llama_config({}).rope_theta == llama.rope_parameters["rope_theta"]
    assert hf.llava_config({"model_type": "llava"}).image_token_index == LlavaConfig().image_token_index


# ----------------------------------------------------------------------------- LLaVA-1.5

# llava-hf/llava-1.5-7b-hf's config.json as published (transformers 4.x writes non-defaults only)
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
    "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


def test_published_llava_config_reads_as_transformers_reads_it():
    ours = hf.llava_config(LLAVA_15_7B)
    theirs = LlavaConfig(**{k: v for k, v in LLAVA_15_7B.items() if k not in ("vocab_size",)})
    v, t = theirs.vision_config, theirs.text_config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "layer_norm_eps"):
        assert getattr(ours.vit, field) == getattr(v, field), field
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours.llama, field) == getattr(t, field), field
    assert ours.llama.rope_theta == t.rope_parameters["rope_theta"] == 10000.0
    assert (ours.vit.feature_layer, ours.image_token_index) == (-2, 32000)
    assert (ours.vit.image_size, ours.llama.vocab_size, ours.mode) == (336, 32064, "llava15")



def llama_style_tokenizer() -> bytes:
    """Like LLaMA's tokenizer.model: BPE, byte fallback, no pad and no <image> piece."""
    words = "what is the colour shape of box red blue green where left right top bottom yes no"
    texts = [" ".join(words.split()[i:] + words.split()[:i]) for i in range(16)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts + ["USER: ASSISTANT:"] * 4), model_writer=out,
        vocab_size=300, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LlavaForConditionalGeneration whose <image> id is the tokenizer's piece count
    (as llava-hf: 32000) inside a padded vocabulary (as llava-hf's 32064)."""
    folder = tmp_path_factory.mktemp("llava")
    raw = llama_style_tokenizer()
    (folder / "tokenizer.model").write_bytes(raw)
    n = spm.SentencePieceProcessor(model_proto=raw).get_piece_size()
    torch.manual_seed(6)
    cfg = LlavaConfig(vision_config=VISION, text_config={**TEXT, "vocab_size": n + 8},
                      image_token_index=n, vision_feature_layer=-2)
    theirs = randomise(LlavaForConditionalGeneration(cfg), 6, scale=0.3)
    return theirs, save(theirs, folder)


def noise_image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                         dtype=torch.uint8).numpy(), "RGB")


def hf_ids(input_ids, image_id, n):
    """transformers expects the <image> token repeated once per image feature."""
    row = []
    for t in input_ids[0].tolist():
        row += [t] * (n if t == image_id else 1)
    return torch.tensor([row])


def test_llava_logits_and_greedy_generation(llava):
    theirs, folder = llava
    ours, tok = hf.load_llava(folder)
    assert ours.cfg.mode == "llava15" and tok.image_id == ours.cfg.image_token_index
    assert tok.image_id >= tok.vocab_size - 1          # appended: the LLaMA layout
    image, question = noise_image(90, 60), "what is the colour of the box"
    batch = prepare([image], [question], tok, ours.cfg)
    n_img = (VISION["image_size"] // VISION["patch_size"]) ** 2
    ids = hf_ids(batch.input_ids, tok.image_id, n_img)
    with torch.no_grad():
        logits, _ = ours(**batch.kwargs(), image_token_id=tok.image_id)
        want = theirs(input_ids=ids, pixel_values=batch.pixel_values).logits
    assert logits.shape == want.shape and rel_err(logits, want) <= TOL

    with torch.no_grad():
        images = ours.encode_images(batch.pixel_values, batch.grids)
        embeds, mask, _ = ours.build_inputs(batch.input_ids, batch.attention_mask, images,
                                            tok.image_id, padding_side="left")
        got = generate(ours.language_model, embeds, mask, 20, eos_id=tok.eos_id)[0].tolist()
        out = theirs.generate(input_ids=ids, pixel_values=batch.pixel_values, max_new_tokens=20,
                              do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    want_ids = out[0, ids.shape[1]:].tolist()
    assert got == want_ids[:len(got)] and len(got) == len(want_ids)
    assert len(set(got)) > 1, "degenerate generation: the test would not catch a wrong token"
    # the public path: the same tokens, decoded (ids beyond the tokenizer skipped)
    text_ids = [t for t in got[:got.index(tok.eos_id) if tok.eos_id in got else None]
                if t < tok.vocab_size]
    assert ours.generate(image, question, tok, max_new_tokens=20) == [tok.decode(text_ids).strip()]


def test_llava_layouts_load_the_same_weights(llava, tmp_path):
    """transformers-5 names (model.*, lm_head) and the hub's (vision_model. inside the tower)."""
    theirs, folder = llava
    ref = hf.load_llava_model(folder).state_dict()
    assert "language_model.model.embed_tokens.weight" in tensors(folder)   # saved: older layout
    in_memory = theirs.state_dict()
    hub = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v
           for k, v in in_memory.items()}
    for name, state in (("memory", in_memory), ("hub", hub)):
        got = hf.load_llava_model(resave(folder, tmp_path / name, state)).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name


@pytest.mark.parametrize("key, value", [("vision_feature_select_strategy", "full"),
                                        ("vision_feature_layer", [-2, -1]),
                                        ("projector_hidden_act", "relu")])
def test_unsupported_llava_feature(llava, tmp_path, key, value):
    def edit(cfg):
        cfg[key] = value
    with pytest.raises(ValueError, match=f"unsupported config feature {key}="):
        hf.load_llava_model(resave(llava[1], tmp_path / "x", {}, edit))


def test_ask_cli(llava, tmp_path, capsys):
    _, folder = llava
    ours, tok = hf.load_llava(folder)
    noise_image(70, 40, 3).save(tmp_path / "img.png")
    want = ours.generate(str(tmp_path / "img.png"), "where is the box", tok, max_new_tokens=6)[0]
    assert cli_ask(["--hf-llava", str(folder), str(tmp_path / "img.png"), "where is the box",
                    "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit) as e:
        cli_ask(["--hf-llava", str(tmp_path), str(tmp_path / "img.png"), "q"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.json" in err and len(err.splitlines()) == 1
    # a damaged tokenizer.model is named (it was a traceback without the file)
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folder.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "tokenizer.model").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        cli_ask(["--hf-llava", str(bad), str(tmp_path / "img.png"), "q", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad / "tokenizer.model") in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- HiRes from HF


def test_hires_from_hf(tmp_path):
    """HF ViT + HF LLaMA + fresh parts: same parameters as HiResLLaVA(cfg); at init SRA is the
    identity (features = CLIP's) and SMS is average pooling."""
    vision = {**VISION, "image_size": 32, "patch_size": 4}
    torch.manual_seed(7)
    clip_model = randomise(CLIPVisionModel(CLIPVisionConfig(**vision)), 7)
    llm = hf_llama(8)
    template = tiny()
    template.vit = dataclasses.replace(template.vit, sra_layers=(0, 1), feature_layer=-2)
    model = hf.hires_from_hf(save(clip_model, tmp_path / "v"), save(llm, tmp_path / "l"), template)
    direct = HiResLLaVA(dataclasses.replace(model.cfg)).state_dict()
    got = model.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in direct.items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert model.cfg.vit.hidden_size == 32 and model.cfg.llama.vocab_size == TEXT["vocab_size"]
    assert len(model.vision_tower.sra) == 2

    x = torch.randn(5, 3, 32, 32)                                 # thumbnail + 2x2 slices
    with torch.no_grad():
        feats = model.vision_tower(x, [(2, 2)])
        want = clip_model(x, output_hidden_states=True).hidden_states[-2]
        assert rel_err(feats, want) <= TOL
        g = 32 // 4
        pooled = model.sampler(feats[:, 1:].reshape(5, g, g, 32))
        assert torch.allclose(pooled, avg_pool_tokens(feats[:, 1:].reshape(5, g, g, 32), 2),
                              atol=1e-6)
        ids = torch.randint(0, TEXT["vocab_size"], (1, 10))
        lm = model.language_model
        assert rel_err(lm(lm.embed(ids)), llm(ids).logits) <= TOL
    with pytest.raises(ValueError, match="sra_layers"):
        bad = tiny()
        bad.vit = dataclasses.replace(bad.vit, sra_layers=(5,))
        hf.hires_from_hf(tmp_path / "v", tmp_path / "l", bad)
