"""Head attribution and composition: on a circuit planted by hand, on an unused head, and over
the checkpoints of a real (tiny) run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import planted
from icl.circuits import head_attribution, k_composition, name_circuit, update_run
from icl.circuits.attribution import ABLATIONS, HEADS_COLUMNS
from icl.circuits.composition import head_circuits
from icl.circuits.over_training import load_checkpoint_model
from icl.config import load_config
from icl.data import load_data
from icl.train import RunDir
from icl.train import train
from icl.layout import RunLayout
from icl.metrics import ACCURACIES
from icl.train.evaluate import evaluate


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
    named = name_circuit(a.rows, a.observed, ablation)
    assert (named["induction_layer"], named["induction_head"]) == (1, 0)
    assert (named["prev_layer"], named["prev_head"]) == (0, 0)
    assert named["induction_icl_drop"] > 0.3 and named["prev_icl_drop"] > 0.3  # ICL falls to about chance
    assert named["induction_obs_rank"] == 1 and named["prev_obs_rank"] == 1  # observation agrees
    assert named["induction_obs_best"] == "L1H0" and named["prev_obs_best"] == "L0H0"


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
    assert all(r["delta"] == 0.0 and r["value"] == a.clean[r["metric"]] for r in unused)


def test_k_composition_is_the_frobenius_formula():
    """On a random model (LayerNorm gains randomised too), one pair by the formula directly."""
    cfg = load_config("tiny", ["model.layers=3"])
    torch.manual_seed(0)
    from icl.model import build_model

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
    assert update_run(run, ablations=("mean",)) == []  # nothing new
    (RunLayout(run).heads).write_text(",".join(HEADS_COLUMNS) + "\n" + "\n".join(
        ",".join(r.values()) for r in heads if r["step"] == "20") + "\n")
    assert [a.step for a in update_run(run, ablations=("mean",))] == [40]  # only the step missing from heads.csv
    assert len(read(RunLayout(run).heads)) == len(heads) and len(read(RunLayout(run).circuit)) == 2
    assert len(read(RunLayout(run).composition)) == len(comp)


def test_rerunning_from_the_ablated_block_equals_a_full_forward(circuit):
    """Attribution reruns only the blocks from the ablated one on, from cached clean inputs: the
    same logits as a whole forward pass with the ablation."""
    from icl.circuits.attribution import ResidualCache
    from icl.model.hooks import ablate_head, hooks

    cfg, data, _, _ = circuit
    torch.manual_seed(3)
    from icl.model import build_model

    model = build_model(cfg).eval()
    cache = ResidualCache.build(model, data, cfg)
    seqs = data.eval_sets.ciwl
    images = data.bank.render(seqs.classes, seqs.exemplars)
    for layer in range(2):
        with hooks(model, [ablate_head(layer, 1)]):
            full = model(images, seqs.labels)
            part = cache.logits(model, cfg, start=layer)["ciwl"]
        torch.testing.assert_close(part, full, rtol=0, atol=1e-6)
