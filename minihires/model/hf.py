"""Real weights: Hugging Face checkpoint folders (safetensors) into the from-scratch modules.

    CLIP vision tower (CLIPVisionModel, or the vision half of a CLIPModel) -> VisionTransformer
    LlamaForCausalLM (LLaMA, Vicuna; GQA; tied or untied head)             -> Llama
    LlavaForConditionalGeneration (LLaVA-1.5)                               -> HiResLLaVA, mode "llava15"
    a CLIP folder + a LLaMA folder + fresh SRA / SMS / projector            -> HiResLLaVA (to train)
    a LLaVA-1.5 folder + fresh SRA / SMS / image embeddings                 -> HiResLLaVA (to train)

Only local folders are read (`config.json` + `model.safetensors` or a sharded
`model.safetensors.index.json`); nothing is ever downloaded. Loading is strict: every
checkpoint tensor must land in a parameter and every parameter must be filled (or be one
of the fresh HiRes-LLaVA parts); a missing, unexpected or mis-shaped tensor is a
ValueError naming the key and both shapes, raised after reading only the file headers.
The model is built on the meta device and allocated once in the requested dtype and
device; tensors are then copied in one at a time, shard by shard, so no second copy of the
weights is ever held.

Key maps are tables of (HF prefix, our prefix, inner table): the first row whose HF prefix
starts a key wins. They cover the transformers-5 names and the older ones (CLIP without and
with `vision_model.`; LLaVA's `model.vision_tower.` / `model.language_model.` / `lm_head.`
and the older `vision_tower.` / `language_model.model.` / `language_model.lm_head.`).

Our choices: a config feature our modules lack (rope scaling, attention or MLP biases, an
activation other than silu / quick_gelu, vision_feature_select_strategy "full", several
vision feature layers, ...) is refused with an error naming it, never ignored. For
LLaVA-1.5 our preprocessing squashes the image to 336 x 336 (`slicing.crops`), where
llava-hf resizes and centre-crops, so answers can differ slightly from the reference.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from minihires.model.hires_llava import HiResLLaVA, MultiModalProjector
from minihires.model.config import LlamaConfig, ModelConfig, ViTConfig, paper
from minihires.model.llama import Llama
from minihires.model.sampler import build_sampler
from minihires.model.slice_restore import SliceRestore
from minihires.model.tokenizer import Tokenizer
from minihires.model.vit import VisionTransformer

# ----------------------------------------------------------------------------- key maps

CLIP_TOWER = (                                  # inside one CLIP vision tower
    ("embeddings.", "embeddings.", None),
    ("pre_layrnorm.", "pre_layrnorm.", None),
    ("encoder.layers.", "layers.", None),
    ("post_layernorm.", "post_layernorm.", None),
)
CLIP_VISION_KEYS = (
    ("vision_model.", "", CLIP_TOWER),          # CLIPModel; CLIPVisionModel before transformers 5
    ("", "", CLIP_TOWER),                       # CLIPVisionModel, transformers 5
)
LLAMA_KEYS = (
    ("model.", "", None),
    ("lm_head.", "lm_head.", None),
)
LLAVA_KEYS = (
    ("model.vision_tower.", "vision_tower.", CLIP_VISION_KEYS),          # transformers >= 4.52
    ("model.multi_modal_projector.", "multi_modal_projector.", None),
    ("model.language_model.", "language_model.", None),
    ("lm_head.", "language_model.lm_head.", None),
    ("vision_tower.", "vision_tower.", CLIP_VISION_KEYS),                # older checkpoints
    ("multi_modal_projector.", "multi_modal_projector.", None),
    ("language_model.model.", "language_model.", None),
    ("language_model.lm_head.", "language_model.lm_head.", None),
)
# tensors a checkpoint may hold that no module of ours needs (and that are safe to skip)
BUFFERS = re.compile(r"(^|\.)(embeddings\.position_ids|rotary_emb\.inv_freq)$")
CLIP_TEXT_HALF = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


def rename(key: str, table) -> str | None:
    """HF key -> our key by `table` (see the module doc); None if no row matches."""
    for hf, ours, inner in table:
        if key.startswith(hf):
            rest = key[len(hf):]
            if inner is None:
                return ours + rest
            sub = rename(rest, inner)
            return None if sub is None else ours + sub
    return None

# ----------------------------------------------------------------------------- configs

# HF's defaults for keys a config.json may omit (transformers writes only non-defaults)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=32,
                            layer_norm_eps=1e-5)
# LlavaConfig's vision tower when its config.json has no vision_config (CLIP ViT-L/14-336)
LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14)


def _unsupported(what: str, feature: str, value) -> ValueError:
    return ValueError(f"{what}: unsupported config feature {feature}={value!r} "
                      "(minihires implements only the plain architecture)")


# sane bounds on sizes read from a config.json, checked before any module is built
MAX_SIZE, MAX_LAYERS = 2 ** 24, 1024


def _fields(d: dict, defaults: dict, what: str) -> dict:
    """The `defaults` keys read from `d`, each checked against its default's kind: ints
    positive (and bounded), floats finite and positive, bools bools. ValueError naming the
    field otherwise (a string "4096" is not a size)."""
    out = {}
    for key, default in defaults.items():
        v = d.get(key, default)
        if v is None and default is None:
            out[key] = v
            continue
        if isinstance(default, bool):
            ok = isinstance(v, bool)
            kind = "true or false"
        elif isinstance(default, int) or default is None:
            limit = MAX_LAYERS if "layers" in key else MAX_SIZE
            ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit
            kind = f"an int in 1..{limit}"
        else:
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and v > 0)
            kind = "a positive number"
        if not ok:
            raise ValueError(f"{what}: {key} must be {kind}, got {v!r}")
        out[key] = float(v) if isinstance(default, float) else v
    return out


def _check_rope(d: dict, what: str) -> None:
    """Refuse any rope scaling, however a config spells it: rope_scaling or rope_parameters
    with a type ("rope_type" or the older "type") other than "default", a factor, or any key
    besides the type and rope_theta."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if rope is None or rope == {}:
            continue
        if not isinstance(rope, dict):
            raise _unsupported(what, key, rope)
        for name in ("rope_type", "type"):
            if rope.get(name, "default") != "default":
                raise (_unsupported(what, key, rope) if key == "rope_scaling"
                       else _unsupported(what, f"{key}.{name}", rope[name]))
        extra = sorted(k for k in rope if k not in ("rope_type", "type", "rope_theta"))
        if extra:
            raise _unsupported(what, f"{key}.{extra[0]}", rope[extra[0]])


def llama_config(d: dict, what: str = "LLaMA config") -> LlamaConfig:
    """A LlamaForCausalLM config.json dict -> LlamaConfig; refuses features Llama lacks."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    if d.get("model_type", "llama") != "llama":
        raise _unsupported(what, "model_type", d["model_type"])
    checks = [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]
    for key, ok in checks:
        if d.get(key, ok) != ok:
            raise _unsupported(what, key, d[key])
    _check_rope(d, what)
    rope = d.get("rope_parameters") or {}
    v = _fields(d, LLAMA_DEFAULTS, what)
    if v["num_key_value_heads"] is None:
        v["num_key_value_heads"] = v["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != v["hidden_size"] // v["num_attention_heads"]:
        raise _unsupported(what, "head_dim", head_dim)
    theta = _fields({"rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0))},
                    {"rope_theta": 10000.0}, what)["rope_theta"]
    return LlamaConfig(rope_theta=theta, **v)


def vit_config(d: dict, feature_layer: int = -2, what: str = "CLIP vision config",
               defaults: dict = CLIP_VISION_DEFAULTS) -> ViTConfig:
    """A CLIPVisionConfig dict -> ViTConfig (no adapters)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise _unsupported(what, "model_type", d["model_type"])
    for key, ok in (("hidden_act", "quick_gelu"), ("num_channels", 3)):
        if d.get(key, ok) != ok:
            raise _unsupported(what, key, d[key])
    merged = {**CLIP_VISION_DEFAULTS, **defaults}
    for k in ("image_size", "patch_size"):
        if isinstance(d.get(k), (list, tuple)):
            raise _unsupported(what, k, d[k])          # non-square sizes
    v = _fields(d, merged, what)
    if v["image_size"] % v["patch_size"] or v["hidden_size"] % v["num_attention_heads"]:
        raise ValueError(f"{what}: image_size {v['image_size']} must be a multiple of "
                         f"patch_size {v['patch_size']}, and hidden_size {v['hidden_size']} of "
                         f"num_attention_heads {v['num_attention_heads']}")
    L = v["num_hidden_layers"]
    if not isinstance(feature_layer, int) or not -(L + 1) <= feature_layer <= L:
        raise ValueError(f"{what}: the feature layer {feature_layer!r} is not one of the "
                         f"{L + 1} hidden states")
    return ViTConfig(feature_layer=feature_layer, **v)


def llava_config(d: dict) -> ModelConfig:
    """A LlavaConfig dict -> ModelConfig in "llava15" mode."""
    what = "LLaVA config"
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    if d.get("model_type") != "llava":
        raise ValueError(f"{what}: model_type must be 'llava', got {d.get('model_type')!r}")
    checks = [("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
              ("multimodal_projector_bias", True)]
    for key, ok in checks:
        if d.get(key, ok) != ok:
            raise _unsupported(what, key, d[key])
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise _unsupported(what, "vision_feature_layer", layer)       # several layers
    vision = d.get("vision_config")
    vit = vit_config(vision or {}, layer, "LLaVA vision_config",
                     LLAVA_VISION_DEFAULTS if vision is None else {})
    text = d.get("text_config") or {}
    if not isinstance(text, dict):
        raise ValueError(f"{what}: text_config must be a JSON object, got {text!r}")
    text = dict(text)
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")
                                       or text.get("tie_word_embeddings"))
    llama = llama_config(text, "LLaVA text_config")
    index = d.get("image_token_index", 32000)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_SIZE:
        raise ValueError(f"{what}: image_token_index must be an int >= 0, got {index!r}")
    return ModelConfig(vit=vit, llama=llama, mode="llava15", image_token_index=index)


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a ValueError naming the file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
    return read_json(path)

# ----------------------------------------------------------------------------- streaming load


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards of its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map (an object of tensor name -> shard file)")
        names = set(weight_map.values())
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise ValueError(f"{index}: weight_map names shards that are not file names in "
                             f"{folder}: {sorted(map(repr, bad))[:3]}")
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) missing from {folder}: {missing[:3]}")
        return [folder / name for name in sorted(names)]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}"
                            + (f" (found {found}: convert them to safetensors; pickled "
                               "checkpoints are not loaded)" if found else ""))


def _plan(folder, targets: dict, table, prefix: str = "", skip=(BUFFERS,), tied=None):
    """Read headers only: [(file, hf_key, our_key)] to copy, and [(file, hf_key, our_key)]
    of tied heads to compare. Raises on unexpected, duplicate or mis-shaped tensors."""
    copies, compares, unexpected, seen = [], [], [], {}
    tied = tied or {}
    for file in checkpoint_files(folder):
        with _open(file) as f:
            for key in f.keys():
                if any(p.search(key) for p in skip):
                    continue
                ours = rename(key, table)
                ours = None if ours is None else prefix + ours
                if ours in tied:                       # tied head: must equal the embedding
                    compares.append((file, key, tied[ours]))
                    continue
                if ours not in targets:
                    unexpected.append(key)
                    continue
                shape, want = tuple(f.get_slice(key).get_shape()), tuple(targets[ours].shape)
                if shape != want:
                    raise ValueError(f"{file.name}: tensor {key} (-> {ours}) has shape {shape}, "
                                     f"but the model's parameter has shape {want}")
                if ours in seen:
                    raise ValueError(f"{folder}: tensors {seen[ours]} and {key} both map to {ours}")
                seen[ours] = key
                copies.append((file, key, ours))
    if unexpected:
        raise ValueError(f"{folder}: {len(unexpected)} unexpected tensor(s) that no parameter "
                         f"takes: {unexpected[:8]}")
    return copies, compares


def _open(file: Path):
    """safe_open with a ValueError naming the file when it is not readable safetensors."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _copy(copies, compares, targets: dict) -> None:
    """Copy tensors shard by shard into the allocated parameters (casting dtype and device),
    then check each tied head against the embedding it must equal."""
    by_file: dict[Path, list] = {}
    for file, key, ours in copies:
        by_file.setdefault(file, []).append((key, ours))
    with torch.no_grad():
        for file, items in by_file.items():
            with _open(file) as f:
                for key, ours in items:
                    targets[ours].copy_(_tensor(f, file, key))   # one tensor at a time
    for file, key, emb in compares:
        with _open(file) as f:
            head = _tensor(f, file, key)
        if not torch.equal(head.to(targets[emb].device, targets[emb].dtype), targets[emb]):
            raise ValueError(f"{file.name}: {key} differs from the embedding {emb}, but the "
                             "config ties them (tie_word_embeddings=true)")


def _tensor(f, file: Path, key: str) -> torch.Tensor:
    """One tensor of an open safetensors file: floating point and finite, or a ValueError
    naming the file and the tensor (a truncated file fails here too)."""
    from safetensors import SafetensorError
    try:
        t = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{file}: cannot read tensor {key} ({e})") from None
    if not t.is_floating_point():
        raise ValueError(f"{file}: tensor {key} is {t.dtype}, not floating point")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{file}: tensor {key} holds non-finite values (nan or inf)")
    return t


def _check_complete(targets: dict, copies, where: str, fresh: tuple[str, ...] = ()) -> None:
    filled = {ours for _, _, ours in copies}
    missing = [k for k in targets if k not in filled and not k.startswith(fresh)]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs, e.g. "
                         f"parameters {missing[:8]}")


def _meta(build, what) -> nn.Module:
    """Build on the meta device: shapes only, nothing allocated."""
    try:
        with torch.device("meta"):
            return build()
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{what}: cannot build the model it describes ({e})") from None


def _allocate(module: nn.Module, dtype: torch.dtype, device) -> nn.Module:
    """Allocate a meta-device module (uninitialised) once, in dtype on device."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return module.to(dtype=dtype).to_empty(device=device)


def _load(build, folder, table, dtype, device, skip=(BUFFERS,), tied=None) -> nn.Module:
    """Build on meta, check every tensor name and shape against the file headers, and only
    then allocate and copy."""
    module = _meta(build, f"{folder}/config.json")
    copies, compares = _plan(folder, module.state_dict(keep_vars=True), table, skip=skip,
                             tied=tied)
    _check_complete(module.state_dict(keep_vars=True), copies, f"checkpoint {folder}")
    module = _allocate(module, dtype, device)
    _copy(copies, compares, module.state_dict(keep_vars=True))
    return module.eval()

# ----------------------------------------------------------------------------- public loaders


def load_vit(folder, dtype: torch.dtype = torch.float32, device="cpu",
             feature_layer: int = -2) -> VisionTransformer:
    """A CLIPVisionModel or CLIPModel folder -> VisionTransformer (vision half only)."""
    d = read_config(folder)
    skip = (BUFFERS,)
    if d.get("model_type") == "clip":                   # the text half is not used
        d, skip = d.get("vision_config") or {}, (BUFFERS, CLIP_TEXT_HALF)
    cfg = vit_config(d, feature_layer)
    return _load(lambda: VisionTransformer(cfg), folder, CLIP_VISION_KEYS, dtype, device, skip)


def load_llama(folder, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A LlamaForCausalLM folder (LLaMA, Vicuna, ...) -> Llama."""
    cfg = llama_config(read_config(folder))
    tied = {"lm_head.weight": "embed_tokens.weight"} if cfg.tie_word_embeddings else None
    return _load(lambda: Llama(cfg), folder, LLAMA_KEYS, dtype, device, tied=tied)


def load_llava_model(folder, dtype: torch.dtype = torch.float32, device="cpu") -> HiResLLaVA:
    """A LlavaForConditionalGeneration (LLaVA-1.5) folder -> HiResLLaVA in "llava15" mode."""
    cfg = llava_config(read_config(folder))
    tied = ({"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
            if cfg.llama.tie_word_embeddings else None)
    return _load(lambda: HiResLLaVA(cfg), folder, LLAVA_KEYS, dtype, device, tied=tied)


def load_tokenizer(folder) -> Tokenizer:
    """The folder's LLaMA sentencepiece `tokenizer.model` (<image> appended if absent)."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.model in {folder}: a sentencepiece model is "
                                "needed (tokenizer.json alone is not supported)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the tokenizer file is empty")
    try:
        return Tokenizer.load(path)
    except (ValueError, OSError, IndexError, RuntimeError) as e:   # sentencepiece's, for junk
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None


def load_llava(folder, dtype: torch.dtype = torch.float32,
               device="cpu") -> tuple[HiResLLaVA, Tokenizer]:
    """LLaVA-1.5 model + tokenizer from one folder; their <image> ids must agree."""
    cfg = llava_config(read_config(folder))
    tok = load_tokenizer(folder)
    if tok.image_id != cfg.image_token_index:
        raise ValueError(f"{folder}: the tokenizer's <image> id is {tok.image_id} but "
                         f"config.json has image_token_index={cfg.image_token_index}")
    text_ids = tok.vocab_size - (tok.image_id == tok.vocab_size - 1)
    if text_ids > cfg.llama.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {text_ids} text ids but the LLM's "
                         f"vocab_size is {cfg.llama.vocab_size}")
    return load_llava_model(folder, dtype, device), tok


def hires_from_hf(vit_dir, llm_dir, cfg: ModelConfig | None = None,
                  dtype: torch.dtype = torch.float32, device="cpu") -> HiResLLaVA:
    """HiRes-LLaVA whose ViT and LLM come from HF folders; SRA, SMS, projector and newline
    are fresh (zero-initialised outputs, so SRA is the identity and SMS average pooling).

    cfg: the template for everything the checkpoints do not fix (sra, sms, max_slices,
    vit.sra_layers, vit.feature_layer, ablation switches); default `paper()`. Its vit and
    llama shapes are replaced by those of the two config.json files.
    """
    cfg = paper() if cfg is None else cfg
    d = read_config(vit_dir)
    skip = (BUFFERS,)
    if d.get("model_type") == "clip":
        d, skip = d.get("vision_config") or {}, (BUFFERS, CLIP_TEXT_HALF)
    vit = vit_config(d, cfg.vit.feature_layer)
    vit.sra_layers = tuple(cfg.vit.sra_layers)
    cfg = dataclasses.replace(cfg, vit=vit, llama=llama_config(read_config(llm_dir)))
    model = _meta(lambda: HiResLLaVA(cfg), f"{vit_dir}/config.json + {llm_dir}/config.json")
    targets = model.state_dict(keep_vars=True)
    tied = ({"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
            if cfg.llama.tie_word_embeddings else None)
    plans = [_plan(vit_dir, targets, CLIP_VISION_KEYS, "vision_tower.", skip),
             _plan(llm_dir, targets, LLAMA_KEYS, "language_model.", tied=tied)]
    fresh = ("vision_tower.sra.", "sampler.", "multi_modal_projector.",
             *HiResLLaVA.IMAGE_EMBEDDINGS)
    _check_complete(targets, plans[0][0] + plans[1][0], f"checkpoints {vit_dir} + {llm_dir}",
                    fresh)
    model = _allocate(model, dtype, device)
    targets = model.state_dict(keep_vars=True)
    for copies, compares in plans:
        _copy(copies, compares, targets)
    _init_fresh(model, dtype, device)
    return model.train()


def hires_from_llava(folder, cfg: ModelConfig | None = None,
                     dtype: torch.dtype = torch.float32, device="cpu") -> HiResLLaVA:
    """HiRes-LLaVA initialised from a LLaVA-1.5 folder: its ViT, projector and LLM; fresh SRA,
    sampler and image embeddings (SRA the identity, the sampler average pooling at the start).

    cfg: the template for what the checkpoint does not fix (as `hires_from_hf`); default
    `paper()`. The tokenizer is the folder's (`load_tokenizer`)."""
    cfg = paper() if cfg is None else cfg
    llava = llava_config(read_config(folder))
    vit = dataclasses.replace(llava.vit, sra_layers=tuple(cfg.vit.sra_layers))
    cfg = dataclasses.replace(cfg, vit=vit, llama=llava.llama, mode="hires",
                              image_token_index=llava.image_token_index)
    model = _meta(lambda: HiResLLaVA(cfg), f"{folder}/config.json")
    targets = model.state_dict(keep_vars=True)
    tied = ({"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
            if cfg.llama.tie_word_embeddings else None)
    copies, compares = _plan(folder, targets, LLAVA_KEYS, tied=tied)
    fresh = ("vision_tower.sra.", "sampler.", *HiResLLaVA.IMAGE_EMBEDDINGS)
    _check_complete(targets, copies, f"checkpoint {folder}", fresh)
    model = _allocate(model, dtype, device)
    _copy(copies, compares, model.state_dict(keep_vars=True))
    _init_fresh(model, dtype, device, projector=False)
    return model.train()


def _init_fresh(model: HiResLLaVA, dtype: torch.dtype, device, projector: bool = True) -> None:
    """Rebuild the parts no checkpoint fills, with the same constructors HiResLLaVA uses."""
    cfg = model.cfg
    Dv, Dl = cfg.vit.hidden_size, cfg.llama.hidden_size
    with torch.device(device):
        for name in list(model.vision_tower.sra.keys()):
            model.vision_tower.sra[name] = SliceRestore(Dv, cfg.sra, eps=cfg.vit.layer_norm_eps)
        if hasattr(model, "sampler"):
            model.sampler = build_sampler(cfg.compression, Dv, cfg.sms)
        if projector:
            model.multi_modal_projector = MultiModalProjector(Dv, Dl)
        model.init_image_embeddings()
    model.to(dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
