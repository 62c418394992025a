"""`python experiments/step_cost.py`: what one training step of the main job costs, and where.

An experiment outside the package. It builds the model, data and optimizer exactly as
`python -m minihires train` does (the defaults, or --batch-size / --threads), runs --warmup
steps, then times --steps more, and prints:

    FLOPs      a step's forward + backward, counted by FlopCounterMode, per part of the model
               (vision tower, sampler, projector, language model) and per op, as `train`
               counts them (minihires.analysis.flops)
    phases     mean seconds a step spends making the batch, in the forward, the backward,
               clipping the gradient and in AdamW, and their shares
    forward    the forward's seconds per part of the model (forward hooks), with each part's
               achieved GFLOP/s against the float32 matmul peak measured in the same run
    ops        with --ops N: torch.profiler's N most expensive ops, over --steps more steps
               (--shapes: per op and input shapes, e.g. to find which layer a `mul` is)

Times on a shared machine are noisy; read the ratios. The step is train's own (same batches,
same optimizer groups), so the figures describe the main job, not a stand-in.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from minihires.analysis import flops
from minihires.cli.errors import ArgumentParser, command
from minihires.data import batches as data
from minihires.model import HiResLLaVA
from minihires.training.train import TrainConfig, build, lr_at, make_optimizer

PARTS = ("vision_tower", "sampler", "multi_modal_projector", "language_model")


def part_timer(model: torch.nn.Module) -> dict[str, list[float]]:
    """Forward seconds of each of PARTS, appended per call (forward pre/post hooks)."""
    seconds: dict[str, list[float]] = {p: [] for p in PARTS}
    for name in PARTS:
        module = getattr(model, name, None)
        if module is None:
            continue
        start = {}
        module.register_forward_pre_hook(lambda m, a, start=start: start.update(t=time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, name=name, start=start: seconds[name].append(time.perf_counter() - start["t"]))
    return seconds


@command
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python experiments/step_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--ops", type=int, default=0, metavar="N",
                   help="also print torch.profiler's N most expensive ops")
    p.add_argument("--shapes", action="store_true", help="with --ops: one row per op and input shapes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(batch_size=args.batch_size)
    model_cfg, data_cfg, tokenizer = build(tc)
    train_cfg = dataclasses.replace(data_cfg, max_entities=tc.train_max_entities)
    torch.manual_seed(tc.seed)
    model = HiResLLaVA(model_cfg)
    opt = make_optimizer(model, tc)
    model.train()
    peak = flops.matmul_peak()

    def batch_of(step):
        samples = data.train_samples(tc.seed, step, tc.batch_size, train_cfg)
        return data.make_batch(samples, tokenizer, model_cfg, tc.turns, train_cfg, tc.chat_turns)

    first = batch_of(0)
    with FlopCounterMode(display=False, custom_mapping=flops.CPU_ATTENTION) as counter:
        model(**first.kwargs())[1].backward()          # as flops.step_flops, keeping the ops
    total = counter.get_total_flops()
    by_module = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    by_op = counter.get_flop_counts()["Global"]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():                            # the forward alone, for per-part GFLOP/s
        fwd_by_module = flops.step_flops(lambda: model(**first.kwargs()))[1]

    def run_step(step: int) -> list[float]:
        """One training step as train runs it -> the seconds of each of its phases."""
        t = [time.perf_counter()]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc) * group["lr_scale"]
        batch = batch_of(step)
        t.append(time.perf_counter())
        _, loss = model(**batch.kwargs())
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        loss.item()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)]

    forward_of = part_timer(model)
    for step in range(args.warmup):
        run_step(step)
    for v in forward_of.values():
        v.clear()
    phases: dict[str, list[float]] = {k: [] for k in ("data", "forward", "backward", "clip", "optimizer")}
    for step in range(args.warmup, args.warmup + args.steps):
        for k, seconds in zip(phases, run_step(step)):
            phases[k].append(seconds)
    part_s = {name: statistics.fmean(v) for name, v in forward_of.items() if v}
    if args.ops:                                     # more steps, profiled (slower)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as profiler:
            for step in range(args.warmup + args.steps, args.warmup + 2 * args.steps):
                run_step(step)

    step_s = sum(statistics.fmean(v) for v in phases.values())
    print(f"step_cost: batch {tc.batch_size}, {torch.get_num_threads()} thread(s), "
          f"{args.steps} timed steps after {args.warmup}; float32 1024^2 matmul "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"\nFLOPs a step (forward + backward): {total / 1e9:.2f} G, "
          f"achieved {total / step_s / 1e9:.1f} GFLOP/s = {total / step_s / peak:.0%} of the matmul")
    for name in PARTS:
        f = by_module.get(f"HiResLLaVA.{name}", 0)
        print(f"  {name:<22}{f / 1e9:8.2f} G  {f / total:6.1%}")
    print("  by op: " + ", ".join(f"{op} {f / 1e9:.2f} G" for op, f in
                                  sorted(by_op.items(), key=lambda kv: -kv[1])))
    print(f"\nphases (mean s a step, share of {step_s:.3f} s):")
    for k, v in phases.items():
        print(f"  {k:<22}{statistics.fmean(v):8.3f}  {statistics.fmean(v) / step_s:6.1%}")
    fwd = statistics.fmean(phases["forward"])
    fwd_total = fwd_by_module["Global"]
    print(f"\nforward by part (mean s, share of the forward; GFLOP/s = of the matmul peak); "
          f"backward / forward = {statistics.fmean(phases['backward']) / fwd:.2f}")
    for name, s in part_s.items():
        f = fwd_by_module.get(f"HiResLLaVA.{name}", 0)
        print(f"  {name:<22}{s:8.3f}  {s / fwd:6.1%}   {f / s / 1e9:6.1f} GFLOP/s  {f / s / peak:5.0%}")
    other = fwd - sum(part_s.values())
    print(f"  {'(the rest: layout, loss)':<22}{other:8.3f}  {other / fwd:6.1%}   "
          f"{(fwd_total - sum(fwd_by_module.get(f'HiResLLaVA.{n}', 0) for n in PARTS)) / 1e9:.2f} GFLOP")
    if args.ops:
        print(f"\nops (torch.profiler, {args.steps} steps):")
        ops = profiler.key_averages(group_by_input_shape=args.shapes)
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
