"""icl-analyze end to end: the report and its files; bad input is exit 2 with one ``error:`` line."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.cli import main
from analysis.report import default_out
from icl.errors import UserError

CLASSES, WD, SEED = "data.num_classes", "optim.weight_decay", "seed"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script; without it, its entry point run by this interpreter."""
    exe = shutil.which("icl-analyze")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from analysis.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def experiment(tmp_path, grid_one_pass) -> Path:
    """The one-pass grid without attention columns (fewer plots: a fast test), as a sweep writes it."""
    df = grid_one_pass
    df = df[[c for c in df.columns if not c.startswith("attn_")]]
    exp = tmp_path / "storage" / "study"
    exp.mkdir(parents=True)
    df.to_csv(exp / "results.csv", index=False)
    spec = {"base": "tiny", "grid": {CLASSES: [10, 100], WD: [0.0, 1.0e-3, 1.0e-2, 1.0e-1], SEED: [0, 1]}}
    (exp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return exp


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_report_with_default_out(experiment, capsys):
    before = {p.name: _digest(p) for p in experiment.iterdir() if p.is_file()}
    assert main([str(experiment), "--dpi", "30"]) == 0
    out = experiment / "report"
    stdout = capsys.readouterr().out
    assert "verdict: Supported: 1 of 3" in stdout and str(out / "report.md") in stdout

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 8 and summary["n_seeds"].eq(2).all()
    for stat in ("peak_icl", "peak_step", "final_icl", "icl_drop", "final_iwl", "final_train_acc", "icl_onset_step"):
        assert {f"{stat}_mean", f"{stat}_std"} <= set(summary.columns)
    row = summary[(summary[CLASSES] == 10) & (summary[WD] == 1e-2)].iloc[0]
    assert row["peak_icl_mean"] == pytest.approx(0.86) and row["final_icl_mean"] == pytest.approx(0.81)

    report = (out / "report.md").read_text()
    assert "**Supported: 1 of 3 few-class cells" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"curves.png", "curves_logx.png", "peak_final_vs_wd.png", "heatmap_icl.png"} <= set(images)
    assert all((out / img).stat().st_size > 0 for img in images)
    assert "| classes | weight decay | shrink | seeds | peak ICL | raw max (biased) |" in report
    assert "*Part 2: the decay effect" in report and "| passes (both parts) |" in report
    assert "## Metric definitions" in report and "`in_context_acc`" in report
    # these results predate the ICL halves: the peaks are raw maxima, and the report says so
    assert "16 of 16 trials have no `icl_acc_even`/`icl_acc_odd` columns" in report
    assert "0.860 [" in report and "(raw max)" in report
    assert {"peak_icl_raw_mean", "peak_icl_lo", "peak_icl_hi", "decay_exponent", "shrink_factor",
            "peak_method"} <= set(summary.columns)
    assert "All 8 cells have every seed" in report
    assert "no `attn_L*` columns" in report and not list(out.glob("attention*"))
    assert {p.name: _digest(p) for p in experiment.iterdir() if p.is_file()} == before  # inputs untouched


def test_report_html_is_the_whole_report_in_one_file(experiment, capsys):
    """report.html holds the verdict, the summary table and every plot of report.md (the PNG
    bytes themselves) and summary.csv; neither report names an absolute path."""
    assert main([str(experiment), "--dpi", "30"]) == 0
    out = experiment / "report"
    assert str(out / "report.html") in capsys.readouterr().out
    page = (out / "report.html").read_text()
    report = (out / "report.md").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>In-context vs in-weights learning" in page
    assert "<strong>Supported: 1 of 3 few-class cells" in page
    assert "<th>classes</th>\n<th>weight decay</th>\n<th>shrink</th>\n<th>seeds</th>\n<th>peak ICL</th>" in page
    shown = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(shown) == len(images) >= 4
    assert [base64.b64decode(b) for b in shown] == [(out / img).read_bytes() for img in images]
    csv_link = re.search(r'href="data:text/csv;base64,([^"]+)" download="summary.csv"', page)
    assert csv_link and base64.b64decode(csv_link.group(1)) == (out / "summary.csv").read_bytes()
    assert 'src="' not in page.replace('src="data:', "")  # nothing left that points outside the file
    for text in (page, report):
        assert str(experiment.parent) not in text
    assert "from `..` (paths relative to this report's folder)" in report


@pytest.mark.slow  # a report with every plot
def test_one_seed_report_says_so_and_shows_no_sd(experiment, tmp_path):
    df = pd.read_csv(experiment / "results.csv")
    single = tmp_path / "single"
    single.mkdir()
    df[df[SEED] == 0].to_csv(single / "results.csv", index=False)
    spec = yaml.safe_load((experiment / "spec.yaml").read_text())
    spec["grid"][SEED] = [0]
    (single / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(single), "--dpi", "30"]) == 0
    report = (single / "report" / "report.md").read_text()
    assert "seeds expected per cell: 1 (seed 0))" in report
    assert "One seed per cell: ICL figures with their 95% interval (the evaluation set's binomial error)" in report
    table = report.split("## Summary per cell")[1].split("## ICL and IWL")[0]
    assert "±" not in table and "| 10 | 1e-2 | e^-0.00097 | 1 | 0.850 [0.786, 0.914] (raw max) | 0.850 | 300 |" in table
    # two seeds: the sd is shown, and the header lists both
    assert main([str(experiment), "--out", str(tmp_path / "two"), "--dpi", "30"]) == 0
    two = (tmp_path / "two" / "report.md").read_text()
    assert "seeds expected per cell: 2 (seeds 0, 1))" in two and "the others mean ± sd over seeds" in two
    assert " ± " in two.split("## Summary per cell")[1].split("## ICL and IWL")[0]


def test_default_out(experiment):
    assert default_out([str(experiment)]) == experiment / "report"
    assert default_out([str(experiment / "results.csv")]) == experiment / "report"
    with pytest.raises(UserError, match="--out"):
        default_out(["a", "b"])


@pytest.mark.slow  # a report with every plot
def test_running_sweep_with_missing_seed(experiment, tmp_path, capsys):
    df = pd.read_csv(experiment / "results.csv")
    cut = (df[CLASSES] == 10) & (df[WD] == 1e-3) & (df[SEED] == 1)
    behind = (df[CLASSES] == 100) & (df[WD] == 0.0) & (df[SEED] == 0) & (df["step"] > 300)
    running = tmp_path / "running"
    running.mkdir()
    df[~cut & ~behind].to_csv(running / "results.csv", index=False)
    (running / "spec.yaml").write_text((experiment / "spec.yaml").read_text())
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("an old report, replaced on refresh")
    assert main([str(running / "results.csv"), "--out", str(tmp_path / "rep"), "--dpi", "30",
                 "--threshold", "0.7"]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "`icl_acc` ≥ 0.7" in report
    assert "10 classes, wd 1e-3: 1 of 2 seeds (missing seed 1)" in report
    assert "Trials not yet at step 500" in report and "100 classes, wd 0 (from step 300)" in report
    assert "Provisional" in report
    summary = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert summary["seeds_complete"].sum() == 7 and summary["behind"].sum() == 1


def _bad(tmp_path: Path, kind: str, df: pd.DataFrame) -> list[str]:
    exp = tmp_path / "e"
    exp.mkdir()
    if kind == "no_results":
        return [str(exp)]
    if kind == "missing_path":
        return [str(tmp_path / "nope")]
    if kind == "missing_columns":
        df.drop(columns=["icl_acc", "train_acc"]).to_csv(exp / "results.csv", index=False)
    elif kind == "empty":
        (exp / "results.csv").write_text("")
    elif kind == "all_nan":
        df.assign(iwl_acc=float("nan")).to_csv(exp / "results.csv", index=False)
    elif kind == "out_is_input":
        df.to_csv(exp / "results.csv", index=False)
        return [str(exp), "--out", str(exp)]
    elif kind == "two_paths_no_out":
        df.to_csv(exp / "results.csv", index=False)
        return [str(exp), str(exp / "results.csv")]
    elif kind == "bad_flag":
        return [str(exp), "--threshold", "high"]
    elif kind == "bad_threshold":
        df.to_csv(exp / "results.csv", index=False)
        return [str(exp), "--threshold", "1.5"]
    elif kind in _MUTATIONS:
        column, value = _MUTATIONS[kind]
        bad = df.astype({column: object})
        bad.loc[3, column] = value
        bad.to_csv(exp / "results.csv", index=False)
    elif kind == "spec_grid_inf":
        df.to_csv(exp / "results.csv", index=False)
        (exp / "spec.yaml").write_text("base: tiny\ngrid:\n  optim.weight_decay: [0.0, .inf]\n")
    elif kind == "run_config_inf":
        df[df["trial_id"] == df["trial_id"].iloc[0]].drop(columns=[CLASSES, WD, SEED]).to_csv(
            exp / "metrics.csv", index=False)
        (exp / "config.yaml").write_text("seed: 0\ndata:\n  num_classes: .inf\n")
    elif kind in ("out_empty", "out_loop", "out_is_the_input_csv"):
        df.to_csv(exp / "results.csv", index=False)
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out = {"out_empty": "", "out_loop": str(tmp_path / "loop"), "out_is_the_input_csv": str(exp / "results.csv")}
        return [str(exp / "results.csv"), "--out", out[kind]]
    elif kind.startswith("out_"):
        df.to_csv(exp / "results.csv", index=False)
        (tmp_path / "file").write_text("")
        out = {"out_is_a_file": tmp_path / "file", "out_under_a_file": tmp_path / "file" / "r",
               "out_in_proc": Path("/proc/icl-report")}[kind]
        return [str(exp), "--out", str(out)]
    return [str(exp)]


_MUTATIONS = {  # a results.csv cell no trainer writes
    "infinite_step": ("step", "1e309"),
    "infinite_classes": (CLASSES, "inf"),
    "huge_classes": (CLASSES, "1e20"),
    "fractional_step": ("step", "1.5"),
    "accuracy_above_one": ("icl_acc", "1.5"),
    "infinite_metric": ("train_loss", "-inf"),
}


BAD = [
    ("no_results", "no results in"),
    ("missing_path", "does not exist"),
    ("missing_columns", "icl_acc, train_acc"),
    ("empty", "is empty"),
    ("all_nan", "metric iwl_acc is empty"),
    ("out_is_input", "holds input results"),
    ("two_paths_no_out", "--out"),
    ("bad_flag", "invalid float value"),
    ("bad_threshold", "--threshold must be between 0 and 1"),
    ("infinite_step", "line 5: column step holds inf; it must be a whole number"),
    ("infinite_classes", "line 5: column data.num_classes holds inf; it must be finite"),
    ("huge_classes", "line 5: data.num_classes must be in [4, 12976]"),
    ("fractional_step", "column step holds 1.5"),
    ("accuracy_above_one", "column icl_acc holds 1.5; it must be in [0, 1]"),
    ("infinite_metric", "column train_loss holds -inf; it must be finite"),
    ("spec_grid_inf", "the grid of"),
    ("run_config_inf", "data.num_classes"),
    ("out_is_a_file", "exists and is not a folder"),
    ("out_under_a_file", "is a file, not a folder"),
    ("out_in_proc", "cannot write --out /proc/icl-report"),
    ("out_empty", "--out '' is not a usable path"),  # not the default PATH/report: an empty name is a mistake
    ("out_loop", "cannot be resolved"),
    ("out_is_the_input_csv", "which this command reads"),
]


def _check_one_error_line(stderr: str, words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert words in lines[0] and "Traceback" not in stderr


@pytest.mark.parametrize("kind, words", [b for b in BAD if b[0] in ("missing_columns", "all_nan")])
def test_bad_input_subprocess_exit_2(tmp_path, grid_one_pass, kind, words):
    # a real process: exit status 2, exactly one `error:` line on stderr, no traceback
    args = _bad(tmp_path, kind, grid_one_pass)
    files_before = sorted(tmp_path.rglob("*"))
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    _check_one_error_line(proc.stderr, words)
    assert sorted(tmp_path.rglob("*")) == files_before  # nothing written, nothing removed


@pytest.mark.parametrize("kind, words", BAD)
def test_bad_input_in_process_exit_2(tmp_path, capsys, grid_one_pass, kind, words):
    # the same entry point in-process (each subprocess costs a second of imports)
    args = _bad(tmp_path, kind, grid_one_pass)
    files_before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    _check_one_error_line(capsys.readouterr().err, words)
    assert sorted(tmp_path.rglob("*")) == files_before


def test_out_on_a_read_only_file_system(tmp_path, capsys, grid_one_pass, tmpfs):
    ro = tmpfs("64k", read_only=True)
    grid_one_pass.to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--out", str(ro / "report")])
    assert exc.value.code == 2
    _check_one_error_line(capsys.readouterr().err, "read-only")
