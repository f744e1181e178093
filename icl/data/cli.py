"""``icl-data``: inspect the data, build the cache, and look at what the model sees.

    icl-data info    [--config CFG] [--set k=v ...]
    icl-data prepare [--config CFG] [--set k=v ...]
    icl-data sample  --config CFG [--set k=v ...] --split train|icl|iwl|icl_train|flip_icl|ciwl -n N --out F.npz [--png F.png]
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from icl.config import MAX_ROWS, U32, Config, cache_dir, data_roots, load_config
from icl.data import load_data
from icl.data.evalsets import EVAL_SETS
from icl.data.omniglot import cache_paths, download, find_source, source_kind
from icl.errors import ArgumentParser, UserError, cli_entry
from icl.inputs import user_path
from icl.io import all_or_nothing, atomic_write, check_writable, refuse_inputs


def _add_config_args(p: ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", default=None if required else "paper", required=required,
                   help="preset name (tiny, demo, paper) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.num_classes=100 (repeatable)")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="icl-data", description="Omniglot data for the ICL/IWL study.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_config_args(sub.add_parser("info", help="show source, classes, split sizes and cache location"))
    _add_config_args(sub.add_parser("prepare", help="download or import Omniglot and build the cache"))
    s = sub.add_parser("sample", help="write sequences (and optionally a PNG of them)")
    _add_config_args(s, required=True)
    s.add_argument("--split", choices=("train", *EVAL_SETS), required=True,
                   help=f"train: training batch at step --step; {'/'.join(EVAL_SETS)}: the fixed evaluation sets")
    s.add_argument("-n", type=int, required=True, help="number of sequences")
    s.add_argument("--step", type=int, default=0, help="training step whose batch to draw (train split)")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--png", default=None, help="also draw the first sequences to this PNG")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.command == "info":
        return info(cfg)
    if args.command == "prepare":
        return prepare(cfg)
    config_file = Path(args.config) if Path(args.config).suffix in (".yaml", ".yml") else None
    return sample(cfg, args.split, args.n, args.step, args.out, args.png, config_file)


def info(cfg: Config) -> int:
    data = load_data(cfg)
    root = data.source.root
    s = data.split
    npy, _ = cache_paths(cache_dir(cfg), data.source, cfg.data.image_size)
    per = 8 if cfg.data.augment else 1
    print(f"source:            {data.source.describe()}")
    print(f"data root:         {root}")
    print(f"characters:        {data.bank.n_chars} x 20 drawers")
    print(f"classes:           {data.bank.n_classes} ({'x8 augmentation' if per > 1 else 'no augmentation'})")
    print(f"holdout:           {len(s.holdout_classes)} classes ({cfg.data.n_holdout} characters, split seed {cfg.data.split_seed})")
    print(f"training:          {s.num_classes} of {(data.bank.n_chars - cfg.data.n_holdout) * per} available")
    print(f"image size:        {cfg.data.image_size} px")
    print(f"cache:             {npy}")
    return 0


def prepare(cfg: Config) -> int:
    roots = data_roots(cfg)
    root = next((r for r in roots if source_kind(r)), roots[0])
    try:
        source = find_source(root)
        print(f"found {source.describe()}")
    except UserError:
        print(f"no Omniglot in {', '.join(map(str, roots))}; downloading with torchvision into {root} ...")
        source = download(root)
    data = load_data(cfg)
    npy, _ = cache_paths(cache_dir(cfg), source, cfg.data.image_size)
    print(f"cache ready: {npy} ({tuple(data.bank.images.shape)} uint8)")
    return 0


def sample(cfg: Config, split: str, n: int, step: int, out: str | Path, png: str | Path | None,
           config_file: Path | None = None) -> int:
    """Write the sequences (and their picture) together, or nothing: both outputs are checked
    before the data is loaded (never onto the dataset, its checksums, its cache or the config),
    and written as one :func:`all_or_nothing` group."""
    if not 1 <= n <= MAX_ROWS:
        raise UserError(f"-n must be in [1, {MAX_ROWS}] sequences, got {n}")
    if not 0 <= step < U32:
        raise UserError(f"--step must be in [0, 2^32), got {step}")
    if split != "train" and n > cfg.eval.n_sequences:
        raise UserError(f"-n {n} exceeds the {cfg.eval.n_sequences} sequences of the fixed evaluation "
                        f"set; raise eval.n_sequences")
    names = ("the data root", "a shared data root", "a shared data root beside the checkout")  # data_roots' order
    inputs = {**dict(zip(names, data_roots(cfg))), "the image cache": cache_dir(cfg), "the config": config_file}
    out = user_path(out, "--out")
    refuse_inputs(out, "--out", inputs)
    out = check_writable(out, "--out")
    if png is not None:
        png = user_path(png, "--png")
        refuse_inputs(png, "--png", inputs)
        png = check_writable(png, "--png")
        if png == out:
            raise UserError(f"--png and --out are the same file {out}; give two names")
    data = load_data(cfg)
    seqs = data.train_batch(step, n) if split == "train" else getattr(data.eval_sets, split)[:n]
    arrays = {
        "classes": seqs.classes.numpy(),
        "labels": seqs.labels.numpy(),
        "exemplars": seqs.exemplars.numpy(),
        "train_classes": data.split.train_classes,
        "holdout_classes": data.split.holdout_classes,
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    picture = draw_sequences(data, seqs, split, cfg) if png is not None else None
    with all_or_nothing():
        atomic_write(out, buf.getvalue())
        if png is not None:
            atomic_write(png, picture)
    print(f"wrote {n} {split} sequences to {out}")
    if png is not None:
        print(f"wrote {png}")
    return 0


def draw_sequences(data, seqs, split: str, cfg: Config, rows: int = 6) -> bytes:
    """A labelled grid of the first sequences: one row per sequence, query last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(seqs))
    images = data.bank.render(seqs.classes[:rows], seqs.exemplars[:rows]).cpu().numpy()
    fig, axes = plt.subplots(rows, 9, figsize=(9 * 1.25, rows * 1.45 + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(9):
            ax = axes[r, c]
            ax.imshow(images[r, c], cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            cls, lab = int(seqs.classes[r, c]), int(seqs.labels[r, c])
            if c == 8:
                ax.set_title(f"query\ncls {cls} → y={lab}?", fontsize=8, color="tab:red")
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red")
                    spine.set_linewidth(2)
            else:
                ax.set_title(f"cls {cls}\ny={lab}", fontsize=8)
    titles = {
        "train": f"training sequences (p_bursty={cfg.data.p_bursty}, {cfg.data.num_classes} classes)",
        "icl": "ICL holdout evaluation: 2-way 4-shot, labels 0/1 per sequence",
        "iwl": "IWL evaluation: query class never in context, fixed labels",
        "icl_train": "ICL on training classes: 2-way 4-shot, relabelled 0/1 per sequence",
        "flip_icl": "flip ICL: training classes, trained labels swapped within the sequence",
        "ciwl": "CIWL: query class not in context, its trained label on another exemplar",
    }
    fig.suptitle(f"{titles[split]} — 8 context (image, label) pairs, then the query", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
