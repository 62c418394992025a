"""SliceRestore: identity at init, context across seams (by gradient), ragged batches."""
import pytest
import torch

from minihires.model.config import SRAConfig, ViTConfig
from minihires.model.slice_restore import SliceRestore
from minihires.model.vit import VisionTransformer

D = 16
GRIDS = [(1, 1), (1, 3), (2, 2), (3, 2), (2, 2)]


def adapter(seed=0, active=True, downsample=2):
    torch.manual_seed(seed)
    sra = SliceRestore(D, SRAConfig(downsample=downsample, num_heads=4))
    if active:                                   # weights non-zero: the adapter does something
        for p in sra.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return sra


def slices_for(grids, h=4, w=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(r * c for r, c in grids), h, w, D, generator=g)


def test_identity_at_init():
    sra = adapter(active=False)
    x = slices_for(GRIDS)
    assert torch.equal(sra(x, GRIDS), x)


def test_neighbouring_slice_matters_only_with_sra():
    grids = [(1, 2)]
    for active in (True, False):
        sra = adapter(active=active)
        x = slices_for(grids).requires_grad_(True)
        out = sra(x, grids)
        out[0, :, -1].sum().backward()           # right edge of the left slice
        grad_from_right_slice = x.grad[1].abs().sum()
        if active:
            assert grad_from_right_slice > 0
            assert x.grad[1, :, 0].abs().sum() > 0   # the token across the seam, via the conv
        else:
            assert grad_from_right_slice == 0


def test_images_do_not_mix():
    sra = adapter()
    x = slices_for(GRIDS).requires_grad_(True)
    out = sra(x, GRIDS)
    out[1:4].sum().backward()                    # image 1: slices 1..3 (grid 1x3)
    assert x.grad[1:4].abs().sum() > 0
    assert x.grad[:1].abs().sum() == 0 and x.grad[4:].abs().sum() == 0


def test_ragged_batch_equals_one_by_one():
    sra = adapter()
    x = slices_for(GRIDS)
    batched = sra(x, GRIDS)
    start = 0
    for rc in GRIDS:
        n = rc[0] * rc[1]
        torch.testing.assert_close(batched[start:start + n], sra(x[start:start + n], [rc]))
        start += n


def test_canvas_side_not_divisible_by_s():
    """Canvas 3 x 9 with s = 2 (ceil_mode): shapes work out, a constant canvas gets one global
    term everywhere, and the partial last window is pooled rather than dropped."""
    sra = adapter(downsample=2)
    torch.nn.init.zeros_(sra.local.weight)
    torch.nn.init.zeros_(sra.local.bias)
    x = torch.randn(1, 1, 1, D).expand(3, 3, 3, D).contiguous()   # grid (1, 3) of 3x3 slices
    delta = sra(x, [(1, 3)]) - x
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(delta, delta[:1, :1, :1].expand_as(delta))
    # the odd last canvas row and column are pooled too (floor mode would drop them)
    y = torch.randn(3, 3, 3, D, requires_grad=True)
    sra(y, [(1, 3)])[0, 0, 0].sum().backward()            # top-left token of the canvas
    assert y.grad[2, 2, 2].abs().sum() > 0                # reaches the bottom-right corner


def test_vit_slice_depends_on_neighbour_pixels_only_with_sra():
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=D, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, feature_layer=-1, sra_layers=(0,))
    grads = {}
    for use_sra in (True, False):
        torch.manual_seed(0)
        vit = VisionTransformer(cfg, SRAConfig(num_heads=4) if use_sra else None)
        for p in vit.sra.parameters():
            torch.nn.init.normal_(p, std=0.3)
        px = torch.randn(3, 3, 16, 16, requires_grad=True)   # thumbnail, then a 1x2 grid
        feats = vit(px, [(1, 2)])
        feats[1, 1:].sum().backward()                         # tokens of the left slice
        grads[use_sra] = px.grad
    assert grads[True][2].abs().sum() > 0                     # right slice's pixels matter ...
    assert grads[False][2].abs().sum() == 0                   # ... only through the adapter
    assert grads[True][0].abs().sum() == 0                    # the thumbnail never does


def test_bad_input():
    sra = adapter(active=False)
    with pytest.raises(ValueError, match="grids"):
        sra(slices_for([(2, 2)]), [(1, 3)])
    with pytest.raises(ValueError, match="x must be"):
        sra(torch.randn(4, 16, D), [(2, 2)])
    with pytest.raises(ValueError, match="num_heads"):
        SliceRestore(D, SRAConfig(num_heads=5))
    with pytest.raises(ValueError, match="kernel_size"):
        SliceRestore(D, SRAConfig(kernel_size=2))
