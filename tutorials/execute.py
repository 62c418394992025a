"""Re-execute the tutorial notebooks in place, keeping their outputs.

    python tutorials/execute.py                 every notebook, in order
    python tutorials/execute.py 03 05_llama     some of them (number, name prefix or file name)

Each notebook runs top to bottom in a fresh kernel of *this* Python (the interpreter that
runs this script, not whatever `python` a Jupyter kernel spec names), with the working
directory set to tutorials/, and is saved back with its new outputs. The first error stops
that notebook and the script exits non-zero, leaving the file as it was.
`tests/test_notebooks.py` uses `execute` below on a copy, discarding the outputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 600          # seconds per cell; a notebook is meant to take well under a minute
                            # (07's training run: about two and a half on 2 free cores)


def notebooks() -> list[Path]:
    """The tutorial notebooks, in their numbered order."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def select(names: list[str]) -> list[Path]:
    """Notebooks matching each name (a number like '03', a name prefix, or a file name)."""
    all_nbs = notebooks()
    if not names:
        return all_nbs
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        hits = [p for p in all_nbs if p.stem == stem or p.stem.startswith(stem)]
        if len(hits) != 1:
            known = ", ".join(p.stem for p in all_nbs)
            what = "matches no notebook" if not hits else f"matches {len(hits)} notebooks"
            raise ValueError(f"notebook name {name!r} {what}; choose from: {known}")
        if hits[0] not in chosen:
            chosen.append(hits[0])
    return chosen


def execute(nb, cwd: Path = HERE, timeout: int = CELL_TIMEOUT):
    """Run a notebook node (modified in place) in a fresh kernel of sys.executable."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name="python3", kernel_manager_class=_current_python_km(),
                            timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()            # starts the kernel, runs every cell, shuts the kernel down
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(cell.outputs)
    return nb


def _merge_streams(outputs):
    """Join consecutive stdout (or stderr) outputs of a cell into one, as Jupyter shows them."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.output_type == "stream" and prev is not None and prev.output_type == "stream"
                and prev.name == out.name):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def _current_python_km():
    """A kernel manager whose "python3" launches sys.executable, ignoring installed kernel
    specs (a user-level spec may name another Python): with no kernel dirs, jupyter_client
    falls back to ipykernel's own spec, which is built from sys.executable."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class CurrentPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[])

    return CurrentPythonKernelManager


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python tutorials/execute.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    args = p.parse_args(argv)
    try:
        chosen = select(args.names)
    except ValueError as e:
        p.error(str(e))
    if not chosen:
        p.error(f"no notebooks found in {HERE}")

    import nbformat
    from nbclient.exceptions import CellExecutionError

    failed = []
    for path in chosen:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        try:
            execute(nb)
        except CellExecutionError as e:
            print(f"FAILED {path.name}:\n{e}", file=sys.stderr)
            failed.append(path.name)
            continue
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
