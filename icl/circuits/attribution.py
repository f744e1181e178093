"""Head attribution: ablate attention heads, alone and in groups, and measure every accuracy metric.

For one model (one checkpoint): the clean metrics on the fixed evaluation sets, then, for
every head ``(layer, head)`` alone, every group of :func:`head_groups` together, and every
ablation, the same metrics with those heads removed:

- ``zero``: the head's output ``z`` set to 0 (icl-dynamics ``opto.make_fn_from_opts`` with
  ``--opto_ablate_heads``, which zeroes the head's values and hence its output);
- ``mean``: ``z`` set to its mean over the evaluation set being measured, position by position
  (removes what the head says about *this* sequence, keeps what it says about every sequence
  *of that set*: the IWL set's mean for IWL, the ICL set's for ICL).

``delta`` = ablated - clean, the mean over the set's sequences of the per-sequence change in
correctness (each sequence is scored clean and ablated: a paired design), and ``se`` its
standard error, ``sd(per-sequence change) / sqrt(n)``: the evaluation sets' sampling noise, what
a delta must clear to say more than "these sequences". Every block's input
(``hook_resid_pre``) is computed once per set, and an ablation whose first head is in block
``l`` reruns blocks ``l`` onwards only (the ResNet embedder, the most expensive part, never
reruns).

The circuit is then named by causal effect (:func:`name_circuit`): the head of a layer >= 1
whose ablation lowers holdout ICL (``icl_acc``) most, and the head of an earlier layer that
lowers it most, among the heads whose drop counts: at least :data:`MIN_DROP` *and* at least
:data:`Z_NAMED` standard errors (:func:`significant`). A named head is *called* an induction
head, resp. a previous-token head, only if the observational score agrees: its induction, resp.
previous-token score (:func:`icl.train.evaluate.attention_scores` on the ICL set) is among the
top :data:`TOP_RANK` of all heads; otherwise it is "an ICL head" (its ablation costs ICL, its
attention does not look like the mechanism). Single-head ablation cannot see work that several
heads share; the groups (each whole layer, the top-k heads by induction and by previous-token
score) can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from icl.config import Config
from icl.data import StudyData
from icl.data.sequences import Sequences
from icl.model.hooks import Hook, ablate_head, capture, hooks
from icl.model.transformer import SequenceModel
from icl.metrics import ACCURACIES, ATTN_STATS, ICL
from icl.train.evaluate import PATTERNS, attention_scores, chunks, set_hits, set_metrics
from icl.train.precision import autocast, param_dtype

ABLATIONS = ("zero", "mean")
MIN_DROP = 0.05  # ICL accuracy points an ablation must cost for its head to be named
Z_NAMED = 2.0  # ... and how many paired standard errors of that drop
TOP_RANK = 3  # an ICL head is called an induction (previous-token) head only if its score ranks this high
GROUP_SIZES = (1, 2, 3)  # the top-k heads by induction / previous-token score, ablated together
HEADS_COLUMNS = ("step", "layer", "head", "ablation", "metric", "value", "delta", "se")
GROUPS_COLUMNS = ("step", "group", "members", "ablation", "metric", "value", "delta", "se")
ROLES = {"induction": ("induction head", "induction"), "prev": ("previous-token head", "prev_tok")}
ICL_HEAD = "ICL head"

Head = tuple[int, int]


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}" if int(layer) >= 0 else "none"


def significant(drop: float, se: float) -> bool:
    """The naming rule: a drop counts if it is at least :data:`MIN_DROP` and at least
    :data:`Z_NAMED` paired standard errors (NaN never counts)."""
    return bool(drop >= MIN_DROP and drop >= Z_NAMED * se)


@dataclass
class ResidualCache:
    """Every evaluation set as chunks of (sequences, each block's clean input ``[B, 17, d]``), each
    set's mean ``z`` per layer (``[T, H, e]``, float64) and the attention scores ``[L, H, 5]`` on
    the ICL set, all from one clean pass."""

    sets: dict[str, list[tuple[Sequences, list[Tensor]]]]
    mean_z: dict[str, list[Tensor]]
    observed: Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, model: SequenceModel, data: StudyData, cfg: Config) -> "ResidualCache":
        layers = range(len(model.blocks))
        sets: dict[str, list[tuple[Sequences, list[Tensor]]]] = {}
        mean_z: dict[str, list[Tensor]] = {}
        scores: Tensor | float = 0.0
        for name, seqs in data.eval_sets.items():
            wanted = ("hook_resid_pre", "attn.hook_z") + ((PATTERNS,) if name == "icl" else ())
            sets[name], z_sum = [], [0.0 for _ in layers]
            with capture(model, lambda n: n.endswith(wanted)) as cache:
                for chunk in chunks(seqs, cfg):
                    images = data.bank.render(chunk.classes, chunk.exemplars, param_dtype(cfg))
                    with autocast(cfg, images.device):
                        model(images, chunk.labels)
                    sets[name].append((chunk, [cache[f"blocks.{l}.hook_resid_pre"] for l in layers]))
                    z_sum = [s + cache[f"blocks.{l}.attn.hook_z"].double().sum(0) for l, s in zip(layers, z_sum)]
                    if name == "icl":
                        scores = scores + attention_scores(cache.stack(PATTERNS).float(), chunk.classes) * len(chunk)
            mean_z[name] = [s / len(seqs) for s in z_sum]
        assert isinstance(scores, Tensor)
        return cls(sets, mean_z, scores / len(data.eval_sets.icl))

    @torch.no_grad()
    def logits(self, model: SequenceModel, cfg: Config, start: int = 0,
               set_hooks: Callable[[str], Sequence[Hook]] = lambda _name: ()) -> dict[str, Tensor]:
        """Each set's logits, running blocks ``start`` onwards on their cached inputs with that
        set's hooks attached."""
        out = {}
        for name, parts in self.sets.items():
            with hooks(model, set_hooks(name)), autocast(cfg, parts[0][1][start].device):
                out[name] = torch.cat([model.logits_from_tokens(r[start], start).float() for _, r in parts])
        return out

    def ablation(self, heads: Sequence[Head], ablation: str) -> Callable[[str], list[Hook]]:
        """The hooks that remove ``heads`` from a pass over one set: zero, or that set's own mean."""
        return lambda name: [ablate_head(l, h, self.mean_z[name][l][:, h] if ablation == "mean" else None)
                             for l, h in heads]


def paired(clean: Mapping[str, Tensor], ablated: Mapping[str, Tensor],
           metrics: Sequence[str]) -> list[dict[str, float | str]]:
    """Per metric: the ablated accuracy (``value``), the mean per-sequence change (``delta``) and its
    standard error (``se``, sd over sequences / sqrt n), read from the device in one copy."""
    stats = []
    for m in metrics:
        a, d = ablated[m].double(), ablated[m].double() - clean[m].double()
        stats.append(torch.stack([a.mean(), d.mean(), d.std() / math.sqrt(d.numel())]))
    return [{"metric": m, "value": v, "delta": dv, "se": se}
            for m, (v, dv, se) in zip(metrics, torch.stack(stats).tolist())]


def top_heads_by(observed: np.ndarray, stat: str, candidates: np.ndarray, k: int) -> list[Head]:
    """The ``k`` heads among ``candidates`` (``[L, H]`` bool) with the highest observational
    ``stat``, highest first (ties: the earlier head)."""
    score = np.where(candidates, observed[:, :, ATTN_STATS.index(stat)], -np.inf).ravel()
    order = np.argsort(-score, kind="stable")[: min(k, int(candidates.sum()))]
    heads = observed.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in order]


def candidates(layers: int, heads: int, role: str, below: int | None = None) -> np.ndarray:
    """``[L, H]``: where a head of ``role`` may sit. An induction head reads what an earlier head
    wrote: layer >= 1. A previous-token head writes for a later head: a layer below ``below``
    (the induction head's layer; by default the last layer)."""
    layer = np.arange(layers)[:, None].repeat(heads, 1)
    if role == "induction":
        return layer >= 1
    return layer < (below if below is not None and below >= 1 else layers - 1)


def head_groups(observed: np.ndarray) -> dict[str, list[Head]]:
    """The groups ablated together: each whole layer (``layer 0``, ...), and the top-k heads by
    induction score (layers >= 1) and by previous-token score (below the last layer), k in
    :data:`GROUP_SIZES` (``top-2 induction``, ``top-1 previous-token``, ...). A 1-layer model has
    neither kind of circuit group."""
    layers, heads = observed.shape[:2]
    groups = {f"layer {l}": [(l, h) for h in range(heads)] for l in range(layers)}
    for role, label in (("induction", "induction"), ("prev", "previous-token")):
        where = candidates(layers, heads, role)
        for k in GROUP_SIZES:
            if k <= where.sum():
                groups[f"top-{k} {label}"] = top_heads_by(observed, ROLES[role][1], where, k)
    return groups


@dataclass
class Attribution:
    """One model's head attribution: ``clean`` metrics, ``rows`` (one per head, ablation and
    metric; :data:`HEADS_COLUMNS` without ``step``), ``groups`` (one per group, ablation and
    metric; :data:`GROUPS_COLUMNS` without ``step``) and ``observed`` ``[L, H, 5]`` attention
    scores on the ICL set (columns :data:`~icl.metrics.ATTN_STATS`)."""

    clean: dict[str, float]
    rows: list[dict[str, float | int | str]]
    groups: list[dict[str, float | int | str]]
    observed: np.ndarray


@torch.no_grad()
def head_attribution(model: SequenceModel, data: StudyData, cfg: Config, ablations: Sequence[str] = ABLATIONS,
                     metrics: Sequence[str] = ACCURACIES) -> Attribution:
    """Ablate every head alone and every group of :func:`head_groups`, by every ablation in
    ``ablations``, and record ``metrics`` with paired standard errors."""
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"unknown ablation(s) {sorted(unknown)}; use {', '.join(ABLATIONS)}")
    was_training = model.training
    model.eval()
    try:
        tokens = ResidualCache.build(model, data, cfg)
        clean_logits = tokens.logits(model, cfg)
        clean = set_metrics(clean_logits, data.eval_sets, data, cfg)
        clean_hits = set_hits(clean_logits, data.eval_sets, data)
        observed = tokens.observed.cpu().numpy()
        done: dict[tuple[frozenset[Head], str], list[dict[str, float | str]]] = {}

        def measure(heads: Sequence[Head], ablation: str) -> list[dict[str, float | str]]:
            key = (frozenset(heads), ablation)
            if key not in done:
                logits = tokens.logits(model, cfg, min(l for l, _ in heads), tokens.ablation(heads, ablation))
                done[key] = paired(clean_hits, set_hits(logits, data.eval_sets, data), metrics)
            return done[key]

        rows: list[dict[str, float | int | str]] = []
        groups: list[dict[str, float | int | str]] = []
        for ablation in ablations:
            for layer in range(len(model.blocks)):
                for head in range(model.cfg.heads):
                    rows += [{"layer": layer, "head": head, "ablation": ablation, **r}
                             for r in measure([(layer, head)], ablation)]
            for group, members in head_groups(observed).items():
                groups += [{"group": group, "members": " ".join(head_name(*m) for m in members),
                            "ablation": ablation, **r} for r in measure(members, ablation)]
    finally:
        model.train(was_training)
    return Attribution(clean, rows, groups, observed)


def drops(rows: Sequence[dict], metric: str, ablation: str, layers: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """``[L, H]`` twice: how much ablating each head lowers ``metric`` (-delta), and its standard
    error (NaN where not measured)."""
    drop, se = np.full((layers, heads), np.nan), np.full((layers, heads), np.nan)
    for r in rows:
        if r["metric"] == metric and r["ablation"] == ablation:
            drop[int(r["layer"]), int(r["head"])] = -float(r["delta"])
            se[int(r["layer"]), int(r["head"])] = float(r.get("se", math.nan))
    return drop, se


def _rank(scores: np.ndarray, layer: int, head: int) -> int:
    """1 + how many heads score strictly higher than ``(layer, head)``."""
    return int((scores > scores[layer, head]).sum()) + 1


def _best(scores: np.ndarray) -> str:
    l, h = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    return head_name(int(l), int(h))


def name_circuit(rows: Sequence[dict], observed: np.ndarray, ablation: str,
                 groups: Sequence[dict] = ()) -> dict[str, float | int | str]:
    """The ICL heads by causal effect on ``icl_acc`` under ``ablation`` (columns of ``circuit.csv``):

    - ``induction_*``: of the heads of layers >= 1 whose drop is :func:`significant`, the one
      whose ablation costs ICL most; ``induction_role`` is "induction head" if its induction
      score ranks within :data:`TOP_RANK` of all heads, else "ICL head";
    - ``prev_*``: the same below it (below the last layer when none is named), called
      "previous-token head" by its previous-token score's rank;
    - ``*_icl_drop`` and ``*_icl_drop_se``, ``*_score``, ``*_obs_rank`` (1 = the top head by
      that score), ``*_obs_best`` (the top head); layer and head are -1 where none qualifies;
    - ``group_icl_drop`` / ``_se``: what the widest top-k induction group in ``groups`` (k = 3,
      fewer where layers >= 1 hold fewer heads) costs ICL together; ``circuit`` = 1 if a head is
      named or that group's drop is significant (the circuit is present, shared or not), else 0.
    """
    layers, heads = observed.shape[:2]
    drop, se = drops(rows, ICL, ablation, layers, heads)
    out: dict[str, float | int | str] = {"ablation": ablation}

    def pick(prefix: str, where: np.ndarray) -> int:
        role, stat = ROLES[prefix]
        obs = observed[:, :, ATTN_STATS.index(stat)]
        counts = where & np.vectorize(significant)(drop, se)
        masked = np.where(counts, drop, -np.inf)
        best = np.unravel_index(int(np.argmax(masked)), masked.shape) if counts.any() else None
        if best is None:
            out.update({f"{prefix}_layer": -1, f"{prefix}_head": -1, f"{prefix}_role": "",
                        f"{prefix}_icl_drop": math.nan, f"{prefix}_icl_drop_se": math.nan,
                        f"{prefix}_score": math.nan, f"{prefix}_obs_rank": -1})
        else:
            l, h = int(best[0]), int(best[1])
            rank = _rank(obs, l, h)
            out.update({f"{prefix}_layer": l, f"{prefix}_head": h, f"{prefix}_role": role if rank <= TOP_RANK
                        else ICL_HEAD, f"{prefix}_icl_drop": float(drop[l, h]), f"{prefix}_icl_drop_se":
                        float(se[l, h]), f"{prefix}_score": float(obs[l, h]), f"{prefix}_obs_rank": rank})
        out[f"{prefix}_obs_best"] = _best(obs)
        return int(out[f"{prefix}_layer"])

    induction_layer = pick("induction", candidates(layers, heads, "induction"))
    # below the induction head; with none named (e.g. several heads share its work, so none
    # alone costs MIN_DROP), below the last layer: a head whose output a later layer can read
    pick("prev", candidates(layers, heads, "prev", below=induction_layer))
    icl = {str(g["group"]): g for g in groups if g["metric"] == ICL and g["ablation"] == ablation}
    widest = next((icl[f"top-{k} induction"] for k in GROUP_SIZES[::-1] if f"top-{k} induction" in icl), None)
    out["group_icl_drop"] = -float(widest["delta"]) if widest else math.nan
    out["group_icl_drop_se"] = float(widest["se"]) if widest else math.nan
    named = int(out["induction_layer"]) >= 0 or int(out["prev_layer"]) >= 0
    out["circuit"] = int(named or significant(float(out["group_icl_drop"]), float(out["group_icl_drop_se"])))
    return out
