"""The LLM's token shift: a causal depthwise convolution over visible predecessors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minihires.model import shared_prefix
from minihires.model.config import LlamaConfig, paper, tiny
from minihires.model.llama import Llama
from minihires.model.token_shift import TokenShift, predecessors
from minihires.training.train import TrainConfig


def reference_shift(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) one plain sequence per row: x + a causal depthwise conv whose tap for
    distance d is weight[d-1], written with F.conv1d."""
    n, D = weight.shape
    taps = torch.cat([weight.flip(0), torch.ones(1, D, dtype=weight.dtype)])  # (n + 1, D)
    y = F.conv1d(F.pad(x.transpose(1, 2), (n, 0)), taps.T[:, None, :], groups=D)  # (B, D, T)
    return y.transpose(1, 2)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 12), D=st.integers(1, 9), n=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_plain_sequence_matches_a_causal_depthwise_conv(B, T, D, n, seed):
    g = torch.Generator().manual_seed(seed)
    shift = TokenShift(n, D).double()
    with torch.no_grad():
        shift.weight.copy_(torch.randn(n, D, generator=g))
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None]
    preds = predecessors(pos, pos, visible, n)
    torch.testing.assert_close(shift(x, x, preds), reference_shift(x, shift.weight),
                               rtol=0, atol=1e-12)


def test_packed_question_looks_back_into_the_prefix_not_the_question_before():
    # prefix of 3, question 1 of 2 tokens, question 2 of 3 tokens, one padding slot
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    pos = shared_prefix.positions(seg, mask)
    visible = shared_prefix.allowed(seg, mask)[:, 0]
    first, second = predecessors(pos, pos, visible, 2)
    pred = lambda p: [int(i) if ok else None for i, ok in zip(p[0][0], p[1][0])]  # noqa: E731
    assert pred(first) == [None, 0, 1, 2, 3, 2, 5, 6, None]   # question 2 starts after the prefix
    assert pred(second) == [None, None, 0, 1, 2, 1, 2, 5, None]


def test_gradcheck_float64():
    shift = TokenShift(2, 3).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(5).expand(2, 5)
    preds = predecessors(pos, pos, torch.ones(5, 5, dtype=torch.bool).tril()[None], 2)
    assert torch.autograd.gradcheck(lambda x, w: TokenShift.forward(
        type("S", (), {"weight": w})(), x, x, preds), (x, shift.weight.detach().requires_grad_()))


def test_off_means_plain_llama_weights():
    """token_shift 0 (the paper preset, loaded LLaMA weights) adds no parameter, so HF
    checkpoints load as before; the tiny preset has one (3, D) tap table per block."""
    assert paper().llama.token_shift == 0
    cfg = tiny().llama
    keys = set(Llama(cfg).state_dict())
    plain = set(Llama(LlamaConfig(**{**cfg.__dict__, "token_shift": 0})).state_dict())
    assert keys - plain == {f"token_shifts.{i}.weight" for i in range(cfg.num_hidden_layers)}
    assert Llama(cfg).token_shifts[0].weight.shape == (3, cfg.hidden_size)


def test_a_token_reaches_exactly_its_next_n_tokens():
    """Changing token 2 changes the shifted inputs of tokens 2..5 (n = 3), not 0, 1 or 6."""
    shift = TokenShift(3, 4)
    x = torch.randn(1, 7, 4)
    pos = torch.arange(7)[None]
    preds = predecessors(pos, pos, torch.ones(7, 7, dtype=torch.bool).tril()[None], 3)
    x2 = x.clone()
    x2[0, 2] += 1
    changed = (shift(x, x, preds) != shift(x2, x2, preds)).any(-1)[0]    # (7,)
    assert changed.tolist() == [False, False, True, True, True, True, False]


@pytest.mark.parametrize("value", [-1, 9, 1.5, True, "3"])
def test_bad_token_shift_is_named(value):
    with pytest.raises(ValueError, match="token_shift"):
        LlamaConfig(token_shift=value).validate()
    with pytest.raises(ValueError, match="token_shift"):
        TrainConfig(token_shift=value).validate()


def test_token_shift_refused_with_loaded_llama(tmp_path):
    for d in ("v", "l"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    (tmp_path / "data.json").write_text("[]")
    data = str(tmp_path / "data.json")
    with pytest.raises(ValueError, match="token_shift needs an LLM trained with it"):
        TrainConfig(token_shift=3, init_from_hf=[str(tmp_path / "v"), str(tmp_path / "l")],
                    data=data).validate()
    with pytest.raises(ValueError, match="token_shift needs an LLM trained with it"):
        TrainConfig(token_shift=3, init_from_llava=str(tmp_path / "v"), data=data).validate()
    TrainConfig(token_shift=0, init_from_llava=str(tmp_path / "v"), data=data).validate()
    with pytest.raises(ValueError, match="token_shift comes with the weights of init_from_run"):
        TrainConfig(token_shift=0, init_from_run=str(tmp_path / "v"), data=data).validate()


def test_train_config_switch_reaches_the_model():
    assert TrainConfig().model_config().llama.token_shift == 3
    assert TrainConfig(token_shift=0).model_config().llama.token_shift == 0
