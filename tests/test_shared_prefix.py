"""Questions packed after a shared prefix: each must get exactly the logits it gets alone."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minihires.model import shared_prefix
from minihires.model.config import LlamaConfig
from minihires.model.llama import KVCache, Llama

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
             rope_theta=1000.0, rms_norm_eps=1e-6)


def make(seed=0, token_shift=0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**SMALL, token_shift=token_shift)).double().eval()


def test_hand_example():
    # prefix of 3, question 1 of 2 tokens, question 2 of 3 tokens, one padding slot
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    assert shared_prefix.positions(seg, mask).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0]]
    ok = shared_prefix.allowed(seg, mask)[0, 0]
    assert ok[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]          # question 1 sees prefix + itself
    assert ok[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 0]          # question 2 skips question 1
    assert ok[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]          # the prefix is plain causal
    assert ok[8, 8] and not ok[:8, 8].any()                       # padding: itself, never a key


def test_one_question_is_plain_causal_attention():
    llm = make()
    x = torch.randn(2, 9, SMALL["hidden_size"], dtype=torch.float64)
    seg = torch.tensor([[0] * 4 + [1] * 5] * 2)
    with torch.no_grad():
        torch.testing.assert_close(llm(x, segment_ids=seg), llm(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("token_shift", [0, 3])
@settings(max_examples=25, deadline=None)
@given(prefix=st.integers(1, 6), lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_each_packed_question_gets_its_logits_alone(token_shift, prefix, lengths, pad, seed):
    """Random prefix and question lengths, right padding with junk: every packed token's
    logits equal those of prefix + its own question run alone (float64). With a token shift,
    a question's first tokens must look back into the prefix, not the question before."""
    llm = make(token_shift=token_shift)
    g = torch.Generator().manual_seed(seed)
    D = SMALL["hidden_size"]
    pre = torch.randn(prefix, D, generator=g, dtype=torch.float64)
    qs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in lengths]
    junk = torch.randn(pad, D, generator=g, dtype=torch.float64) * 5
    x = torch.cat([pre, *qs, junk])[None]                              # (1, S, D)
    seg = torch.tensor([[0] * prefix + sum(([k + 1] * n for k, n in enumerate(lengths)), [])
                        + [0] * pad])
    mask = torch.tensor([[1] * (x.shape[1] - pad) + [0] * pad])
    with torch.no_grad():
        packed = llm(x, attention_mask=mask, segment_ids=seg)[0]        # (S, V)
        alone_pre = llm(pre[None])[0]
        torch.testing.assert_close(packed[:prefix], alone_pre, rtol=0, atol=1e-10)
        start = prefix
        for q in qs:
            alone = llm(torch.cat([pre, q])[None])[0, prefix:]          # (n, V)
            torch.testing.assert_close(packed[start:start + len(q)], alone, rtol=0, atol=1e-10)
            start += len(q)


@pytest.mark.parametrize("token_shift", [0, 3])
def test_gradients_flow_only_within_a_question(token_shift):
    """The loss on question 2 has no gradient with respect to question 1's tokens."""
    llm = make(token_shift=token_shift)
    x = torch.randn(1, 9, SMALL["hidden_size"], dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])
    llm(x, segment_ids=seg)[0, 6:].sum().backward()
    assert x.grad[0, 3:6].abs().max() == 0
    assert x.grad[0, :3].abs().max() > 0


@pytest.mark.parametrize("seg, mask, err, match", [
    ([[0, 1, 1, 0, 2]], None, ValueError, "must not decrease"),
    ([[1, 1, 2, 2, 2]], None, None, None),                      # no prefix: allowed, just odd
    ([[0, -1, 1, 1, 1]], None, ValueError, ">= 0"),
    ([[0.0, 1, 1, 1, 1]], None, TypeError, "integers"),
    ([[0, 0, 1, 2, 1]], [[1, 1, 1, 1, 0]], None, None),         # padding may hold anything
    ([[0, 0, 1, 1]], None, ValueError, r"\(B, T\)"),
])
def test_bad_segment_ids_are_named(seg, mask, err, match):
    llm = make()
    x = torch.randn(1, 5, SMALL["hidden_size"], dtype=torch.float64)
    seg = torch.tensor(seg)
    mask = None if mask is None else torch.tensor(mask)
    if err is None:
        llm(x, attention_mask=mask, segment_ids=seg)
    else:
        with pytest.raises(err, match=match):
            llm(x, attention_mask=mask, segment_ids=seg)


def test_segments_cannot_extend_a_cache():
    llm = make()
    cache = KVCache(SMALL["num_hidden_layers"])
    x = torch.randn(1, 4, SMALL["hidden_size"], dtype=torch.float64)
    llm(x, cache=cache)
    with pytest.raises(ValueError, match="cannot extend a cache"):
        llm(x[:, :2], cache=cache, attention_mask=torch.ones(1, 6),
            segment_ids=torch.tensor([[0, 1]]))
