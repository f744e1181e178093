"""Head attribution over training, read back: heat maps, the top heads, composition, per-cell circuits.

``icl-analyze heads RUN...`` runs :func:`icl.circuits.update_run` on every run directory
(``heads.csv``, ``circuit.csv``, ``composition.csv`` next to its ``metrics.csv``) and draws, into
``RUN/circuits/``:

- ``heads_step_<step>.png``: per checkpoint, a layer x head heat map of every accuracy's change
  when that head alone is ablated;
- ``heads_over_training.png``: the clean accuracies, then the effect of the heads that matter
  most for ICL and IWL, checkpoint by checkpoint;
- ``composition.png``: the ICL curve above the K-composition of the previous-token -> induction
  pair (the pair named at the ICL peak, followed over training), with the largest and the median
  score over all pairs.

:func:`trial_circuits` condenses a run's files into what the report's "Circuits" section shows
per cell: the heads that carry ICL (at the ICL peak) and IWL (at the end), and when the circuit
forms and dissolves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis.fmt import cell_label, markdown_table
from analysis.load import CIWL, FLIP_CTX, FLIP_IWL, ICL, IWL, METRICS_CSV, SEED_KEY
from icl.errors import UserError

HEADS_CSV, CIRCUIT_CSV, COMPOSITION_CSV = "heads.csv", "circuit.csv", "composition.csv"
PLOTS_DIR = "circuits"
PANEL_METRICS = (ICL, "icl_train_acc", IWL, CIWL, FLIP_CTX, FLIP_IWL)
TITLES = {ICL: "ICL, holdout", "icl_train_acc": "ICL, train classes", IWL: "IWL", CIWL: "CIWL",
          FLIP_CTX: "flip ICL: context", FLIP_IWL: "flip ICL: weights", "icl_acc_all": "ICL, all labels"}


def head_name(layer: Any, head: Any) -> str:
    return f"L{int(layer)}H{int(head)}" if int(layer) >= 0 else "none"


# --------------------------------------------------------------------------- finding and reading runs


def find_runs(paths: Iterable[str | os.PathLike[str]], max_depth: int = 4) -> list[Path]:
    """Run directories (``config.yaml`` and ``checkpoints/``) at or below each path."""
    found: list[Path] = []
    for root in map(Path, paths):
        if (root / "config.yaml").is_file() and (root / "checkpoints").is_dir():
            found.append(root)
            continue
        base = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if len(here.parts) - base >= max_depth:
                dirnames[:] = []
            if "config.yaml" in filenames and "checkpoints" in dirnames:
                found.append(here)
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "checkpoint_"))]
    return sorted(dict.fromkeys(found))


def _read(path: Path) -> pd.DataFrame | None:
    """A table of the run (None if absent or empty); UserError naming it if it is not a CSV
    table with a numeric ``step`` column (a damaged file, or one written by something else)."""
    try:
        df = pd.read_csv(path) if path.is_file() else None
    except pd.errors.EmptyDataError:
        return None
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable CSV table ({type(e).__name__}); move it away "
                        f"(`icl-analyze heads {path.parent}` rewrites the heads tables)") from None
    if df is not None and ("step" not in df.columns or not pd.api.types.is_numeric_dtype(df["step"])):
        raise UserError(f"{path} has no numeric step column; move it away "
                        f"(`icl-analyze heads {path.parent}` rewrites the heads tables)")
    return df


def read_run(run: Path) -> dict[str, pd.DataFrame | None]:
    """A run's ``heads``, ``circuit``, ``composition`` and ``metrics`` tables (None if absent)."""
    return {"heads": _read(run / HEADS_CSV), "circuit": _read(run / CIRCUIT_CSV),
            "composition": _read(run / COMPOSITION_CSV), "metrics": _read(run / METRICS_CSV)}


def run_dirs(df: pd.DataFrame) -> dict[tuple[str, str], Path]:
    """``(experiment, trial_id) -> run directory`` for the trials of a results frame (from
    :func:`analysis.load.load_results`): a run source is its own directory; a sweep's trial
    ``tNNN`` is ``EXP/tNNN_<grid>/run``."""
    out: dict[tuple[str, str], Path] = {}
    for name, (kind, path) in (df.attrs.get("source_dirs") or {}).items():
        path = Path(path)
        trials = df.loc[df["experiment"] == name, "trial_id"].astype(str).unique()
        if kind == "run":
            out.update({(name, t): path for t in trials})
            continue
        exp = path if path.is_dir() else path.parent
        for t in trials:
            hits = sorted(p / "run" for p in exp.glob(f"{t}_*") if (p / "run").is_dir())
            if hits:
                out[(name, t)] = hits[0]
    return out


# --------------------------------------------------------------------------- plots


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def plot_head_map(heads: pd.DataFrame, step: int, ablation: str = "mean") -> Figure:
    """Layer x head heat maps of each accuracy's change when one head is ablated, at ``step``."""
    _theme()
    sub = heads[(heads["step"] == step) & (heads["ablation"] == ablation)]
    metrics = [m for m in PANEL_METRICS if m in set(sub["metric"])]
    layers, n_heads = int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    size = (1.6 + cols * (0.55 * n_heads + 1.4), 1.2 + rows * (0.42 * layers + 1.1))
    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmax = max(0.05, float(sub["delta"].abs().max()))
    for ax, metric in zip(axes, metrics):
        m = sub[sub["metric"] == metric]
        grid = m.pivot_table(index="layer", columns="head", values="delta").reindex(index=range(layers),
                                                                                   columns=range(n_heads))
        clean = float((m["value"] - m["delta"]).iloc[0])
        sns.heatmap(grid, ax=ax, cmap="RdBu", center=0, vmin=-vmax, vmax=vmax, annot=layers * n_heads <= 64,
                    fmt=".2f", annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white", cbar=False)
        ax.set_title(f"{TITLES.get(metric, metric)} (clean {clean:.2f})")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", rotation=0)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    fig.colorbar(axes[0].collections[0], ax=list(axes), label="Δ accuracy (ablated − clean)", shrink=0.8)
    fig.suptitle(f"Step {step:,}: change in accuracy when one head is {ablation}-ablated", fontsize=12)
    return fig


def top_heads(heads: pd.DataFrame, ablation: str, metrics: Sequence[str] = (ICL, IWL), k: int = 3) -> list[str]:
    """The ``k`` heads whose ablation costs each metric most at any checkpoint, in that order."""
    sub = heads[heads["ablation"] == ablation]
    chosen: list[str] = []
    for metric in metrics:
        m = sub[sub["metric"] == metric].assign(name=lambda d: [head_name(a, b) for a, b in zip(d["layer"], d["head"])])
        worst = m.groupby("name")["delta"].min().sort_values()
        chosen += [n for n in worst.index[:k] if worst[n] < 0 and n not in chosen]
    return chosen


def plot_top_heads(heads: pd.DataFrame, circuit: pd.DataFrame | None, ablation: str = "mean", k: int = 3) -> Figure:
    """Clean accuracies over the checkpoints, then the effect of ablating each of the heads that
    matter most for ICL and IWL (:func:`top_heads`) on each accuracy, over training."""
    _theme()
    metrics = [m for m in (ICL, IWL, CIWL, FLIP_CTX) if m in set(heads["metric"])]
    names = top_heads(heads, ablation, k=k)
    sub = heads[heads["ablation"] == ablation].assign(
        name=lambda d: [head_name(a, b) for a, b in zip(d["layer"], d["head"])])
    fig = Figure(figsize=(9.5, 1.4 + 2.1 * (len(metrics) + 1)), layout="constrained")
    axes = fig.subplots(len(metrics) + 1, 1, sharex=True)
    pal = sns.color_palette("deep")
    ax = axes[0]
    if circuit is not None:
        for i, metric in enumerate(m for m in metrics if m in circuit.columns):
            ax.plot(circuit["step"], circuit[metric], marker="o", color=pal[i], label=TITLES.get(metric, metric))
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("clean accuracy")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("clean model at each checkpoint")
    colours = dict(zip(names, sns.color_palette("colorblind", max(len(names), 1))))
    for ax, metric in zip(axes[1:], metrics):
        m = sub[sub["metric"] == metric]
        for name in names:
            h = m[m["name"] == name].sort_values("step")
            ax.plot(h["step"], h["delta"], marker="o", color=colours[name], label=name)
        ax.axhline(0, color="0.5", linewidth=1)
        ax.set_ylabel(f"Δ {TITLES.get(metric, metric)}")
        if names:
            ax.legend(title="head ablated", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1].set_xlabel("training step (checkpoints)")
    fig.suptitle(f"The heads that carry ICL and IWL over training ({ablation} ablation, Δ = ablated − clean)",
                 fontsize=12)
    return fig


def plot_composition(circuit: pd.DataFrame, composition: pd.DataFrame, metrics: pd.DataFrame | None) -> Figure:
    """ICL over training above the K-composition of the previous-token -> induction pair named at
    the ICL peak (followed over every checkpoint; filled markers where that pair is the one named
    at the checkpoint), the largest score over all pairs and the median (unrelated heads)."""
    _theme()
    fig = Figure(figsize=(9.5, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    pal = sns.color_palette("deep")
    source = metrics if metrics is not None and ICL in metrics.columns else circuit
    for i, metric in enumerate(m for m in (ICL, CIWL, IWL) if m in source.columns):
        top.plot(source["step"], source[metric], color=pal[i], label=TITLES[metric])
    top.axhline(0.5, color="0.5", linestyle="--", linewidth=1, label="chance (ICL)")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    top.set_title("accuracy over training (every evaluation)")
    named = circuit[(circuit["prev_layer"] >= 0) & (circuit["induction_layer"] >= 0)]
    if len(named):
        peak = named.loc[named[ICL].idxmax()]
        pair = tuple(int(peak[k]) for k in ("prev_layer", "prev_head", "induction_layer", "induction_head"))
        label = f"{head_name(*pair[:2])} → {head_name(*pair[2:])} (named at the ICL peak)"
        c = composition[(composition["layer_from"] == pair[0]) & (composition["head_from"] == pair[1])
                        & (composition["layer_to"] == pair[2]) & (composition["head_to"] == pair[3])]
        c = c.sort_values("step")
        bottom.plot(c["step"], c["k_comp"], color=pal[3], label=label)
        here = named[(named["prev_layer"] == pair[0]) & (named["prev_head"] == pair[1])
                     & (named["induction_layer"] == pair[2]) & (named["induction_head"] == pair[3])]
        bottom.plot(here["step"], c.set_index("step").loc[here["step"], "k_comp"], "o", color=pal[3],
                    label="checkpoints where this pair is named")
        title = "K-composition of the previous-token → induction pair"
    else:
        title = "K-composition: no previous-token → induction pair named at any checkpoint"
    bottom.plot(circuit["step"], circuit["max_k_comp"], "--", color="0.3", label="largest over all pairs")
    bottom.plot(circuit["step"], circuit["median_k_comp"], ":", color="0.5", label="median over all pairs")
    bottom.set_ylabel("K-composition score")
    bottom.set_xlabel("training step")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    bottom.set_title(title)
    fig.suptitle("The circuit beside the ICL curve", fontsize=12)
    return fig


def write_run_plots(run: Path, dpi: int = 110, ablation: str = "mean") -> list[Path]:
    """Every plot of one analysed run, into ``RUN/circuits/``."""
    from analysis.plots import save_figure

    t = read_run(run)
    heads, circuit, composition = t["heads"], t["circuit"], t["composition"]
    if heads is None or heads.empty:
        return []
    if ablation not in set(heads["ablation"]):
        ablation = str(heads["ablation"].iloc[0])
    out = run / PLOTS_DIR
    written = [save_figure(plot_head_map(heads, int(s), ablation), out / f"heads_step_{int(s):09d}.png", dpi)
               for s in sorted(heads["step"].unique())]
    written.append(save_figure(plot_top_heads(heads, circuit, ablation), out / "heads_over_training.png", dpi))
    if circuit is not None and composition is not None and not composition.empty:
        written.append(save_figure(plot_composition(circuit, composition, t["metrics"]), out / "composition.png", dpi))
    return written


# --------------------------------------------------------------------------- per trial, per cell


def trial_circuits(run: Path) -> dict[str, Any] | None:
    """What a run's circuit files say, in a few numbers (None if it has none):

    - ``icl_heads``: the induction and previous-token heads named at the checkpoint of highest
      clean ICL, with the ICL each costs when ablated;
    - ``iwl_heads``: at the last checkpoint, the heads whose ablation costs IWL (and CIWL) at
      least ``MIN_DROP``, worst first;
    - ``forms``: the first checkpoint where the circuit is seen (an induction or a previous-token
      head named: some head's ablation costs ICL at least ``MIN_DROP``); ``dissolves``: the first
      checkpoint after it where neither is (NaN while the circuit holds);
    - ``pair_k_comp_peak`` / ``_last``: the K-composition of the pair named at the ICL peak, there
      and at the last checkpoint.
    """
    from icl.circuits.attribution import MIN_DROP

    t = read_run(run)
    heads, circuit, composition = t["heads"], t["circuit"], t["composition"]
    if circuit is None or circuit.empty or heads is None:
        return None
    circuit = circuit.sort_values("step")
    has = (circuit["induction_layer"] >= 0) | (circuit["prev_layer"] >= 0)
    forms = float(circuit.loc[has, "step"].iloc[0]) if has.any() else math.nan
    after = circuit[(circuit["step"] > forms) & ~has] if has.any() else circuit.iloc[:0]
    peak = circuit.loc[circuit[ICL].idxmax()]
    last = circuit.iloc[-1]
    ablation = str(last["ablation"])

    def icl_heads(row: pd.Series) -> str:
        parts = []
        for role, key in (("induction", "induction"), ("previous-token", "prev")):
            if int(row[f"{key}_layer"]) >= 0:
                parts.append(f"{role} {head_name(row[f'{key}_layer'], row[f'{key}_head'])} "
                             f"(−{row[f'{key}_icl_drop']:.2f})")
        return ", ".join(parts) or "none"

    final = heads[(heads["step"] == last["step"]) & (heads["ablation"] == ablation)]
    iwl_parts = []
    for metric in (IWL, CIWL):
        m = final[(final["metric"] == metric) & (final["delta"] <= -MIN_DROP)].sort_values("delta")
        iwl_parts += [f"{head_name(r.layer, r.head)} ({TITLES[metric]} {r.delta:+.2f})" for r in m.head(3).itertuples()]
    return {
        "icl_heads": icl_heads(peak),
        "peak_step": float(peak["step"]),
        "iwl_heads": ", ".join(iwl_parts) or "none",
        "last_step": float(last["step"]),
        "forms": forms,
        "dissolves": float(after["step"].iloc[0]) if len(after) else math.nan,
        "pair_k_comp_peak": float(peak["pair_k_comp"]),
        "pair_k_comp_last": _pair_score(composition, peak, float(last["step"])),
        "checkpoints": int(len(circuit)),
        "plot": run / PLOTS_DIR / "composition.png",
    }


def _pair_score(composition: pd.DataFrame | None, named: pd.Series, step: float) -> float:
    """K-composition at ``step`` of the previous-token -> induction pair named in row ``named``."""
    pair = [int(named[k]) for k in ("prev_layer", "prev_head", "induction_layer", "induction_head")]
    if composition is None or min(pair) < 0:
        return math.nan
    c = composition[(composition["step"] == step) & (composition["layer_from"] == pair[0])
                    & (composition["head_from"] == pair[1]) & (composition["layer_to"] == pair[2])
                    & (composition["head_to"] == pair[3])]
    return float(c["k_comp"].iloc[0]) if len(c) else math.nan


def _step(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:,.0f}"


def circuits_section(df: pd.DataFrame, keys: Sequence[str], out: Path) -> list[str]:
    """The report's "Circuits" section: one row per trial with circuit files, grouped by cell."""
    lines = ["## Circuits", ""]
    runs = run_dirs(df)
    rows = []
    for (experiment, trial_id), run in sorted(runs.items()):
        info = trial_circuits(run)
        if info is None:
            continue
        first = df[(df["experiment"] == experiment) & (df["trial_id"] == trial_id)].iloc[0]
        plot = f"[plot]({os.path.relpath(info['plot'], out)})" if info["plot"].is_file() else ""
        rows.append({
            "cell": cell_label({k: first[k] for k in keys if k != "experiment"}) or trial_id,
            "seed": str(first[SEED_KEY]),
            "ICL heads (at the ICL peak)": f"{info['icl_heads']} at step {_step(info['peak_step'])}",
            "IWL heads (last checkpoint)": info["iwl_heads"],
            "forms": _step(info["forms"]),
            "dissolves": _step(info["dissolves"]),
            "prev → induction K-comp (peak / last)": "—" if math.isnan(info["pair_k_comp_peak"])
            else f"{info['pair_k_comp_peak']:.2f} / {info['pair_k_comp_last']:.2f}",
            "checkpoints": str(info["checkpoints"]),
            "plot": plot,
        })
    if not rows:
        where = " ".join(sorted({str(Path(p)) for p in (df.attrs.get("sources") or [])})) or "RUN_DIR"
        return lines + ["No head attribution yet. Run `icl-analyze heads " + where + "` (it analyses every saved "
                        "checkpoint; keep more with `train.keep_checkpoints`), then this report again.", ""]
    table = pd.DataFrame(rows).sort_values(["cell", "seed"], kind="stable")
    return lines + [
        "Heads named by causal effect (`icl-analyze heads`): each head is ablated alone at each saved checkpoint; "
        "the **induction head** is the head of a layer ≥ 1 whose ablation costs holdout ICL most, the "
        "**previous-token head** the head of an earlier layer that costs it most (named only if the cost is at "
        "least 0.05; in brackets). **IWL heads**: heads whose ablation costs IWL or CIWL at least 0.05 at the last "
        "checkpoint. **Forms**: first checkpoint where either head is named; **dissolves**: first checkpoint after "
        "that where neither is. K-comp: Elhage et al.'s K-composition of the pair (median over all pairs is the "
        "baseline, see each run's plot).",
        "",
        markdown_table(table),
        "",
    ]


__all__ = ["find_runs", "read_run", "run_dirs", "plot_head_map", "plot_top_heads", "plot_composition",
           "write_run_plots", "trial_circuits", "circuits_section", "top_heads"]
