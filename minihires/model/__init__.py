"""The model a reader studies: HiRes-LLaVA = ViT (+ SliceRestore) -> sampler -> projector -> LLaMA.

    config         sizes and switches (ModelConfig, presets tiny and paper)
    slicing        image -> thumbnail + slices (the grid plan, the crops, the token count)
    vit            the CLIP-style vision transformer
    slice_restore  the SliceRestore adapter (SRA): restores what slicing cut apart
    sampler        Self-Mining Sampler (SMS) and the average-pool baseline
    llama          the LLaMA language model, KV cache and generation
    shared_prefix  masks and positions for several questions packed after one image
    tokenizer      a SentencePiece BPE and the chat template
    inputs         Batch, collate, prepare: what `HiResLLaVA.forward` eats
    hires_llava    the whole model: layout of visual tokens, splicing at <image>
    hf             loading real CLIP / LLaMA / LLaVA weights from Hugging Face folders
"""
from minihires.model.config import LlamaConfig, ModelConfig, ViTConfig, preset
from minihires.model.hires_llava import HiResLLaVA
from minihires.model.inputs import (
           IGNORE,
           Batch,
           collate,
           image_inputs,
           prepare,
           uses_slices,
)

__all__ = ["HiResLLaVA", "ModelConfig", "ViTConfig", "LlamaConfig", "preset", "Batch", "collate",
           "prepare", "image_inputs", "uses_slices", "IGNORE"]
