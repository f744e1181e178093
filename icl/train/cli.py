"""``icl-train --config CFG [--set key=value ...] --out DIR``: train or resume one run."""

from __future__ import annotations

from icl.config import cache_dir, data_root, load_config
from icl.errors import ArgumentParser, cli_entry
from icl.inputs import user_path
from icl.io import refuse_inputs
from icl.layout import RunLayout
from icl.metrics import CHANCE, ICL, IWL, STEP, TRAIN_ACC
from icl.train.loop import train


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="icl-train",
        description="Train one run of the ICL/IWL study; re-run the same command to resume.",
    )
    p.add_argument("--config", required=True, help="preset name (tiny, demo, paper) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.weight_decay=1e-3 (repeatable)")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress line (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = user_path(args.out, "--out")
    refuse_inputs(out, "--out", {"the data root": data_root(cfg), "the image cache": cache_dir(cfg)})
    row = train(cfg, out, progress=args.progress)
    if row:
        print(
            f"step {int(row[STEP])}: ICL {row[ICL]:.3f} (holdout, chance {CHANCE}), "
            f"IWL {row[IWL]:.3f}, train acc {row[TRAIN_ACC]:.3f}; metrics in {RunLayout(out).metrics}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
