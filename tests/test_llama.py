"""The from-scratch LLaMA: causality, padding, KV cache, GQA, tying, sampling, HF parity."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minihires.model.config import LlamaConfig
from minihires.model.llama import (
    KVCache,
    Llama,
    attention_allowed,
    generate,
    sample_next,
    top_p_filter,
)

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rope_theta=1000.0, rms_norm_eps=1e-6)


def make(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**SMALL, **overrides})).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def unreachable(llm, token):
    """Zero the token's output row: its logit is 0 while the best of the other 199 random rows
    is positive (all negative has probability 2^-199), so greedy never picks it."""
    with torch.no_grad():
        llm.lm_head.weight[token] = 0
    return token


def left_padded(llm, lengths, seed=0):
    """Random prompts of the given lengths, left-padded with junk embeddings (which must not
    matter). Returns (embeds (B, T, D), mask (B, T), rows: list of (1, L, D))."""
    g = torch.Generator().manual_seed(seed)
    T, D = max(lengths), llm.cfg.hidden_size
    rows = [llm.embed(torch.randint(0, llm.cfg.vocab_size, (1, n), generator=g)) for n in lengths]
    embeds = torch.randn(len(lengths), T, D, generator=g) * 5  # junk in the pad slots
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        embeds[b, T - n:] = row[0]
        mask[b, T - n:] = 1
    return embeds, mask, rows


# ---- attention structure ---------------------------------------------------------------------

@pytest.mark.parametrize("token_shift", [0, 3])   # the tiny preset shifts by 3
@settings(max_examples=8, deadline=None)
@given(T=st.integers(2, 16), k=st.integers(1, 15), with_mask=st.booleans())
def test_changing_later_tokens_never_changes_earlier_logits(token_shift, T, k, with_mask):
    k = min(k, T - 1)
    llm = make(token_shift=token_shift)
    x = torch.randn(2, T, llm.cfg.hidden_size)
    x2 = x.clone()
    x2[:, k:] = torch.randn(2, T - k, llm.cfg.hidden_size)
    mask = torch.ones(2, T) if with_mask else None
    with torch.no_grad():
        y, y2 = llm(x, mask), llm(x2, mask)
    torch.testing.assert_close(y[:, :k], y2[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, k:], y2[:, k:])  # the change is visible where it may be


@pytest.mark.parametrize("token_shift", [0, 3])   # the tiny preset shifts by 3
def test_cache_fed_in_chunks_equals_one_pass(token_shift):
    llm = make(token_shift=token_shift)
    x = torch.randn(2, 13, llm.cfg.hidden_size)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0  # left padding in row 0
    with torch.no_grad():
        full = llm(x, mask)
        cache, outs, t = KVCache(llm.cfg.num_hidden_layers), [], 0
        for n in (5, 1, 4, 1, 2):
            outs.append(llm(x[:, t:t + n], mask[:, :t + n], cache=cache))
            t += n
            assert cache.length == t
    torch.testing.assert_close(torch.cat(outs, 1)[1], full[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(outs, 1)[0, 3:], full[0, 3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("token_shift", [0, 3])   # the tiny preset shifts by 3
def test_left_padded_batch_matches_each_row_alone(token_shift):
    llm = make(token_shift=token_shift)
    lengths = [7, 3, 5, 1]
    embeds, mask, rows = left_padded(llm, lengths)
    with torch.no_grad():
        batch = llm(embeds, mask)
        assert torch.isfinite(batch).all()  # fully padded query rows must not produce NaN
        for b, (row, n) in enumerate(zip(rows, lengths)):
            torch.testing.assert_close(batch[b, -n:], llm(row)[0], rtol=0, atol=1e-5)


def test_attention_mask_is_causal_and_skips_padding_but_never_empty():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    past, T = 2, 3  # 2 cached tokens, 3 new queries
    allowed = attention_allowed(mask, T, past, "cpu")[:, 0]  # (B, T, S)
    for b in range(2):
        for i in range(T):
            q = past + i
            want = [bool(mask[b, j]) and j <= q for j in range(5)]
            assert allowed[b, i].tolist() == want
    pad_rows = attention_allowed(mask, 5, 0, "cpu")[0, 0, :2]  # queries at padding slots
    assert pad_rows.tolist() == [[True, False, False, False, False], [False, True, False, False, False]]


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    """A GQA model is an MHA model whose k/v heads are copied: q head h reads kv head h // rep."""
    gqa = make(num_attention_heads=4, num_key_value_heads=2)
    mha = make(seed=1, num_attention_heads=4, num_key_value_heads=4)
    state = gqa.state_dict()
    hs = gqa.head_dim
    for key, w in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = w.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(4 * hs, -1)  # (nh*hs, D)
    mha.load_state_dict(state)
    x = torch.randn(2, 9, gqa.cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * hs, 32)


def test_tied_embeddings_share_one_matrix():
    tied, untied = make(tie_word_embeddings=True), make(tie_word_embeddings=False)
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    assert "lm_head.weight" in untied.state_dict()
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == SMALL["vocab_size"] * SMALL["hidden_size"]
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = tied(x)
        tied.embed_tokens.weight[7] += 1.0  # the output matrix is the embedding matrix
        after = tied(x)
    changed = (before - after).abs().amax(dim=(0, 1)) > 0
    assert changed[7] and changed.sum() == 1
    # a state dict that carries lm_head.weight (as HF's does) loads only if it is the embedding
    state = tied.state_dict()
    tied.load_state_dict({**state, "lm_head.weight": state["embed_tokens.weight"].clone()})
    with pytest.raises(RuntimeError, match="tie_word_embeddings"):
        tied.load_state_dict({**state, "lm_head.weight": torch.zeros(61, 32)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_in_dtype_on_cpu(dtype):
    llm = make()
    embeds, mask, _ = left_padded(llm, [6, 4])
    with torch.no_grad():
        ref = llm(embeds, mask)
        low = llm.to(dtype)(embeds.to(dtype), mask)
        out = generate(llm, embeds.to(dtype), mask, 5, eos_id=0)
    assert low.dtype == dtype and out.shape[0] == 2 and out.dtype == torch.long
    assert rel_err(low.float()[:, -4:], ref[:, -4:]) < (1e-6 if dtype == torch.float32 else 5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("token_shift", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_cache_matches_recompute(dtype, token_shift):
    llm = make(token_shift=token_shift)
    embeds, mask, _ = left_padded(llm, [9, 4, 6])
    with torch.no_grad():
        ref = llm(embeds, mask)
        gpu = llm.to("cuda", dtype)
        out = gpu(embeds.to("cuda", dtype), mask.cuda()).float().cpu()
        e, m = embeds.to("cuda", dtype), mask.cuda()
        cached = generate(gpu, e, m, 10, eos_id=0)
        recomputed = generate(gpu, e, m, 10, eos_id=0, use_cache=False)
    assert rel_err(out[:, -4:], ref[:, -4:]) < (1e-4 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:  # bf16 rounding can flip near-tied argmaxes
        assert torch.equal(cached, recomputed)


# ---- generation ------------------------------------------------------------------------------

@pytest.mark.parametrize("token_shift", [0, 3])   # the tiny preset shifts by 3
def test_greedy_with_cache_equals_full_recompute_and_rows_alone(token_shift):
    llm = make(vocab_size=200, token_shift=token_shift)
    lengths = [8, 3, 5]
    embeds, mask, rows = left_padded(llm, lengths, seed=3)
    eos = unreachable(llm, 199)
    cached = generate(llm, embeds, mask, 12, eos_id=eos)
    recomputed = generate(llm, embeds, mask, 12, eos_id=eos, use_cache=False)
    assert cached.shape == (3, 12) and (cached != eos).all()  # eos unused: the full length runs
    assert torch.equal(cached, recomputed)
    for b, row in enumerate(rows):
        alone = generate(llm, row, torch.ones(1, row.shape[1]), 12, eos_id=eos)
        assert torch.equal(alone[0], cached[b])
    assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant stream


def test_finished_rows_emit_eos_and_decoding_stops():
    llm = make(vocab_size=200)
    embeds, mask, _ = left_padded(llm, [6, 4], seed=3)
    free = generate(llm, embeds, mask, 10, eos_id=unreachable(llm, 199))
    assert (free != 199).all()
    for eos in free[0, 1:4].tolist():  # a token row 0 emits early
        out = generate(llm, embeds, mask, 10, eos_id=eos)
        ends = []
        for b in range(2):
            hits = (free[b] == eos).nonzero()
            end = int(hits[0]) + 1 if len(hits) else 10
            ends.append(end)
            assert torch.equal(out[b, :end], free[b, :end])
            assert (out[b, end:] == eos).all()
        assert out.shape == (2, max(ends))


def test_generate_rejects_bad_arguments():
    llm = make()
    embeds, mask, _ = left_padded(llm, [4, 2])
    right = mask.flip(1)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(llm, embeds, right, 3, eos_id=0)
    with pytest.raises(ValueError, match="no real token"):
        generate(llm, embeds, torch.zeros_like(mask), 3, eos_id=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(llm, embeds, mask, 62, eos_id=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(llm, embeds, mask, 3, eos_id=0, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="eos_id"):
        generate(llm, embeds, mask, 3, eos_id=61)
    assert generate(llm, embeds, mask, 0, eos_id=0).shape == (2, 0)


# ---- sampling --------------------------------------------------------------------------------

def nucleus_by_hand(p: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    return kept


@settings(max_examples=25, deadline=None)
@given(logits=st.lists(st.floats(-4, 4), min_size=2, max_size=12, unique=True),
       top_p=st.floats(0.05, 1.0))
def test_top_p_filter_keeps_exactly_the_nucleus(logits, top_p):
    probs = torch.softmax(torch.tensor([logits], dtype=torch.float64), -1)
    kept = top_p_filter(probs, top_p)[0]
    assert {i for i in range(len(logits)) if kept[i] > 0} == nucleus_by_hand(probs[0].tolist(), top_p)
    assert abs(kept.sum().item() - 1) < 1e-9


def test_top_p_boundary_mass_exactly_reached_stops_the_nucleus():
    probs = torch.tensor([[0.25, 0.5, 0.125, 0.125]], dtype=torch.float64)  # exact in binary
    assert top_p_filter(probs, 0.5)[0].tolist() == [0, 1, 0, 0]
    assert top_p_filter(probs, 0.75)[0].tolist() == [1 / 3, 2 / 3, 0, 0]
    assert top_p_filter(probs, 1.0)[0].tolist() == probs[0].tolist()


def test_sampling_draws_only_nucleus_tokens_and_all_of_them():
    p = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.18, 0.1])
    logits = p.log().repeat(4000, 1)  # (4000, V): 4000 independent draws
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(draws.tolist()) == nucleus_by_hand(p.tolist(), 0.8) == {1, 3, 4}
    freq = torch.bincount(draws, minlength=6).float() / 4000
    torch.testing.assert_close(freq[[1, 3, 4]], p[[1, 3, 4]] / 0.83, rtol=0, atol=0.03)
    assert torch.equal(sample_next(logits[:3]), logits[:3].argmax(-1))  # temperature 0: greedy


def test_seeded_sampling_is_reproducible():
    llm = make(vocab_size=200)
    embeds, mask, _ = left_padded(llm, [5, 3])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(llm, embeds, mask, 12, eos_id=199, temperature=1.5, top_p=0.9, generator=g)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- input checks ----------------------------------------------------------------------------

def test_forward_rejects_bad_input():
    llm = make()
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        llm(torch.randn(1, 65, 32))
    cache = llm.new_cache()
    with torch.no_grad():
        llm(torch.randn(1, 60, 32), cache=cache)
    with pytest.raises(ValueError, match=r"60 cached \+ 5 new"):
        llm(torch.randn(1, 5, 32), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        llm(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="inputs_embeds"):
        llm(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="position_ids"):
        llm(x, position_ids=torch.arange(5) + 60)
    with pytest.raises(ValueError, match="ids must lie"):
        llm.embed(torch.tensor([[61]]))
    with pytest.raises(TypeError, match="integer"):
        llm.embed(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Llama(LlamaConfig(**{**SMALL, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="hidden_size"):
        Llama(LlamaConfig(**{**SMALL, "hidden_size": 30}))


# ---- parity with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(kv_heads, tied):
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig(**{**SMALL, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dataclasses.asdict(cfg))).eval()
    llm = Llama(cfg).eval()
    llm.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})

    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :6] = 0
    mask[2, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = llm(llm.embed(ids), mask)
        assert rel_err(got[mask.bool()], want[mask.bool()]) <= 1e-5
        eos = cfg.vocab_size - 1
        want_gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)[:, 17:]
    assert torch.equal(generate(llm, llm.embed(ids), mask, 6, eos_id=eos), want_gen)
