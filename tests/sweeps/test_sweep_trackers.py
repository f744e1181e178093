"""Every model of a sweep in MLflow and Weights & Biases, for real: MLflow's local stores
read back with its client, W&B in offline mode (no account, no network) read back from the
run files it writes. One run per model named by its cell, grouped by the experiment, config
and cell as parameters/tags, every metrics row at its step; a resumed sweep goes on in the
same runs and sends each row once."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

import yaml
from sweep_helpers import cli_error, read_results, run_cli
from sweeps import results as res
from icl.config import build_config
from sweeps.spec import ModelSpec, expand, load_spec
from sweeps.trackers import STATE_FILE, Trackers

CONFIG = {"train.steps": 100, "optim.lr": 0.001, "data.root": None, "model.embedder": "linear"}
TRIALS = [
    ModelSpec("t000", "t000_num_classes=16_seed=0", {"data.num_classes": 16, "seed": 0},
              build_config({**CONFIG, "data.num_classes": 16, "seed": 0})),
    ModelSpec("t001", "t001_num_classes=64_seed=1", {"data.num_classes": 64, "seed": 1},
              build_config({**CONFIG, "data.num_classes": 64, "seed": 1})),
]
HEADER = "step,train_loss,icl_acc,iwl_acc\n"
STEPS = 40  # the sweep below: 40 steps, evaluated every 20


def write_spec_file(path: Path, changes: dict) -> Path:
    """The smoke spec (4 models of the tiny preset), shortened to 40 steps, with ``changes``."""
    doc = yaml.safe_load(Path(load_spec("smoke").source).read_text())
    doc["overrides"].update({"train.steps": STEPS, "train.eval_every": 20, "train.checkpoint_every": 20})
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def tracker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """MLflow's file store and W&B offline, everything under tmp_path (home untouched)."""
    env = {
        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps its file store behind this switch
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_PROJECT": "icl-test",
        "WANDB_SILENT": "true",
    }
    (tmp_path / "wandb-dir").mkdir()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()  # its service process ends with the test


def write_rows(exp: Path, trial: ModelSpec, text: str) -> None:
    run = res.run_dir(exp, trial).path
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.csv").write_text(text)


# --------------------------------------------------------------------------- reading back


def mlflow_runs(uri: str, experiment: str) -> dict[str, dict]:
    """Run name -> {status, params, tags, metrics: {key: [(step, value)]}} from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                   for k in run.data.metrics}
        out[run.info.run_name] = {"status": run.info.status, "params": run.data.params, "tags": run.data.tags,
                                  "metrics": metrics}
    return out


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): W&B's LevelDB-style log of
    protobuf records, in 32 KiB blocks, read as ``wandb sync`` reads it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, or middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(wandb_dir: Path) -> dict[str, dict]:
    """Run name -> {id, group, project, config, tags, history: {key: [(step, value)]}, exit}
    from every offline run folder (a resumed run writes a second folder: merged here)."""
    out: dict[str, dict] = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict = {}
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                run = out.setdefault(r.display_name, {"history": {}, "exits": []})
                run.update(id=r.run_id, group=r.run_group, project=r.project, tags=list(r.tags),
                           config={i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        run["history"].setdefault(key, []).append((rec.history.step.num, json.loads(item.value_json)))
            elif kind == "exit":
                run["exits"].append(rec.exit.exit_code)
    return out


# --------------------------------------------------------------------------- the trackers


@pytest.mark.slow  # MLflow's store and W&B offline runs
def test_every_model_is_one_run_named_by_its_cell_with_every_row_sent_once(tmp_path: Path, tracker_env):
    exp = tmp_path / "storage" / "smoke"
    write_rows(exp, TRIALS[0], HEADER + "50,2.5,0.5,0.25\n")
    trackers = Trackers(("mlflow", "wandb"), "smoke", exp, TRIALS)
    trackers.sync()  # t001 has no rows yet: no run for it
    write_rows(exp, TRIALS[0], HEADER + "50,2.5,0.5,0.25\n100,2.0,0.75,0.5\n")  # finished
    write_rows(exp, TRIALS[1], HEADER + "50,2.4,0.625,0.125\n")
    trackers.sync()
    trackers.close({"t000": "TERMINATED", "t001": "UNFINISHED"})  # the driver stopped: t001 is behind

    # a resumed sweep: a new driver goes on in the same runs and sends only what is new
    write_rows(exp, TRIALS[1], HEADER + "50,2.4,0.625,0.125\n100,2.1,0.875,nan\n")
    again = Trackers(("mlflow", "wandb"), "smoke", exp, TRIALS)
    again.sync()
    again.close({"t000": "TERMINATED", "t001": "TERMINATED"})

    runs = mlflow_runs(tracker_env["MLFLOW_TRACKING_URI"], "smoke")
    assert sorted(runs) == [t.dirname for t in TRIALS]
    first, second = (runs[t.dirname] for t in TRIALS)
    assert first["metrics"]["icl_acc"] == [(50, 0.5), (100, 0.75)]
    assert first["metrics"]["train_loss"] == [(50, 2.5), (100, 2.0)]
    assert second["metrics"]["icl_acc"] == [(50, 0.625), (100, 0.875)]  # one run across both drivers
    assert [s for s, _ in second["metrics"]["iwl_acc"]] == [50, 100]
    assert first["status"] == second["status"] == "FINISHED"
    assert first["params"]["optim.lr"] == "0.001" and first["params"]["data.root"] == "null"
    assert first["params"]["data.num_classes"] == "16" and len(first["params"]) == len(TRIALS[0].flat_config())
    assert first["tags"]["cell.data.num_classes"] == "16" and first["tags"]["cell.seed"] == "0"
    assert first["tags"]["icl.cell"] == "data.num_classes=16, seed=0" and first["tags"]["icl.trial_id"] == "t000"

    wb = wandb_runs(Path(tracker_env["WANDB_DIR"]))
    assert sorted(wb) == [t.dirname for t in TRIALS]
    first, second = (wb[t.dirname] for t in TRIALS)
    assert first["group"] == "smoke" and first["project"] == "icl-test"
    assert first["config"]["cell"] == {"data.num_classes": 16, "seed": 0} and first["config"]["optim.lr"] == 0.001
    assert first["tags"] == ["data.num_classes=16", "seed=0"]
    assert first["history"]["icl_acc"] == [(50, 0.5), (100, 0.75)] and first["exits"] == [0]
    assert second["history"]["icl_acc"] == [(50, 0.625), (100, 0.875)]
    assert second["exits"] == [1, 0]  # stopped unfinished by the first driver, finished by the second
    assert wb[TRIALS[1].dirname]["id"] == wb[TRIALS[1].dirname]["id"]

    state = json.loads((exp / STATE_FILE).read_text())
    assert {k.split()[0] for k in state} == {"mlflow", "wandb"}
    assert all(rec["step"] == 100 and rec["closed"] for dest in state.values() for rec in dest.values())


def test_a_tracker_that_fails_while_the_sweep_runs_is_reported_once_and_left_alone(tmp_path, tracker_env, capsys):
    exp = tmp_path / "smoke"
    write_rows(exp, TRIALS[0], HEADER + "50,2.5,0.5,0.25\n")
    trackers = Trackers(("mlflow",), "smoke", exp, TRIALS)

    def gone(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    trackers.trackers[0].log = gone  # what a server that goes down mid-sweep does to the client
    trackers.sync()
    trackers.sync()
    err = capsys.readouterr().err
    assert err.count("warning: mlflow failed (ConnectionError: the tracking server went away)") == 1


# --------------------------------------------------------------------------- bad input


def test_log_to_names_trackers_and_a_missing_client_names_its_extra(tmp_path, capsys, monkeypatch, tracker_env):
    line = cli_error(capsys, ["smoke", "--log-to", "mlflow,tensorboardx", "--dry-run", "--storage", str(tmp_path)])
    assert "--log-to: unknown tracker 'tensorboardx'; choose from mlflow, wandb" in line
    spec = write_spec_file(tmp_path / "s.yaml", {"log_to": "wandb"})
    line = cli_error(capsys, [str(spec), "--dry-run", "--storage", str(tmp_path)])
    assert "log_to must be a list of trackers" in line
    assert load_spec("smoke", log_to=["wandb", "mlflow,wandb"]).log_to == ("mlflow", "wandb")

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    line = cli_error(capsys, ["smoke", "--log-to", "wandb", "--storage", str(tmp_path), "--num-cpus", "1"])
    assert "--log-to wandb needs the wandb package" in line and "pip install 'icl-sweep[wandb]'" in line
    assert not (tmp_path / "smoke").exists()


def test_an_unusable_mlflow_store_is_one_error_before_anything_starts(tmp_path, capsys, monkeypatch, tracker_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    line = cli_error(capsys, ["smoke", "--log-to", "mlflow", "--storage", str(tmp_path), "--num-cpus", "1"])
    assert "cannot use the MLflow tracking store nosuchscheme://x" in line and "MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "smoke").exists()


# --------------------------------------------------------------------------- a real sweep


def test_a_packed_sweep_sends_every_model_to_mlflow_and_wandb(ray_head, driver_env, tmp_path):
    """A packed smoke sweep (2 models per Tune trial) with --log-to mlflow,wandb: one run per
    model, every row of results.csv in both, at its step."""
    env = dict(driver_env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",  # MLflow's default kind
               WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               WANDB_SILENT="true")
    spec = write_spec_file(tmp_path / "smoke.yaml", {"pack": 2, "log_to": ["wandb"]})
    proc = run_cli([str(spec), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis",
                    "--log-to", "mlflow"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "smoke"
    results = read_results(exp)
    trials = expand(load_spec(str(spec), storage=str(tmp_path)))
    runs = mlflow_runs(env["MLFLOW_TRACKING_URI"], "smoke")
    wb = wandb_runs(tmp_path)
    assert sorted(runs) == sorted(wb) == sorted(t.dirname for t in trials)
    for t in trials:
        rows = results[results.trial_id == t.trial_id]
        expected = [(int(s), v) for s, v in zip(rows.step, rows.icl_acc)]
        assert runs[t.dirname]["metrics"]["icl_acc"] == pytest.approx(expected)
        assert wb[t.dirname]["history"]["icl_acc"] == pytest.approx(expected)
        assert runs[t.dirname]["status"] == "FINISHED" and wb[t.dirname]["exits"] == [0]
        assert runs[t.dirname]["tags"]["cell.data.num_classes"] == str(t.grid["data.num_classes"])
        assert wb[t.dirname]["config"]["cell"]["seed"] == t.grid["seed"] and wb[t.dirname]["group"] == "smoke"
        assert expected[-1][0] == STEPS
    assert "log_to:\n- mlflow\n- wandb" in (exp / "spec.yaml").read_text()
