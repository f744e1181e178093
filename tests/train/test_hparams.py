"""A run's TensorBoard HParams summary, read back by TensorBoard itself: the run's cell as
hyperparameters (the keys of ``train.hparams``, a sweep's grid keys), peak ICL and final IWL
as its metrics; the summary survives a rebuild of the event file (a resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from icl.config import build_config
from icl.errors import UserError
from icl.train.hparams import DEFAULT_KEYS, hparam_values, with_peak_icl
from icl.train.rundir import RunDir


def rows(icl: list[float]) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    made = [{"step": 10 * (i + 1), "icl_acc": a, "iwl_acc": 0.1 * i, "train_loss": 1.0} for i, a in enumerate(icl)]
    return made, [np.zeros((1, 2, 5), dtype=np.float32) for _ in icl]


def read_back(run: Path) -> tuple[dict, dict, EventAccumulator]:
    """(experiment, session start info, accumulator) as TensorBoard's HParams plugin sees them."""
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return experiment, start, acc


def test_the_hparams_are_the_cell_and_the_metrics_peak_icl_and_final_iwl(tmp_path: Path) -> None:
    cfg = build_config("tiny", ["train.hparams=data.num_classes, optim.weight_decay,seed,model.embedder",
                                "optim.weight_decay=0.1", "seed=3"])
    run = RunDir(tmp_path)
    run.open(cfg)
    run.events.sync(*rows([0.5, 0.8]))
    run.events.sync(*rows([0.5, 0.8, 0.6]))  # appended: the peak stays 0.8
    run.close()

    experiment, start, acc = read_back(tmp_path)
    assert [h.name for h in experiment.hparam_infos] == ["data.num_classes", "optim.weight_decay", "seed",
                                                         "model.embedder"]
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/peak_icl_acc", "eval/iwl_acc"]
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {"data.num_classes": 64, "optim.weight_decay": 0.1, "seed": 3, "model.embedder": "linear"}
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/peak_icl_acc")] == [(10, 0.5), (20, 0.8), (30, 0.8)]
    assert acc.Scalars("eval/iwl_acc")[-1].value == pytest.approx(0.2)  # the final IWL the dashboard shows

    # a resumed run rebuilds its event file: the summary opens the new file too
    again = RunDir(tmp_path)
    again.open(cfg)
    again.events.sync(*rows([0.5, 0.9]))
    again.close()
    _, start, acc = read_back(tmp_path)
    assert start.hparams["seed"].number_value == 3
    assert [e.value for e in acc.Scalars("eval/peak_icl_acc")] == pytest.approx([0.5, 0.9])


def test_without_train_hparams_a_run_shows_the_study_cell() -> None:
    assert list(hparam_values(build_config("tiny"))) == list(DEFAULT_KEYS)
    with pytest.raises(UserError, match="train.hparams names unknown config key.*data.num_clases"):
        build_config("tiny", ["train.hparams=data.num_clases"])


def test_peak_icl_is_the_best_so_far() -> None:
    got = with_peak_icl([{"step": 1, "icl_acc": 0.6}, {"step": 2}, {"step": 3, "icl_acc": 0.55},
                         {"step": 4, "icl_acc": 0.7}])
    assert [r.get("peak_icl_acc") for r in got] == [0.6, None, 0.6, 0.7]
