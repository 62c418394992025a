"""The canvas stage of the seam-board experiment: its batches put the entity where the
geometry says, its tokens land on the right canvas cells, a slice's tokens see another slice
only through the adapters, and its weights load into the main job's variant.

Part of the suite: `python -m pytest` collects experiments/ too."""
import dataclasses
import random

import pytest
import seam_boards as SB
import seam_pretrain as SP
import torch

from minihires.model.config import tiny


def test_canvas_batch_labels_seams_from_geometry_and_masks_the_entity():
    x, y, seam, board, mask = SP.canvas_batch("C", random.Random(0), 40, classes=True)
    assert x.shape == (40 * 4, 3, 32, 32) and mask.shape == (40, 16, 16)
    assert board.any() and (~board).any() and seam.any() and (~seam).any()
    assert torch.equal(board, y < 2)
    for k in range(40):                                 # 16-px entities touch 4 or 5 patches a side
        rows, cols = mask[k].any(1).nonzero(), mask[k].any(0).nonzero()
        assert 4 <= len(rows) <= 5 and 4 <= len(cols) <= 5
        assert rows.diff(dim=0).eq(1).all() and cols.diff(dim=0).eq(1).all()
        on = bool((rows.min() < 8 <= rows.max()) or (cols.min() < 8 <= cols.max()))
        assert on == bool(seam[k])                      # touches two slices' tokens iff cut


def test_canvas_tokens_put_each_slice_token_on_its_canvas_cell():
    class Stub(torch.nn.Module):                        # token = (slice, row, col) of the patch
        def forward(self, x, grids):
            n = x.shape[0]
            k = torch.arange(n).view(n, 1, 1).expand(n, 8, 8)
            i = torch.arange(8).view(1, 8, 1).expand(n, 8, 8)
            j = torch.arange(8).view(1, 1, 8).expand(n, 8, 8)
            t = torch.stack([k, i, j], -1).reshape(n, 64, 3).float()
            return torch.cat([torch.zeros(n, 1, 3), t], 1)
    t = SP.canvas_tokens(Stub(), torch.zeros(2 * 4, 3, 32, 32))
    assert t.shape == (2, 16, 16, 3)
    for b in range(2):
        for y in range(16):
            for x in range(16):
                want = [b * 4 + (y // 8) * 2 + x // 8, y % 8, x % 8]
                assert t[b, y, x].tolist() == want


@pytest.mark.parametrize("sra", [(), (0, 1, 2)])
def test_only_the_adapters_let_a_slice_see_its_neighbour(sra):
    torch.manual_seed(0)
    vit = SP.build_vit(sra)
    for a in vit.sra.values():                          # as after training: not the identity
        torch.nn.init.normal_(a.proj.weight, std=0.1)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)   # one canvas, 2 x 2 slices
    SP.canvas_tokens(vit, x)[0, :8, 7].sum().backward()  # slice 0's column at the seam
    assert x.grad[0].abs().sum() > 0
    reaches = x.grad[1].abs().sum() > 0                 # slice 1, across the seam
    assert bool(reaches) == bool(sra)


def test_whole_canvas_tokens_match_the_whole_canvas_control_and_see_across_the_seam():
    from minihires.model.hires_llava import HiResLLaVA
    torch.manual_seed(0)
    model = HiResLLaVA(dataclasses.replace(tiny(), use_sra=False, whole_canvas=True)).eval()
    vit = SP.build_vit(())
    vit.load_state_dict(model.vision_tower.state_dict())
    x = torch.randn(4, 3, 32, 32, requires_grad=True)   # one canvas, 2 x 2 slices
    t = SP.canvas_tokens(vit, x, whole=True)            # (1, 16, 16, D)
    thumb = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():                               # the control's per-slice pieces
        want = model._whole_canvas_features(torch.cat([thumb, x]), [(2, 2)])[1:]  # (4, 8, 8, D)
    got = t.detach().reshape(2, 8, 2, 8, -1).permute(0, 2, 1, 3, 4)  # (2 rows, 2 cols, 8, 8, D)
    got = got.reshape(4, 8, 8, -1)                      # the slices' pieces, raster order
    torch.testing.assert_close(got, want)
    t[0, :8, 7].sum().backward()                        # slice 0's column at the seam
    assert x.grad[1].abs().sum() > 0                    # reaches slice 1 with no adapters


def test_whole_canvas_pretraining_runs_and_its_weights_load_into_the_whole_variant(monkeypatch,
                                                                                 tmp_path):
    from minihires.training import train as T
    monkeypatch.setattr(T, "HiResLLaVA", T.HiResLLaVA)
    vit, curve = SP.pretrain("C", 1, (), batch=4, whole=True, progress=lambda line: None)
    assert [c[0] for c in curve] == [1]
    torch.save(vit.state_dict(), tmp_path / "whole.pt")
    SB.with_encoder(str(tmp_path / "whole.pt"))
    got = T.HiResLLaVA(dataclasses.replace(tiny(), use_sra=False, whole_canvas=True))
    got = got.vision_tower.state_dict()
    assert all(torch.equal(got[k], v) for k, v in vit.state_dict().items())
    with pytest.raises(ValueError, match="takes no adapters"):
        SP.pretrain("C", 1, (0,), batch=4, whole=True, progress=lambda line: None)


def test_pretrain_learns_and_its_weights_load_into_the_matching_variant(tmp_path, monkeypatch):
    from minihires.training import train as T
    monkeypatch.setattr(T, "HiResLLaVA", T.HiResLLaVA)
    vit, curve = SP.pretrain("C", 2, (0, 1, 2), batch=4, every=1, progress=lambda line: None)
    assert [c[0] for c in curve] == [1, 2] and all(0 <= a <= 1 for a in curve[-1][1:3])
    torch.save(vit.state_dict(), tmp_path / "sra.pt")
    plain_vit, _ = SP.pretrain("C", 1, (), batch=4, seed=1, progress=lambda line: None)
    torch.save(plain_vit.state_dict(), tmp_path / "plain.pt")
    SB.with_encoder(str(tmp_path / "plain.pt"), str(tmp_path / "sra.pt"))
    m = tiny()
    m.vit.sra_layers = (0, 1, 2)
    got = T.HiResLLaVA(m).vision_tower.state_dict()      # the variant with adapters: sra.pt
    assert all(torch.equal(got[k], v) for k, v in vit.state_dict().items())
    got = T.HiResLLaVA(dataclasses.replace(m, use_sra=False)).vision_tower.state_dict()
    assert got.keys() == plain_vit.state_dict().keys()   # the variant without: plain.pt
    assert all(torch.equal(got[k], v) for k, v in plain_vit.state_dict().items())
    m.vit.sra_layers = (1,)                             # adapters elsewhere: said, not dropped
    with pytest.raises(ValueError, match="does not fit"):
        T.HiResLLaVA(m)


def test_command_line_errors_name_the_flag(capsys, tmp_path):
    with pytest.raises(SystemExit):
        SP.cli_seam_pretrain(["--board", "C", "--sra-layers", "7"])
    assert "--sra-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        SP.cli_seam_pretrain(["--board", "C", "--sra-layers", "1", "--whole"])
    assert "--whole cuts nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        SP.cli_seam_pretrain(["--board", "C", "--sra-layers", "none", "--init", "/nonexistent.pt"])
    assert "--init" in capsys.readouterr().err
    torch.save({"not.a.vit.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit):
        SP.cli_seam_pretrain(["--board", "C", "--sra-layers", "none", "--init",
                              str(tmp_path / "bad.pt")])
    assert "--init: these weights do not fit" in capsys.readouterr().err


def test_layers_parses_blocks_and_none():
    assert SP.layers("none") == () and SP.layers("0,2") == (0, 2)
