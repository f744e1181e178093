"""Head attribution and composition for every checkpoint of a run directory, incrementally.

    update_run(RUN) -> the checkpoints analysed now

Writes, next to the run's ``metrics.csv`` (each rewritten atomically after every checkpoint, so
an interruption loses at most the checkpoint in progress):

- ``heads.csv``: ``step, layer, head, ablation, metric, value, delta, se`` (every head, every
  ablation, every accuracy metric; ``delta`` = ablated - clean, ``se`` its paired standard error);
- ``groups.csv``: ``step, group, members, ablation, metric, value, delta, se``: the same for the
  groups ablated together (each layer, the top-k heads by induction and previous-token score;
  :func:`icl.circuits.attribution.head_groups`);
- ``circuit.csv``: one row per step: the clean metrics, the ICL heads named by causal effect
  with their roles, observational scores and ranks, the top-k induction group's drop and whether
  the circuit is present (:func:`icl.circuits.attribution.name_circuit`), and the K-composition
  of the named pair (``pair_k_comp``), the largest over all pairs (``max_k_comp``) and the
  median (``median_k_comp``, what unrelated heads give);
- ``composition.csv``: ``step, layer_from, head_from, layer_to, head_to, k_comp``.

Only steps not yet in ``heads.csv`` are analysed, so a sweep can call this at every checkpoint
(``train.keep_checkpoints`` only keeps the newest few: analysing each as it is written is what
makes attribution *over training* possible without keeping them all), and ``icl-analyze heads``
can be re-run at any time. Checkpoints are read through :mod:`icl.train.checkpoint`
(listed, verified against their manifests; a corrupt one is reported and skipped).
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from icl.circuits.attribution import ABLATIONS, GROUPS_COLUMNS, HEADS_COLUMNS, head_attribution, name_circuit
from icl.circuits.composition import composition_rows, k_composition
from icl.config import Config, build_config, read_yaml
from icl.data import StudyData, load_data
from icl.errors import UserError
from icl.inputs import read_text
from icl.io import atomic_write
from icl.layout import RunLayout
from icl.model import SequenceModel, build_model
from icl.train import checkpoint as ckpt
from icl.train.precision import param_dtype

COMPOSITION_COLUMNS = ("step", "layer_from", "head_from", "layer_to", "head_to", "k_comp")


@dataclass
class Analysed:
    step: int
    seconds: float  # attribution + composition of this checkpoint, data loading excluded
    circuit: dict[str, float | int | str]


def read_rows(path: Path) -> list[dict[str, str]]:
    """A table this module wrote (``[]`` if there is none); :class:`UserError` if it is not
    one (not UTF-8 CSV, no integer ``step`` in every row), saying how to redo it."""
    if not path.is_file():
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path, "table"), newline="")))
        for r in rows:
            int(r["step"])
    except (UserError, csv.Error, KeyError, ValueError, TypeError) as e:
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path} is not a table icl-analyze heads wrote ({why}); move it away and run "
                        f"`icl-analyze heads {path.parent}` again to redo the analysis") from None
    return rows


def write_rows(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def run_config(run_dir: Path) -> Config:
    return build_config(read_yaml(RunLayout(run_dir).config, "run config"))


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """The run's checkpoint directories by step, oldest first."""
    return {ckpt.step_of(p) or 0: p for p in RunLayout(run_dir).checkpoints()}


def load_checkpoint_model(path: Path, cfg: Config, device: torch.device | str) -> tuple[int, SequenceModel]:
    """The model saved in checkpoint ``path`` (verified); ValueError if it is damaged."""
    loaded = ckpt.load(path)
    model = build_model(cfg).to(device, param_dtype(cfg))
    model.load_state_dict(loaded.state["model"])
    return loaded.step, model


_DATA: dict[str, StudyData] = {}


def data_for(cfg: Config, device: torch.device | str) -> StudyData:
    """The run's data, kept for the next call (a sweep calls :func:`update_run` at every
    checkpoint of its trials in one process; their images and evaluation sets are the same)."""
    key = repr((cfg.data, cfg.eval, str(device)))
    if key not in _DATA:
        _DATA.clear()  # one at a time: a 105 px image bank is 358 MB
        _DATA[key] = load_data(cfg, device)
    return _DATA[key]


def analyse(model: SequenceModel, data: StudyData, cfg: Config, ablations: Sequence[str] = ABLATIONS):
    """One checkpoint: ``(heads rows, group rows, circuit row, composition rows)``, without ``step``."""
    attribution = head_attribution(model, data, cfg, ablations)
    scores = k_composition(model)
    circuit = {**attribution.clean, **name_circuit(attribution.rows, attribution.observed,
                                                   "mean" if "mean" in ablations else ablations[0],
                                                   attribution.groups)}
    pl, ph, il, ih = (int(circuit[k]) for k in ("prev_layer", "prev_head", "induction_layer", "induction_head"))
    defined = scores[np.isfinite(scores)]
    circuit["pair_k_comp"] = float(scores[pl, ph, il, ih]) if min(pl, il) >= 0 else math.nan
    circuit["max_k_comp"] = float(defined.max()) if defined.size else math.nan
    circuit["median_k_comp"] = float(np.median(defined)) if defined.size else math.nan
    return attribution.rows, attribution.groups, circuit, composition_rows(scores)


def update_run(run_dir: Path | str, *, ablations: Sequence[str] = ABLATIONS, device: torch.device | str = "cpu",
               data: StudyData | None = None) -> list[Analysed]:
    """Analyse every checkpoint of ``run_dir`` whose step is not yet in ``heads.csv``."""
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    cfg = run_config(run_dir)
    heads_rows = read_rows(run.heads)
    if heads_rows and "se" not in heads_rows[0]:
        raise UserError(f"{run.heads} was written by an earlier version (no standard errors; its mean "
                        f"ablation used the ICL set's mean for every set): move it, {run.circuit.name} and "
                        f"{run.composition.name} aside to analyse the run's saved checkpoints again")
    done = {int(r["step"]) for r in heads_rows}  # heads.csv decides; the other files follow it
    group_rows = [r for r in read_rows(run.groups) if int(r["step"]) in done]
    circuit_rows = [r for r in read_rows(run.circuit) if int(r["step"]) in done]
    comp_rows = [r for r in read_rows(run.composition) if int(r["step"]) in done]
    analysed: list[Analysed] = []
    for step, path in checkpoint_steps(run_dir).items():
        if step in done:
            continue
        try:
            step, model = load_checkpoint_model(path, cfg, device)
        except Exception as e:  # verify's ValueError, or torch failing on bytes that pass
            print(f"warning: checkpoint {path} is unreadable ({e}); skipped", file=sys.stderr)
            continue
        if data is None:
            data = data_for(cfg, device)
        t0 = time.perf_counter()
        heads, groups, circuit, comp = analyse(model, data, cfg, ablations)
        seconds = time.perf_counter() - t0
        heads_rows += [{"step": step, **r} for r in heads]
        group_rows += [{"step": step, **r} for r in groups]
        circuit_rows.append({"step": step, **circuit, "seconds": seconds})
        comp_rows += [{"step": step, **r} for r in comp]
        by_step = lambda r: int(r["step"])  # noqa: E731
        # heads.csv last: it says which steps are done, so the others hold them before it does
        write_rows(run.groups, sorted(group_rows, key=by_step), GROUPS_COLUMNS)
        write_rows(run.circuit, sorted(circuit_rows, key=by_step), list(circuit_rows[-1]))
        write_rows(run.composition, sorted(comp_rows, key=by_step), COMPOSITION_COLUMNS)
        write_rows(run.heads, sorted(heads_rows, key=by_step), HEADS_COLUMNS)
        analysed.append(Analysed(step, seconds, circuit))
    return analysed
