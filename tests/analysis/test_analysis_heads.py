"""``icl-analyze heads``: head attribution over a run's checkpoints, its plots, and the report's
circuits section."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from analysis import load_results  # noqa: E402
from analysis.cli import main  # noqa: E402
from analysis.heads import find_runs, plot_composition, plot_head_map, plot_top_heads, read_run  # noqa: E402
from icl.config import load_config  # noqa: E402
from icl.train import train  # noqa: E402
from sweeps.results import write_results, write_trials  # noqa: E402
from sweeps.spec import TrialSpec  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config("tiny", ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                               "train.keep_checkpoints=5", "eval.n_sequences=64"])
    root = tmp_path_factory.mktemp("sweepish")
    run = root / "t000_seed=0" / "run"
    train(cfg, run, progress=False)
    trial = TrialSpec("t000", "t000_seed=0", {"seed": 0}, {})
    write_trials(root, [trial], {"t000": ("TERMINATED", "")}, {"t000": ("t000",)})  # as the sweep does
    return run


def test_runs_are_found_where_the_sweep_recorded_them(run, tmp_path):
    """An experiment's runs come from its trials.csv; a run directory is itself; a folder of
    runs or experiments holds theirs; anything else holds none."""
    assert find_runs([run.parent.parent]) == [run] == find_runs([run])
    trial = TrialSpec("t000", "t000_elsewhere", {"seed": 0}, {})
    (tmp_path / "exp").mkdir()
    write_trials(tmp_path / "exp", [trial], {}, {"t000": ("t000",)})
    (tmp_path / "exp" / "t000_seed=0").symlink_to(run.parent, target_is_directory=True)
    assert find_runs([tmp_path / "exp"]) == []  # not searched for: its trials.csv names another
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a").symlink_to(run, target_is_directory=True)
    assert find_runs([tmp_path / "runs"]) == [tmp_path / "runs" / "a"] and find_runs([tmp_path]) == []
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "sweep").symlink_to(run.parent.parent, target_is_directory=True)
    assert find_runs([tmp_path / "storage"]) == [tmp_path / "storage" / "sweep" / "t000_seed=0" / "run"]


def test_heads_command_analyses_every_checkpoint_and_draws(run, capsys):
    assert find_runs([run.parent.parent]) == [run]
    assert main(["heads", str(run.parent.parent), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s) analysed" in out and "induction" in out
    names = sorted(p.name for p in (run / "circuits").iterdir())
    assert names == ["composition.png", "heads_over_training.png", "heads_step_000000020.png",
                     "heads_step_000000040.png"]
    assert all((run / "circuits" / n).read_bytes().startswith(PNG) for n in names)
    assert main(["heads", str(run), "--no-plots"]) == 0
    assert "0 checkpoint(s) analysed" in capsys.readouterr().out


def test_head_plots_are_titled_and_labelled(run):
    main(["heads", str(run), "--no-plots"])
    t = read_run(run)
    for fig in (plot_head_map(t["heads"], 40), plot_top_heads(t["heads"], t["circuit"]),
                plot_composition(t["circuit"], t["composition"], t["metrics"])):
        assert fig.get_suptitle()
        labelled = [ax for ax in fig.axes if ax.get_ylabel()]
        assert labelled and any(ax.get_xlabel() for ax in fig.axes)


def test_report_has_a_circuits_section(run, tmp_path):
    main(["heads", str(run), "--no-plots"])
    assert main([str(run), "--out", str(tmp_path / "report"), "--dpi", "30"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Circuits", 1)[1]
    assert "| cell | seed | ICL heads (at the ICL peak) |" in section
    assert "forms" in section and "dissolves" in section


def test_an_experiments_report_reads_its_runs_where_trials_csv_says(run, tmp_path):
    """The sweep's tables name the runs: the report finds their circuits, and the grid values
    the results lack come from the runs' configs (no spec here to say them)."""
    main(["heads", str(run), "--no-plots"])
    root = run.parent.parent
    write_results(root, [TrialSpec("t000", "t000_seed=0", {"seed": 0}, {})])
    df = load_results(root)
    assert (df["data.num_classes"] == 64).all()  # the tiny preset, from the run's config.yaml
    assert any("taken from its trials' config.yaml" in n for n in df.attrs["notes"])
    assert main([str(root), "--out", str(tmp_path / "r"), "--dpi", "30"]) == 0
    section = (tmp_path / "r" / "report.md").read_text().split("## Circuits", 1)[1]
    assert "| cell | seed | ICL heads (at the ICL peak) |" in section and "No head attribution" not in section


def test_report_says_how_to_get_circuits(tmp_path, rows, curve):
    exp = tmp_path / "exp"
    exp.mkdir()
    rows(100, 0.0, 0, curve(0.8)).to_csv(exp / "results.csv", index=False)
    from analysis.report import write_report

    rep = write_report(load_results(exp), tmp_path / "out", dpi=30)
    assert "No head attribution yet. Run `icl-analyze heads" in rep.path.read_text()


def test_heads_command_without_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["heads", str(tmp_path)])
    assert e.value.code == 2 and "no run directory" in capsys.readouterr().err
