"""The live table's layout (no Ray cluster): Ray's full table in a log and where it fits, the
compact one on a narrower terminal, every line within the terminal's width; rendered by Ray's
own reporter code from Tune trials of packs (the stand-ins of ``test_sweep_progress``)."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
from test_sweep_progress import TRIALS, report, tune_trial

from sweeps.reporter import SweepReporter, short_count
from icl.config import build_config
from sweeps.spec import ModelSpec, expand, load_spec

STUDY_PACKS = {"p000": tuple(f"t{i:03d}" for i in range(15)), "p001": tuple(f"t{i:03d}" for i in range(15, 30))}
STUDY_GRID = [{"seed": i % 3, "data.num_classes": 100 if i < 15 else 1600,
               "optim.weight_decay": (0.0, 3e-4, 1e-3, 3e-3, 1e-2)[i % 5]} for i in range(30)]
STUDY = [  # the study's shape: 30 models of 500k steps (the paper's) in 2 packs of 15, a 3-key grid
    ModelSpec(f"t{i:03d}", f"t{i:03d}_cell", cell, build_config({}, cell)) for i, cell in enumerate(STUDY_GRID)
]


def packed(tmp_path: Path, width: int | None = None):
    """The demo's 4 models in 2 packs: one running (with a rate), one pending."""
    reporter = SweepReporter(TRIALS, {"p000": ("t000", "t001"), "p001": ("t002", "t003")}, tmp_path, slots=1,
                             period_s=0, width=width)
    now = time.time() + 60
    trials = [
        tune_trial("p000", "RUNNING", report({"t000": (4000, 0.52, 0.99), "t001": (4000, 0.51, 0.98)}, 100.0, now)),
        tune_trial("p001", "PENDING"),
    ]
    return reporter, trials, now


def unpacked(tmp_path: Path, width: int | None = None):
    """One model per trial: finished, failed (with its error file), running, pending."""
    reporter = SweepReporter(TRIALS, {t.trial_id: (t.trial_id,) for t in TRIALS}, tmp_path, slots=2, period_s=0,
                             width=width)
    now = time.time() + 60
    error_file = str(tmp_path / "ray" / "p001_2026-11-27_18-15-38" / "error.txt")  # a long path, as Ray's are
    trials = [
        tune_trial("t000", "TERMINATED", report({"t000": (10000, 0.53, 1.0)}, 50.0, now)),
        tune_trial("t001", "ERROR", report({"t001": (500, 0.5, 0.01)}, 50.0, now), error_file=error_file),
        tune_trial("t002", "RUNNING", report({"t002": (9000, 0.8, 0.3)}, 50.0, now, age=5)),
        tune_trial("t003", "PENDING"),
    ]
    return reporter, trials, now


def study(tmp_path: Path, width: int | None = None):
    """The study's 2 packs of 15 half-way, ETAs of days (the widest values the columns take)."""
    reporter = SweepReporter(STUDY, STUDY_PACKS, tmp_path, slots=2, period_s=0, width=width)
    now = time.time() + 60
    trials = [tune_trial(p, "RUNNING", report({m: (245000, 0.512, 0.873) for m in ms}, 5.2, now))
              for p, ms in STUDY_PACKS.items()]
    return reporter, trials, now


STATES = {"packed": packed, "unpacked": unpacked, "study": study}
RAY_LINES = ("Using FIFO scheduling algorithm.",
             "Logical resource usage: 4.0/4 CPUs, 1.0/1 GPUs (0.0/1.0 accelerator_type:H100)")


def rendered(state: str, tmp_path: Path, width: int | None) -> str:
    reporter, trials, now = STATES[state](tmp_path, width)
    rows, line = reporter.rows(trials, now)
    return reporter.render(rows, False, *RAY_LINES, line, width=width)


def table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The progress table's header and body rows (by their first cell, which is left out);
    a wrapped cell's continuation lines joined to its row."""
    header: list[str] = []
    body: dict[str, list[str]] = {}
    last = None
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("Trial name", "model"):
            if header:  # Ray's table of errors, under the progress table
                break
            header = cells
        elif cells[0].startswith("t") and len(cells) == len(header):
            body[cells[0]] = last = cells[1:]
        elif not cells[0] and last is not None:  # a wrapped cell goes on under its row
            last[:] = [a + b for a, b in zip(last, cells[1:])]
    return header, body


@pytest.mark.parametrize("width", [80, 100, 200])
@pytest.mark.parametrize("state", list(STATES))
def test_every_line_fits_the_terminal_and_every_model_has_its_row(state: str, width: int, tmp_path: Path) -> None:
    text = rendered(state, tmp_path, width)
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, f"{len(too_wide)} line(s) wider than {width}:\n" + "\n".join(too_wide)
    header, body = table(text)
    trials = STUDY if state == "study" else TRIALS
    assert sorted(body) == [t.trial_id for t in trials]
    for column in ("step", "ICL", "IWL", "ETA"):  # the must-haves, in either layout
        assert column in header, header
    if header[0] == "model":  # compact: each model's cell as one column, named above the table
        legend = "cell: seed/num_classes/weight_decay" if state == "study" else "cell: num_classes/weight_decay/seed"
        assert legend in text.splitlines()
        cell = header.index("cell") - 1
        for t in trials:
            assert body[t.trial_id][cell] == "/".join(f"{v:g}" if isinstance(v, float) else str(v)
                                                      for v in t.grid.values())


def test_the_full_table_where_it_fits_the_compact_one_where_it_does_not(tmp_path: Path) -> None:
    full = rendered("packed", tmp_path, None)
    assert table(full)[0][0] == "Trial name"
    need = max(len(line) for line in full.splitlines() if line.startswith(("+", "|")))
    assert table(rendered("packed", tmp_path, need))[0][0] == "Trial name"  # exactly its width
    assert table(rendered("packed", tmp_path, need - 1))[0][0] == "model"


def test_compact_columns_join_by_priority_while_they_fit(tmp_path: Path) -> None:
    header, body = table(rendered("packed", tmp_path, 80))
    assert header == ["model", "status", "cell", "step", "ICL", "IWL", "ETA"]
    assert body["t001"] == ["RUNNING", "100/0.1/0", "4000/10k", "0.51", "0.98", "0:02:00"]
    assert body["t003"] == ["PENDING", "1600/0.1/0", "0/10k", "", "", ""]
    # 20 columns more: the shrink and the training accuracy (LIVE's next) join, in their places
    header, body = table(rendered("packed", tmp_path, 100))
    assert header == ["model", "status", "cell", "shrink", "step", "ICL", "IWL", "train acc", "ETA"]
    assert body["t001"][2].startswith("e^-0.")
    # and with still more room before the full table fits: the rate, the pack, the location
    header, _ = table(rendered("packed", tmp_path, 150))
    assert header == ["model", "status", "cell", "pack", "shrink", "step", "ICL", "IWL", "train acc",
                      "model-steps/s", "ETA", "loc"]


def test_compact_table_of_finished_failed_and_resumed_models(tmp_path: Path) -> None:
    (tmp_path / "t003_cell" / "run" / "checkpoints" / "step_000002500").mkdir(parents=True)  # t003 resumes
    text = rendered("unpacked", tmp_path, 80)
    header, body = table(text)
    assert [body[m][0] for m in ("t000", "t001", "t002", "t003")] == ["DONE", "ERROR", "RUNNING", "PENDING"]
    step = header.index("step") - 1
    assert [body[m][step] for m in ("t000", "t001", "t002", "t003")] == ["10k/10k", "500/10k", "9000/10k", "2500/10k"]
    assert body["t002"][-1] == "0:00:15"
    assert "| pack" not in text  # a pack of one is its model
    # Ray's order: running, pending, finished, failed
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| t")] == [
        "t002", "t003", "t000", "t001"]
    # the error file, whole, wrapped to the width
    assert "Number of errored trials: 1" in text
    errors = text[text.index("Number of errored trials"):]
    assert "t001 (1 failure):" in errors
    assert str(tmp_path / "ray" / "p001_2026-11-27_18-15-38" / "error.txt") in "".join(
        line.strip() for line in errors.splitlines()[1:])


def test_where_even_the_must_haves_do_not_fit_the_cell_wraps(tmp_path: Path) -> None:
    text = rendered("study", tmp_path, 74)  # 80 unwrapped
    assert max(len(line) for line in text.splitlines()) <= 74
    header, body = table(text)
    assert body["t001"][header.index("cell") - 1] == "1/100/0.0003"  # whole, over two lines


def test_a_log_gets_the_full_table_whatever_COLUMNS_says(tmp_path: Path, monkeypatch, capsys) -> None:
    """A SLURM job's log, or any stdout that is not a terminal: the full table, lines unwrapped."""
    monkeypatch.setenv("COLUMNS", "80")
    reporter, trials, _ = packed(tmp_path)
    assert not sys.stdout.isatty() and reporter.columns() is None
    reporter.report(trials, False)
    out = capsys.readouterr().out
    assert table(out)[0][0] == "Trial name"
    assert max(len(line) for line in out.splitlines()) > 80
    assert "Sweep: 0/4 models finished, 8,000/40,000 model-steps (20%), 100.0 model-steps/s, ETA" in out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_layout_that_fits_its_width(tmp_path: Path, monkeypatch) -> None:
    reporter, trials, _ = packed(tmp_path)
    for columns, first in (("100", "model"), ("200", "Trial name")):
        monkeypatch.setenv("COLUMNS", columns)
        monkeypatch.setattr(sys, "stdout", Terminal())
        assert reporter.columns() == int(columns)
        reporter.report(trials, False)
        out = sys.stdout.getvalue()
        assert table(out)[0][0] == first
        assert max(len(line) for line in out.splitlines()) <= int(columns)


@pytest.mark.parametrize("n, text", [(0, "0"), (9999, "9999"), (10000, "10k"), (500000, "500k"), (12345, "12.3k")])
def test_compact_step_counts(n: int, text: str) -> None:
    assert short_count(n) == text


def readme_moment(tmp_path: Path):
    """The moment of the README's live-table example (`icl-sweep demo`, 3 minutes in): the
    demo's 4 models, 2 finished, 2 running, with every LIVE column reported."""
    trials = expand(load_spec("demo", storage=str(tmp_path)))
    assert [t.trial_id for t in trials] == ["t000", "t001", "t002", "t003"]
    reporter = SweepReporter(trials, {t.trial_id: (t.trial_id,) for t in trials}, tmp_path, slots=2, period_s=0)
    now = time.time() + 60

    def result(model: str, step: int, accs: tuple[float, ...], rate: float, pid: int, age: float = 0.0) -> dict:
        names = ("icl_acc", "iwl_acc", "train_acc", "ciwl_acc", "flip_icl_ctx_acc", "flip_icl_iwl_acc")
        out = report({}, rate, now, age)
        out["per_model"] = {model: {"step": step, **dict(zip(names, accs))}}
        return {**out, "pid": pid, "node_ip": "192.0.2.2"}

    tune = [
        tune_trial("t000", "TERMINATED", result("t000", 10000, (0.518, 1, 1, 1, 0, 1), 86.1, 28711)),
        tune_trial("t001", "TERMINATED", result("t001", 10000, (0.52, 1, 1, 1, 0, 1), 86.6, 28710)),
        tune_trial("t002", "RUNNING", result("t002", 4500, (0.783, 0.262, 0.876, 0.502, 0.035, 0.688), 78.34, 28710, 4)),
        tune_trial("t003", "RUNNING", result("t003", 4500, (0.811, 0.232, 0.878, 0.523, 0.039, 0.682), 77.84, 28711,
                                             3.5)),
    ]
    return reporter, tune, now


def without_ray_lines(lines: list[str]) -> list[str]:
    """``lines`` without blank ones and Ray's about the result folder and the trial count, the
    indented lines they were wrapped onto included (the folder, a test's, is as long as it is)."""
    kept, dropping = [], False
    for line in lines:
        dropping = line.startswith(("Result logdir:", "Number of trials:")) or (dropping and line.startswith("    "))
        if line and not dropping:
            kept.append(line)
    return kept


def test_the_readme_examples_are_what_the_code_renders(tmp_path: Path) -> None:
    """README.md shows the same moment twice, as a log and an 80-column terminal see it (from
    the sweep's line down, without Ray's lines about the result folder and the trial count)."""
    reporter, trials, now = readme_moment(tmp_path)
    rows, line = reporter.rows(trials, now)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for width in (None, 80):
        text = reporter.render(rows, False, line, width=width).splitlines()
        text = without_ray_lines(text[next(i for i, t in enumerate(text) if t.startswith("Sweep:")):])
        assert "\n".join(text) in readme, "\n".join(text)
        if width:
            assert max(len(t) for t in text) <= width
