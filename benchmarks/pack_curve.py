"""One cell of the study as far as a deadline allows: a preset trained as a pack of the study's
weight decays until ``--seconds`` are spent; its ICL/IWL curve as a CSV and a figure.

    python benchmarks/pack_curve.py --config paper [--set KEY=VALUE ...] --device cuda --seconds 120 \
        --out DIR --csv curve.csv [--png curve.png]

The models are the preset's own (seed, classes, schedule over its ``train.steps``), one per
weight decay of STUDY.md's grid (0, 3e-4, 1e-3, 3e-3, 1e-2), evaluated every ``--eval-every``
steps. Training stops after the last evaluation whose successor would end past the deadline
(predicted from the time between evaluations); the CSV is rewritten after every evaluation, so a
run cut short keeps its curve so far. The CSV has the columns of a sweep's ``results.csv`` (config keys, ``step``, the metrics), so
``analysis.plots.plot_curves`` draws it; the last line printed is the summary line
(``benchmarks/gpu_session.sh``'s science phase).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY  # noqa: E402
from analysis.plots import plot_curves  # noqa: E402
from icl.config import load_config  # noqa: E402
from icl.io import atomic_write  # noqa: E402
from icl.train import PackTrainingDiverged, train_packed  # noqa: E402

WEIGHT_DECAYS = (0.0, 3e-4, 1e-3, 3e-3, 1e-2)  # STUDY.md's grid


class Deadline(Exception):
    """Raised from the evaluation hook: the next evaluation would end past the deadline."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, required=True, help="time for training and evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: the preset's)")
    p.add_argument("--out", type=Path, required=True, help="folder for the K run directories")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--png", type=Path)
    args = p.parse_args(argv)
    base = [*args.overrides, f"train.device={args.device}"] + ([f"train.eval_every={args.eval_every}"] if args.eval_every else [])
    cfg0 = load_config(args.config, base)
    t = cfg0.train
    every = [*base, f"train.checkpoint_every={t.eval_every * max(1, t.checkpoint_every // t.eval_every)}"]
    cfgs = [load_config(args.config, [*every, f"optim.weight_decay={wd}"]) for wd in WEIGHT_DECAYS]
    rows: list[dict] = []
    rounds: list[float] = []  # when each evaluation round closed, seconds from the start
    state = {"expected": len(cfgs), "open": None}  # models per round; the step being reported
    start = time.perf_counter()

    def close_round() -> None:
        """Every model of the round has reported: keep the curve so far, stop if the next
        round would end past the deadline."""
        state["expected"] = sum(r["step"] == state["open"] for r in rows)
        state["open"] = None
        atomic_write(args.csv, pd.DataFrame(rows).to_csv(index=False).encode())
        rounds.append(time.perf_counter() - start)
        if 2 * rounds[-1] - (rounds[-2] if len(rounds) > 1 else 0.0) > args.seconds:
            raise Deadline

    def on_eval(k: int, row: dict, saved: object) -> None:
        if state["open"] is not None and row["step"] != state["open"]:
            close_round()  # a model diverged in the last round, which closes only now
        state["open"] = row["step"]
        rows.append({CLASS_KEY: cfgs[k].data.num_classes, WD_KEY: cfgs[k].optim.weight_decay,
                     SEED_KEY: cfgs[k].seed, **row})
        if sum(r["step"] == row["step"] for r in rows) == state["expected"]:
            close_round()

    stopped = "the preset's last step"
    try:
        train_packed(cfgs, [args.out / f"wd{wd:g}" for wd in WEIGHT_DECAYS], on_eval=on_eval, progress=False)
    except Deadline:
        stopped = "the deadline"
    except PackTrainingDiverged as e:
        stopped = f"divergence of models {sorted(e.diverged)}"
    elapsed = time.perf_counter() - start
    if not rows:
        print(f"science: no evaluation within {args.seconds:.0f} s ({args.config}, pack of {len(cfgs)})")
        return 0
    df = pd.DataFrame(rows)
    atomic_write(args.csv, df.to_csv(index=False).encode())
    steps = int(df["step"].max())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    if args.png:
        title = (f"{args.config} preset, {cfg0.data.num_classes} classes, one pack of {len(cfgs)} weight decays\n"
                 f"{steps:,} steps in {elapsed:.0f} s on {where}")
        fig = plot_curves(df, title=title)
        fig.savefig(args.png, dpi=110)
    last = df[df["step"] == steps].sort_values(WD_KEY)
    per_wd = ", ".join(f"{wd:g}: {icl:.2f}/{iwl:.2f}" for wd, icl, iwl in
                       zip(last[WD_KEY], last["icl_acc"], last["iwl_acc"]))
    print(f"science: {args.config} ({cfg0.data.num_classes} classes) as a pack of {len(cfgs)} weight decays, "
          f"{steps:,} steps in {elapsed:.0f} s ({steps * len(cfgs) / elapsed:,.0f} model-steps/s with evaluations; "
          f"stopped by {stopped}); ICL/IWL at step {steps:,} by weight decay: {per_wd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
