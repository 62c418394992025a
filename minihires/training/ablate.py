"""The ablation variants of `python -m minihires ablate`, every one trained with the same budget.

    1 thumbnail only          no slices; all g*g thumbnail tokens (no compression), the
                              LLaVA-1.5-style baseline: low resolution, many tokens
    2 slices + avg pool       thumbnail + slices, each crop average-pooled by the window
    3 slices + SMS            average pooling replaced by the Self-Mining sampler
    4 slices + SMS + SRA      + SliceRestore adapters: HiRes-LLaVA
    5 overlap, no SRA         control: overlapping windows instead of restoring seams, at
                              native resolution (overlap OVERLAP: on the 2 x 2 canvas a
                              3 x 3 grid of slices with a half-slice stride, so every entity
                              lies whole in some window), at the price of more tokens
    6 whole canvas, no SRA    control: the ViT runs once over each image's whole canvas
                              (nothing is cut), then the same pieces, sampler and LLM: the
                              upper bound SRA aims at, at the price of ViT attention FLOPs

Every variant trains with the same steps, batch size, learning rate and seeds
(`minihires.training.train`), on the same data stream, and is scored on the same test
split; its ViT starts from the shipped encoder pretrained for its kind of view of the canvas
(`minihires.training.encoders`: no adapters, SliceRestore, or the whole canvas), or from
scratch with `ablate --vit-init none`. With several seeds the table shows means (and the
spread as min-max). Choices that are ours: the variant list (not the paper's tables); variant 1 keeps all thumbnail tokens;
variant 5's half-slice stride; variant 6.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from minihires.analysis import budget
from minihires.data.batches import data_config
from minihires.training import checkpoint as ckpt
from minihires.training import train as T
from minihires.training.encoders import resolve

OVERLAP = 0.5
VARIANTS = {
    "thumbnail": ("thumbnail only", dict(use_slices=False, compression="none")),
    "avg": ("slices + avg pool", dict(use_slices=True, use_sra=False, compression="avg")),
    "sms": ("slices + SMS", dict(use_slices=True, use_sra=False, compression="sms")),
    "sms+sra": ("slices + SMS + SRA", dict(use_slices=True, use_sra=True, compression="sms")),
    "overlap": (f"overlap {OVERLAP}, no SRA", dict(use_slices=True, use_sra=False,
                                                   compression="sms", overlap=OVERLAP)),
    "whole": ("whole canvas, no SRA", dict(use_slices=True, use_sra=False, compression="sms",
                                           whole_canvas=True)),
}
COLUMNS = [("accuracy", "overall"), ("recognition", "recog."), ("position", "position"),
           ("counting", "counting"), ("on_seam", "on-seam"), ("off_seam", "off-seam"),
           ("discrepancy", "discrep.")]
CONTINUITY_COLUMNS = [("continuity_on", "cont. on-seam"), ("continuity_off", "cont. off-seam"),
                      ("continuity_gap", "cont. gap")]


def flat(m: dict) -> dict:
    """One run's metrics, with the continuity task's seam sides as columns."""
    cont = (m.get("seam") or {}).get("continuity") or {}
    return {**m, "continuity_on": cont.get("on_seam"), "continuity_off": cont.get("off_seam"),
            "continuity_gap": cont.get("discrepancy")}


SWITCHES = ("use_slices", "use_sra", "compression", "overlap", "crop_embedding", "whole_canvas",
            "sra_layers", "thumbnail_filter", "token_shift")   # compared through the model
MACHINE = ("device", "threads", "vit_init")   # where a run ran or its file lay, not what it
                                              # is (the file's SHA-256 is compared)


def finished_run(tc: T.TrainConfig, run_dir) -> dict | None:
    """The metrics of `run_dir` if it is a finished run of exactly `tc` (so `ablate --resume`
    reuses it), None if it has no metrics yet (it is resumed or started); ValueError naming
    the fields when the folder holds another run."""
    run_dir = Path(run_dir)
    tc = resolve(tc)                                          # "bundled": that file's SHA-256
    model_cfg, saved, saved_data = ckpt.load_config(run_dir)
    want, default = dataclasses.asdict(tc), dataclasses.asdict(T.TrainConfig())
    differ = sorted(k for k in want if k not in SWITCHES + MACHINE + ("tasks",)
                    and saved.get(k, default[k]) != want[k])   # missing: saved before the field
    built = tc.model_config()
    built.image_token_index = model_cfg.image_token_index     # set from the run's tokenizer
    T.ignore_unused_sra_layers(built, model_cfg)
    if built != model_cfg:
        differ.append("model")
    tasks = T.run_data_config(tc, built).tasks
    if saved_data.tasks != tasks:                             # compared as the runs drew them
        differ.append("tasks")
    if differ:
        raise ValueError(f"{run_dir} is another run than this ablation's: "
                         f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}")
    if not (run_dir / ckpt.METRICS).is_file():
        return None
    return json.loads((run_dir / ckpt.METRICS).read_text())


def variant_config(tc: T.TrainConfig, key: str, **changes) -> T.TrainConfig:
    """`tc` switched to variant `key`; tc.sra_layers applies to the variants with SRA only
    (the others keep the preset's, which they do not use)."""
    switches = VARIANTS[key][1]
    sra = tc.sra_layers if switches.get("use_sra") else None
    return dataclasses.replace(tc, sra_layers=sra, **switches, **changes)


def vit_gflops(tc: T.TrainConfig, key: str) -> float:
    """ViT (+ SRA) GFLOPs per EntityGrid-QA image for variant `key` (`budget`'s formulas)."""
    cfg = variant_config(tc, key).model_config()
    data_cfg = data_config(cfg)
    row = budget.budget(data_cfg.width, data_cfg.height, cfg)[-1]      # the HiRes-LLaVA row
    return row.vit / 1e9


def encoder_id(encoder: tuple[str, str] | None) -> str | None:
    """'vit-sra.pt sha256:0123abcd...' for the (path, SHA-256) of the weights a variant started
    from, None for none: names the file without this machine's folders, and tells two files
    of one name apart."""
    if encoder is None:
        return None
    return f"{Path(encoder[0]).name} sha256:{encoder[1][:16]}"


def summary(results: dict[str, list[dict]], seeds: list[int], tc: T.TrainConfig,
            encoders: dict[str, tuple[str, str] | None] | None = None) -> dict:
    """What `ablate` writes as JSON beside its table: per variant, the encoder it started
    from (`encoder_id`) and each seed's figures."""
    keys = [k for k, _ in COLUMNS + CONTINUITY_COLUMNS] + ["continuity", "visual_tokens",
                                                           "train_time_s", "steps", "eval_n"]
    encoders = encoders or {}
    model_cfg = tc.model_config()                 # the values the runs used, not None
    tasks = T.run_data_config(tc, model_cfg).tasks
    return {"seeds": seeds, "tasks": list(tasks), "thumbnail_filter": model_cfg.thumbnail_filter,
            "token_shift": model_cfg.llama.token_shift,
            "variants": {key: {"name": VARIANTS[key][0], "vit_gflops": vit_gflops(tc, key),
                               "vit_init": encoder_id(encoders.get(key)),
                               "runs": [{k: flat(r).get(k) for k in keys} for r in runs]}
                         for key, runs in results.items()}}


def _cell(values: list, signed: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    s = fmt.format(statistics.fmean(values))
    if len(values) > 1:
        s += f" ({min(values):.0f}-{max(values):.0f})"
    return s


def markdown_table(results: dict[str, list[dict]], tc: T.TrainConfig, seeds: list[int],
                   encoders: dict[str, tuple[str, str] | None] | None = None) -> str:
    """results: variant key -> that variant's metrics, one per seed; encoders: variant key ->
    (path, SHA-256) of the weights its vision tower started from (None: from scratch)."""
    results = {k: [flat(r) for r in runs] for k, runs in results.items()}
    cont = any(r.get("continuity") is not None for runs in results.values() for r in runs)
    columns = COLUMNS + (CONTINUITY_COLUMNS if cont else [])
    head = ["variant"] + [c[1] for c in columns] + ["visual tokens", "ViT GFLOPs", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in results.items():
        row = [VARIANTS[key][0]] + [_cell([r.get(k) for r in runs], k.endswith(("discrepancy", "gap")))
                                    for k, _ in columns]
        row += [str(runs[0]["visual_tokens"]), f"{vit_gflops(tc, key):.3g}",
                f"{statistics.fmean(r['train_time_s'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    sra = tc.sra_layers and any(VARIANTS[k][1].get("use_sra") for k in results)
    model_cfg = tc.model_config()                 # the values the runs used, not None
    lines.append(f"EntityGrid-QA test split, n={tc.eval_n}; accuracy in %, discrepancy = off-seam "
                 f"minus on-seam in points. Each variant: preset {tc.preset}, {tc.steps} steps x "
                 f"{tc.batch_size} images x {tc.turns} questions, lr {tc.lr} "
                 f"(ViT encoder x {tc.vision_lr_scale}), seeds {', '.join(map(str, seeds))}"
                 f"; tasks {', '.join(T.run_data_config(tc, model_cfg).tasks)}"
                 f"; thumbnail {model_cfg.thumbnail_filter}"
                 f"; LLM token shift {model_cfg.llama.token_shift}"
                 f"{'; SRA after ViT blocks ' + ', '.join(map(str, tc.sra_layers)) if sra else ''}"
                 f"{' (mean, min-max)' if len(seeds) > 1 else ''}.")
    started = {k: Path(f[0]).name for k, f in (encoders or {}).items() if f}
    if started:
        rest = "; the others from scratch" if len(started) < len(results) else ""
        lines.append("Vision towers from `pretrain-vit` weights: " + "; ".join(
            f"{VARIANTS[k][0]}: {name}" for k, name in started.items()) + rest + ".")
    return "\n".join(lines)
