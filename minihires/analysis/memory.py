"""`python -m minihires memory`: GPU memory per rank for a training stage, an estimate.

    parameters   fp32 master weights, sharded over the ranks with FSDP (whole on each with DDP),
                 plus, with FSDP on a GPU, the bf16 copies gathered for the blocks in flight
                 (the one computing and the one prefetched) and the unsharded root group
                 (the LLM's embeddings and head live there)
    gradients    fp32, for the trainable parameters only, sharded like the weights (the root
                 group's are whole while it reduces)
    optimizer    AdamW: two fp32 moments per trainable parameter, sharded like the weights
    activations  what the backward keeps, bf16, per micro-batch of `micro_batch` sequences of
                 `seq_len` tokens (visual + text, padded): without checkpointing every block's
                 saved tensors; with checkpointing each block's input only, plus one block's
                 saved tensors while it is recomputed; plus the logits (bf16, and fp32 for the
                 loss) and the ViT's crops

Per token and LLaMA block the saved tensors are counted as 14 h + 8 I bytes in bf16 (norm
inputs, q/k/v, attention output, o_proj input, residual; gate, up, SiLU and product of the
SwiGLU MLP), for an attention kernel that keeps no T x T matrix (PyTorch's SDPA flash /
memory-efficient); per token and ViT block 14 h + 4 I. These are our counts of what autograd
keeps, not measurements; allocator fragmentation and CUDA context (~1-2 GB) are not included,
so the estimate asks for a margin (MARGIN) below the GPU's memory.
"""
from __future__ import annotations

from minihires.analysis.budget import hires_tokens, parameter_counts
from minihires.model.config import ModelConfig, preset

GB = 1e9
MARGIN = 0.9                     # the estimate must stay below 90% of the GPU's memory


def block_params(cfg: ModelConfig) -> int:
    h, i = cfg.llama.hidden_size, cfg.llama.intermediate_size
    kv = cfg.llama.num_key_value_heads * h // cfg.llama.num_attention_heads
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def estimate(preset_name: str = "paper", stage: str = "finetune", world: int = 8,
             micro_batch: int = 16, seq_len: int = 2048, grad_checkpointing: bool = True,
             fsdp: bool = True, train_vision: bool = False, gpu_gb: float = 80.0,
             image: tuple[int, int] = (672, 672)) -> dict:
    """The estimate (bytes as GB) for one rank; see the module doc."""
    cfg = preset(preset_name) if isinstance(preset_name, str) else preset_name
    parts = parameter_counts(cfg)
    total = parts["total"]
    connector = (parts["SliceRestore adapters"] + parts["sampler"] + parts["projector + newline"])
    trainable = connector + (parts["language model"] if stage in ("finetune", "full") else 0) + (
        parts["vision tower"] if stage == "full" or train_vision else 0)
    shard = world if fsdp else 1
    h, inter = cfg.llama.hidden_size, cfg.llama.intermediate_size
    vocab = cfg.llama.vocab_size
    root = vocab * h * (1 if cfg.llama.tie_word_embeddings else 2)     # embeddings + head
    params = 4 * total / shard
    gathered = (2 * (2 * block_params(cfg) + root)) if fsdp else 0      # bf16 in flight
    grads = 4 * trainable / shard + (4 * root if fsdp and stage != "pretrain" else 0)
    optim = 8 * trainable / shard
    tokens = micro_batch * seq_len
    L = cfg.llama.num_hidden_layers
    per_block = (14 * h + 8 * inter) * tokens                          # bf16 bytes
    llm_acts = (2 * h * tokens * L + per_block) if grad_checkpointing else per_block * L
    logits = tokens * vocab * (2 + 4)
    crops = 1 + hires_tokens(*image, cfg)[1][0] * hires_tokens(*image, cfg)[1][1]
    v = cfg.vit
    vit_tokens = micro_batch * crops * ((v.image_size // v.patch_size) ** 2 + 1)
    vit_block = (14 * v.hidden_size + 4 * v.intermediate_size) * vit_tokens
    vit_acts = (2 * v.hidden_size * vit_tokens * v.num_hidden_layers + vit_block
                if grad_checkpointing else vit_block * v.num_hidden_layers)
    acts = llm_acts + logits + vit_acts
    out = {"preset": preset_name if isinstance(preset_name, str) else "custom", "stage": stage,
           "world": world, "fsdp": fsdp, "micro_batch": micro_batch, "seq_len": seq_len,
           "grad_checkpointing": grad_checkpointing, "gpu_gb": gpu_gb,
           "params_total": total, "params_trainable": trainable,
           "visual_tokens": hires_tokens(*image, cfg)[0], "image": list(image),
           "params_gb": (params + gathered) / GB, "grads_gb": grads / GB,
           "optimizer_gb": optim / GB, "activations_gb": acts / GB,
           "activations_llm_gb": llm_acts / GB, "logits_gb": logits / GB,
           "activations_vit_gb": vit_acts / GB}
    out["total_gb"] = out["params_gb"] + out["grads_gb"] + out["optimizer_gb"] + out["activations_gb"]
    out["fits"] = out["total_gb"] <= MARGIN * gpu_gb
    return out


def format_estimate(e: dict) -> str:
    lines = [
        f"memory per GPU: preset {e['preset']}, stage {e['stage']}, {e['world']} GPU(s), "
        f"{'FSDP2 (bf16 compute, fp32 master)' if e['fsdp'] else 'DDP (whole model per GPU)'}, "
        f"micro-batch {e['micro_batch']} x {e['seq_len']} tokens, activation checkpointing "
        f"{'on' if e['grad_checkpointing'] else 'off'}",
        f"  parameters        {e['params_total'] / 1e9:6.2f} B, trainable "
        f"{e['params_trainable'] / 1e9:.2f} B; an image of {e['image'][0]}x{e['image'][1]} "
        f"is {e['visual_tokens']} visual tokens",
        f"  weights           {e['params_gb']:7.1f} GB",
        f"  gradients         {e['grads_gb']:7.1f} GB",
        f"  optimizer (AdamW) {e['optimizer_gb']:7.1f} GB",
        f"  activations       {e['activations_gb']:7.1f} GB   (LLM {e['activations_llm_gb']:.1f}, "
        f"logits {e['logits_gb']:.1f}, ViT {e['activations_vit_gb']:.1f})",
        f"  total             {e['total_gb']:7.1f} GB of {e['gpu_gb']:.0f} GB: "
        + ("fits" if e["fits"] else "does NOT fit")
        + f" (with a {100 * (1 - MARGIN):.0f}% margin)"]
    return "\n".join(lines)
