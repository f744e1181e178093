"""Head attribution over training, read back: heat maps, the top heads, composition, per-cell circuits.

``icl-analyze heads RUN...`` runs :func:`icl.circuits.update_run` on every run directory
(``heads.csv``, ``circuit.csv``, ``composition.csv`` next to its ``metrics.csv``) and draws, into
``RUN/circuits/``:

- ``heads_step_<step>.png``: per checkpoint, a layer x head heat map of every accuracy's change
  when that head alone is ablated;
- ``heads_over_training.png``: the clean accuracies, then the effect of the heads that matter
  most for ICL and IWL, checkpoint by checkpoint (± 2 paired standard errors);
- ``groups_over_training.png``: the effect on holdout ICL of ablating groups of heads together
  (each layer; the top-k heads by induction and by previous-token score), where shared work
  shows;
- ``composition.png``: the ICL curve above the K-composition of the previous-token -> induction
  pair (the pair named at the ICL peak, followed over training), with the largest and the median
  score over all pairs.

:func:`trial_circuits` condenses a run's files into what the report's "Circuits" section shows
per cell: the heads that carry ICL (at the ICL peak) and IWL (at the end), the groups' effects,
and the checkpoints between which the circuit forms and dissolves (bounds: a run keeps only some
checkpoints).
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
from analysis.load import SEED_KEY
from icl.circuits.attribution import GROUP_SIZES, ICL_HEAD, MIN_DROP, TOP_RANK, Z_NAMED, head_name, significant
from icl.errors import UserError
from icl.layout import ExperimentDir, RunLayout
from icl.metrics import CHANCE, CIWL, FLIP_CTX, HEAD_MAP_METRICS, ICL, IWL, TITLES


# --------------------------------------------------------------------------- finding and reading runs


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The run directories each path names: itself if it is one (``config.yaml`` and
    ``checkpoints/``), the runs an experiment's ``trials.csv`` lists, or those of the runs and
    experiments directly inside it (``icl-analyze heads runs/``, ``... experiments/``)."""

    def named(path: Path) -> list[Path]:
        if RunLayout(path).holds_run():
            return [path]
        if ExperimentDir(path).trials.is_file():
            return [run for run in ExperimentDir(path).run_dirs().values() if RunLayout(run).holds_run()]
        return []

    found: list[Path] = []
    for root in map(Path, paths):
        runs = named(root)
        if not runs and root.is_dir():
            runs = [run for p in sorted(root.iterdir()) if p.is_dir() for run in named(p)]
        found += runs
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
    if df is not None and df.empty and "step" in df.columns:  # a header alone: nothing analysed yet
        return df
    if df is not None and ("step" not in df.columns or not pd.api.types.is_numeric_dtype(df["step"])):
        raise UserError(f"{path} has no numeric step column; move it away "
                        f"(`icl-analyze heads {path.parent}` rewrites the heads tables)")
    return df


def read_run(run: Path) -> dict[str, pd.DataFrame | None]:
    """A run's ``heads``, ``groups``, ``circuit``, ``composition`` and ``metrics`` tables (None if absent)."""
    layout = RunLayout(run)
    return {"heads": _read(layout.heads), "groups": _read(layout.groups), "circuit": _read(layout.circuit),
            "composition": _read(layout.composition), "metrics": _read(layout.metrics)}


def run_dirs(df: pd.DataFrame) -> dict[tuple[str, str], Path]:
    """``(experiment, trial_id) -> run directory`` for the trials of a results frame (from
    :func:`analysis.load.load_results`): a run source is its own directory; a sweep's trials
    are where its ``trials.csv`` says."""
    out: dict[tuple[str, str], Path] = {}
    for name, (kind, path) in (df.attrs.get("source_dirs") or {}).items():
        path = Path(path)
        trials = df.loc[df["experiment"] == name, "trial_id"].astype(str).unique()
        if kind == "run":
            out.update({(name, t): path for t in trials})
            continue
        recorded = ExperimentDir(path if path.is_dir() else path.parent).run_dirs()
        out.update({(name, t): recorded[t] for t in trials if t in recorded and recorded[t].is_dir()})
    return out


# --------------------------------------------------------------------------- plots


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def plot_head_map(heads: pd.DataFrame, step: int, ablation: str = "mean") -> Figure:
    """Layer x head heat maps of each accuracy's change when one head is ablated, at ``step``."""
    _theme()
    sub = heads[(heads["step"] == step) & (heads["ablation"] == ablation)]
    metrics = [m for m in HEAD_MAP_METRICS if m in set(sub["metric"])]
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
    matter most for ICL and IWL (:func:`top_heads`) on each accuracy, over training, with a band
    of 2 paired standard errors and the naming threshold."""
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
            if "se" in h.columns:
                ax.fill_between(h["step"], h["delta"] - Z_NAMED * h["se"], h["delta"] + Z_NAMED * h["se"],
                                color=colours[name], alpha=0.15, linewidth=0)
        ax.axhline(0, color="0.5", linewidth=1)
        ax.axhline(-MIN_DROP, color="0.5", linewidth=1, linestyle=":")
        ax.set_ylabel(f"Δ {TITLES.get(metric, metric)}")
        if names:
            ax.legend(title="head ablated", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1].set_xlabel("training step (checkpoints)")
    fig.suptitle(f"The heads that carry ICL and IWL over training ({ablation} ablation, Δ = ablated − clean; "
                 f"bands ± {Z_NAMED:g} SE, dotted: −{MIN_DROP:g})", fontsize=12)
    return fig


def _group_families(groups: pd.DataFrame) -> dict[str, list[str]]:
    """The groups of a run by kind, in drawing order: whole layers, top-k induction, top-k previous-token."""
    names = list(dict.fromkeys(groups["group"]))
    layers = sorted((g for g in names if g.startswith("layer ")), key=lambda g: int(g.split()[1]))
    return {"whole layers": layers,
            **{f"top-k heads by {label} score": [f"top-{k} {label}" for k in GROUP_SIZES if f"top-{k} {label}" in names]
               for label in ("induction", "previous-token")}}


def plot_groups(groups: pd.DataFrame, circuit: pd.DataFrame | None, ablation: str = "mean") -> Figure:
    """Holdout ICL's change, over training, when a group of heads is ablated together: each whole
    layer, the top-k heads by induction score, the top-k by previous-token score (± 2 paired
    standard errors; the clean ICL for reference). Work several heads share shows as a group
    that costs far more than its members alone."""
    _theme()
    sub = groups[(groups["ablation"] == ablation) & (groups["metric"] == ICL)]
    families = {k: v for k, v in _group_families(sub).items() if v}
    fig = Figure(figsize=(9.5, 1.4 + 2.3 * len(families)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(families), 1, sharex=True, squeeze=False)).ravel()
    for ax, (family, names) in zip(axes, families.items()):
        colours = sns.color_palette("colorblind", len(names))
        for colour, name in zip(colours, names):
            g = sub[sub["group"] == name].sort_values("step")
            members = str(g["members"].iloc[-1])
            label = name if family == "whole layers" else f"{name} (last: {members.replace(' ', ', ')})"
            ax.plot(g["step"], g["delta"], marker="o", color=colour, label=label)
            ax.fill_between(g["step"], g["delta"] - Z_NAMED * g["se"], g["delta"] + Z_NAMED * g["se"],
                            color=colour, alpha=0.15, linewidth=0)
        if circuit is not None and ICL in circuit.columns:
            c = circuit.sort_values("step")
            ax.plot(c["step"], 0.5 - c[ICL], color="0.4", linestyle="--", linewidth=1,
                    label="to chance (0.5 − clean ICL)")
        ax.axhline(0, color="0.5", linewidth=1)
        ax.axhline(-MIN_DROP, color="0.5", linewidth=1, linestyle=":")
        ax.set_ylabel("Δ ICL, holdout")
        ax.set_title(family)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    axes[-1].set_xlabel("training step (checkpoints)")
    fig.suptitle(f"Heads ablated together ({ablation} ablation, Δ = ablated − clean; bands ± {Z_NAMED:g} SE, "
                 f"dotted: −{MIN_DROP:g})", fontsize=12)
    return fig


def plot_composition(circuit: pd.DataFrame, composition: pd.DataFrame, metrics: pd.DataFrame | None) -> Figure:
    """ICL over training above the K-composition of the pair of ICL heads named at the ICL peak
    (followed over every checkpoint; filled markers where that pair is the one named at the
    checkpoint), the largest score over all pairs and the median (unrelated heads)."""
    _theme()
    fig = Figure(figsize=(9.5, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    pal = sns.color_palette("deep")
    source = metrics if metrics is not None and ICL in metrics.columns else circuit
    for i, metric in enumerate(m for m in (ICL, CIWL, IWL) if m in source.columns):
        top.plot(source["step"], source[metric], color=pal[i], label=TITLES[metric])
    top.axhline(CHANCE, color="0.5", linestyle="--", linewidth=1, label="chance (ICL)")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    top.set_title("accuracy over training (every evaluation)")
    named = circuit[(circuit["prev_layer"] >= 0) & (circuit["induction_layer"] >= 0)]
    if len(named):
        peak = named.loc[named[ICL].idxmax()]
        pair = tuple(int(peak[k]) for k in ("prev_layer", "prev_head", "induction_layer", "induction_head"))
        roles = [_role(peak, k) for k in ("prev", "induction")]
        label = f"{head_name(*pair[:2])} → {head_name(*pair[2:])}, named at the ICL peak\n({roles[0]} → {roles[1]})"
        c = composition[(composition["layer_from"] == pair[0]) & (composition["head_from"] == pair[1])
                        & (composition["layer_to"] == pair[2]) & (composition["head_to"] == pair[3])]
        c = c.sort_values("step")
        bottom.plot(c["step"], c["k_comp"], color=pal[3], label=label)
        here = named[(named["prev_layer"] == pair[0]) & (named["prev_head"] == pair[1])
                     & (named["induction_layer"] == pair[2]) & (named["induction_head"] == pair[3])]
        bottom.plot(here["step"], c.set_index("step").loc[here["step"], "k_comp"], "o", color=pal[3],
                    label="checkpoints where this pair is named")
        title = "K-composition of the pair of ICL heads"
    else:
        title = "K-composition: no pair of ICL heads named at any checkpoint"
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
    heads, circuit, composition, groups = t["heads"], t["circuit"], t["composition"], t["groups"]
    if heads is None or heads.empty:
        return []
    if ablation not in set(heads["ablation"]):
        ablation = str(heads["ablation"].iloc[0])
    layout = RunLayout(run)
    written = [save_figure(plot_head_map(heads, int(s), ablation), layout.head_map_plot(int(s)), dpi)
               for s in sorted(heads["step"].unique())]
    written.append(save_figure(plot_top_heads(heads, circuit, ablation), layout.top_heads_plot, dpi))
    if groups is not None and not groups[groups["ablation"] == ablation].empty:
        written.append(save_figure(plot_groups(groups, circuit, ablation), layout.groups_plot, dpi))
    if circuit is not None and composition is not None and not composition.empty:
        written.append(save_figure(plot_composition(circuit, composition, t["metrics"]), layout.composition_plot,
                                   dpi))
    return written


# --------------------------------------------------------------------------- per trial, per cell


def _role(row: pd.Series, key: str) -> str:
    """The role ``circuit.csv`` gives a named head (files from before roles existed: the slot's name)."""
    role = row.get(f"{key}_role")
    return str(role) if isinstance(role, str) and role else {"induction": "induction head",
                                                              "prev": "previous-token head"}[key]


def named_heads(row: pd.Series) -> str:
    """``induction head L1H0 (−0.45 ± 0.03)``, ``ICL head L1H3 (−0.07 ± 0.02; induction score
    rank 5)``, ...: the heads a ``circuit.csv`` row names, with what each costs ICL."""
    parts = []
    for key, stat in (("induction", "induction"), ("prev", "previous-token")):
        if int(row[f"{key}_layer"]) < 0:
            continue
        role, se = _role(row, key), float(row.get(f"{key}_icl_drop_se", math.nan))
        cost = f"−{row[f'{key}_icl_drop']:.2f}" + ("" if math.isnan(se) else f" ± {se:.2f}")
        if role == ICL_HEAD:
            cost += f"; {stat} score rank {int(row[f'{key}_obs_rank'])}"
        parts.append(f"{role} {head_name(row[f'{key}_layer'], row[f'{key}_head'])} ({cost})")
    return ", ".join(parts) or "none"


def present(circuit: pd.DataFrame) -> pd.Series:
    """Per ``circuit.csv`` row: is the circuit there (a head named, or the top-k induction group's
    drop significant; files from before groups existed: a head named)."""
    named = (circuit["induction_layer"] >= 0) | (circuit["prev_layer"] >= 0)
    return circuit["circuit"].astype(bool) if "circuit" in circuit.columns else named


def formation(steps: Sequence[float], has: Sequence[bool]) -> dict[str, float]:
    """Bounds on when the circuit forms and dissolves, from the analysed checkpoints only:

    - ``forms_by``: the first checkpoint with it; ``forms_after``: the checkpoint before that
      (without it; NaN when the first analysed checkpoint already has it: not analysed earlier);
    - ``dissolves_by``: the first checkpoint after ``forms_by`` without it; ``dissolves_after``:
      the one before (with it). NaN where it never forms, resp. still holds at the last one.
    """
    steps, has = [float(s) for s in steps], [bool(h) for h in has]
    out = dict.fromkeys(("forms_after", "forms_by", "dissolves_after", "dissolves_by"), math.nan)
    first = next((i for i, h in enumerate(has) if h), None)
    if first is None:
        return out
    out["forms_by"] = steps[first]
    out["forms_after"] = steps[first - 1] if first else math.nan
    gone = next((i for i in range(first + 1, len(has)) if not has[i]), None)
    if gone is not None:
        out["dissolves_after"], out["dissolves_by"] = steps[gone - 1], steps[gone]
    return out


def when(after: float, by: float, last: float, formed: bool = True) -> str:
    """The report's words for one of :func:`formation`'s bounds: ``between 2,000 and 2,500``,
    ``by 7,500; not analysed earlier``, ``not by 10,000`` (never seen up to the last analysed
    checkpoint), ``—`` (a dissolution of a circuit that never formed)."""
    if not formed:
        return "—"
    if math.isnan(by):
        return f"not by {_step(last)}"
    if math.isnan(after):
        return f"by {_step(by)}; not analysed earlier"
    return f"between {_step(after)} and {_step(by)}"


def _effect(drop: float, se: float) -> str:
    return f"{-drop:+.2f} ± {se:.2f}".replace("-", "−")


def group_effects(groups: pd.DataFrame | None, step: float, ablation: str) -> dict[str, str]:
    """At ``step``: per family of :func:`_group_families`, the change in holdout ICL when its groups
    are ablated (``−0.05 ± 0.02 / −0.30 ± 0.03 (L1H0, L1H3)`` for top-1 / top-2 with the
    widest group's members; ``L0 −0.40 ± 0.03, L1 −0.45 ± 0.03`` for the layers)."""
    if groups is None or "se" not in groups.columns:
        return {}
    sub = groups[(groups["step"] == step) & (groups["ablation"] == ablation) & (groups["metric"] == ICL)]
    by = sub.set_index("group")
    out = {}
    for family, names in _group_families(sub).items():
        if not names:
            continue
        effects = [_effect(-float(by.loc[n, "delta"]), float(by.loc[n, "se"])) for n in names]
        if family == "whole layers":
            out[family] = ", ".join(f"L{n.split()[1]} {e}" for n, e in zip(names, effects))
        else:
            out[family] = " / ".join(effects) + f" ({by.loc[names[-1], 'members'].replace(' ', ', ')})"
    return out


def trial_circuits(run: Path) -> dict[str, Any] | None:
    """What a run's circuit files say, in a few numbers (None if it has none):

    - ``icl_heads``: the ICL heads named at the checkpoint of highest clean ICL, with their roles
      and what each costs ICL (:func:`named_heads`);
    - ``iwl_heads``: at the last checkpoint, the heads whose ablation costs IWL (and CIWL) by the
      naming rule (:func:`icl.circuits.attribution.significant`), worst first;
    - ``groups``: at the ICL peak, what the groups cost ICL (:func:`group_effects`);
    - ``forms_*``, ``dissolves_*``: :func:`formation`'s bounds over the analysed checkpoints, and
      ``forms`` / ``dissolves``, the same in words (:func:`when`);
    - ``pair_k_comp_peak`` / ``_last``: the K-composition of the pair named at the ICL peak, there
      and at the last checkpoint.
    """
    t = read_run(run)
    heads, circuit, composition = t["heads"], t["circuit"], t["composition"]
    if circuit is None or circuit.empty or heads is None:
        return None
    circuit = circuit.sort_values("step")
    bounds = formation(circuit["step"], present(circuit))
    peak = circuit.loc[circuit[ICL].idxmax()]
    last = circuit.iloc[-1]
    ablation = str(last["ablation"])
    final = heads[(heads["step"] == last["step"]) & (heads["ablation"] == ablation)]
    final = final.assign(se=final["se"] if "se" in final.columns else 0.0)
    iwl_parts = []
    for metric in (IWL, CIWL):
        m = final[(final["metric"] == metric)].sort_values("delta")
        m = m[[significant(-d, se) for d, se in zip(m["delta"], m["se"])]]
        iwl_parts += [f"{head_name(r.layer, r.head)} ({TITLES[metric]} {_effect(-r.delta, r.se)})"
                      for r in m.head(3).itertuples()]
    formed = not math.isnan(bounds["forms_by"])
    return {
        "icl_heads": named_heads(peak),
        "peak_step": float(peak["step"]),
        "iwl_heads": ", ".join(iwl_parts) or "none",
        "groups": group_effects(t["groups"], float(peak["step"]), ablation),
        "last_step": float(last["step"]),
        **bounds,
        "forms": when(bounds["forms_after"], bounds["forms_by"], float(last["step"])),
        "dissolves": when(bounds["dissolves_after"], bounds["dissolves_by"], float(last["step"]), formed),
        "pair_k_comp_peak": float(peak["pair_k_comp"]),
        "pair_k_comp_last": _pair_score(composition, peak, float(last["step"])),
        "checkpoints": int(len(circuit)),
        "plot": RunLayout(run).composition_plot,
    }


def _pair_score(composition: pd.DataFrame | None, named: pd.Series, step: float) -> float:
    """K-composition at ``step`` of the pair of ICL heads named in row ``named``."""
    pair = [int(named[k]) for k in ("prev_layer", "prev_head", "induction_layer", "induction_head")]
    if composition is None or min(pair) < 0:
        return math.nan
    c = composition[(composition["step"] == step) & (composition["layer_from"] == pair[0])
                    & (composition["head_from"] == pair[1]) & (composition["layer_to"] == pair[2])
                    & (composition["head_to"] == pair[3])]
    return float(c["k_comp"].iloc[0]) if len(c) else math.nan


def _step(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:,.0f}"


RULE = (f"a drop counts if it is at least {MIN_DROP:g} and at least {Z_NAMED:g} paired standard errors (± after "
        "each drop: the standard error of the mean per-sequence change in correctness, ablated vs clean on the "
        "same evaluation sequences)")


def circuits_section(df: pd.DataFrame, keys: Sequence[str], out: Path) -> list[str]:
    """The report's "Circuits" section: one row per trial with circuit files, grouped by cell, and
    the group ablations at each trial's ICL peak."""
    lines = ["## Circuits", ""]
    runs = run_dirs(df)
    rows, group_rows = [], []
    for (experiment, trial_id), run in sorted(runs.items()):
        info = trial_circuits(run)
        if info is None:
            continue
        first = df[(df["experiment"] == experiment) & (df["trial_id"] == trial_id)].iloc[0]
        plot = f"[plot]({os.path.relpath(info['plot'], out)})" if info["plot"].is_file() else ""
        cell = cell_label({k: first[k] for k in keys if k != "experiment"}) or trial_id
        rows.append({
            "cell": cell,
            "seed": str(first[SEED_KEY]),
            "ICL heads (at the ICL peak)": f"{info['icl_heads']} at step {_step(info['peak_step'])}",
            "IWL heads (last checkpoint)": info["iwl_heads"],
            "forms": info["forms"],
            "dissolves": info["dissolves"],
            "K-comp of the pair (peak / last)": "—" if math.isnan(info["pair_k_comp_peak"])
            else f"{info['pair_k_comp_peak']:.2f} / {info['pair_k_comp_last']:.2f}",
            "checkpoints": str(info["checkpoints"]),
            "plot": plot,
        })
        if info["groups"]:
            group_rows.append({"cell": cell, "seed": str(first[SEED_KEY]), "step": _step(info["peak_step"]),
                               **{f"{family} (k = 1 / 2 / 3)" if family.startswith("top") else family: v
                                  for family, v in info["groups"].items()}})
    if not rows:
        where = " ".join(sorted({str(Path(p)) for p in (df.attrs.get("sources") or [])})) or "RUN_DIR"
        return lines + ["No head attribution yet. Run `icl-analyze heads " + where + "` (it analyses every saved "
                        "checkpoint; keep more with `train.keep_checkpoints`), then this report again.", ""]
    table = pd.DataFrame(rows).sort_values(["cell", "seed"], kind="stable")
    lines += [
        "Heads named by causal effect (`icl-analyze heads`, mean ablation: a head's output replaced by its mean over "
        "the evaluation set being scored). At each saved checkpoint every head is ablated alone; the **ICL heads** "
        "are the head of a layer ≥ 1 whose ablation costs holdout ICL most and the head of an earlier layer that "
        f"costs it most, each named only where its drop counts: {RULE}. A named head is called an **induction "
        f"head** (**previous-token head**) only if its observational induction (previous-token) score is among the "
        f"top {TOP_RANK} of all heads; otherwise it is an **{ICL_HEAD}**, with its rank by that score. "
        "**IWL heads**: heads whose ablation costs IWL or CIWL by the same rule at the last checkpoint. The "
        f"circuit is **present** at a checkpoint where an ICL head is named or the top-{GROUP_SIZES[-1]} heads by "
        "induction score, ablated together, cost ICL by the same rule. **Forms** / **dissolves**: between the "
        "analysed checkpoints where that changes; where the first analysed checkpoint already has the circuit "
        "only an upper bound is known (\"by 7,500; not analysed earlier\": keep more checkpoints with "
        "`train.keep_checkpoints`, or analyse each as it is written with the sweep option `heads: true`); "
        "\"not by\" the last analysed checkpoint: not seen. K-comp: Elhage et al.'s K-composition of the "
        "named pair (median over all pairs is the baseline, see each run's plot).",
        "",
        markdown_table(table),
        "",
    ]
    if group_rows:
        lines += [
            "**Heads ablated together**, at each trial's ICL peak: the change in holdout ICL ± its paired standard "
            f"error when a whole layer, or the top-k heads by induction (previous-token) score, k = "
            f"{', '.join(map(str, GROUP_SIZES))}, are ablated at once (members of the widest group in brackets). "
            "Work several heads share shows as a group that costs far more than any of its members alone. Every "
            "metric at every checkpoint: `RUN/groups.csv`; over training: `RUN/circuits/groups_over_training.png`.",
            "",
            markdown_table(pd.DataFrame(group_rows).sort_values(["cell", "seed"], kind="stable").fillna("—")),
            "",
        ]
    return lines


__all__ = ["find_runs", "read_run", "run_dirs", "plot_head_map", "plot_top_heads", "plot_groups", "plot_composition",
           "write_run_plots", "trial_circuits", "circuits_section", "top_heads", "formation", "when", "named_heads",
           "group_effects"]
