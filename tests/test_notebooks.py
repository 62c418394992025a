"""The tutorial notebooks run top to bottom, and the committed copies are their honest outputs.

Each notebook is executed in a fresh kernel of the current Python (`tutorials/execute.py`) on
an in-memory copy with its outputs cleared: the committed file is never touched. Any cell that
raises fails the test. MINIHIRES_NB_STEPS shortens notebook 07's training (same code path).
The committed notebooks must keep their outputs (they are read on the repository page), from
one top-to-bottom run, with every figure produced by a cell (none pasted into markdown).
"""
from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"


def _load_execute():
    spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()
NOTEBOOKS = execute.notebooks()
EXPECTED = ["01_slicing_and_fragmentation", "02_vit_from_scratch", "03_slice_restore",
            "04_self_mining_sampler", "05_llama_from_scratch", "06_the_model",
            "07_train_on_entitygrid", "08_cuda_kernels", "09_seam_benchmark"]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def pngs(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def cleared(nb):
    fresh = copy.deepcopy(nb)
    for cell in code_cells(fresh):
        cell.outputs, cell.execution_count = [], None
    return fresh


def test_the_numbered_notebooks_are_all_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def test_execute_selects_notebooks_by_number_or_name():
    assert execute.select([]) == NOTEBOOKS
    assert execute.select(["03"]) == [TUTORIALS / "03_slice_restore.ipynb"]
    assert execute.select(["05_llama", "tutorials/01_slicing_and_fragmentation.ipynb"]) == [
        TUTORIALS / "05_llama_from_scratch.ipynb", TUTORIALS / "01_slicing_and_fragmentation.ipynb"]
    with pytest.raises(ValueError, match="'99' matches no notebook"):
        execute.select(["99"])
    with pytest.raises(ValueError, match=f"matches {len(EXPECTED)} notebooks"):
        execute.select(["0"])
    with pytest.raises(SystemExit):            # the command line reports the bad name and exits 2
        execute.main(["no_such_notebook"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_keeps_outputs_of_one_clean_run(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with prose"
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        "outputs must come from one top-to-bottom run: python tutorials/execute.py"
    for c in cells:
        assert not any(o.output_type == "error" for o in c.outputs), c.source[:80]
    assert sum(pngs(c) for c in cells) >= 1, "every tutorial draws at least one figure"
    for c in nb.cells:
        if c.cell_type == "markdown":
            assert "attachments" not in c and "data:image" not in c.source, \
                "figures come from running cells, not pasted into markdown"


def test_the_training_notebook_shows_a_model_that_learns():
    """Notebook 07's committed run scores every task above chance by more than two standard
    errors (its own verdict lines), not a model stuck at chance."""
    nb = nbformat.read(TUTORIALS / "07_train_on_entitygrid.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs
                   if o.output_type == "stream")
    for task in ("recognition", "position", "counting", "continuity"):
        assert re.search(rf"^{task} .*: above chance$", text, re.M), \
            f"{task}: the committed run of notebook 07 is not above chance"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("MINIHIRES_NB_STEPS", "8")
    committed = nbformat.read(path, as_version=4)
    nb = execute.execute(cleared(committed))  # raises CellExecutionError on the first failing cell
    ran, kept = code_cells(nb), code_cells(committed)
    assert all(c.execution_count is not None for c in ran)
    for new, old in zip(ran, kept):
        assert not any(o.output_type == "error" for o in new.outputs)
        # the committed figures are exactly the ones the code draws
        assert pngs(new) == pngs(old), f"figure count differs for cell: {new.source[:80]!r}"


def _gpu_results_notebook():
    """The cells of notebook 08 that read and draw recorded GPU results (tagged gpu-results)."""
    nb = nbformat.read(TUTORIALS / "08_cuda_kernels.ipynb", as_version=4)
    nb.cells = [c for c in code_cells(nb) if "gpu-results" in c.metadata.get("tags", [])]
    assert len(nb.cells) >= 3, "imports, table helpers and the results cell are tagged"
    return cleared(nb)


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_gpu_results_cell_says_plainly_when_there_are_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIHIRES_GPU_RESULTS", str(tmp_path))
    nb = execute.execute(_gpu_results_notebook())
    assert "No GPU results recorded yet" in _stdout(nb)
    assert sum(pngs(c) for c in nb.cells) == 0


@pytest.mark.slow
def test_gpu_results_cell_shows_recorded_tables_with_hardware_and_date(tmp_path, monkeypatch):
    # A results folder as tests/gpu/run.sh writes it (log.txt + bench.md in the bench's format).
    from minihires.benchmarks.common import format_table
    old, new = tmp_path / "2030-05-01", tmp_path / "2030-06-02"
    for folder, gpu in ((old, "OldGPU 1"), (new, "TestGPU 9000")):
        folder.mkdir()
        (folder / "log.txt").write_text(f"\n=== machine (10:00:00)\n{gpu}, 1000 MiB, 1.0\n"
                                        "python 3.12 torch 2.11 cuda 13.0\n\n=== build (10:00:05)\nok\n")
        rows = [["paper", p, impl, 1.0, 100.0, frac, 2.0]
                for p in ("forward", "backward") for impl, frac in (("reference", 0.2), ("cuda v2", 0.9))]
        table = format_table(["size", "pass", "impl", "median ms", "GB/s", "of clone()", "vs reference"], rows)
        (folder / "bench.md").write_text(f"window_attn_pool on {gpu}, torch.bfloat16\nnote line\n\n{table}\n")
    monkeypatch.setenv("MINIHIRES_GPU_RESULTS", str(tmp_path))
    nb = execute.execute(_gpu_results_notebook())
    text = _stdout(nb)
    assert "measured 2030-06-02" in text and "TestGPU 9000, 1000 MiB" in text   # the latest folder
    assert "OldGPU" not in text
    assert "python 3.12 torch 2.11" in text and "ok" not in text.split("\n")   # machine lines only
    assert "window_attn_pool on TestGPU 9000, torch.bfloat16" in text and "cuda v2" in text
    assert sum(pngs(c) for c in nb.cells) == 1                                  # one table, one plot
