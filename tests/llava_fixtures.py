"""Tiny random Hugging Face folders (CLIP vision, LLaMA with a tokenizer.model, LLaVA-1.5) and
a small LLaVA-format export, shared by the tests of the real-model path."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minihires.cli.entitygrid import cli_entitygrid
from minihires.data.entitygrid import EntityGridConfig, question_texts
from minihires.model.tokenizer import Tokenizer

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TEXT = {"vocab_size": 160, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def hf_folders(root: Path) -> tuple[Path, Path, Path]:
    """(CLIP vision folder, LLaMA folder with tokenizer.model, LLaVA-1.5 folder)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    torch.manual_seed(0)
    tok = Tokenizer.train(question_texts(EntityGridConfig()), 150, span_words=True)
    vision, llm, llava = root / "clip", root / "llama", root / "llava"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision)
    LlamaForCausalLM(LlamaConfig(**TEXT)).save_pretrained(llm)
    tok.save(llm / "tokenizer.model")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                      image_token_index=tok.image_id)
    LlavaForConditionalGeneration(cfg).save_pretrained(llava)
    tok.save(llava / "tokenizer.model")
    return vision, llm, llava


def export(root: Path, n: int = 8, turns: int = 2, text_rows: int = 0) -> Path:
    """`entitygrid --format llava` into root; with text_rows, text-only rows interleaved."""
    assert cli_entitygrid(["--split", "train", "--n", str(n), "--turns", str(turns),
                           "--format", "llava", "--out", str(root)]) == 0
    path = root / "llava.json"
    if text_rows:
        rows = json.loads(path.read_text())
        for k in range(text_rows):
            rows.insert(2 * k + 1, {"id": f"text-{k}", "conversations": [
                {"from": "human", "value": "What is at the top left?"},
                {"from": "gpt", "value": "red stripes"}]})
        path.write_text(json.dumps(rows))
    return path
