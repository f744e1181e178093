"""Head attribution: ablate each attention head alone and measure every accuracy metric.

For one model (one checkpoint): the clean metrics on the fixed evaluation sets, then, for
every head ``(layer, head)`` and every ablation, the same metrics with that head removed:

- ``zero``: the head's output ``z`` set to 0 (icl-dynamics ``opto.make_fn_from_opts`` with
  ``--opto_ablate_heads``, which zeroes the head's values and hence its output);
- ``mean``: ``z`` set to its mean over the ICL holdout set, position by position (removes what
  the head says about *this* sequence, keeps what it says about every sequence).

``delta`` = ablated - clean. Every block's input (``hook_resid_pre``) is computed once per set,
and an ablation in block ``l`` reruns blocks ``l`` onwards only: nothing changes before it (and
the ResNet embedder, the most expensive part, never reruns).

The circuit is then named by causal effect (:func:`name_circuit`): the **induction head** is the
head of a layer >= 1 whose ablation lowers holdout ICL (``icl_acc``) most; the
**previous-token head** the head of an earlier layer (earlier than the induction head's, or,
with none named, than the last layer) whose ablation lowers it most. Either is named only if
that drop is at least :data:`MIN_DROP`. Single-head ablation cannot see work that several heads
share: where redundant heads each cost less than that, none of them is named. Each is checked against the observational
scores (:func:`icl.train.evaluate.attention_scores` on the ICL set): its rank by induction
score, resp. previous-token score, among all heads (1 = the top head agrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from icl.config import Config
from icl.data import StudyData
from icl.data.sequences import Sequences
from icl.model.hooks import ablate_head, capture, hooks
from icl.model.transformer import SequenceModel
from icl.metrics import ACCURACIES, ATTN_STATS, ICL
from icl.train.evaluate import attention_scores, autocast, chunks, set_metrics

ABLATIONS = ("zero", "mean")
MIN_DROP = 0.05  # ICL accuracy points an ablation must cost for its head to be named
HEADS_COLUMNS = ("step", "layer", "head", "ablation", "metric", "value", "delta")


@dataclass
class ResidualCache:
    """Every evaluation set as chunks of (sequences, each block's clean input ``[B, 17, d]``)."""

    sets: dict[str, list[tuple[Sequences, list[Tensor]]]]

    @classmethod
    @torch.no_grad()
    def build(cls, model: SequenceModel, data: StudyData, cfg: Config) -> "ResidualCache":
        sets: dict[str, list[tuple[Sequences, list[Tensor]]]] = {}
        layers = range(len(model.blocks))
        with capture(model, lambda n: n.endswith("hook_resid_pre")) as cache:
            for name, seqs in data.eval_sets.items():
                sets[name] = []
                for chunk in chunks(seqs, cfg):
                    images = data.bank.render(chunk.classes, chunk.exemplars)
                    with autocast(cfg, images.device):
                        model(images, chunk.labels)
                    sets[name].append((chunk, [cache[f"blocks.{l}.hook_resid_pre"] for l in layers]))
        return cls(sets)

    @torch.no_grad()
    def logits(self, model: SequenceModel, cfg: Config, start: int = 0) -> dict[str, Tensor]:
        """Each set's logits, running blocks ``start`` onwards on their cached inputs."""
        out = {}
        for name, parts in self.sets.items():
            with autocast(cfg, parts[0][1][start].device):
                out[name] = torch.cat([model.logits_from_tokens(r[start], start).float() for _, r in parts])
        return out


@dataclass
class Attribution:
    """One model's head attribution: ``clean`` metrics, ``rows`` (one per head, ablation and
    metric; :data:`HEADS_COLUMNS` without ``step``) and ``observed`` ``[L, H, 5]`` attention
    scores on the ICL set (columns :data:`~icl.metrics.ATTN_STATS`)."""

    clean: dict[str, float]
    rows: list[dict[str, float | int | str]]
    observed: np.ndarray


@torch.no_grad()
def icl_activations(model: SequenceModel, tokens: ResidualCache, cfg: Config) -> tuple[list[Tensor], Tensor]:
    """Each layer's mean ``z`` over the ICL set (``[T, H, e]`` per layer) and the attention
    scores ``[L, H, 5]`` there, from one clean pass with the patterns hooked."""
    wanted = lambda n: n.endswith(("attn.hook_z", "attn.hook_pattern"))  # noqa: E731
    z_sum: list[Tensor] | None = None
    scores, n = 0.0, 0
    with capture(model, wanted) as cache:
        for chunk, r in tokens.sets["icl"]:
            with autocast(cfg, r[0].device):
                model.logits_from_tokens(r[0])
            z = [cache[f"blocks.{l}.attn.hook_z"].double().sum(0) for l in range(len(model.blocks))]
            z_sum = z if z_sum is None else [a + b for a, b in zip(z_sum, z)]
            scores = scores + attention_scores(cache.stack("attn.hook_pattern").float(), chunk.classes) * len(chunk)
            n += len(chunk)
    assert z_sum is not None
    return [(z / n).float() for z in z_sum], scores / n


@torch.no_grad()
def head_attribution(model: SequenceModel, data: StudyData, cfg: Config, ablations: Sequence[str] = ABLATIONS,
                     metrics: Sequence[str] = ACCURACIES) -> Attribution:
    """Ablate every head alone, by every ablation in ``ablations``, and record ``metrics``."""
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"unknown ablation(s) {sorted(unknown)}; use {', '.join(ABLATIONS)}")
    was_training = model.training
    model.eval()
    try:
        tokens = ResidualCache.build(model, data, cfg)
        clean = set_metrics(tokens.logits(model, cfg), data.eval_sets, data, cfg)
        mean_z, observed = icl_activations(model, tokens, cfg)
        rows: list[dict[str, float | int | str]] = []
        for ablation in ablations:
            for layer in range(len(model.blocks)):
                for head in range(model.cfg.heads):
                    mean = mean_z[layer][:, head] if ablation == "mean" else None
                    with hooks(model, [ablate_head(layer, head, mean)]):
                        got = set_metrics(tokens.logits(model, cfg, start=layer), data.eval_sets, data, cfg)
                    rows += [{"layer": layer, "head": head, "ablation": ablation, "metric": m,
                              "value": got[m], "delta": got[m] - clean[m]} for m in metrics]
    finally:
        model.train(was_training)
    return Attribution(clean, rows, observed.cpu().numpy())


def drops(rows: Sequence[dict], metric: str, ablation: str, layers: int, heads: int) -> np.ndarray:
    """``[L, H]``: how much ablating each head lowers ``metric`` (-delta; NaN where not measured)."""
    out = np.full((layers, heads), np.nan)
    for r in rows:
        if r["metric"] == metric and r["ablation"] == ablation:
            out[int(r["layer"]), int(r["head"])] = -float(r["delta"])
    return out


def _rank(scores: np.ndarray, layer: int, head: int) -> int:
    """1 + how many heads score strictly higher than ``(layer, head)``."""
    return int((scores > scores[layer, head]).sum()) + 1


def _best(scores: np.ndarray) -> str:
    l, h = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    return f"L{l}H{h}"


def name_circuit(rows: Sequence[dict], observed: np.ndarray, ablation: str) -> dict[str, float | int | str]:
    """The induction and previous-token heads by causal effect on ``icl_acc`` under ``ablation``,
    with their observational scores, ranks, and the observationally top heads (columns of
    ``circuit.csv``; layer and head are -1 where no head qualifies)."""
    layers, heads = observed.shape[:2]
    drop = drops(rows, ICL, ablation, layers, heads)
    induction_obs = observed[:, :, ATTN_STATS.index("induction")]
    prev_obs = observed[:, :, ATTN_STATS.index("prev_tok")]
    out: dict[str, float | int | str] = {"ablation": ablation}

    def pick(prefix: str, candidates: np.ndarray, obs: np.ndarray) -> int:
        masked = np.where(candidates, drop, -np.inf)
        best = np.unravel_index(int(np.argmax(masked)), masked.shape) if candidates.any() else None
        if best is None or not masked[best] >= MIN_DROP:
            out.update({f"{prefix}_layer": -1, f"{prefix}_head": -1, f"{prefix}_icl_drop": math.nan,
                        f"{prefix}_score": math.nan, f"{prefix}_obs_rank": -1})
        else:
            l, h = int(best[0]), int(best[1])
            out.update({f"{prefix}_layer": l, f"{prefix}_head": h, f"{prefix}_icl_drop": float(drop[l, h]),
                        f"{prefix}_score": float(obs[l, h]), f"{prefix}_obs_rank": _rank(obs, l, h)})
        out[f"{prefix}_obs_best"] = _best(obs)
        return int(out[f"{prefix}_layer"])

    layer_index = np.arange(layers)[:, None].repeat(heads, 1)
    induction_layer = pick("induction", layer_index >= 1, induction_obs)
    # below the induction head; with none named (e.g. several heads share its work, so none
    # alone costs MIN_DROP), below the last layer: a head whose output a later layer can read
    pick("prev", layer_index < (induction_layer if induction_layer >= 1 else layers - 1), prev_obs)
    return out
