"""Configuration dataclasses and presets.

Field names follow the Hugging Face config names where a real checkpoint has the same
knob (`hidden_size`, `num_hidden_layers`, ...), so `minihires.hf` can fill them from a
`config.json` without a translation table.

Presets:
    tiny   small enough to train from scratch on a 2-core CPU in minutes.
    paper  CLIP ViT-L/14 at 336 px + a 7B LLaMA/Vicuna (shapes only; build it on the
           meta device to count parameters).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ViTConfig:
    """A CLIP-style vision transformer (pre-LayerNorm, quick-GELU)."""
    image_size: int = 336          # S: the side of one crop (thumbnail or slice), pixels
    patch_size: int = 14           # g = image_size // patch_size tokens per side
    hidden_size: int = 1024        # D
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2        # hidden state fed to the sampler: -2 = penultimate block
    sra_layers: tuple[int, ...] = ()  # SliceRestore adapters after these blocks (0-based)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SRAConfig:
    """SliceRestore adapter: local depthwise conv + global down-attend-up fusion."""
    downsample: int = 2            # s: avg-pool factor before global self-attention
    num_heads: int = 8
    kernel_size: int = 3           # depthwise local fusion


@dataclass
class SMSConfig:
    """Self-Mining sampler: window attention pooling, window k x k."""
    window: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class LlamaConfig:
    """A LLaMA decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    """The whole HiRes-LLaVA model and its ablation switches.

    mode:        "hires" (thumbnail + slices) or "llava15" (the paper's baseline:
                 thumbnail only, no compression, no newline tokens).
    use_slices:  False = thumbnail only (ablation 1).
    use_sra:     False = slices without SliceRestore (vit.sra_layers ignored).
    compression: "sms" (Self-Mining sampler), "avg" (average pooling), "none".
    overlap:     fraction of a slice shared with its neighbour (ablation control 5);
                 0 = the paper's non-overlapping slices.
    image_token_index: the tokenizer's <image> id (HF LLaVA's name); None until a
                 tokenizer is paired with the model (forward can also take it).
    crop_embedding: add learned embeddings of each visual token's place: its crop's (one
                 for the thumbnail, one per slice row plus one per slice column) and its
                 place in the crop's h x h token grid (ours, not the paper's; "hires" mode
                 only). Without them the LLM can tell slices and places apart only by their
                 order in the sequence.
    """
    vit: ViTConfig = field(default_factory=ViTConfig)
    sra: SRAConfig = field(default_factory=SRAConfig)
    sms: SMSConfig = field(default_factory=SMSConfig)
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    max_slices: int = 6
    mode: str = "hires"
    use_slices: bool = True
    use_sra: bool = True
    compression: str = "sms"
    overlap: float = 0.0
    image_token_index: int | None = None
    crop_embedding: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        vit = dict(d.pop("vit", {}))
        if "sra_layers" in vit:
            vit["sra_layers"] = tuple(vit["sra_layers"])
        return cls(vit=ViTConfig(**vit), sra=SRAConfig(**d.pop("sra", {})),
                   sms=SMSConfig(**d.pop("sms", {})), llama=LlamaConfig(**d.pop("llama", {})),
                   **d)


def tiny() -> ModelConfig:
    """Trains from scratch on a 2-core CPU in minutes (tuned by the training issue)."""
    return ModelConfig(
        vit=ViTConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=4, feature_layer=-1,
                      sra_layers=(1,)),
        sra=SRAConfig(downsample=2, num_heads=4),
        sms=SMSConfig(window=2, num_heads=4, mlp_ratio=2.0),
        llama=LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320,
                          num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=512, rope_theta=200.0,
                          tie_word_embeddings=True),
        max_slices=4,
        crop_embedding=True,
    )


def paper() -> ModelConfig:
    """CLIP ViT-L/14-336 + a 7B LLaMA/Vicuna; SRA in the last blocks (our choice)."""
    return ModelConfig(
        vit=ViTConfig(sra_layers=(19, 21)),
        sra=SRAConfig(downsample=2, num_heads=16),
        sms=SMSConfig(window=2, num_heads=16),
        llama=LlamaConfig(),
        max_slices=6,
    )


PRESETS = {"tiny": tiny, "paper": paper}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
