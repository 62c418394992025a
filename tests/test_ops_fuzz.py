"""Direct torch.ops.minihires.* calls with hostile arguments, each case in a child process.

The C++ checks (csrc/checks.h) promise that no invalid input reaches a kernel from a direct
call. A broken promise is an out-of-bounds access, which can kill the process instead of
failing a test, so every case runs in a child Python (this file, run with --child) that
the test talks to over pipes: one JSON line per case in, one result line out. A child that
dies (a signal, an abort) or hangs fails the case that killed it, and the next case gets a
fresh child.

For every case the test knows, from its own reading of the contract (`problems`), whether
the input is valid. Invalid input must raise a RuntimeError or ValueError whose message
names the problem; valid input must match the pure-PyTorch reference. The same call on
meta tensors (the fake kernels of minihires/ops/) must accept and reject exactly the same
cases, with the same output shapes.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading

INT64_MAX = 2**63 - 1
STITCH_OPS = ("stitch", "stitch_naive")
SPLIT_OPS = ("split", "split_naive")
FORWARD_OPS = ("window_attn_pool", "window_attn_pool_naive")
BACKWARD_OPS = ("window_attn_pool_backward", "window_attn_pool_backward_naive")
FLOATS = ("float32", "float64", "float16", "bfloat16")


# ==========================================================================================
# The child: runs cases, reports outcomes. Imports torch only here and in the tests.
# ==========================================================================================
def _tensor(spec, device, seed):
    import torch
    shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
    numel = math.prod(shape)
    if device != "meta" and numel > 10**6:  # a generator bug, not a kernel's: never allocate that
        raise ValueError(f"the case asks for a tensor of {numel} elements")
    if device == "meta" or numel == 0:  # no data (huge dimensions come only with numel 0)
        base = torch.empty(shape[:-1] + [2 * shape[-1]] if spec.get("strided") else shape, dtype=dtype,
                           device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        wide = shape[:-1] + [2 * shape[-1]] if spec.get("strided") else shape
        base = torch.randn(wide, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return base[..., ::2] if spec.get("strided") else base


def _outcome(fn):
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the test sorts the errors
        return {"error": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else ""}
    outs = out if isinstance(out, tuple) else (out,)
    return {"shapes": [[list(t.shape), str(t.dtype)] for t in outs], "value": outs}


def _close(got, want, what):
    """'' when got (a kernel) matches want (float64 reference) to a loose check-level tolerance."""
    import torch
    got = got.double().cpu()
    want = want.double().cpu()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return ""
    err = (got - want).abs().max().item()
    tol = 2e-2 * max(1.0, want.abs().max().item())  # float16 / bfloat16 inputs included
    return "" if err <= tol and not torch.isnan(got).any() else f"{what}: max error {err:.3g} > {tol:.3g}"


def _reference_check(case, args, value):
    """'' when a valid case's result matches the reference, else what differs."""
    import torch

    from minihires.ops import reference as ref
    op = case["op"]
    if op in STITCH_OPS + SPLIT_OPS:
        flat = [int(g) for g in case["grids"]]
        pairs = list(zip(flat[::2], flat[1::2]))
        if op in STITCH_OPS:
            want = ref.stitch(args[0], pairs)
        else:
            want = ref.split(args[0], pairs, int(case["h"]), int(case["w"]))
        return "" if torch.equal(value[0], want) else f"{op} differs from the reference"
    q, k, v = (args[i] for i in ((0, 1, 2) if op in FORWARD_OPS else (1, 2, 3)))
    window, scale = (int(case["kh"]), int(case["kw"])), case["scale"]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = ref.window_attn_pool(q64, k64, v64, window, scale)
    if op in FORWARD_OPS:
        return _close(value[0], out64, "out")
    grads = torch.autograd.grad(out64, (q64, k64, v64), args[0].double())
    return "; ".join(filter(None, (_close(a, b, n) for a, b, n in zip(value, grads, ("dq", "dk", "dv")))))


def _lse64(q, k, kh, kw, scale):
    """float64 log-sum-exp of each query's window logits: a valid lse for the backward."""
    import torch
    n, hq, wq, nh, d = q.shape
    kwin = k.double().reshape(n, hq, kh, wq, kw, nh, d).permute(0, 1, 3, 5, 2, 4, 6)  # (N, Hq, Wq, nh, kh, kw, d)
    kwin = kwin.reshape(n, hq, wq, nh, kh * kw, d)                                     # (N, Hq, Wq, nh, T, d)
    return (torch.einsum("nijhd,nijhtd->nijht", q.double(), kwin) * scale).logsumexp(-1)


def _args(case, device):
    """The op's positional arguments for `device` ('cpu', 'cuda' or 'meta')."""
    t = {name: _tensor(spec, device, seed) for seed, (name, spec) in enumerate(sorted(case["tensors"].items()))}
    op = case["op"]
    if op in STITCH_OPS:
        return [t["slices"], case["grids"]]
    if op in SPLIT_OPS:
        return [t["packed"], case["grids"], case["h"], case["w"]]
    tail = [case["kh"], case["kw"], case["scale"]]
    if op in FORWARD_OPS:
        return [t["q"], t["k"], t["v"], *tail]
    lse = t["lse"]
    if case.get("true_lse") and device != "meta" and lse.numel():  # a valid case: the forward's lse
        lse = _lse64(t["q"], t["k"], case["kh"], case["kw"], case["scale"]).to(device=device, dtype=lse.dtype)
    return [t["grad_out"], t["q"], t["k"], t["v"], lse, *tail]


def run_case(case):
    import torch
    if case["op"] == "__crash__":  # the harness's own test: die as a bad kernel would
        os.kill(os.getpid(), signal.SIGSEGV)
    op = getattr(torch.ops.minihires, case["op"])
    result = {}
    for where in (case["device"], "meta"):
        try:
            args = _args(case, where)
        except Exception as e:  # noqa: BLE001
            return {"setup_error": f"{type(e).__name__}: {e}"}
        res = _outcome(lambda: op(*args))
        if where != "meta" and "value" in res:
            try:
                res["match"] = _reference_check(case, args, res["value"])
            except Exception as e:  # noqa: BLE001
                res["match"] = f"the reference raised {type(e).__name__}: {e}"
        res.pop("value", None)
        result[where if where == "meta" else "device"] = res
    return result


def child_main():
    import torch

    import minihires.ops  # noqa: F401  (registers the ops and their fake kernels)
    torch.set_num_threads(1)
    print("READY", flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        print("RESULT " + json.dumps(run_case(case)), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child_main()
    sys.exit(0)


# ==========================================================================================
# The parent: the tests.
# ==========================================================================================
import pytest  # noqa: E402
from conftest import devices, examples  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALL_OPS = ("stitch", "split", "window_attn_pool", "window_attn_pool_backward")
CASE_TIMEOUT = 120  # seconds; the first case also waits for the child's imports


class Worker:
    """A child Python that runs cases one at a time; a fresh one replaces a dead child."""

    def __init__(self):
        self.proc = None

    def _start(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        if self._next_line() != "READY":
            raise RuntimeError(f"the fuzz child did not start: {self._stderr_tail()}")

    @staticmethod
    def _read(proc, lines):
        for line in proc.stdout:
            if line.startswith(("READY", "RESULT ")):
                lines.put(line.rstrip("\n"))
        lines.put(None)  # EOF: the child is gone

    def _next_line(self):
        try:
            return self.lines.get(timeout=CASE_TIMEOUT)
        except queue.Empty:
            return "TIMEOUT"

    def _stderr_tail(self):
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self._next_line()
        if line is not None and line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line == "TIMEOUT":
            self.proc.kill()
        rc = self.proc.wait()
        died = f"hung for {CASE_TIMEOUT} s" if line == "TIMEOUT" else (
            f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}")
        return {"died": died, "stderr": self._stderr_tail()}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# --- the contract, read independently of the code under test -------------------------------
def _is_float(x):
    return isinstance(x, float)


def _grid_problems(grids):
    """Problems of flat grids. The C++ checks report the first bad image in order (a size
    that is not positive, or a running slice count past int64); the Python checks look at
    every size first: either may be named."""
    ints = [int(g) for g in grids]
    if len(ints) % 2:
        return ["pairs"]
    out, total = [], 0
    for r, c in zip(ints[::2], ints[1::2]):
        if r <= 0 or c <= 0:
            return out + ["must be positive"]
        total += r * c
        if total > INT64_MAX and not out:
            out.append("more than int64 holds")
    return out


def _slice_count(grids):
    ints = [int(g) for g in grids]
    return sum(r * c for r, c in zip(ints[::2], ints[1::2]))


def problems(case) -> list[str]:
    """Regexes, one for each problem of the case; [] when the call is valid. A kernel
    reports the first problem it finds, so its message must match one of them."""
    op, t = case["op"], case["tensors"]
    for name in ("grids", "h", "w", "kh", "kw"):  # torch's own argument parser: int / int[]
        value = case.get(name)
        if _is_float(value) or (isinstance(value, list) and any(map(_is_float, value))):
            return [f"argument '{name}'"]
    out = []
    for spec in t.values():
        if spec["dtype"] not in FLOATS:
            out.append("float32, float64, float16 or bfloat16")
    if op in STITCH_OPS + SPLIT_OPS:
        grid = _grid_problems(case["grids"])
        out += grid
    if op in STITCH_OPS:
        shape = t["slices"]["shape"]
        if len(shape) != 4:
            return out + [r"must be \[N, h, w, C\]"]
        N, h, w, _ = shape
        if h <= 0 or w <= 0:
            out.append("must be positive")
        elif not grid:
            if _slice_count(case["grids"]) != N:
                out.append(f"hold {_slice_count(case['grids'])} slices")
            elif N * h * w > INT64_MAX:
                out.append("more than int64 holds")
        return out
    if op in SPLIT_OPS:
        shape = t["packed"]["shape"]
        if len(shape) != 2:
            out.append(r"must be \[rows, C\]")
        h, w = int(case["h"]), int(case["w"])
        if h <= 0 or w <= 0:
            return out + ["must be positive"]
        if len(shape) == 2 and h * w * max(shape[1], 1) > INT64_MAX:
            out.append("a slice of h x w x C")
        if not grid:
            rows = _slice_count(case["grids"]) * h * w
            if rows > INT64_MAX:
                out.append("more than int64 holds")
            elif len(shape) == 2 and shape[0] != rows:
                out.append(f"packed has {shape[0]} rows")
        return out
    # window_attn_pool and its backward
    q, k, v = t["q"], t["k"], t["v"]
    kh, kw = int(case["kh"]), int(case["kw"])
    if kh <= 0 or kw <= 0:
        out.append("must be positive")
    elif kh * kw > INT64_MAX:
        out.append("keys")
    if not math.isfinite(case["scale"]):
        out.append("scale must be finite")
    for name, spec in (("q", q), ("k", k), ("v", v)):
        if len(spec["shape"]) != 5:
            return out + [rf"{name} must be \[N, H, W, heads, d\]"]
    if k["shape"] != v["shape"]:
        out.append("same shape")
    if not q["dtype"] == k["dtype"] == v["dtype"]:
        out.append("share a dtype")
    n, hq, wq, nh, d = q["shape"]
    if d <= 0:
        out.append("head size d")
    if k["shape"][0] != n:
        out.append(f"q has N = {n}")
    if k["shape"][3] != nh or k["shape"][4] != d:
        out.append("q has heads, d")
    if kh > 0 and kw > 0 and (k["shape"][1] != hq * kh or k["shape"][2] != wq * kw):
        out.append("does not tile")
    if op in BACKWARD_OPS:
        g, lse = t["grad_out"], t["lse"]
        if g["shape"] != q["shape"]:
            out.append("grad_out must have")
        elif g["dtype"] != q["dtype"]:
            out.append("grad_out must match")
        acc = "float64" if q["dtype"] == "float64" else "float32"
        if lse["shape"] != q["shape"][:4] or lse["dtype"] != acc:
            out.append("lse must be")
    return out


def check_result(case, result):
    """Asserts the outcome of one case: no dead child, errors that name the problem, results
    that match the reference, and meta (fake) kernels that agree with the device kernels."""
    assert "died" not in result, f"{case}\nthe child process {result['died']}:\n{result['stderr']}"
    assert "setup_error" not in result, f"{case}: the test could not build its inputs: {result['setup_error']}"
    want, dev, meta = problems(case), result["device"], result["meta"]
    if want:
        assert "error" in dev, f"{case}\ninvalid input accepted (expected an error about {want})"
        assert dev["error"] in ("RuntimeError", "ValueError") and any(re.search(p, dev["message"]) for p in want), \
            f"{case}\n{dev['error']}: {dev['message']!r} does not name any of {want}"
    else:
        assert "error" not in dev, f"{case}\nvalid input rejected: {dev.get('error')}: {dev.get('message')}"
        assert dev["match"] == "", f"{case}\n{dev['match']}"
    assert ("error" in meta) == ("error" in dev), \
        f"{case}\nthe fake kernel {'rejects' if 'error' in meta else 'accepts'} what the kernel " \
        f"{'accepts' if 'error' not in dev else 'rejects'}: meta {meta}, kernel {dev}"
    if "error" in meta:
        assert meta["error"] in ("RuntimeError", "ValueError", "TypeError") and \
            any(re.search(p, meta["message"]) for p in want), f"{case}\nfake kernel: {meta}"
    else:
        assert meta["shapes"] == dev["shapes"], f"{case}\nfake kernel shapes {meta['shapes']} != {dev['shapes']}"


# --- case generators ----------------------------------------------------------------------
def tensor(shape, dtype="float32", strided=False):
    return {"shape": list(shape), "dtype": dtype, "strided": strided}


def constructible(shape) -> bool:
    """Whether torch can make a tensor of this shape: its strides (zero sizes count as one)
    must fit int64, even when it holds no elements."""
    return math.prod(max(s, 1) for s in shape) * 2 <= INT64_MAX


HUGE = st.one_of(st.sampled_from([2**31, 2**32 + 1, 2**62, 2**62 + 1, 2**63 - 2, INT64_MAX,
                                  3458764513820540928, 8070450532247928834]),
                 st.integers(2**31, INT64_MAX))
GRID_ENTRY = st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(-2, 0), HUGE,
                       st.sampled_from([1.5, 2.0, True]))
DTYPE = st.one_of(st.sampled_from(FLOATS), st.just("int32"))


def wrapping_pairs(draw, target):
    """Grids whose r*c products and running sum, computed modulo 2^64, come to `target`
    (so int64 arithmetic that wraps would pass the count check)."""
    if draw(st.booleans()):  # one product wraps: 2^j * (2^(64-j) + t) = 2^64 + 2^j t
        j = draw(st.integers(2, 6))
        if target % 2**j == 0 and target > 0:
            pairs = [(2**j, 2**(64 - j) + target // 2**j)]
            return pairs if pairs[0][1] <= INT64_MAX else [(1, target)]
    a, b = draw(HUGE), draw(HUGE)
    last = (target - a - b) % 2**64
    if 0 < last <= INT64_MAX:
        return draw(st.permutations([(1, a), (1, b), (1, last)]))
    return [(1, a), (1, b)]


@st.composite
def stitch_cases(draw, device):
    op = draw(st.sampled_from(STITCH_OPS))
    kind = draw(st.sampled_from(["valid", "wrap", "random"]))
    h, w, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 4))
    if kind == "valid":
        pairs = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), max_size=3))
        N = sum(r * c for r, c in pairs)
        spec = tensor([N, h, w, C], draw(st.sampled_from(FLOATS)), draw(st.booleans()))
    elif kind == "wrap":
        N = draw(st.integers(1, 6))
        pairs = wrapping_pairs(draw, N)
        spec = tensor([N, h, w, C], draw(st.sampled_from(FLOATS)))
    else:
        grids = draw(st.lists(GRID_ENTRY, max_size=7))
        N = draw(st.one_of(st.integers(0, 6), st.just(min(max(_slice_count(grids), 0), 6))))
        shape = [N, draw(st.one_of(st.integers(0, 3), HUGE)), draw(st.one_of(st.integers(0, 3), HUGE)), C]
        if draw(st.integers(0, 9)) == 0:
            shape = shape[:3]
        if any(s > 64 for s in shape):  # a huge dimension: no data (numel 0)
            shape[0 if draw(st.booleans()) else -1] = 0
        assume(constructible(shape))
        return {"op": op, "device": device, "grids": grids, "tensors": {"slices": tensor(shape, draw(DTYPE))}}
    return {"op": op, "device": device, "grids": [x for p in pairs for x in p], "tensors": {"slices": spec}}


@st.composite
def split_cases(draw, device):
    op = draw(st.sampled_from(SPLIT_OPS))
    kind = draw(st.sampled_from(["valid", "wrap_count", "wrap_rows", "random"]))
    h, w, C = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 4))
    if kind == "valid":
        pairs = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), max_size=3))
        rows = sum(r * c for r, c in pairs) * h * w
        return {"op": op, "device": device, "grids": [x for p in pairs for x in p], "h": h, "w": w,
                "tensors": {"packed": tensor([rows, C], draw(st.sampled_from(FLOATS)), draw(st.booleans()))}}
    if kind == "wrap_count":  # the slice count wraps to N
        N = draw(st.integers(1, 4))
        pairs = wrapping_pairs(draw, N)
        return {"op": op, "device": device, "grids": [x for p in pairs for x in p], "h": h, "w": w,
                "tensors": {"packed": tensor([N * h * w, C])}}
    if kind == "wrap_rows":  # N*h*w wraps to a small row count: h*w = 2^64 + small
        j = draw(st.integers(2, 6))
        small = draw(st.integers(1, 3))
        hh, ww = 2**j, 2**(64 - j) + small
        if draw(st.booleans()):
            hh, ww = ww, hh
        return {"op": op, "device": device, "grids": [1, 1], "h": hh, "w": ww,
                "tensors": {"packed": tensor([(hh * ww) % 2**64, C])}}
    grids = draw(st.lists(GRID_ENTRY, max_size=7))
    hh = draw(st.one_of(st.integers(-1, 3), HUGE, st.just(2.0)))
    ww = draw(st.one_of(st.integers(-1, 3), HUGE, st.just(True)))
    rows = draw(st.one_of(st.integers(0, 30), st.just(max(_slice_count(grids), 0) * h * w % 31)))
    shape = [rows, C] if draw(st.integers(0, 9)) else [rows, 1, C]
    return {"op": op, "device": device, "grids": grids, "h": hh, "w": ww,
            "tensors": {"packed": tensor(shape, draw(DTYPE))}}


@st.composite
def window_cases(draw, device):
    backward = draw(st.booleans())
    op = draw(st.sampled_from(BACKWARD_OPS if backward else FORWARD_OPS))
    n, hq, wq = draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(0, 2))
    kh, kw, nh, d = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(("float32", "float64")))
    scale = draw(st.floats(0.1, 2.0))
    kshape = [n, hq * kh, wq * kw, nh, d]
    kind = draw(st.sampled_from(["valid", "wrap", "random"]))
    q, k, v = tensor([n, hq, wq, nh, d], dtype, draw(st.booleans())), tensor(kshape, dtype), tensor(kshape, dtype)
    if kind == "wrap":  # Hq*kh or Wq*kw = 2^64 + (what k has)
        j = draw(st.integers(2, 4))
        hq, kh = 2**j, 2**(64 - j) + 1  # hq*kh = 2^64 + hq
        q["shape"][1] = hq
        k["shape"][1] = v["shape"][1] = (hq * kh) % 2**64
        if draw(st.booleans()):
            q["shape"], k["shape"], v["shape"] = ([s[0], s[2], s[1], s[3], s[4]] for s in (q["shape"], k["shape"],
                                                                                        v["shape"]))
            kh, kw = kw, kh
    elif kind == "random":
        what = draw(st.sampled_from(["kh", "kw", "scale", "d", "shape", "dtype", "dims"]))
        if what in ("kh", "kw"):
            bad = draw(st.one_of(st.integers(-2, 0), HUGE, st.just(2.0)))
            kh, kw = (bad, kw) if what == "kh" else (kh, bad)
        elif what == "scale":
            scale = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        elif what == "d":
            for s in (q, k, v):
                s["shape"][4] = 0
        elif what == "shape":
            t, i = draw(st.sampled_from([q, k, v])), draw(st.integers(0, 4))
            t["shape"][i] = draw(st.integers(0, 4))
        elif what == "dtype":
            draw(st.sampled_from([q, k, v]))["dtype"] = draw(st.sampled_from(FLOATS + ("int32",)))
        else:
            t = draw(st.sampled_from([q, k, v]))
            t["shape"] = t["shape"][:4]
    tensors = {"q": q, "k": k, "v": v}
    case = {"op": op, "device": device, "kh": kh, "kw": kw, "scale": scale, "tensors": tensors}
    if backward:
        acc = "float64" if dtype == "float64" else "float32"
        tensors["grad_out"] = tensor(q["shape"], q["dtype"], draw(st.booleans()))
        tensors["lse"] = tensor(q["shape"][:4], acc)
        if kind == "random" and draw(st.booleans()):
            what = draw(st.sampled_from(["g_shape", "g_dtype", "lse_shape", "lse_dtype"]))
            if what == "g_shape":
                tensors["grad_out"]["shape"] = tensors["grad_out"]["shape"][:4] + [7]
            elif what == "g_dtype":
                tensors["grad_out"]["dtype"] = "float16"
            elif what == "lse_shape":
                tensors["lse"]["shape"] = tensors["lse"]["shape"][:3] + [5]
            else:
                tensors["lse"]["dtype"] = "float16" if acc == "float32" else "float32"
        case["true_lse"] = not problems(case)  # a valid call gets the lse its forward would give
    return case


# --- the tests ----------------------------------------------------------------------------
# Sizes whose products or running sums wrap around int64 to a plausible small number, and
# non-finite scales. Arithmetic without overflow checks lets such input past the checks, into
# kernels that then index outside their buffers: a crash, a corrupted heap, or rows read from
# outside the input returned without an error.
WRAPPING = [9223372036854775806, 9223372036854775806, 1, 1]  # sum of r*c wraps to 5
NAMED = [
    {"op": "stitch", "grids": [1, 3458764513820540928, 2, 3458764513820540928, 1, 8070450532247928834],
     "tensors": {"slices": tensor([2, 3, 1, 1])}},
    {"op": "window_attn_pool_naive", "kh": 2**62 + 1, "kw": 1, "scale": 1.0,
     "tensors": {n: tensor([1, 4, 1, 1, 1]) for n in "qkv"}},
    {"op": "stitch", "grids": WRAPPING, "tensors": {"slices": tensor([5, 2, 2, 8])}},
    {"op": "stitch_naive", "grids": WRAPPING, "tensors": {"slices": tensor([5, 2, 2, 8])}},
    {"op": "split", "grids": WRAPPING, "h": 2, "w": 2, "tensors": {"packed": tensor([20, 8])}},
    {"op": "split_naive", "grids": WRAPPING, "h": 2, "w": 2, "tensors": {"packed": tensor([20, 8])}},
    {"op": "split", "grids": [1, 1], "h": 4, "w": 2**62 + 1, "tensors": {"packed": tensor([4, 3])}},
    {"op": "window_attn_pool", "kh": 2**62 + 1, "kw": 1, "scale": 1.0,
     "tensors": {n: tensor([1, 4, 1, 1, 1]) for n in "qkv"}},
    {"op": "window_attn_pool_backward", "kh": 1, "kw": 2**62 + 1, "scale": 1.0, "true_lse": False,
     "tensors": {**{n: tensor([1, 1, 4, 1, 1]) for n in ("q", "k", "v", "grad_out")},
                 "lse": tensor([1, 1, 4, 1])}},
    {"op": "window_attn_pool", "kh": 2, "kw": 2, "scale": math.nan,
     "tensors": {"q": tensor([1, 1, 1, 1, 2]), "k": tensor([1, 2, 2, 1, 2]), "v": tensor([1, 2, 2, 1, 2])}},
    {"op": "window_attn_pool_backward_naive", "kh": 2, "kw": 2, "scale": -math.inf, "true_lse": False,
     "tensors": {"q": tensor([1, 1, 1, 1, 2]), "k": tensor([1, 2, 2, 1, 2]), "v": tensor([1, 2, 2, 1, 2]),
                 "grad_out": tensor([1, 1, 1, 1, 2]), "lse": tensor([1, 1, 1, 1])}},
]

# Edge shapes (h = 0, d = 0, N = 0, sizes past int64) on which the fake (meta) kernels and the
# C++ kernels must make the same decision.
EDGES = [
    {"op": "stitch", "grids": [2, 1], "tensors": {"slices": tensor([2, 0, 3, 4])}},          # h = 0
    {"op": "stitch_naive", "grids": [], "tensors": {"slices": tensor([0, 3, 0, 4])}},        # N = 0, w = 0
    {"op": "stitch", "grids": [], "tensors": {"slices": tensor([0, 3, 4, 5])}},              # N = 0: valid
    {"op": "stitch", "grids": [-1, -2], "tensors": {"slices": tensor([2, 1, 1, 1])}},        # (-1)*(-2) = 2
    {"op": "stitch", "grids": [1, 2], "tensors": {"slices": tensor([2, 2**61, 2, 0])}},      # N*h*w = 2^63
    {"op": "stitch", "grids": [1, 2], "tensors": {"slices": tensor([2, 2**61, 0, 1])}},      # w = 0
    {"op": "stitch", "grids": [], "tensors": {"slices": tensor([0, 2**31, 2**31, 1])}},      # N = 0: 0 rows
    {"op": "split", "grids": [], "h": 2**62, "w": 2**62, "tensors": {"packed": tensor([0, 3])}},
    {"op": "split", "grids": [2, 2**62], "h": 1, "w": 1, "tensors": {"packed": tensor([0, 3])}},
    {"op": "window_attn_pool", "kh": 2, "kw": 2, "scale": 1.0,                                # d = 0
     "tensors": {"q": tensor([1, 1, 1, 1, 0]), "k": tensor([1, 2, 2, 1, 0]), "v": tensor([1, 2, 2, 1, 0])}},
    {"op": "window_attn_pool", "kh": 2, "kw": 3, "scale": 1.0,                                # N = 0: valid
     "tensors": {"q": tensor([0, 1, 1, 1, 2]), "k": tensor([0, 2, 3, 1, 2]), "v": tensor([0, 2, 3, 1, 2])}},
    {"op": "window_attn_pool_naive", "kh": 2**62, "kw": 4, "scale": 1.0,                      # kh*kw = 2^64
     "tensors": {"q": tensor([1, 0, 0, 1, 2]), "k": tensor([1, 0, 0, 1, 2]), "v": tensor([1, 0, 0, 1, 2])}},
    {"op": "window_attn_pool_backward", "kh": 2**62, "kw": 1, "scale": 1.0, "true_lse": True,  # Hq = 0: valid
     "tensors": {**{n: tensor([1, 0, 1, 1, 2]) for n in ("q", "k", "v", "grad_out")}, "lse": tensor([1, 0, 1, 1])}},
    {"op": "window_attn_pool_backward", "kh": 1, "kw": 1, "scale": 1.0, "true_lse": False,
     "tensors": {"q": tensor([1, 1, 1, 1, 2]), "k": tensor([1, 1, 1, 1, 2]), "v": tensor([1, 1, 1, 1, 2]),
                 "grad_out": tensor([1, 1, 1, 1, 2], "float64"), "lse": tensor([1, 1, 1, 1])}},
    {"op": "window_attn_pool_backward", "kh": 1, "kw": 1, "scale": 1.0, "true_lse": False,
     "tensors": {"q": tensor([1, 1, 1, 1, 2]), "k": tensor([1, 1, 1, 1, 2]), "v": tensor([1, 1, 1, 1, 2]),
                 "grad_out": tensor([1, 1, 1, 1, 2]), "lse": tensor([1, 1, 1, 1], "float64")}},
]


@pytest.mark.parametrize("device", devices(*ALL_OPS))
@pytest.mark.parametrize("case", NAMED + EDGES, ids=lambda c: c["op"])
def test_named_cases(worker, device, case):
    check_result(case, worker.run({**case, "device": device}))


@pytest.mark.parametrize("device", devices("stitch"))
@examples(4)
@given(data=st.data())
def test_fuzz_stitch(worker, device, data):
    case = data.draw(stitch_cases(device))
    check_result(case, worker.run(case))


@pytest.mark.parametrize("device", devices("split"))
@examples(4)
@given(data=st.data())
def test_fuzz_split(worker, device, data):
    case = data.draw(split_cases(device))
    check_result(case, worker.run(case))


@pytest.mark.parametrize("device", devices("window_attn_pool", "window_attn_pool_backward"))
@examples(4)
@given(data=st.data())
def test_fuzz_window_attn_pool(worker, device, data):
    case = data.draw(window_cases(device))
    check_result(case, worker.run(case))


def test_a_crash_fails_the_case_and_the_next_case_gets_a_fresh_child(worker):
    """The harness itself: a child killed by a signal is reported, not fatal to the suite."""
    died = worker.run({"op": "__crash__", "device": "cpu"})
    assert "killed by signal" in died["died"] or "exited" in died["died"]
    ok = worker.run({"op": "stitch", "device": "cpu", "grids": [1, 1], "tensors": {"slices": tensor([1, 1, 1, 1])}})
    check_result({"op": "stitch", "device": "cpu", "grids": [1, 1], "tensors": {"slices": tensor([1, 1, 1, 1])}}, ok)
    with pytest.raises(AssertionError, match="the child process"):
        check_result({}, died)
