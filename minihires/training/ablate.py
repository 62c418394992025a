"""`python -m minihires ablate`: the ablation table, every variant trained with the same budget.

    1 thumbnail only          no slices; all g*g thumbnail tokens (no compression), the
                              LLaVA-1.5-style baseline: low resolution, many tokens
    2 slices + avg pool       thumbnail + slices, each crop average-pooled by the window
    3 slices + SMS            average pooling replaced by the Self-Mining sampler
    4 slices + SMS + SRA      + SliceRestore adapters: HiRes-LLaVA
    5 overlap, no SRA         control: slices overlap by OVERLAP instead of restoring seams

Every variant trains from scratch with the same steps, batch size, learning rate and seeds
(`minihires.train`), on the same data stream, and is scored on the same test split. With
several seeds the table shows means (and the spread as min-max). Choices that are ours:
the variant list follows the issue, not the paper's tables; variant 1 keeps all thumbnail
tokens; variant 5 uses overlap 0.25, for which `slicing` shrinks the 2 x 2 canvas to
56 px before cutting (that resampling blurs the 1-pixel patterns too, so the control
measures overlap and resampling together).
"""
from __future__ import annotations

import statistics

from minihires.training import train as T

OVERLAP = 0.25
VARIANTS = {
    "thumbnail": ("thumbnail only", dict(use_slices=False, compression="none")),
    "avg": ("slices + avg pool", dict(use_slices=True, use_sra=False, compression="avg")),
    "sms": ("slices + SMS", dict(use_slices=True, use_sra=False, compression="sms")),
    "sms+sra": ("slices + SMS + SRA", dict(use_slices=True, use_sra=True, compression="sms")),
    "overlap": (f"overlap {OVERLAP}, no SRA", dict(use_slices=True, use_sra=False,
                                                   compression="sms", overlap=OVERLAP)),
}
COLUMNS = [("accuracy", "overall"), ("recognition", "recog."), ("position", "position"),
           ("counting", "counting"), ("on_seam", "on-seam"), ("off_seam", "off-seam"),
           ("discrepancy", "discrep.")]


def _cell(values: list, signed: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    s = fmt.format(statistics.fmean(values))
    if len(values) > 1:
        s += f" ({min(values):.0f}-{max(values):.0f})"
    return s


def markdown_table(results: dict[str, list[dict]], tc: T.TrainConfig, seeds: list[int]) -> str:
    """results: variant key -> that variant's metrics, one per seed."""
    head = ["variant"] + [c[1] for c in COLUMNS] + ["visual tokens", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in results.items():
        row = [VARIANTS[key][0]] + [_cell([r.get(k) for r in runs], k == "discrepancy")
                                    for k, _ in COLUMNS]
        row += [str(runs[0]["visual_tokens"]), f"{statistics.fmean(r['train_time_s'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"EntityGrid-QA test split, n={tc.eval_n}; accuracy in %, discrepancy = off-seam "
                 f"minus on-seam in points. Each variant: preset {tc.preset}, {tc.steps} steps x "
                 f"{tc.batch_size} images x {tc.turns} questions, lr {tc.lr} "
                 f"(ViT encoder x {tc.vision_lr_scale}), seeds {', '.join(map(str, seeds))}"
                 f"{' (mean, min-max)' if len(seeds) > 1 else ''}.")
    return "\n".join(lines)
