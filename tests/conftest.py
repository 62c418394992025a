"""Shared test setup: hypothesis profiles, the `cuda` and `huge` markers, poisoned allocations.

Hypothesis profiles (HYPOTHESIS_PROFILE=...; default `ci` when CI is set, else `dev`):
    ci   derandomised (same examples every run), modest example counts
    dev  random examples, modest counts
    gpu  more examples, for tests/gpu/run.sh on a lent GPU machine
Tests take their example counts from the profile (`examples(factor)` scales it), so the
profile decides how hard they look.

Device-parametrised kernel tests use `devices("op", ...)`: the cuda instance carries the
`cuda` marker, so `pytest -m cuda` (tests/gpu/run.sh) runs exactly the GPU instances.

`trained_run` is the session's one shared training (a tiny run folder): tests that only need
some trained run use it instead of training their own.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=_SUPPRESS)
settings.register_profile("gpu", deadline=None, max_examples=100, derandomize=True, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

HUGE_ENV = "MINIHIRES_HUGE_TESTS"


def examples(factor: float = 1.0) -> settings:
    """Hypothesis settings drawing `factor` times the active profile's example count."""
    return settings(max_examples=max(1, round(settings.default.max_examples * factor)))


def devices(*ops: str) -> list:
    """["cpu", "cuda"] for a device-parametrised kernel test of `ops`; the cuda instance is
    marked `cuda` (skipped without a GPU, selected by `pytest -m cuda`)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda(*ops))]


def pytest_configure(config):
    config.addinivalue_line("markers", f"huge: needs tens of GiB of GPU memory; runs only with {HUGE_ENV}=1 "
                                       "(tests/gpu/run.sh sets it)")


def pytest_runtest_setup(item):
    """@pytest.mark.cuda("op", ...): skip without a GPU; FAIL when a GPU is present but an
    op named in the marker has no CUDA kernel registered (a silent CPU fallback would
    otherwise pass the GPU run). @pytest.mark.huge: skip unless MINIHIRES_HUGE_TESTS=1."""
    if item.get_closest_marker("huge") is not None and os.environ.get(HUGE_ENV) != "1":
        pytest.skip(f"a huge-memory test: runs with {HUGE_ENV}=1 (tests/gpu/run.sh)")
    marker = item.get_closest_marker("cuda")
    if marker is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from minihires.ops._extension import LOAD_ERROR, has_kernel
    missing = [op for op in marker.args if not has_kernel(op, "cuda")]
    if missing:
        pytest.fail(f"a GPU is present but minihires has no CUDA kernel for {missing} "
                    f"(build with CUDA: pip install --no-build-isolation -e .; load error: {LOAD_ERROR})")


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """`train` and `ablate` set torch's CPU thread count (--threads); every test module
    gets back the count it started with, whatever its fixtures and tests ran."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread never waits for a busy core.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def poison():
    """Every fresh allocation (torch.empty, at::empty in the kernels) is filled with NaN, so
    an output element a kernel forgot to write fails the comparison."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all(), "poisoning does not reach fresh allocations"
    yield
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# the one shared training: `trained_run`'s flags (tests read its numbers from here). 30 steps
# at lr 3e-3: past the first phase in which the model answers every question with eos (16
# steps were not), so `ask` prints an answer.
TRAINED_RUN_ARGS = ["--steps", "30", "--ckpt-every", "7", "--batch-size", "2", "--lr", "3e-3",
                    "--warmup-steps", "3", "--eval-n", "9", "--quiet"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder of `python -m minihires train TRAINED_RUN_ARGS` (tiny preset, checkpoints
    every 7 steps and at the end, metrics on 9 test samples), trained once per session for
    every test that needs "some trained run". Tests must not change it: copy it first to
    damage or resume it. Tests that need their own run (resume, kill, stop-at, DDP, other
    flags) train it themselves."""
    from minihires.cli.train import cli_train
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli_train([*TRAINED_RUN_ARGS, "--out", str(out)]) == 0
    return out
