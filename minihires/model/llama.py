"""The LLaMA decoder, from scratch: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Submodule names mirror Hugging Face's `LlamaForCausalLM` without its "model." prefix
(`embed_tokens`, `layers.{i}.self_attn.q_proj`, ..., `norm`, `lm_head`), so a real checkpoint
loads after stripping that prefix, and the arithmetic follows transformers step by step
(RMSNorm in float32, rotate-half RoPE, softmax attention scaled by head_dim^-0.5), so logits
match it to float32 rounding.

The model takes embeddings, not ids: HiRes-LLaVA splices image features into the text
embeddings at the <image> placeholder (`minihires.model`), then runs this decoder.

Padding: `attention_mask` is 1 for real tokens and 0 for padding. When `position_ids` is not
given it is derived from the mask (cumsum - 1), so a left-padded row gets the same positions,
and the same logits, as the row alone. Generation (`generate`) expects left-padded prompts.

Our choices (the paper only says "LLaMA/Vicuna"): positions derived from the mask when not
given (HF counts padding unless told otherwise); a padding query always attends to itself
(so no row of the attention is empty); a tied model keeps no lm_head module; HF's init.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihires.model import shared_prefix
from minihires.model.config import LlamaConfig
from minihires.model.token_shift import TokenShift, predecessors


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles, (B, T, head_dim), computed in float32 as HF does.

    Frequencies are recomputed on every call instead of kept in a buffer: `model.to(bfloat16)`
    would otherwise round them (there are only head_dim / 2 of them, so this is free).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float,
                                             device=position_ids.device) / head_dim))  # (hs/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs): both halves share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF's RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles of its positions; cos, sin are (B, T, hs)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): broadcast over heads
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for the tokens seen so far; grows by concatenation.

    Keys are stored after rotary embedding and before the grouped-query repeat, so each
    layer holds (B, num_key_value_heads, length, head_dim).
    """

    def __init__(self, num_layers: int):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # for a token shift (`minihires.model.token_shift`): every block's inputs so far
        # (B, length, D) and the tokens' rotary positions (B, length)
        self.block_inputs: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Tokens cached; read from the last layer, so it counts completed forward passes."""
        k = self.keys[-1]
        return 0 if k is None else k.shape[2]

    @property
    def batch_size(self) -> int | None:
        k = self.keys[-1]
        return None if k is None else k.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v (B, nkv, T, hs); return the layer's full k, v (B, nkv, S, hs)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (B, nkv, past + T, hs)
            v = torch.cat([self.values[layer], v], dim=2)  # (B, nkv, past + T, hs)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: each k/v head serves nh / nkv q heads."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.num_attention_heads
        self.n_kv_head = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        hs = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs), S = past + T
        rep = self.n_head // self.n_kv_head
        k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hs): q head h reads kv head h // rep
        v = v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        # mask None means "fresh causal sequence": the fused causal path, no mask tensor
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)  # (B, T, nh * hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LLaMA decoder over input embeddings; returns next-token logits (B, T, vocab_size).

    With `tie_word_embeddings` there is no lm_head module: logits use embed_tokens.weight, so
    the state dict holds one copy (safetensors refuses shared tensors). A state dict that
    does carry "lm_head.weight" (HF's does) still loads if it equals embed_tokens.weight.
    Weights start as HF's do: normal(0, 0.02) for linear and embedding weights, ones for norms.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.token_shifts = (nn.ModuleList(TokenShift(cfg.token_shift, cfg.hidden_size)
                                           for _ in range(cfg.num_hidden_layers))
                             if cfg.token_shift else None)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.register_load_state_dict_pre_hook(_accept_tied_lm_head)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape, e.g. (B, T)) -> embeddings (..., D)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point \
                or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.cfg.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self.embed_tokens(ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, D); attention_mask (B, past + T), 1 real / 0 pad, covering the
        cached tokens too; position_ids (B, T); cache is extended in place. segment_ids (B, T):
        questions packed after a shared prefix (`minihires.model.shared_prefix`; no cache);
        they set the mask and, unless given, the positions. -> logits (B, T, V)."""
        past = self._check_inputs(inputs_embeds, attention_mask, position_ids, cache)
        B, T, _ = inputs_embeds.shape
        S, device = past + T, inputs_embeds.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device) != 0  # (B, S) bool
        if segment_ids is not None:
            if past:
                raise ValueError("segment_ids packs a fresh sequence; it cannot extend a cache")
            if isinstance(segment_ids, torch.Tensor):
                segment_ids = segment_ids.to(device)
            shared_prefix.check(segment_ids, attention_mask, (B, T))
        if position_ids is None and segment_ids is not None:
            position_ids = shared_prefix.positions(segment_ids, attention_mask)  # (B, T)
        elif position_ids is None and attention_mask is not None:
            # count real tokens only, so left padding shifts no position
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        elif position_ids is None:
            position_ids = torch.arange(past, S, device=device).expand(B, T)  # (B, T)
        else:
            position_ids = position_ids.to(device).expand(B, T)  # (B, T) from (B, T), (1, T), (T,)

        mask = None  # None: plain causal attention over a fresh sequence
        if segment_ids is not None:
            mask = shared_prefix.allowed(segment_ids, attention_mask)  # (B, 1, T, T)
        elif attention_mask is not None or past > 0:
            mask = attention_allowed(attention_mask, T, past, device)  # (B or 1, 1, T, S)
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.cfg.rope_theta,
                                  inputs_embeds.dtype)  # (B, T, hs) each
        x = inputs_embeds
        if self.token_shifts is None:
            for block in self.layers:
                x = block(x, cos, sin, mask, cache)
        else:
            x = self._shifted_blocks(x, position_ids, mask, past, cos, sin, cache)
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight)  # (B, T, V), tied
        return self.lm_head(x)  # (B, T, V)

    def _shifted_blocks(self, x, position_ids, mask, past, cos, sin, cache):
        """The blocks, each after its token shift; the cache keeps their inputs."""
        T = x.shape[1]
        if mask is None:                                                   # plain causal
            visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]  # (1, T, T)
        else:
            visible = mask[:, 0]                                           # (B or 1, T, S)
        key_positions = position_ids
        if cache is not None and past:
            key_positions = torch.cat([cache.positions, position_ids], 1)  # (B, S)
        preds = predecessors(position_ids, key_positions, visible, self.cfg.token_shift)
        for i, (shift, block) in enumerate(zip(self.token_shifts, self.layers)):
            keys = x
            if cache is not None:
                if past:
                    keys = torch.cat([cache.block_inputs[i], x], 1)        # (B, S, D)
                cache.block_inputs[i] = keys
            x = block(shift(x, keys, preds), cos, sin, mask, cache)
        if cache is not None:
            cache.positions = key_positions
        return x

    def _check_inputs(self, inputs_embeds, attention_mask, position_ids, cache) -> int:
        """Validate forward's arguments; return the number of cached tokens."""
        cfg = self.cfg
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != cfg.hidden_size or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be (B, T>0, {cfg.hidden_size}), "
                             f"got {tuple(getattr(inputs_embeds, 'shape', ()))}")
        if not inputs_embeds.dtype.is_floating_point:
            raise TypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
        B, T, _ = inputs_embeds.shape
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache) or cache.num_layers != len(self.layers):
                raise ValueError(f"cache must be a KVCache with {len(self.layers)} layers")
            past = cache.length
            if past and cache.batch_size != B:
                raise ValueError(f"cache holds batch size {cache.batch_size}, "
                                 f"inputs_embeds has {B}")
        S = past + T
        if S > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {S} tokens ({past} cached + {T} new) exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be (B, past + T) = ({B}, {S}), "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is not None:
            shape = tuple(position_ids.shape)
            if shape not in ((T,), (1, T), (B, T)):
                raise ValueError(f"position_ids must be (B, T) = ({B}, {T}), got {shape}")
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= cfg.max_position_embeddings:
                raise ValueError(f"position_ids must lie in [0, max_position_embeddings="
                                 f"{cfg.max_position_embeddings}), got [{lo}, {hi}]")
        return past


def attention_allowed(attention_mask: torch.Tensor | None, T: int, past: int,
                      device) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask for SDPA: query i (absolute index past + i) sees key j iff
    j <= past + i and key j is not padding. Every query also sees itself, so a padding
    query whose row would be empty gets a finite output instead of NaN (which would leak
    into real tokens through 0 * NaN in later layers); real queries see themselves anyway."""
    S = past + T
    q_idx = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S) causal
    if attention_mask is not None:
        allowed = (allowed[None] & attention_mask[:, None, :]) | (k_idx == q_idx)  # (B, T, S)
    else:
        allowed = allowed[None]  # (1, T, S)
    return allowed[:, None]  # (B, 1, T, S): broadcast over heads


def _accept_tied_lm_head(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    """Tied model: drop a state dict's lm_head.weight if it equals embed_tokens.weight."""
    key = prefix + "lm_head.weight"
    if key not in state_dict:
        return
    head = state_dict.pop(key)
    emb = state_dict.get(prefix + "embed_tokens.weight")
    if emb is not None and not torch.equal(head.to(emb.device, emb.dtype), emb):
        error_msgs.append(f"{key} differs from {prefix}embed_tokens.weight, but this model "
                          "ties them (tie_word_embeddings=True); build it with "
                          "tie_word_embeddings=False")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the nucleus, the smallest set of most likely tokens whose mass reaches top_p;
    zero the rest and renormalise. probs (B, V) -> (B, V)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # (B, V): mass of strictly likelier tokens
    keep_sorted = mass_before < top_p  # the most likely token is always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (B, V), vocab order
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature == 0, else softmax at
    that temperature, restricted to the top-p nucleus, sampled with `generator` (which must
    live on the logits' device)."""
    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(llm: Llama, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue left-padded prompts (B, T, D) -> new ids (B, n), n <= max_new_tokens.

    Rows that emitted eos keep emitting eos; decoding stops once every row has. With
    use_cache=False each step re-runs the whole sequence (slow; for tests and to show what
    the KV cache saves). Positions come from the mask, so padding does not shift them.
    """
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (B, T, D), "
                         f"got {tuple(getattr(inputs_embeds, 'shape', ()))}")
    B, T, _ = inputs_embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must be (B, T) = ({B}, {T}), "
                         f"got {tuple(attention_mask.shape)}")
    mask = (attention_mask != 0).long().to(inputs_embeds.device)  # (B, T)
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask has padding after a real token: "
                         "prompts must be LEFT-padded")
    if (mask.sum(-1) == 0).any():
        raise ValueError("attention_mask has a row with no real token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if T + max_new_tokens - 1 > llm.cfg.max_position_embeddings:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_position_embeddings={llm.cfg.max_position_embeddings}")
    if not 0 <= eos_id < llm.cfg.vocab_size:
        raise ValueError(f"eos_id must lie in [0, {llm.cfg.vocab_size}), got {eos_id}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    if max_new_tokens == 0:
        return torch.zeros(B, 0, dtype=torch.long, device=inputs_embeds.device)

    cache = llm.new_cache() if use_cache else None
    embeds = inputs_embeds
    logits = llm(embeds, mask, cache=cache)[:, -1]  # (B, V): prefill
    finished = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    out = []
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, eos_id), token)
        out.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
        new = llm.embed(token[:, None]).to(embeds.dtype)  # (B, 1, D)
        if use_cache:
            logits = llm(new, mask, cache=cache)[:, -1]
        else:
            embeds = torch.cat([embeds, new], dim=1)  # (B, S + 1, D)
            logits = llm(embeds, mask)[:, -1]
    return torch.stack(out, dim=1)  # (B, n)
