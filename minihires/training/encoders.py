"""The pretrained tiny encoders that ship with minihires, and which one a run starts from.

LLaVA-style models start from a vision encoder pretrained elsewhere (CLIP); the tiny model's
counterpart is made by `python -m minihires pretrain-vit` (`minihires.training.pretrain_vit`),
and three of its files ship in `minihires/weights/`, one per way a variant encodes a canvas:

    tiny-vit-none.pt    slices encoded each alone, no adapters (SMS, average pooling,
                        overlapping windows, the thumbnail only)
    tiny-vit-sra.pt     slices with SliceRestore adapters after ViT blocks 0, 1 and 2
                        (the tiny preset, and so the main job)
    tiny-vit-whole.pt   one pass over the whole canvas, nothing cut (the native-resolution
                        control)

`TrainConfig.vit_init = BUNDLED` (the default) picks the file that fits the run's model;
`None` starts the ViT from scratch. `minihires/weights/README.md` gives the commands that
made the files and their SHA-256. Runs on the real-data path, from Hugging Face or LLaVA
weights, from another run or with another preset load no bundled file: they initialise as
their own flags say.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from minihires.model.config import ModelConfig
from minihires.training.pretrain_vit import file_sha256

BUNDLED = "bundled"                 # TrainConfig.vit_init: the shipped file for the model
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
FILES = {"none": "tiny-vit-none.pt", "sra": "tiny-vit-sra.pt", "whole": "tiny-vit-whole.pt"}
SRA_LAYERS = (0, 1, 2)              # the adapters in tiny-vit-sra.pt


def kind(model_cfg: ModelConfig) -> str:
    """'none', 'sra' or 'whole': how `model_cfg` encodes a canvas; ValueError for adapters
    placed where no shipped file has them."""
    if model_cfg.whole_canvas:
        return "whole"
    if not model_cfg.sra_runs:
        return "none"
    layers = tuple(model_cfg.vit.sra_layers)
    if layers != SRA_LAYERS:
        raise ValueError(
            f"no bundled encoder has SliceRestore after ViT blocks {list(layers)} (the shipped "
            f"one has them after {list(SRA_LAYERS)}); pass --vit-init none to train the ViT "
            f"from scratch, or a file from `pretrain-vit --stage canvas --sra-layers "
            f"{','.join(map(str, layers))}`")
    return "sra"


def applies(tc) -> bool:
    """Whether a bundled encoder is the natural start for TrainConfig `tc`: the tiny preset
    on the built-in stream, not initialised from other weights."""
    return (tc.preset == "tiny" and tc.data is None and tc.init_from_hf is None
            and tc.init_from_llava is None and tc.init_from_run is None)


def path_for(model_cfg: ModelConfig) -> str:
    """The shipped file for `model_cfg`'s encoder (absolute path); FileNotFoundError if the
    installation lacks it."""
    path = WEIGHTS / FILES[kind(model_cfg)]
    if not path.is_file():
        raise FileNotFoundError(f"the bundled encoder {path} is missing from this installation "
                                "(reinstall minihires, or pass --vit-init none)")
    return str(path)


def resolve(tc):
    """`tc` with vit_init BUNDLED replaced by the shipped file's path and its SHA-256 (or by
    None where no bundled file applies); other values unchanged. ValueError as `kind`."""
    if tc.vit_init != BUNDLED:
        return tc
    if not applies(tc):
        return dataclasses.replace(tc, vit_init=None, vit_init_sha256=None)
    path = path_for(tc.model_config())
    return dataclasses.replace(tc, vit_init=path, vit_init_sha256=file_sha256(path))
