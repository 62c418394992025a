"""vit: shapes over mixed grids, HF hidden-state indexing, and agreement with HF CLIP."""
import dataclasses

import pytest
import torch

from minihires.model.config import SRAConfig, ViTConfig
from minihires.model.vit import VisionTransformer

GRIDS = [(1, 1), (1, 3), (2, 2), (3, 2)]


def small_cfg(**kw):
    base = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, feature_layer=-2, sra_layers=(0,))
    return ViTConfig(**(base | kw))


def test_shapes_mixed_grids():
    torch.manual_seed(0)
    vit = VisionTransformer(small_cfg(), SRAConfig(downsample=2, num_heads=4))
    n = len(GRIDS) + sum(r * c for r, c in GRIDS)
    x = torch.randn(n, 3, 16, 16)
    y = vit(x, GRIDS)
    assert y.shape == (n, 1 + 16, 32)
    states = vit.hidden_states(x, GRIDS)
    assert len(states) == 3 + 1
    assert torch.equal(states[0], vit.pre_layrnorm(vit.embeddings(x)))
    assert torch.equal(y, states[-2])                    # feature_layer -2: penultimate
    vit_last = VisionTransformer(small_cfg(feature_layer=-1))
    vit_last.load_state_dict(vit.state_dict(), strict=False)
    assert torch.equal(vit_last(x), vit_last.hidden_states(x)[-1])


def test_names_mirror_hf():
    names = set(VisionTransformer(small_cfg()).state_dict())
    for key in ["embeddings.patch_embedding.weight", "embeddings.class_embedding",
                "embeddings.position_embedding.weight", "pre_layrnorm.weight",
                "layers.0.self_attn.q_proj.weight", "layers.2.self_attn.out_proj.bias",
                "layers.1.layer_norm1.weight", "layers.1.mlp.fc1.weight", "layers.1.mlp.fc2.bias",
                "layers.1.layer_norm2.bias", "post_layernorm.weight"]:
        assert key in names
    assert "embeddings.patch_embedding.bias" not in names


def hf_to_ours(key: str) -> str:
    return key.removeprefix("vision_model.").replace("encoder.layers.", "layers.")


@pytest.mark.parametrize("size", [16, 24])       # 24: position embeddings interpolated (6x6 grid)
def test_matches_hf_clip(size):
    transformers = pytest.importorskip("transformers")
    cfg = small_cfg(sra_layers=())
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    ours = VisionTransformer(cfg).eval()
    sd = {hf_to_ours(k): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    missing, unexpected = ours.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True,
                 interpolate_pos_encoding=size != cfg.image_size).hidden_states
        got = ours.hidden_states(x)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sra_leaves_thumbnails_and_cls_alone():
    torch.manual_seed(0)
    cfg = small_cfg(sra_layers=(1,), feature_layer=-1)
    plain = VisionTransformer(cfg)
    sra = VisionTransformer(cfg, SRAConfig(downsample=2, num_heads=4))
    sra.load_state_dict(plain.state_dict(), strict=False)
    for p in sra.sra.parameters():                       # make the adapter do something
        torch.nn.init.normal_(p, std=0.2)
    n_thumb = len(GRIDS)
    x = torch.randn(n_thumb + sum(r * c for r, c in GRIDS), 3, 16, 16)
    a, b = plain.hidden_states(x, GRIDS), sra.hidden_states(x, GRIDS)
    assert torch.equal(a[1], b[1])                       # before the adapter: same
    assert torch.equal(a[2][:n_thumb], b[2][:n_thumb])   # thumbnails untouched
    assert torch.equal(a[2][:, 0], b[2][:, 0])           # CLS untouched
    assert not torch.allclose(a[2][n_thumb:, 1:], b[2][n_thumb:, 1:])
    assert torch.equal(sra(x[:n_thumb]), plain(x[:n_thumb]))   # no grids: no slices, no adapter


def test_bad_input():
    vit = VisionTransformer(small_cfg())
    with pytest.raises(ValueError, match="pixel_values must be"):
        vit(torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="patch_size"):
        vit(torch.randn(2, 3, 18, 16))
    with pytest.raises(ValueError, match="grids"):
        vit(torch.randn(2, 3, 16, 16), [(1, 3)])
    with pytest.raises(ValueError, match="sra_layers"):
        VisionTransformer(small_cfg(sra_layers=(2,)), SRAConfig())   # block 2 feeds nothing at -2
    with pytest.raises(ValueError, match="feature_layer"):
        VisionTransformer(small_cfg(feature_layer=5))
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(dataclasses.replace(small_cfg(), image_size=18))
