"""Real weights: Hugging Face checkpoint folders (safetensors) into the from-scratch modules.

    CLIP vision tower (CLIPVisionModel, or the vision half of a CLIPModel) -> VisionTransformer
    LlamaForCausalLM (LLaMA, Vicuna; GQA; tied or untied head)             -> Llama
    LlavaForConditionalGeneration (LLaVA-1.5)                               -> HiResLLaVA, mode "llava15"
    a CLIP folder + a LLaMA folder + fresh SRA / SMS / projector            -> HiResLLaVA (to train)

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
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .config import LlamaConfig, ModelConfig, ViTConfig, paper
from .llama import Llama
from .model import HiResLLaVA, MultiModalProjector
from .sampler import build_sampler
from .slice_restore import SliceRestore
from .tokenizer import Tokenizer
from .vit import VisionTransformer

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


def llama_config(d: dict, what: str = "LLaMA config") -> LlamaConfig:
    """A LlamaForCausalLM config.json dict -> LlamaConfig; refuses features Llama lacks."""
    if d.get("model_type", "llama") != "llama":
        raise _unsupported(what, "model_type", d["model_type"])
    checks = [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
              ("rope_scaling", None)]
    for key, ok in checks:
        if d.get(key, ok) != ok:
            raise _unsupported(what, key, d[key])
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(what, "rope_parameters.rope_type", rope["rope_type"])
    v = {k: d.get(k, default) for k, default in LLAMA_DEFAULTS.items()}
    if v["num_key_value_heads"] is None:
        v["num_key_value_heads"] = v["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != v["hidden_size"] // v["num_attention_heads"]:
        raise _unsupported(what, "head_dim", head_dim)
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    return LlamaConfig(rope_theta=float(theta), **v)


def vit_config(d: dict, feature_layer: int = -2, what: str = "CLIP vision config",
               defaults: dict = CLIP_VISION_DEFAULTS) -> ViTConfig:
    """A CLIPVisionConfig dict -> ViTConfig (no adapters)."""
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise _unsupported(what, "model_type", d["model_type"])
    for key, ok in (("hidden_act", "quick_gelu"), ("num_channels", 3)):
        if d.get(key, ok) != ok:
            raise _unsupported(what, key, d[key])
    v = {k: d.get(k, default) for k, default in {**CLIP_VISION_DEFAULTS, **defaults}.items()}
    for k in ("image_size", "patch_size"):
        if not isinstance(v[k], int):
            raise _unsupported(what, k, v[k])          # non-square sizes
    return ViTConfig(feature_layer=feature_layer, **v)


def llava_config(d: dict) -> ModelConfig:
    """A LlavaConfig dict -> ModelConfig in "llava15" mode."""
    what = "LLaVA config"
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
    text = dict(d.get("text_config") or {})
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")
                                       or text.get("tie_word_embeddings"))
    llama = llama_config(text, "LLaVA text_config")
    return ModelConfig(vit=vit, llama=llama, mode="llava15",
                       image_token_index=int(d.get("image_token_index", 32000)))


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
    return json.loads(path.read_text())

# ----------------------------------------------------------------------------- streaming load


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards of its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}"
                            + (f" (found {found}: convert them to safetensors; pickled "
                               "checkpoints are not loaded)" if found else ""))


def _plan(folder, targets: dict, table, prefix: str = "", skip=(BUFFERS,), tied=None):
    """Read headers only: [(file, hf_key, our_key)] to copy, and [(file, hf_key, our_key)]
    of tied heads to compare. Raises on unexpected, duplicate or mis-shaped tensors."""
    from safetensors import safe_open
    copies, compares, unexpected, seen = [], [], [], {}
    tied = tied or {}
    for file in checkpoint_files(folder):
        with safe_open(file, framework="pt") as f:
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


def _copy(copies, compares, targets: dict) -> None:
    """Copy tensors shard by shard into the allocated parameters (casting dtype and device),
    then check each tied head against the embedding it must equal."""
    from safetensors import safe_open
    by_file: dict[Path, list] = {}
    for file, key, ours in copies:
        by_file.setdefault(file, []).append((key, ours))
    with torch.no_grad():
        for file, items in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key, ours in items:
                    targets[ours].copy_(f.get_tensor(key))   # one tensor in memory at a time
    for file, key, emb in compares:
        with safe_open(file, framework="pt") as f:
            head = f.get_tensor(key)
        if not torch.equal(head.to(targets[emb].device, targets[emb].dtype), targets[emb]):
            raise ValueError(f"{file.name}: {key} differs from the embedding {emb}, but the "
                             "config ties them (tie_word_embeddings=true)")


def _check_complete(targets: dict, copies, where: str, fresh: tuple[str, ...] = ()) -> None:
    filled = {ours for _, _, ours in copies}
    missing = [k for k in targets if k not in filled and not k.startswith(fresh)]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs, e.g. "
                         f"parameters {missing[:8]}")


def _empty(build, dtype: torch.dtype, device) -> nn.Module:
    """Build on the meta device, then allocate (uninitialised) once in dtype on device."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.device("meta"):
        module = build()
    return module.to(dtype=dtype).to_empty(device=device)


def _load(module: nn.Module, folder, table, skip=(BUFFERS,), tied=None) -> nn.Module:
    targets = module.state_dict(keep_vars=True)
    copies, compares = _plan(folder, targets, table, skip=skip, tied=tied)
    _check_complete(targets, copies, f"checkpoint {folder}")
    _copy(copies, compares, targets)
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
    return _load(_empty(lambda: VisionTransformer(cfg), dtype, device), folder,
                 CLIP_VISION_KEYS, skip)


def load_llama(folder, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A LlamaForCausalLM folder (LLaMA, Vicuna, ...) -> Llama."""
    cfg = llama_config(read_config(folder))
    tied = {"lm_head.weight": "embed_tokens.weight"} if cfg.tie_word_embeddings else None
    return _load(_empty(lambda: Llama(cfg), dtype, device), folder, LLAMA_KEYS, tied=tied)


def load_llava_model(folder, dtype: torch.dtype = torch.float32, device="cpu") -> HiResLLaVA:
    """A LlavaForConditionalGeneration (LLaVA-1.5) folder -> HiResLLaVA in "llava15" mode."""
    cfg = llava_config(read_config(folder))
    tied = ({"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
            if cfg.llama.tie_word_embeddings else None)
    return _load(_empty(lambda: HiResLLaVA(cfg), dtype, device), folder, LLAVA_KEYS, tied=tied)


def load_tokenizer(folder) -> Tokenizer:
    """The folder's LLaMA sentencepiece `tokenizer.model` (<image> appended if absent)."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.model in {folder}: a sentencepiece model is "
                                "needed (tokenizer.json alone is not supported)")
    return Tokenizer.load(path)


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
    model = _empty(lambda: HiResLLaVA(cfg), dtype, device)
    targets = model.state_dict(keep_vars=True)
    tied = ({"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
            if cfg.llama.tie_word_embeddings else None)
    plans = [_plan(vit_dir, targets, CLIP_VISION_KEYS, "vision_tower.", skip),
             _plan(llm_dir, targets, LLAMA_KEYS, "language_model.", tied=tied)]
    fresh = ("vision_tower.sra.", "sampler.", "multi_modal_projector.",
             *HiResLLaVA.IMAGE_EMBEDDINGS)
    _check_complete(targets, plans[0][0] + plans[1][0], f"checkpoints {vit_dir} + {llm_dir}",
                    fresh)
    for copies, compares in plans:
        _copy(copies, compares, targets)
    _init_fresh(model, dtype, device)
    return model.train()


def _init_fresh(model: HiResLLaVA, dtype: torch.dtype, device) -> None:
    """Rebuild the parts no checkpoint fills, with the same constructors HiResLLaVA uses."""
    cfg = model.cfg
    Dv, Dl = cfg.vit.hidden_size, cfg.llama.hidden_size
    with torch.device(device):
        for name in list(model.vision_tower.sra.keys()):
            model.vision_tower.sra[name] = SliceRestore(Dv, cfg.sra, eps=cfg.vit.layer_norm_eps)
        if hasattr(model, "sampler"):
            model.sampler = build_sampler(cfg.compression, Dv, cfg.sms)
        model.multi_modal_projector = MultiModalProjector(Dv, Dl)
        model.init_image_embeddings()
    model.to(dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
