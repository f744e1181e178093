"""``icl-analyze heads``: head attribution over a run's checkpoints (fp32 and fp64 runs), its plots,
and the report's circuits section: named heads with their roles and standard errors, the groups,
and formation / dissolution as bounds between the analysed checkpoints."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402
import shutil  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import load_results  # noqa: E402
from analysis.cli import main  # noqa: E402
from analysis.heads import (find_runs, formation, named_heads, plot_composition, plot_groups,  # noqa: E402
                            plot_head_map, plot_top_heads, read_run, trial_circuits, when)
from icl.config import load_config  # noqa: E402
from icl.train import train  # noqa: E402
from sweeps.results import write_results, write_trials  # noqa: E402
from icl.config import Config  # noqa: E402
from sweeps.spec import ModelSpec  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


trained_run = pytest.mark.slow  # a test of the trained run below: head attribution of its checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config("tiny", ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                               "train.keep_checkpoints=5", "eval.n_sequences=64"])
    root = tmp_path_factory.mktemp("sweepish")
    run = root / "t000_seed=0" / "run"
    train(cfg, run, progress=False)
    trial = ModelSpec("t000", "t000_seed=0", {"seed": 0}, Config())
    write_trials(root, [trial], {"t000": ("TERMINATED", "")}, {"t000": ("t000",)})  # as the sweep does
    return run


@trained_run
def test_runs_are_found_where_the_sweep_recorded_them(run, tmp_path):
    """An experiment's runs come from its trials.csv; a run directory is itself; a folder of
    runs or experiments holds theirs; anything else holds none."""
    assert find_runs([run.parent.parent]) == [run] == find_runs([run])
    trial = ModelSpec("t000", "t000_elsewhere", {"seed": 0}, Config())
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


@trained_run
def test_heads_command_analyses_every_checkpoint_and_draws(run, capsys):
    assert find_runs([run.parent.parent]) == [run]
    assert main(["heads", str(run.parent.parent), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s) analysed" in out and "ICL heads: " in out and "circuit " in out
    names = sorted(p.name for p in (run / "circuits").iterdir())
    assert names == ["composition.png", "groups_over_training.png", "heads_over_training.png",
                     "heads_step_000000020.png", "heads_step_000000040.png"]
    assert all((run / "circuits" / n).read_bytes().startswith(PNG) for n in names)
    assert main(["heads", str(run), "--no-plots"]) == 0
    assert "0 checkpoint(s) analysed" in capsys.readouterr().out


@trained_run
def test_head_plots_are_titled_and_labelled(run):
    main(["heads", str(run), "--no-plots"])
    t = read_run(run)
    for fig in (plot_head_map(t["heads"], 40), plot_top_heads(t["heads"], t["circuit"]),
                plot_groups(t["groups"], t["circuit"]), plot_composition(t["circuit"], t["composition"], t["metrics"])):
        assert fig.get_suptitle()
        labelled = [ax for ax in fig.axes if ax.get_ylabel()]
        assert labelled and any(ax.get_xlabel() for ax in fig.axes)


@trained_run
def test_report_has_a_circuits_section(run, tmp_path):
    main(["heads", str(run), "--no-plots"])
    assert main([str(run), "--out", str(tmp_path / "report"), "--dpi", "30"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Circuits", 1)[1]
    assert "| cell | seed | ICL heads (at the ICL peak) |" in section
    assert "forms" in section and "dissolves" in section
    assert "at least 0.05 and at least 2 paired standard errors" in section and "top 3 of all heads" in section
    groups = section.split("**Heads ablated together**", 1)[1]
    assert "| cell | seed | step | whole layers | top-k heads by induction score (k = 1 / 2 / 3) |" in groups
    assert "L0 " in groups and "L1 " in groups and " ± " in groups


@pytest.mark.slow  # trains a run in fp64
def test_fp64_runs_are_analysed(tmp_path, capsys):
    """A run trained in float64: its checkpoints hold float64 weights, the pixels must follow."""
    cfg = load_config("tiny", ["train.precision=fp64", "train.steps=20", "train.eval_every=20",
                               "train.checkpoint_every=20", "eval.n_sequences=32"])
    run = tmp_path / "h64"
    train(cfg, run, progress=False)
    assert main(["heads", str(run), "--dpi", "30"]) == 0
    assert "1 checkpoint(s) analysed" in capsys.readouterr().out
    t = read_run(run)
    trained = t["metrics"].set_index("step").loc[20]
    for metric in ("icl_acc", "iwl_acc", "ciwl_acc"):  # the clean model is the trainer's, to the last bit
        assert t["circuit"].set_index("step").loc[20, metric] == trained[metric]
    assert t["heads"]["se"].notna().all() and (run / "circuits" / "groups_over_training.png").is_file()


@trained_run
def test_a_run_whose_early_checkpoints_are_gone_gives_an_upper_bound(run, tmp_path):
    """Only step 40 left: whatever it shows, nothing is known about earlier steps."""
    late = tmp_path / "late"
    analysed = {"heads.csv", "groups.csv", "circuit.csv", "composition.csv", "circuits", "step_000000020"}
    shutil.copytree(run, late, ignore=lambda d, names: [n for n in names if n in analysed and d == str(run)
                                                        or n == "step_000000020"])
    assert main(["heads", str(late), "--no-plots"]) == 0
    info = trial_circuits(late)
    assert info["checkpoints"] == 1 and math.isnan(info["forms_after"])
    if read_run(late)["circuit"]["circuit"].iloc[0]:
        assert info["forms"] == "by 40; not analysed earlier" and info["dissolves"] == "not by 40"
    else:
        assert info["forms"] == "not by 40" and info["dissolves"] == "—"


def planted_run(tmp_path, steps, has, iwl=()):
    """A run directory whose circuit files say the circuit is present at ``steps[i]`` iff ``has[i]``
    (named induction head L1H0 there), and ``iwl`` = ``[(head, drop, se)]`` of layer 0 on IWL at the
    last step."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "icl_acc": 0.9 if h else 0.5, "ablation": "mean", "induction_layer": 1 if h else -1,
             "induction_head": 0 if h else -1, "induction_role": "induction head" if h else "",
             "induction_icl_drop": 0.3 if h else math.nan, "induction_icl_drop_se": 0.02 if h else math.nan,
             "induction_obs_rank": 1 if h else -1, "prev_layer": -1, "prev_head": -1, "prev_role": "",
             "prev_icl_drop": math.nan, "prev_icl_drop_se": math.nan, "prev_obs_rank": -1, "circuit": int(h),
             "pair_k_comp": math.nan} for s, h in zip(steps, has)]
    pd.DataFrame(rows).to_csv(run / "circuit.csv", index=False)
    heads = [{"step": steps[-1], "layer": 0, "head": head, "ablation": "mean", "metric": "iwl_acc", "value": 0.5 - d,
              "delta": -d, "se": se} for head, d, se in iwl]
    pd.DataFrame(heads, columns=["step", "layer", "head", "ablation", "metric", "value", "delta", "se"]).to_csv(
        run / "heads.csv", index=False)
    return run


@pytest.mark.parametrize("steps, has, forms, dissolves", [
    ([7500, 8000, 8500], [1, 1, 1], "by 7,500; not analysed earlier", "not by 8,500"),
    ([1500, 2000, 2500, 3000], [0, 0, 1, 1], "between 2,000 and 2,500", "not by 3,000"),
    ([1000, 2000, 3000, 4000, 5000], [0, 1, 1, 0, 1], "between 1,000 and 2,000", "between 3,000 and 4,000"),
    ([500, 1000], [0, 0], "not by 1,000", "—"),
])
def test_forming_and_dissolving_are_bounded_by_the_analysed_checkpoints(tmp_path, steps, has, forms, dissolves):
    info = trial_circuits(planted_run(tmp_path, steps, has))
    assert (info["forms"], info["dissolves"]) == (forms, dissolves)
    assert info["checkpoints"] == len(steps)


def test_formation_bounds():
    assert formation([10, 20, 30], [False, True, False]) == {"forms_after": 10, "forms_by": 20,
                                                             "dissolves_after": 20, "dissolves_by": 30}
    first = formation([10, 20], [True, True])
    assert math.isnan(first["forms_after"]) and first["forms_by"] == 10 and math.isnan(first["dissolves_by"])
    assert when(math.nan, 7500.0, 9000.0) == "by 7,500; not analysed earlier"
    assert when(math.nan, math.nan, 9000.0, formed=False) == "—"


def test_iwl_heads_follow_the_naming_rule(tmp_path):
    """0.20 ± 0.02 counts; 0.06 ± 0.04 is above 0.05 but inside 2 standard errors; 0.04 ± 0.001 is below 0.05."""
    run = planted_run(tmp_path, [100], [1], iwl=[(1, 0.20, 0.02), (2, 0.06, 0.04), (3, 0.04, 0.001)])
    assert trial_circuits(run)["iwl_heads"] == "L0H1 (IWL −0.20 ± 0.02)"


def test_a_head_without_the_induction_pattern_is_called_an_icl_head():
    row = pd.Series({"induction_layer": 1, "induction_head": 3, "induction_role": "ICL head",
                     "induction_icl_drop": 0.07, "induction_icl_drop_se": 0.02, "induction_obs_rank": 5,
                     "prev_layer": 0, "prev_head": 0, "prev_role": "previous-token head", "prev_icl_drop": 0.3,
                     "prev_icl_drop_se": 0.02, "prev_obs_rank": 1})
    assert named_heads(row) == ("ICL head L1H3 (−0.07 ± 0.02; induction score rank 5), "
                                "previous-token head L0H0 (−0.30 ± 0.02)")


@trained_run
def test_an_experiments_report_reads_its_runs_where_trials_csv_says(run, tmp_path):
    """The sweep's tables name the runs: the report finds their circuits, and the grid values
    the results lack come from the runs' configs (no spec here to say them)."""
    main(["heads", str(run), "--no-plots"])
    root = run.parent.parent
    write_results(root, [ModelSpec("t000", "t000_seed=0", {"seed": 0}, Config())])
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
@trained_run
def test_heads_flags_are_checked_before_work(run, capsys, flags, words):
    assert words in _one_error_line(capsys, ["heads", str(run), *flags])


@trained_run
def test_heads_on_cuda_without_a_gpu_is_one_error_line(run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no CUDA device is available" in _one_error_line(capsys, ["heads", str(run), "--device", "cuda"])


@pytest.mark.parametrize("garbage", [b"step,layer\nabc,1\n", b"\xff\xfe\x00 not text", b"layer,head\n1,2\n"],
                         ids=["text step", "not UTF-8", "no step column"])
@trained_run
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
