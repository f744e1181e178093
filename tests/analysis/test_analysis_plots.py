"""Every plot is written as a non-empty PNG; plot functions return figures without pyplot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis import summarize  # noqa: E402
from analysis.plots import (  # noqa: E402
    plot_attention,
    plot_curves,
    plot_heatmap,
    plot_peak_final,
    save_figure,
    write_plots,
)

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES, WD = "data.num_classes", "optim.weight_decay"
DPI = 30  # small images: the test checks that files are written, not how they look


def _small(rows, curve, attention=True, cells=((10, 0.0), (10, 1e-2), (100, 0.0), (100, 1e-2))):
    df = pd.concat([rows(c, wd, s, curve(0.6 + 0.1 * s + (0.1 if c > 10 else 0)))
                    for c, wd in cells for s in (0, 1)], ignore_index=True)
    if not attention:
        df = df[[c for c in df.columns if not c.startswith("attn_")]]
    return df


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 500 and data.startswith(PNG)


def test_write_plots_writes_every_png(tmp_path, rows, curve):
    df = _small(rows, curve, cells=((10, 1e-2), (100, 0.0)))  # two cells: one attention page each
    written = write_plots(df, summarize(df), tmp_path, logx=True, dpi=DPI)
    names = {p.name for p in written.values()}
    assert names == {"curves.png", "curves_logx.png", "peak_final_vs_wd.png", "heatmap_icl.png", "attention.png",
                     "attention_c10_wd1e-2.png", "attention_c100_wd0.png"}
    assert all(_is_png(p) for p in written.values())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_plot_functions_return_titled_labelled_figures(tmp_path, rows, curve):
    df = _small(rows, curve)
    s = summarize(df)
    fig = plot_curves(df, x="sequences")
    assert isinstance(fig, Figure) and fig.get_suptitle()
    assert any(ax.get_xlabel() == "training sequences" for ax in fig.axes)
    assert any("chance 0.5" in ax.get_ylabel() for ax in fig.axes)
    for f in (plot_peak_final(s), plot_heatmap(s),
              plot_attention(df, {"data.num_classes": 100, "optim.weight_decay": 0.0})):
        assert isinstance(f, Figure) and f.get_suptitle()
        assert any(ax.get_xlabel() for ax in f.axes) and any(ax.get_ylabel() for ax in f.axes)
    assert plot_attention(df, {"data.num_classes": 7}) is None  # no such cell
    assert _is_png(save_figure(fig, tmp_path / "sub" / "c.png", DPI))


def test_single_run_plots(tmp_path, rows, curve):
    one = rows(100, 0.0, 0, curve(0.8))
    one = one[[c for c in one.columns if not c.startswith("attn_L1")]]  # a one-layer model, one seed, one cell
    s = summarize(one)
    for name, fig in (("a", plot_attention(one, {"data.num_classes": 100, "optim.weight_decay": 0.0}, logx=True)),
                      ("h", plot_heatmap(s))):
        assert _is_png(save_figure(fig, tmp_path / f"{name}.png", DPI))


@pytest.mark.slow  # a report with every plot
def test_peer_evaluators_get_their_own_plot_and_summary_columns(tmp_path, rows, curve):
    df = _small(rows, curve, attention=False, cells=((10, 0.0), (100, 0.0)))
    assert "evaluators" not in write_plots(df, summarize(df), tmp_path / "old", dpi=DPI)  # results from before
    df = df.assign(ciwl_acc=0.7, flip_icl_ctx_acc=0.4, flip_icl_iwl_acc=0.5)
    s = summarize(df)
    assert s["final_ciwl_mean"].tolist() == [0.7, 0.7] and s["final_flip_iwl_mean"].tolist() == [0.5, 0.5]
    written = write_plots(df, s, tmp_path / "new", dpi=DPI)
    assert _is_png(written["evaluators"])
    from analysis.plots import plot_evaluators

    fig = plot_evaluators(df)
    assert fig.get_suptitle() and any("CIWL" in ax.get_ylabel() for ax in fig.axes)
    assert any("follows" in ax.get_ylabel() for ax in fig.axes)


def test_evaluators_draw_both_definitions(rows, curve):
    """Each evaluator row: the peers' definition solid, the all-label one dashed, in the same panel."""
    from analysis.plots import plot_evaluators

    df = _small(rows, curve, attention=False, cells=((10, 0.0), (100, 0.0)))
    df = df.assign(ciwl_acc=0.5, ciwl_acc_inctx=0.8, flip_icl_ctx_acc=0.3, flip_icl_ctx_acc_inctx=0.4,
                   flip_icl_iwl_acc=0.5, flip_icl_iwl_acc_inctx=0.6, icl_train_acc_all=0.7)
    fig = plot_evaluators(df)
    axes = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}
    ciwl = next(ax for label, ax in axes.items() if label.startswith("CIWL"))
    styles = {(line.get_linestyle(), round(float(line.get_ydata()[-1]), 3)) for line in ciwl.lines}
    assert {("-", 0.8), ("--", 0.5)} <= styles
    assert len(axes) == 6 and any(label.startswith("IWL") for label in axes)
    assert "labels in context" in fig.get_suptitle() and "every label" in fig.get_suptitle()


def test_peak_plot_draws_the_verdicts_baseline(rows, curve):
    """The baseline line is the verdict's: with the spec's grid naming more classes than have
    results, the verdict has no baseline, and neither does the plot."""
    from analysis.verdict import baseline_cell

    df = _small(rows, curve, attention=False)
    s = summarize(df)
    def levels(fig):  # the horizontal lines across the first panel (axhline: x from 0 to 1 in axes units)
        return sorted(round(float(line.get_ydata()[0]), 6) for line in fig.axes[0].lines
                      if list(line.get_xdata()) == [0, 1])

    base = baseline_cell(s)[1]
    assert base[CLASSES] == 100 and base[WD] == 0
    assert levels(plot_peak_final(s)) == sorted([0.5, round(base["peak_icl_mean"], 6),
                                                 round(0.9 * base["peak_icl_mean"], 6)])
    # the 1600-class baseline has no results: no baseline, no bar, chance only
    assert levels(plot_peak_final(s, grid={CLASSES: [10, 100, 1600]})) == [0.5]
