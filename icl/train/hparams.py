"""The TensorBoard HParams summary of a run: its cell, so TensorBoard's HParams dashboard
filters and sorts the runs of a sweep by cell, with peak ICL and final IWL beside them.

The hyperparameters are the config keys of ``train.hparams`` (a sweep sets its grid keys;
empty: the study's cell, ``data.num_classes``, ``optim.weight_decay``, ``seed``). The metrics
are two scalar series of the run's event file, read by the dashboard at their last value:
``eval/peak_icl_acc`` (the best holdout ICL accuracy so far, Chan et al. 2022's transient ICL
peak, written with every evaluation) and ``eval/iwl_acc`` (in-weights accuracy: its last value
is the final IWL).

Why the summaries come as serialized protos: tensorboardX and ``torch.utils.tensorboard`` both
build them (``summary.hparams``), each with its own proto classes; bytes go into either
writer's ``Summary``. Built by tensorboardX where it is installed, else by torch (which
needs the ``tensorboard`` package).
"""

from __future__ import annotations

from typing import Any, Sequence

from icl.config import Config, get_key
from icl.metrics import HPARAMS_METRICS, ICL, PEAK_ICL, group

DEFAULT_KEYS = ("data.num_classes", "optim.weight_decay", "seed")
METRIC_TAGS = tuple(f"{group(c)}/{c}" for c in HPARAMS_METRICS)  # their TensorBoard tags


def hparam_keys(cfg: Config) -> list[str]:
    """The config keys shown as hyperparameters: ``train.hparams``, else the study's cell."""
    listed = [k.strip() for k in cfg.train.hparams.split(",") if k.strip()]
    return listed or list(DEFAULT_KEYS)


def hparam_values(cfg: Config) -> dict[str, Any]:
    """``{key: value}`` of :func:`hparam_keys` (numbers, text, booleans; unset keys left out)."""
    values = {k: get_key(cfg, k) for k in hparam_keys(cfg)}
    return {k: v for k, v in values.items() if v is not None}


def hparams_summaries(hparams: dict[str, Any]) -> list[bytes]:
    """The serialized ``Summary`` protos TensorBoard's HParams plugin reads, to be written
    at the start of the event file: the experiment (the keys and the two metrics) and the
    session start (this run's values)."""
    try:
        from tensorboardX.summary import hparams as build
    except ImportError:
        from torch.utils.tensorboard.summary import hparams as build
    experiment, session_start, _ = build(hparams, {tag: 0.0 for tag in METRIC_TAGS})
    return [experiment.SerializeToString(), session_start.SerializeToString()]


def with_peak_icl(rows: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """``rows`` with ``peak_icl_acc``: the highest ``icl_acc`` up to each row (rows without
    ``icl_acc`` are left as they are)."""
    peak = None
    out = []
    for row in rows:
        if ICL in row:
            peak = float(row[ICL]) if peak is None else max(peak, float(row[ICL]))
            row = {**row, PEAK_ICL: peak}
        out.append(row)
    return out


__all__ = ["DEFAULT_KEYS", "METRIC_TAGS", "PEAK_ICL", "hparam_keys", "hparam_values", "hparams_summaries",
           "with_peak_icl"]
