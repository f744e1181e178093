"""Head attribution and composition: on a circuit planted by hand (one head per role, or two heads
sharing the induction work), on an unused head, on synthetic attributions for the naming rules,
and over the checkpoints of a real (tiny) run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import planted
from icl.circuits import head_attribution, k_composition, name_circuit, update_run
from icl.circuits.attribution import (ABLATIONS, GROUPS_COLUMNS, HEADS_COLUMNS, ICL_HEAD, MIN_DROP, ResidualCache,
                                      head_groups)
from icl.circuits.composition import head_circuits
from icl.circuits.over_training import load_checkpoint_model
from icl.config import load_config
from icl.data import load_data
from icl.errors import UserError
from icl.model import build_model
from icl.model.hooks import ablate_head, hooks, run_with_cache
from icl.train import RunDir
from icl.train import train
from icl.layout import RunLayout
from icl.metrics import ACCURACIES, ATTN_STATS
from icl.train.evaluate import evaluate, set_hits, set_metrics


@pytest.fixture(scope="module")
def circuit():
    cfg = planted.config()
    model = planted.model(cfg)
    return cfg, planted.data(cfg), model, head_attribution(model, planted.data(cfg), cfg)


def test_planted_model_does_icl_through_its_circuit(circuit):
    _, _, model, a = circuit
    assert a.clean["icl_acc"] == 1.0 and a.clean["flip_icl_ctx_acc"] == 1.0  # reads labels off the context
    assert a.clean["iwl_acc"] == 0.0  # and knows nothing in its weights
    obs = {name: a.observed[..., i] for i, name in enumerate(("match_img", "match_lbl", "other", "induction",
                                                               "prev_tok"))}
    assert obs["prev_tok"][0, 0] > 0.999  # an exact previous-token head
    assert obs["match_lbl"][1, 0] > 0.8  # the query attends to the labels of its class


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_attribution_names_the_planted_heads(circuit, ablation):
    _, _, _, a = circuit
    named = name_circuit(a.rows, a.observed, ablation, a.groups)
    assert (named["induction_layer"], named["induction_head"]) == (1, 0)
    assert (named["prev_layer"], named["prev_head"]) == (0, 0)
    assert named["induction_icl_drop"] > 0.3 and named["prev_icl_drop"] > 0.3  # ICL falls to about chance
    assert 0 < named["induction_icl_drop_se"] < 0.05 and 0 < named["prev_icl_drop_se"] < 0.05  # 256 sequences
    assert named["induction_obs_rank"] == 1 and named["prev_obs_rank"] == 1  # observation agrees
    assert named["induction_role"] == "induction head" and named["prev_role"] == "previous-token head"
    assert named["induction_obs_best"] == "L1H0" and named["prev_obs_best"] == "L0H0"
    assert named["circuit"] == 1


def test_the_planted_pair_composes_most(circuit):
    _, _, model, _ = circuit
    k = k_composition(model)
    assert k.shape == (2, 2, 2, 2)
    assert np.isnan(k[1, :, :, :]).all() and np.isnan(k[:, :, 0, :]).all()  # only earlier -> later
    assert np.nanargmax(k) == np.ravel_multi_index((0, 0, 1, 0), k.shape)
    assert k[0, 0, 1, 0] == pytest.approx(0.25, abs=1e-6)  # two aligned rank-16 maps: 1 / sqrt(16)
    assert k[0, 1, 1, 0] == 0.0  # the unused head writes nothing


def test_ablating_an_unused_head_changes_nothing(circuit):
    _, _, model, a = circuit
    assert torch.equal(model.blocks[0].attn.proj.weight[:, planted.E :], torch.zeros(planted.D, planted.E))
    unused = [r for r in a.rows if (r["layer"], r["head"]) == (0, 1)]
    assert len(unused) == len(ABLATIONS) * len(ACCURACIES)
    assert all(r["delta"] == 0.0 and r["se"] == 0.0 and r["value"] == a.clean[r["metric"]] for r in unused)


def test_k_composition_is_the_frobenius_formula():
    """On a random model (LayerNorm gains randomised too), one pair by the formula directly."""
    cfg = load_config("tiny", ["model.layers=3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.ln1.weight.uniform_(0.5, 1.5)
    k = k_composition(model)
    e = cfg.model.d_model // cfg.model.heads
    a1, a2 = model.blocks[0].attn, model.blocks[2].attn
    g1, g2 = model.blocks[0].ln1.weight.double(), model.blocks[2].ln1.weight.double()
    w_v = g1[:, None] * a1.qkv.weight.double()[2 * cfg.model.d_model + e : 2 * cfg.model.d_model + 2 * e].T
    w_o = a1.proj.weight.double()[:, e : 2 * e].T
    ov = w_v @ w_o
    ov = ov - ov.mean(-1, keepdim=True)
    h = 3
    w_q = g2[:, None] * a2.qkv.weight.double()[h * e : (h + 1) * e].T
    w_k = g2[:, None] * a2.qkv.weight.double()[cfg.model.d_model + h * e : cfg.model.d_model + (h + 1) * e].T
    qk = w_q @ w_k.T
    expected = ((ov @ qk.T).norm() / (ov.norm() * qk.norm())).detach()
    assert k[0, 1, 2, 3] == pytest.approx(float(expected), rel=1e-9)
    assert np.nanmax(k) <= 1.0 and np.nanmin(k) >= 0.0
    ov_all, qk_all = head_circuits(model)
    torch.testing.assert_close(ov_all[0, 1], ov.detach())


@pytest.fixture(scope="module")
def shared():
    cfg = planted.config()
    data = planted.data(cfg)
    return head_attribution(planted.model(cfg, shared=True), data, cfg)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_group_ablation_shows_work_two_heads_share(shared, ablation):
    """Two copies of the induction head: either alone costs nothing, so no induction head is
    named; layer 1, and the top-2 heads by induction score, ablated together, cost ICL as much as
    the one head of the plain planted circuit."""
    a = shared
    assert a.clean["icl_acc"] == 1.0
    icl = {(r["layer"], r["head"]): r for r in a.rows if r["metric"] == "icl_acc" and r["ablation"] == ablation}
    assert -icl[(1, 0)]["delta"] < MIN_DROP and -icl[(1, 1)]["delta"] < MIN_DROP
    groups = {r["group"]: r for r in a.groups if r["metric"] == "icl_acc" and r["ablation"] == ablation}
    assert groups["top-2 induction"]["members"] in ("L1H0 L1H1", "L1H1 L1H0")
    for name in ("top-2 induction", "layer 1", "layer 0", "top-1 previous-token"):
        assert -groups[name]["delta"] > 0.3 and groups[name]["se"] < 0.05, name
    assert -groups["top-1 induction"]["delta"] < MIN_DROP  # one copy: the other still answers
    named = name_circuit(a.rows, a.observed, ablation, a.groups)
    assert named["induction_layer"] == -1  # no head alone qualifies ...
    assert (named["prev_layer"], named["prev_head"], named["prev_role"]) == (0, 0, "previous-token head")
    assert named["group_icl_drop"] > 0.3 and named["circuit"] == 1  # ... but the group shows the circuit


def test_groups_are_layers_and_the_top_heads_by_score():
    observed = np.zeros((3, 4, len(ATTN_STATS)))
    observed[:, :, ATTN_STATS.index("induction")] = [[9, 9, 9, 9], [0.1, 0.5, 0.2, 0.0], [0.4, 0.0, 0.3, 0.0]]
    observed[:, :, ATTN_STATS.index("prev_tok")] = [[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0], [1, 1, 1, 1]]
    g = head_groups(observed)
    assert g["layer 1"] == [(1, 0), (1, 1), (1, 2), (1, 3)] and "layer 2" in g
    assert g["top-3 induction"] == [(1, 1), (2, 0), (2, 2)]  # layer 0 cannot read a previous token
    assert g["top-1 induction"] == [(1, 1)] and g["top-2 induction"] == [(1, 1), (2, 0)]
    assert g["top-2 previous-token"] == [(0, 1), (1, 2)]  # the last layer writes for no later head
    one_layer = head_groups(observed[:1])
    assert list(one_layer) == ["layer 0"]


def synthetic(drops: dict, ses: dict, layers: int = 2, heads: int = 4):
    """``heads.csv``-like rows: ``icl_acc`` drops and standard errors per head (0 elsewhere)."""
    return [{"layer": l, "head": h, "ablation": "mean", "metric": "icl_acc", "value": 0.9 - drops.get((l, h), 0.0),
             "delta": -drops.get((l, h), 0.0), "se": ses.get((l, h), 0.01)}
            for l in range(layers) for h in range(heads)]


def scores(induction_rank_of_l1h0: int, prev_rank_of_l0h0: int) -> np.ndarray:
    """``[2, 4, 5]`` observed scores: L1H0's induction score ranks ``induction_rank_of_l1h0``
    among all 8 heads, L0H0's previous-token score ``prev_rank_of_l0h0``."""
    obs = np.zeros((2, 4, len(ATTN_STATS)))
    for stat, (l, h), rank in (("induction", (1, 0), induction_rank_of_l1h0), ("prev_tok", (0, 0), prev_rank_of_l0h0)):
        others = [(a, b) for a in range(2) for b in range(4) if (a, b) != (l, h)]
        values = np.linspace(0.9, 0.1, 8)
        obs[l, h, ATTN_STATS.index(stat)] = values[rank - 1]
        for (a, b), v in zip(others, np.delete(values, rank - 1)):
            obs[a, b, ATTN_STATS.index(stat)] = v
    return obs


@pytest.mark.parametrize("rank, role", [(1, "induction head"), (3, "induction head"), (4, ICL_HEAD), (8, ICL_HEAD)])
def test_a_head_is_called_an_induction_head_only_if_its_induction_score_is_top_3(rank, role):
    rows = synthetic({(1, 0): 0.3, (0, 0): 0.3}, {})
    named = name_circuit(rows, scores(rank, 1), "mean")
    assert (named["induction_layer"], named["induction_head"], named["induction_obs_rank"]) == (1, 0, rank)
    assert named["induction_role"] == role
    assert named["prev_role"] == "previous-token head"


@pytest.mark.parametrize("rank, role", [(2, "previous-token head"), (5, ICL_HEAD)])
def test_a_head_is_called_a_previous_token_head_only_if_its_previous_token_score_is_top_3(rank, role):
    named = name_circuit(synthetic({(1, 0): 0.3, (0, 0): 0.3}, {}), scores(1, rank), "mean")
    assert (named["prev_layer"], named["prev_head"], named["prev_obs_rank"]) == (0, 0, rank)
    assert named["prev_role"] == role


@pytest.mark.parametrize("drops, ses, expected", [
    ({(1, 0): 0.30}, {(1, 0): 0.02}, (1, 0)),  # far above both
    ({(1, 0): 0.06}, {(1, 0): 0.02}, (1, 0)),  # 0.06 >= 0.05 and >= 2 x 0.02
    ({(1, 0): 0.06}, {(1, 0): 0.035}, (-1, -1)),  # above the threshold, inside the noise
    ({(1, 0): 0.04}, {(1, 0): 0.001}, (-1, -1)),  # far outside the noise, below the threshold
    ({(1, 0): 0.09, (1, 2): 0.06}, {(1, 0): 0.05, (1, 2): 0.01}, (1, 2)),  # the largest drop that counts
])
def test_a_head_is_named_only_if_its_drop_clears_the_threshold_and_two_standard_errors(drops, ses, expected):
    named = name_circuit(synthetic(drops, ses), scores(1, 1), "mean")
    assert (named["induction_layer"], named["induction_head"]) == expected
    assert named["circuit"] == int(expected[0] >= 0)


@pytest.mark.parametrize("drop, se, present", [(0.3, 0.02, 1), (0.06, 0.04, 0), (0.03, 0.001, 0)])
def test_the_circuit_is_present_where_the_top_induction_heads_together_cost_icl(drop, se, present):
    """No head alone counts (work shared); the top-3 heads by induction score ablated together do,
    by the same rule as a single head."""
    groups = [{"group": f"top-{k} induction", "members": "", "ablation": "mean", "metric": "icl_acc",
               "value": 0.9, "delta": -drop if k == 3 else -0.01, "se": se} for k in (1, 2, 3)]
    named = name_circuit(synthetic({(1, 0): 0.02, (1, 1): 0.02}, {}), scores(1, 1), "mean", groups)
    assert named["induction_layer"] == -1 and named["prev_layer"] == -1
    assert (named["group_icl_drop"], named["group_icl_drop_se"], named["circuit"]) == (drop, se, present)


def direct(model, data, cfg, heads, mean_of):
    """Every set's logits from a whole forward pass with ``heads`` mean-ablated, each head's mean
    taken over the set named by ``mean_of(set name)``: computed here from scratch."""
    def mean_z(name):
        seqs = getattr(data.eval_sets, name)
        _, cache = run_with_cache(model, data.bank.render(seqs.classes, seqs.exemplars), seqs.labels,
                                  names_filter=lambda n: n.endswith("attn.hook_z"))
        return {l: cache[f"blocks.{l}.attn.hook_z"].double().mean(0) for l, _ in heads}

    out = {}
    for name, seqs in data.eval_sets.items():
        means = mean_z(mean_of(name))
        with torch.no_grad(), hooks(model, [ablate_head(l, h, means[l][:, h]) for l, h in heads]):
            out[name] = model(data.bank.render(seqs.classes, seqs.exemplars), seqs.labels)
    return out


@pytest.fixture(scope="module")
def random_model():
    """The planted setting with random weights, scaled up so every head's output matters."""
    cfg = planted.config()
    torch.manual_seed(5)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.proj.weight.mul_(8.0)
    data = planted.data(cfg)
    return cfg, data, model, head_attribution(model, data, cfg, ablations=("mean",))


def test_mean_ablation_uses_each_sets_own_mean(random_model):
    cfg, data, model, a = random_model
    for layer, head in ((0, 1), (1, 0)):
        own = direct(model, data, cfg, [(layer, head)], lambda name: name)
        expected = set_metrics(own, data.eval_sets, data, cfg)
        rows = {r["metric"]: r for r in a.rows if (r["layer"], r["head"]) == (layer, head)}
        assert all(rows[m]["value"] == pytest.approx(expected[m], abs=1e-12) for m in ACCURACIES)
        # the ICL set's mean (the old rule) ablates the other sets differently: far beyond the
        # tolerance below
        icl_mean = direct(model, data, cfg, [(layer, head)], lambda name: "icl")
        assert (icl_mean["iwl"] - own["iwl"]).abs().max() > 0.01
    cache = ResidualCache.build(model, data, cfg)
    logits = cache.logits(model, cfg, 1, cache.ablation([(1, 0)], "mean"))
    torch.testing.assert_close(logits["ciwl"], direct(model, data, cfg, [(1, 0)], lambda name: name)["ciwl"],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["one head", "a group"])
def test_each_delta_carries_its_paired_standard_error(circuit, shared, which):
    """delta = the mean per-sequence change in correctness (ablated - clean, same sequences);
    se = its sd / sqrt(n): checked on the planted induction head alone, and on the two shared
    copies ablated together."""
    cfg, data, _, plain = circuit
    model = planted.model(cfg, shared=which == "a group")
    a = plain if which == "one head" else shared
    heads = [(1, 0)] if which == "one head" else [(1, 0), (1, 1)]
    measured = [r for r in (a.rows if which == "one head" else a.groups)
                if r["metric"] == "icl_acc" and r["ablation"] == "mean"]
    row = next(r for r in measured if r.get("group") == "top-2 induction" or (r.get("layer"), r.get("head")) == (1, 0))
    with torch.no_grad():
        clean = set_hits({name: model(data.bank.render(s.classes, s.exemplars), s.labels)
                          for name, s in data.eval_sets.items()}, data.eval_sets, data)
    ablated = set_hits(direct(model, data, cfg, heads, lambda name: name), data.eval_sets, data)
    d = ablated["icl_acc"].double() - clean["icl_acc"].double()
    assert (d != 0).sum() > 50  # ICL falls to about chance: many sequences change
    assert row["delta"] == pytest.approx(float(d.mean()), abs=1e-12)
    assert row["se"] == pytest.approx(float(d.std(unbiased=True)) / math.sqrt(len(d)), rel=1e-9)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_update_run_over_checkpoints_is_incremental(tmp_path):
    cfg = load_config("tiny", ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                               "train.keep_checkpoints=5", "eval.n_sequences=64"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    done = update_run(run, ablations=("mean",))  # one ablation: half the passes, same bookkeeping
    assert [a.step for a in done] == [20, 40] and all(a.seconds > 0 for a in done)
    heads = read(RunLayout(run).heads)
    assert list(heads[0]) == list(HEADS_COLUMNS)
    layers, n_heads = cfg.model.layers, cfg.model.heads
    assert len(heads) == 2 * layers * n_heads * len(ACCURACIES) and {r["ablation"] for r in heads} == {"mean"}
    assert {r["metric"] for r in heads} == set(ACCURACIES)
    for r in heads:
        assert math.isclose(float(r["value"]) - float(r["delta"]), float(
            next(c for c in read(RunLayout(run).circuit) if c["step"] == r["step"])[r["metric"]]), abs_tol=1e-9)
    comp = read(RunLayout(run).composition)
    assert len(comp) == 2 * n_heads * n_heads  # 2 steps x (L0 -> L1 pairs)
    # the clean metrics are the trainer's evaluation of the same checkpoint
    _, model = load_checkpoint_model(RunDir(run).latest_checkpoint(), cfg, "cpu")
    metrics, _ = evaluate(model, load_data(cfg), cfg)
    last = read(RunLayout(run).circuit)[-1]
    assert all(float(last[m]) == pytest.approx(metrics[m]) for m in ACCURACIES)
    groups = read(RunLayout(run).groups)
    assert list(groups[0]) == list(GROUPS_COLUMNS)
    assert {g["group"] for g in groups} == {"layer 0", "layer 1", "top-1 induction", "top-2 induction",
                                            "top-3 induction", "top-1 previous-token", "top-2 previous-token",
                                            "top-3 previous-token"}
    assert len(groups) == 2 * 8 * len(ACCURACIES)
    assert update_run(run, ablations=("mean",)) == []  # nothing new
    (RunLayout(run).heads).write_text(",".join(HEADS_COLUMNS) + "\n" + "\n".join(
        ",".join(r.values()) for r in heads if r["step"] == "20") + "\n")
    assert [a.step for a in update_run(run, ablations=("mean",))] == [40]  # only the step missing from heads.csv
    assert len(read(RunLayout(run).heads)) == len(heads) and len(read(RunLayout(run).circuit)) == 2
    assert len(read(RunLayout(run).composition)) == len(comp) and len(read(RunLayout(run).groups)) == len(groups)


def test_heads_csv_of_an_earlier_version_is_refused_not_overwritten(tmp_path):
    """Rows without standard errors were measured with the ICL set's mean for every set: mixing
    them with new rows would give one table two definitions."""
    run = tmp_path / "run"
    cfg = load_config("tiny", ["train.steps=20", "train.eval_every=20", "train.checkpoint_every=20"])
    train(cfg, run, progress=False)
    old = "step,layer,head,ablation,metric,value,delta\n10,0,0,mean,icl_acc,0.5,0.0\n"
    (RunLayout(run).heads).write_text(old)
    with pytest.raises(UserError, match="earlier version"):
        update_run(run, ablations=("mean",))
    assert (RunLayout(run).heads).read_text() == old and not (RunLayout(run).circuit).exists()


def test_rerunning_from_the_ablated_block_equals_a_full_forward(circuit):
    """Attribution reruns only the blocks from the ablated one on, from cached clean inputs: the
    same logits as a whole forward pass with the ablation."""
    cfg, data, _, _ = circuit
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    cache = ResidualCache.build(model, data, cfg)
    seqs = data.eval_sets.ciwl
    images = data.bank.render(seqs.classes, seqs.exemplars)
    for layer in range(2):
        with hooks(model, [ablate_head(layer, 1)]):
            full = model(images, seqs.labels)
            part = cache.logits(model, cfg, start=layer)["ciwl"]
        torch.testing.assert_close(part, full, rtol=0, atol=1e-6)
