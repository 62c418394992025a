"""Self-Mining sampler: average pooling at init, the formula, windows, kernel vs reference."""
import pytest
import torch
import torch.nn.functional as F

from minihires import ops
from minihires.model.config import SMSConfig
from minihires.model.sampler import (
    AvgPoolSampler,
    SelfMiningSampler,
    avg_pool_tokens,
    build_sampler,
)
from minihires.ops import reference

D = 16
CFG = SMSConfig(window=2, num_heads=4, mlp_ratio=2.0)


def trained_like(seed=0):
    torch.manual_seed(seed)
    sms = SelfMiningSampler(D, CFG)
    for p in sms.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return sms


def test_equals_average_pooling_at_init():
    torch.manual_seed(0)
    sms = SelfMiningSampler(D, CFG)
    x = torch.randn(5, 8, 8, D)
    y = sms(x)
    assert y.shape == (5, 4, 4, D)
    assert torch.equal(y, avg_pool_tokens(x, 2))
    ref = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)   # torch's own pooling
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(AvgPoolSampler(2)(x), ref)


def naive_sms(sms, x):
    """The module's formula written with explicit loops over windows and heads."""
    B, H, W, _ = x.shape
    k, nh, hs = sms.window, sms.n_head, D // sms.n_head
    out = torch.empty(B, H // k, W // k, D)
    for b in range(B):
        for i in range(H // k):
            for j in range(W // k):
                win = x[b, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(k * k, D)   # (k*k, D)
                q0 = win.mean(0)
                q = sms.q_proj(sms.norm_q(q0))
                kk = sms.k_proj(sms.norm_kv(win))
                vv = sms.v_proj(sms.norm_kv(win))
                heads = []
                for h in range(nh):
                    sl = slice(h * hs, (h + 1) * hs)
                    p = torch.softmax(kk[:, sl] @ q[sl] / hs ** 0.5, dim=0)           # (k*k,)
                    heads.append(p @ vv[:, sl])
                y = q0 + sms.o_proj(torch.cat(heads))
                out[b, i, j] = y + sms.fc2(F.gelu(sms.fc1(sms.norm_mlp(y))))
    return out


def test_matches_naive_formula():
    sms = trained_like()
    x = torch.randn(2, 4, 6, D)
    with torch.no_grad():
        torch.testing.assert_close(sms(x), naive_sms(sms, x), atol=1e-5, rtol=1e-5)


def test_output_depends_only_on_its_window():
    sms = trained_like()
    x = torch.randn(1, 8, 8, D, requires_grad=True)
    sms(x)[0, 1, 2].sum().backward()
    g = x.grad[0].abs().sum(-1)                 # (8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:4, 4:6] = True
    assert (g[inside] > 0).all() and (g[~inside] == 0).all()


def test_kernel_backend_matches_reference():
    sms = trained_like()
    x = torch.randn(6, 8, 8, D, requires_grad=True)
    y_kernel = sms(x)
    gk, = torch.autograd.grad(y_kernel.sum(), x)
    sms.use_kernel = False
    y_ref = sms(x)
    gr, = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y_kernel, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, gr, atol=1e-5, rtol=1e-5)
    # and the two ops directly, on SMS-shaped inputs
    q, k, v = torch.randn(3, 4, 4, 4, 4), torch.randn(3, 8, 8, 4, 4), torch.randn(3, 8, 8, 4, 4)
    torch.testing.assert_close(ops.window_attn_pool(q, k, v, (2, 2)),
                               reference.window_attn_pool(q, k, v, (2, 2)), atol=1e-5, rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="not a multiple of the window"):
        SelfMiningSampler(D, CFG)(torch.randn(1, 5, 4, D))
    with pytest.raises(ValueError, match="x must be"):
        SelfMiningSampler(D, CFG)(torch.randn(1, 16, D))
    with pytest.raises(ValueError, match="num_heads"):
        SelfMiningSampler(D, SMSConfig(num_heads=3))
    with pytest.raises(ValueError, match="compression"):
        build_sampler("max", D, CFG)
    assert isinstance(build_sampler("none", D, CFG), torch.nn.Identity)
