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

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config("tiny", ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                               "train.keep_checkpoints=5", "eval.n_sequences=64"])
    root = tmp_path_factory.mktemp("sweepish")
    run = root / "t000_seed=0" / "run"
    train(cfg, run, progress=False)
    return run


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


def _one_error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--dpi", "0"], "--dpi must be between 10 and 600"),
    (["--device", "tpu"], "--device must be cpu, auto, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_heads_flags_are_checked_before_work(run, capsys, flags, words):
    assert words in _one_error_line(capsys, ["heads", str(run), *flags])


def test_heads_on_cuda_without_a_gpu_is_one_error_line(run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no CUDA device is available" in _one_error_line(capsys, ["heads", str(run), "--device", "cuda"])


@pytest.mark.parametrize("garbage", [b"step,layer\nabc,1\n", b"\xff\xfe\x00 not text", b"layer,head\n1,2\n"],
                         ids=["text step", "not UTF-8", "no step column"])
def test_garbage_heads_tables_are_one_error_line(run, tmp_path, capsys, garbage):
    """A heads.csv someone else wrote: both the heads command and the report say which file
    and how to redo it; nothing else of the run is touched."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "heads.csv").write_bytes(garbage)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert "heads.csv" in _one_error_line(capsys, ["heads", str(copy), "--no-plots"])
    assert "heads.csv" in _one_error_line(capsys, [str(copy), "--out", str(tmp_path / "report")])
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
