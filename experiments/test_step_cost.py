"""The step-cost script runs and prints its four parts (FLOPs, phases, forward by part, ops).

Part of the suite: `python -m pytest` collects experiments/ too."""
import step_cost


def test_one_small_step_prints_every_part(capsys):
    assert step_cost.main(["--steps", "1", "--warmup", "0", "--batch-size", "1", "--threads", "1",
                           "--ops", "3", "--shapes"]) == 0
    out = capsys.readouterr().out
    for part in ("FLOPs a step", "by op: aten.mm", "phases", "backward / forward",
                 "language_model", "ops (torch.profiler"):
        assert part in out
