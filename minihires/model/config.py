"""Configuration dataclasses and presets.

Field names follow the Hugging Face config names where a real checkpoint has the same
knob (`hidden_size`, `num_hidden_layers`, ...), so `minihires.model.hf` can fill them from a
`config.json` without a translation table.

Presets:
    tiny   small enough to train on a 2-core CPU in minutes (its ViT from a shipped encoder).
    paper  CLIP ViT-L/14 at 336 px + a 7B LLaMA/Vicuna (shapes only; build it on the
           meta device to count parameters).

Validation: every config checks itself in `validate()`, which raises a ValueError naming the
field ("llama.hidden_size ...", "overlap ..."). It is called where a config is built (the
presets, `TrainConfig.model_config`) and once by each module that a config builds
(`HiResLLaVA`, `Llama`, `VisionTransformer`, `SliceRestore`, `SelfMiningSampler`), so a
config edited after it was built is checked again before it makes a model; the modules
themselves hold no copies of these checks. `from_dict` does not validate: a loader first
checks the fields' types (`checkpoint.load_config`), then building the model validates.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

MODES = ("hires", "llava15")
COMPRESSIONS = ("sms", "avg", "none")   # ModelConfig.compression: the one list of choices


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_ints(cfg, where: str, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{where}.{name} must be a positive int, got {v!r}")


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _divides(heads: int, width: int, where: str) -> None:
    if width % heads:
        raise ValueError(f"{where}.num_heads {heads} does not divide the width {width}")


THUMBNAIL_FILTERS = ("bicubic", "box")

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

    @property
    def feature_index(self) -> int:
        """feature_layer as a hidden-state index 0..num_hidden_layers (blocks that run)."""
        return self.feature_layer % (self.num_hidden_layers + 1)

    def validate(self) -> None:
        _positive_ints(self, "vit", "image_size", "patch_size", "hidden_size",
                       "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"vit.image_size {self.image_size} is not a multiple of "
                             f"vit.patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vit.hidden_size {self.hidden_size} is not divisible by "
                             f"vit.num_attention_heads {self.num_attention_heads}")
        L = self.num_hidden_layers
        if not _is_int(self.feature_layer) or not -(L + 1) <= self.feature_layer <= L:
            raise ValueError(f"vit.feature_layer {self.feature_layer!r} out of range for "
                             f"{L} layers (hidden states -{L + 1}..{L})")
        for i in self.sra_layers:
            if not _is_int(i) or not 0 <= i < self.feature_index:
                raise ValueError(f"vit.sra_layers has block {i!r}, but only blocks "
                                 f"0..{self.feature_index - 1} feed feature_layer "
                                 f"{self.feature_layer}")


@dataclass
class SRAConfig:
    """SliceRestore adapter: local depthwise conv + global down-attend-up fusion."""
    downsample: int = 2            # s: avg-pool factor before global self-attention
    num_heads: int = 8
    kernel_size: int = 3           # depthwise local fusion

    def validate(self, width: int | None = None) -> None:
        """width: the ViT width the adapter runs at, when known (num_heads must divide it)."""
        if not _is_int(self.downsample) or self.downsample < 1:
            raise ValueError(f"sra.downsample must be >= 1, got {self.downsample!r}")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"sra.kernel_size must be odd and positive, got {self.kernel_size!r}")
        _positive_ints(self, "sra", "num_heads")
        if width is not None:
            _divides(self.num_heads, width, "sra")


@dataclass
class SMSConfig:
    """Self-Mining sampler: window attention pooling, window k x k."""
    window: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0

    def validate(self, width: int | None = None) -> None:
        """width: the ViT width the sampler runs at, when known (num_heads must divide it)."""
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"sms.window must be >= 1, got {self.window!r}")
        _positive_ints(self, "sms", "num_heads")
        if not _positive_number(self.mlp_ratio):
            raise ValueError(f"sms.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if width is not None:
            _divides(self.num_heads, width, "sms")


@dataclass
class LlamaConfig:
    """A LLaMA decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

    token_shift n > 0 adds our token shift before every block (`minihires.model.token_shift`):
    the tiny preset's from-scratch LLM uses n = 3; real LLaMA weights have none (n = 0).
    """
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
    token_shift: int = 0           # predecessors mixed into each block's input; 0: LLaMA as is

    def validate(self) -> None:
        ts = self.token_shift
        if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= 8:
            raise ValueError(f"llama.token_shift must be an int in 0..8, got {ts!r}")
        _positive_ints(self, "llama", "vocab_size", "hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "max_position_embeddings")
        d, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if d % nh:
            raise ValueError(f"llama.hidden_size {d} is not divisible by "
                             f"llama.num_attention_heads {nh}")
        if (d // nh) % 2:
            raise ValueError(f"llama.hidden_size / llama.num_attention_heads = head_dim "
                             f"{d // nh} must be even for rotary embeddings")
        if nh % nkv:
            raise ValueError(f"llama.num_key_value_heads {nkv} must divide "
                             f"llama.num_attention_heads {nh}")
        if not _positive_number(self.rope_theta):
            raise ValueError(f"llama.rope_theta must be a positive number, got {self.rope_theta!r}")


@dataclass
class ModelConfig:
    """The whole HiRes-LLaVA model and its ablation switches.

    mode:        "hires" (thumbnail + slices) or "llava15" (the paper's baseline:
                 thumbnail only, no compression, no newline tokens).
    use_slices:  False = thumbnail only (ablation 1).
    use_sra:     False = slices without SliceRestore (vit.sra_layers ignored). With slices
                 on, True needs blocks in vit.sra_layers and overlap 0.
    compression: one of COMPRESSIONS: "sms" (Self-Mining sampler), "avg" (average
                 pooling), "none".
    overlap:     fraction of a slice shared with its neighbour (ablation control 5);
                 0 = the paper's non-overlapping slices. Only without SliceRestore, which
                 stitches the slices back as if they were disjoint.
    image_token_index: the tokenizer's <image> id (HF LLaVA's name); None until a
                 tokenizer is paired with the model (forward can also take it).
    crop_embedding: add learned embeddings of each visual token's place: its crop's (one
                 for the thumbnail, one per slice row plus one per slice column) and its
                 place in the crop's h x h token grid (ours, not the paper's; "hires" mode
                 only). Without them the LLM can tell slices and places apart only by their
                 order in the sequence.
    whole_canvas: the native-resolution control (ours): the ViT runs once over each image's
                 whole canvas of slices (position embeddings interpolated), and its tokens are
                 cut into the slices' pieces afterwards, so no entity is ever cut; the same
                 sampler, layout and LLM follow. Needs use_sra=False and overlap 0.
    thumbnail_filter: how the whole image shrinks to the S x S thumbnail: "bicubic" (CLIP's
                 preprocessing) or "box" (the mean of each pixel block: a pattern finer than
                 the thumbnail's pixels becomes its mean colour, with no ringing at its edges;
                 EntityGrid-QA's continuity task needs it, see `minihires.data.entities`).
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
    thumbnail_filter: str = "bicubic"
    whole_canvas: bool = False

    @property
    def sra_runs(self) -> bool:
        """Whether SliceRestore adapters are built and run (HiRes mode, slices on, SRA on)."""
        return self.mode == "hires" and self.use_slices and self.use_sra

    def validate(self) -> None:
        """ValueError naming the first wrong field: each part's own checks, then how the
        parts and switches fit together (only the submodules this config builds count)."""
        self.vit.validate()
        self.llama.validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if not (isinstance(self.overlap, (int, float)) and not isinstance(self.overlap, bool)
                and 0.0 <= self.overlap < 1.0):
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if not _is_int(self.max_slices) or self.max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {self.max_slices!r}")
        if self.image_token_index is not None and (not _is_int(self.image_token_index)
                                                   or self.image_token_index < 0):
            raise ValueError(f"image_token_index must be an int >= 0 or None, "
                             f"got {self.image_token_index!r}")
        hires, Dv = self.mode == "hires", self.vit.hidden_size
        sampler = hires and self.compression != "none"
        sra = self.sra_runs
        self.sms.validate(width=Dv if hires and self.compression == "sms" else None)
        if sampler and self.vit.grid % self.sms.window:
            raise ValueError(f"sms.window {self.sms.window} does not divide the token grid "
                             f"g = {self.vit.grid}")
        self.sra.validate(width=Dv if sra else None)
        if sra and not self.vit.sra_layers:
            raise ValueError("use_sra is True but vit.sra_layers is empty: SliceRestore would "
                             "run after no block; list blocks in vit.sra_layers, or set "
                             "use_sra=False")
        if sra and self.overlap > 0:
            raise ValueError(f"overlap {self.overlap} needs use_sra=False: SliceRestore "
                             "stitches the slices back as if they were disjoint, so "
                             "overlapping slices would be restored wrongly")
        if self.thumbnail_filter not in THUMBNAIL_FILTERS:
            raise ValueError(f"thumbnail_filter must be one of {THUMBNAIL_FILTERS}, "
                             f"got {self.thumbnail_filter!r}")
        if self.whole_canvas and not (hires and self.use_slices and not self.use_sra
                                      and self.overlap == 0):
            raise ValueError("whole_canvas (one ViT pass over the canvas of slices) needs "
                             "mode 'hires', use_slices=True, use_sra=False and overlap 0: "
                             "nothing is cut, so there is nothing to restore or overlap")

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
    """Small enough to train on a 2-core CPU within the main job's budget; SliceRestore after
    every ViT block and the box thumbnail, which the continuity task needs."""
    return _checked(ModelConfig(
        vit=ViTConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=4, feature_layer=-1,
                      sra_layers=(0, 1, 2)),
        sra=SRAConfig(downsample=2, num_heads=4),
        sms=SMSConfig(window=2, num_heads=4, mlp_ratio=2.0),
        llama=LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320,
                          num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=512, rope_theta=200.0,
                          tie_word_embeddings=True, token_shift=3),
        max_slices=4,
        crop_embedding=True,
        thumbnail_filter="box",
    ))


def paper() -> ModelConfig:
    """CLIP ViT-L/14-336 + a 7B LLaMA/Vicuna; SRA in the last blocks (our choice)."""
    return _checked(ModelConfig(
        vit=ViTConfig(sra_layers=(19, 21)),
        sra=SRAConfig(downsample=2, num_heads=16),
        sms=SMSConfig(window=2, num_heads=16),
        llama=LlamaConfig(),
        max_slices=6,
    ))


def _checked(cfg: ModelConfig) -> ModelConfig:
    cfg.validate()
    return cfg


PRESETS = {"tiny": tiny, "paper": paper}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
