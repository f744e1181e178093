"""Packs: K models trained at once equal the same models trained alone (any embedder, the
ResNet's BatchNorm included), a pack of one equals plain PyTorch, packs resume, and what
cannot be packed is refused."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from icl.config import load_config, science_dict
from icl.errors import UserError
import torch.nn.functional as F

from icl.data import load_data
from icl.model import build_model
from icl.metrics import TIMING
from icl.train import PackTrainingDiverged, RunDir, train, train_packed
from icl.train.evaluate import evaluate
from icl.schedule import lr_at
from icl.train.optim import decay_groups, make_optimizer, set_lr
from icl.train.adamw import PackedAdamW
from icl.config import check_packable
from icl.train.stack import PackedModels, initial_model
from icl.train.step import PackedTrainer, data_for

RUN = ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20", "train.threads=1"]
GRID = [(0, 0.0), (1, 0.1), (2, 0.5)]  # (seed, weight decay) of the three packed models
# The ResNet is compared in fp64: its training dynamics (BatchNorm, Adam on gradients near
# eps) amplify fp32 rounding whether packed or not (a 1e-7 relative perturbation of the
# weights of one model alone grows to 3e-3 in 20 steps), while in fp64 a pack of 3 and a
# model alone stay within 1e-12 of each other over 100 steps.
SETUPS = {"linear": ["model.embedder=linear"],  # (the ResNet in fp64 trains slowly: half the steps, as often evaluated)
          "resnet": ["model.embedder=resnet", "train.precision=fp64", "train.steps=20", "train.eval_every=10",
                     "train.checkpoint_every=10", "eval.n_sequences=64"]}
# Packs run the GPU's batched forward (vmap) here; a model alone runs its own module (the
# CPU's default, pack_forward=auto), the plain reference.
VMAP = "train.pack_forward=vmap"


def configs(grid=GRID, extra=()):
    return [load_config("tiny", [*RUN, *extra, f"seed={s}", f"optim.weight_decay={wd}"]) for s, wd in grid]


def rtol(cfg) -> float:
    return 1e-9 if cfg.train.precision == "fp64" else 1e-4


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # train.threads=1 sets torch's global thread count
    yield
    torch.set_num_threads(threads)


def science(path):
    return pd.read_csv(path / "metrics.csv").drop(columns=list(TIMING))


def final_state(path):
    return torch.load(sorted((path / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)


def key_bias(name, t):
    """The key third of a qkv bias: the softmax ignores it, so its gradient is exactly zero in
    exact arithmetic and only rounding noise in floating point; Adam normalises that noise to
    steps of size ~lr, so this slice wanders differently in any two implementations (and never
    changes what the model computes)."""
    is_qkv = name.endswith("attn.qkv.bias")
    return is_qkv, (slice(t.shape[0] // 3, 2 * t.shape[0] // 3) if is_qkv else None)


def assert_params_close(a: dict, b: dict, cfg, names=None):
    for name in names or a:
        x, y = a[name].double(), b[name].double()
        is_qkv, key = key_bias(name, x)
        if is_qkv:
            bound = 2 * sum(lr_at(s, cfg.optim, cfg.train.steps) for s in range(1, cfg.train.steps + 1))
            assert (x[key] - y[key]).abs().max() <= bound, name
            mask = torch.ones_like(x, dtype=torch.bool)
            mask[key] = False
            x, y = x[mask], y[mask]
        scale = x.abs().max().clamp_min(1e-12)
        assert (x - y).abs().max() <= rtol(cfg) * scale, f"{name}: {(x - y).abs().max() / scale:.2e} of its scale"


@pytest.fixture(scope="module", params=["linear", pytest.param("resnet", marks=pytest.mark.slow)])
def runs(request, tmp_path_factory):
    """The three models of GRID trained packed (one call) and each alone with icl.train.train,
    with the linear embedder and with the ResNet (BatchNorm statistics per model)."""
    root = tmp_path_factory.mktemp(f"packed-{request.param}")
    cfgs = configs(extra=[*SETUPS[request.param], VMAP])
    calls = []
    results = train_packed(cfgs, [root / f"packed{k}" for k in range(3)],
                           on_eval=lambda k, row, ck: calls.append((k, int(row["step"]), ck)))
    for k, cfg in enumerate(configs(extra=SETUPS[request.param])):
        train(cfg, root / f"alone{k}")
    return root, cfgs, results, calls


def every_and_last(cfg) -> tuple[int, int]:
    return cfg.train.eval_every, cfg.train.steps


def test_packed_models_equal_the_same_models_trained_alone(runs):
    root, cfgs, results, _ = runs
    every, last = every_and_last(cfgs[0])
    for k, cfg in enumerate(cfgs):
        packed, alone = root / f"packed{k}", root / f"alone{k}"
        assert science_dict(load_config(str(packed / "config.yaml"))) == science_dict(load_config(str(alone / "config.yaml")))
        a, p = science(alone), science(packed)
        assert list(p.columns) == list(a.columns) and list(p["step"]) == [every, last]
        pd.testing.assert_frame_equal(p, a, check_exact=False, rtol=rtol(cfg), atol=1e-6)
        assert pd.read_csv(packed / "metrics.csv").columns.tolist() == pd.read_csv(alone / "metrics.csv").columns.tolist()
        assert results[k]["step"] == last and results[k]["icl_acc"] == pytest.approx(a["icl_acc"].iloc[-1], rel=rtol(cfg))
        with np.load(packed / "attention.npz") as zp, np.load(alone / "attention.npz") as za:
            assert list(zp["step"]) == list(za["step"])
            np.testing.assert_allclose(zp["heads"], za["heads"], rtol=rtol(cfg), atol=1e-6)
        assert [c.name for c in (packed / "checkpoints").iterdir()] == [c.name for c in (alone / "checkpoints").iterdir()]
        sp, sa = final_state(packed), final_state(alone)
        assert sp["step"] == sa["step"] == last and sp["science"] == sa["science"]
        assert sp["model"].keys() == sa["model"].keys()
        assert_params_close(sp["model"], sa["model"], cfg)  # parameters and buffers (BatchNorm's too)
        op, oa = sp["optimizer"], sa["optimizer"]
        assert op["param_groups"] == oa["param_groups"]  # lr, betas, eps, weight decay per group
        names = decay_groups(build_model(cfg))
        names = names[0] + names[1]
        for i, name in enumerate(names):
            assert float(op["state"][i]["step"]) == float(oa["state"][i]["step"]) == last
            for moment in ("exp_avg", "exp_avg_sq"):
                assert_params_close({name: op["state"][i][moment]}, {name: oa["state"][i][moment]}, cfg)


def test_models_of_a_pack_are_independent(runs):
    root, cfgs, _, _ = runs
    s0, s1 = final_state(root / "packed0")["model"], final_state(root / "packed1")["model"]
    assert not torch.equal(s0["head.weight"], s1["head.weight"])  # own seed, own data, own decay


def test_on_eval_reports_every_model_with_its_checkpoint(runs):
    root, cfgs, _, calls = runs
    assert [(k, s) for k, s, _ in calls] == [(k, s) for s in every_and_last(cfgs[0]) for k in range(3)]
    for k, step, ck in calls:
        assert ck == RunDir(root / f"packed{k}").checkpoint_dir(step) and ck.is_dir()


class Stop(Exception):
    pass


def interrupted_pack(cfgs, tmp_path, model: int, step: int, dirs=None) -> list:
    """Run directories of a pack stopped by an exception when ``model`` reports ``step``."""

    def stop(k, row, ck):
        if k == model and row["step"] == step:
            raise Stop

    dirs = dirs or [tmp_path / f"p{k}" for k in range(len(cfgs))]
    with pytest.raises(Stop):
        train_packed(cfgs, dirs, on_eval=stop)
    return dirs


def test_resumed_pack_continues_exactly_and_plain_train_resumes_a_packed_run(runs, tmp_path):
    root, cfgs, _, _ = runs
    every, _ = every_and_last(cfgs[0])
    dirs = interrupted_pack(cfgs, tmp_path, model=2, step=every)
    shutil.copytree(dirs[0], tmp_path / "alone0")
    train_packed(cfgs, dirs)  # all three resume from their first checkpoint
    for k in range(3):
        pd.testing.assert_frame_equal(science(dirs[k]), science(root / f"packed{k}"))
        resumed, straight = final_state(dirs[k])["model"], final_state(root / f"packed{k}")["model"]
        for name, t in resumed.items():
            assert torch.equal(t, straight[name]), name
    train(cfgs[0], tmp_path / "alone0")  # a packed run directory resumes alone too
    pd.testing.assert_frame_equal(science(tmp_path / "alone0"), science(root / "alone0"),
                                  check_exact=False, rtol=rtol(cfgs[0]), atol=1e-6)


def test_models_checkpointed_at_different_steps_are_brought_level(runs, tmp_path):
    """A crash between two models' saves leaves them one checkpoint apart."""
    root, cfgs, _, _ = runs
    every, last = every_and_last(cfgs[0])
    dirs = interrupted_pack(cfgs, tmp_path, model=1, step=last)
    assert [int(science(d)["step"].iloc[-1]) for d in dirs] == [last, last, every]
    calls = []
    results = train_packed(cfgs, dirs, on_eval=lambda k, row, ck: calls.append((k, int(row["step"]))))
    assert calls == [(2, last)]  # model 2 caught up alone; 0 and 1 were already done
    assert [int(r["step"]) for r in results] == [last, last, last]
    for k in range(3):
        pd.testing.assert_frame_equal(science(dirs[k]), science(root / f"packed{k}"),
                                      check_exact=False, rtol=rtol(cfgs[k]), atol=1e-6)


def test_models_trained_in_one_segment_go_on_to_the_next_in_memory(tmp_path, monkeypatch):
    """Model 1 stands at step 0 and model 0 at 20: model 1 trains to 20, then both on to 40 in a
    second segment. Model 1 comes to it in memory, each run's checkpoint is read once (model
    0's: model 1 had none), and every number, weights and AdamW state included, is that of a
    resume that read model 1 back from disk between the two segments."""
    from icl.train import checkpoint as ckpt

    cfgs = configs(GRID[:2], [VMAP])
    carried = interrupted_pack(cfgs, tmp_path, model=0, step=20, dirs=[tmp_path / f"c{k}" for k in range(2)])
    disk = interrupted_pack(cfgs, tmp_path, model=0, step=20, dirs=[tmp_path / f"d{k}" for k in range(2)])
    interrupted_pack(cfgs, tmp_path, model=1, step=20, dirs=disk)  # model 1 to step 20, then stopped
    train_packed(cfgs, disk)  # both from their checkpoints at 20
    reads, load = [], ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda path, required=(): reads.append(path) or load(path, required))
    calls = []
    train_packed(cfgs, carried, on_eval=lambda k, row, ck: calls.append((k, int(row["step"]))))
    assert calls == [(1, 20), (0, 40), (1, 40)]  # two segments
    assert reads == [RunDir(carried[0]).checkpoint_dir(20)]
    for c, d in zip(carried, disk):
        pd.testing.assert_frame_equal(science(c), science(d), check_exact=True)
        ours, theirs = final_state(c), final_state(d)
        for part in ("model", "optimizer"):
            torch.testing.assert_close(ours[part], theirs[part], rtol=0, atol=0)


def test_the_optimiser_state_is_torch_adamws_written_without_a_torch_adamw(monkeypatch):
    """PackedAdamW writes and reads a model's state in the format of ``torch.optim.AdamW``'s
    ``state_dict`` itself (a checkpoint builds no torch optimiser), and torch's own AdamW of the
    same model takes that state as its own: its ``state_dict`` gives it back unchanged."""
    cfgs = configs(GRID[:2])  # weight decay 0 and 0.1
    data = load_data(cfgs[0])
    a, b = PackedTrainer.fresh(cfgs, data), PackedTrainer.fresh(cfgs, data)
    a.run(1, 5)

    def no_torch_adamw(*args, **kwargs):
        raise AssertionError("a torch.optim.AdamW was built")

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "__init__", no_torch_adamw)
        states = [a.optimizer_state(k, 5) for k in range(2)]
        for k in range(2):
            b.load_state(k, a.pack.state_dict(k), states[k], 5)
    for x, y in zip((b.pack.flat, b.optimizer.exp_avg, b.optimizer.exp_avg_sq, b.optimizer.compensation),
                    (a.pack.flat, a.optimizer.exp_avg, a.optimizer.exp_avg_sq, a.optimizer.compensation)):
        assert torch.equal(x, y)
    for k, cfg in enumerate(cfgs):
        model = initial_model(cfg)
        model.load_state_dict(a.pack.state_dict(k))
        opt = make_optimizer(model, cfg.optim)
        opt.load_state_dict(states[k])
        torch.testing.assert_close(opt.state_dict(), states[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="parameter groups"):
        b.load_state(0, a.pack.state_dict(0), {**states[0], "param_groups": states[0]["param_groups"][:1]}, 5)
    with pytest.raises(UserError, match="at step 5, not 6"):
        b.load_state(0, a.pack.state_dict(0), states[0], 6)


def test_frozen_embedder_packs_and_keeps_each_models_projection(tmp_path):
    grid = [(3, 0.0), (4, 0.2)]
    cfgs = configs(grid, ["model.embedder=frozen", VMAP])
    train_packed(cfgs, [tmp_path / f"p{k}" for k in range(2)])
    for k, cfg in enumerate(configs(grid, ["model.embedder=frozen"])):
        train(cfg, tmp_path / f"a{k}")
        pd.testing.assert_frame_equal(science(tmp_path / f"p{k}"), science(tmp_path / f"a{k}"),
                                      check_exact=False, rtol=rtol(cfg), atol=1e-6)
        sp, sa = final_state(tmp_path / f"p{k}")["model"], final_state(tmp_path / f"a{k}")["model"]
        assert torch.equal(sp["embedder.weight"], sa["embedder.weight"])  # the seed's own projection
        assert_params_close(sp, sa, cfg, [n for n in sa if n != "embedder.weight" and n != "positions"])


def test_a_diverging_model_stops_alone_and_the_others_finish(tmp_path):
    cfgs = configs([(0, 0.0), (1, 1e6)])  # decay factor 1 - lr * 1e6 blows model 1 up
    dirs = [tmp_path / "ok", tmp_path / "bad"]
    with pytest.raises(PackTrainingDiverged, match="1 of 2 packed models diverged") as info:
        train_packed(cfgs, dirs)
    assert info.value.results[0]["step"] == 40 and info.value.results[1] is None
    assert set(info.value.diverged) == {1} and "non-finite" in info.value.diverged[1]
    assert list(science(dirs[0])["step"]) == [20, 40]
    assert not (dirs[1] / "checkpoints").exists() or not any((dirs[1] / "checkpoints").iterdir())


def plain_pytorch(cfg, data, steps: int):
    """The reference: the model trained alone by a plain PyTorch loop (an ``nn.Module`` with its
    own BatchNorm layers, ``torch.optim.AdamW``) on the run's batches."""
    model = initial_model(cfg).train()
    opt = make_optimizer(model, cfg.optim, fused=False)
    for t in range(1, steps + 1):
        set_lr(opt, lr_at(t, cfg.optim, cfg.train.steps))
        batch = data.train_batch(t - 1)
        images = data.bank.render(batch.classes, batch.exemplars, next(model.parameters()).dtype)
        loss = F.cross_entropy(model(images, batch.labels), batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("embedder, k, forward, decay", [
    ("linear", 1, "loop", ""), ("linear", 3, "vmap", ""), ("resnet", 1, "vmap", ""),
    pytest.param("resnet", 3, "vmap", "", marks=pytest.mark.slow), pytest.param("resnet", 3, "loop", "", marks=pytest.mark.slow),
    ("linear", 3, "vmap", "optim.decay_modules=attn,head"),  # decoupled decay on chosen modules only
    ("linear", 3, "loop", "optim.l2=coupled"),  # the papers' penalty through Adam
    ("linear", 3, "vmap", "optim.l2=coupled optim.decay_modules=mlp"),
    ("linear", 3, "vmap", "optim.l2_scope=all"),  # every array decays, the label table included
    ("linear", 3, "loop", "optim.l2=coupled optim.l2_scope=all"),  # the peers' penalty
])
def test_a_pack_equals_plain_pytorch_batchnorm_statistics_and_adamw_moments_included(embedder, k, forward, decay):
    cfgs = configs(GRID[:k], [*SETUPS[embedder], f"train.pack_forward={forward}", *decay.split()])
    data = load_data(cfgs[0])
    steps = 12
    trainer = PackedTrainer.fresh(cfgs, data)
    trainer.optimizer.schedule(1, steps)
    for t in range(1, steps + 1):
        trainer.step(t)
    for i, cfg in enumerate(cfgs):
        model, opt = plain_pytorch(cfg, data_for(cfg, data), steps)
        packed = trainer.models[i]
        names = decay_groups(model)[0] + decay_groups(model)[1]
        assert_params_close(trainer.pack.state_dict(i), model.state_dict(), cfg)  # parameters and buffers
        if embedder == "resnet":  # running statistics moved, and as nn.BatchNorm2d moves them
            bn = packed.embedder.stem[1]
            assert int(bn.num_batches_tracked) == steps and bn.running_mean.abs().sum() > 0
            torch.testing.assert_close(bn.running_var, model.embedder.stem[1].running_var, rtol=rtol(cfg), atol=0)
        moments = trainer.optimizer_state(i, steps)["state"]
        reference = opt.state_dict()["state"]
        for j, name in enumerate(names):
            for moment in ("exp_avg", "exp_avg_sq"):
                assert_params_close({name: moments[j][moment]}, {name: reference[j][moment]}, cfg)
        ours, theirs = evaluate(packed, data, cfg)[0], evaluate(model, data, cfg)[0]  # eval(): running statistics
        for key in ("icl_acc", "iwl_acc", "icl_train_acc", "ece"):
            assert ours[key] == pytest.approx(theirs[key], abs=2 / cfg.eval.n_sequences), key


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_packed_adamw_is_torch_adamw_with_a_weight_decay_per_model(precision):
    """The pack's update is torch's single-tensor AdamW, one weight decay per model: bit for bit
    wherever no decay acts (the wd-0 model; every model's undecayed columns), and to within
    rounding on the decayed columns. There torch multiplies by ``1 - lr * wd`` rounded to the
    weight's precision (an error of up to half an ulp of 1, times the weight, per step), while
    the pack subtracts ``p * lr * wd`` with compensated summation (icl.train.adamw.decay_, exact
    to within a rounding of the weight); with the Adam step's own rounding of the two slightly
    different weights, they drift apart by at most about 2 ulps of the weight per step."""
    cfgs = configs(extra=["optim.warmup_steps=3", f"train.precision={precision}"])
    models = [initial_model(cfg) for cfg in cfgs]
    reference = []
    for cfg in cfgs:
        m = initial_model(cfg)
        reference.append((m, make_optimizer(m, cfg.optim, fused=False)))  # torch's own single-tensor AdamW
    pack = PackedModels(models, cfgs[0])
    opt = PackedAdamW(pack.flat, pack.n_decay, cfgs, chunk_elements=3 * 1000)  # chunks of 1000 columns
    assert len(opt.chunks) > 2 and pack.n_decay % 1000  # one chunk straddles the decay boundary
    steps = 6
    opt.schedule(1, steps)
    g = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        grad = torch.randn(pack.flat.shape, generator=g, dtype=pack.flat.dtype) * (0 if t == 4 else 1)  # t=4: decay only
        opt.step(t, grad)
        for k, (m, o) in enumerate(reference):
            set_lr(o, lr_at(t, cfgs[k].optim, cfgs[k].train.steps))
            for s in pack.slots:
                dict(m.named_parameters())[s.name].grad = grad[k, s.start:s.stop].view(s.shape).clone()
            o.step()
    decayed = set(decay_groups(models[0])[0])
    ulp = torch.finfo(pack.flat.dtype).eps
    drift = 0.0
    for k, (m, _) in enumerate(reference):
        for name, p in m.named_parameters():
            ours, p = dict(models[k].named_parameters())[name].detach(), p.detach()
            if name not in decayed or cfgs[k].optim.weight_decay == 0:
                assert torch.equal(ours, p), name
                continue
            scale = p.abs().max()
            assert (ours - p).abs().max() <= 2 * steps * ulp * scale, name
            drift = max(drift, float((ours - p).abs().max() / scale))
    assert drift > 0  # (the two decays differ: the comparison above is not vacuous)


def test_decay_compensation_is_checkpointed_and_older_checkpoints_resume_from_zero():
    """What rounding has left of each decayed weight's decay (icl.train.adamw.decay_) is part of
    the model's optimiser state: saved for the decayed tensors of a model that decays, loadable
    without pickles, restored exactly (so a resumed run continues bit for bit); a checkpoint
    made before it existed loads with zero compensation."""
    import copy
    import io

    from icl.train.adamw import COMPENSATION

    cfgs = configs(GRID[:2])  # weight decay 0 and 0.1
    data = load_data(cfgs[0])
    a = PackedTrainer.fresh(cfgs, data)
    a.run(1, 5)
    assert a.optimizer.compensation[1].abs().max() > 0  # rounding left something to carry
    assert not a.optimizer.compensation[0].any()  # the undecayed model carries nothing
    n_decayed = len(decay_groups(a.models[0])[0])
    states = []
    for k in range(2):
        buf = io.BytesIO()
        torch.save(a.optimizer_state(k, 5), buf)
        states.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert not any(COMPENSATION in st for st in states[0]["state"].values())
    assert [COMPENSATION in states[1]["state"][i] for i in sorted(states[1]["state"])] == \
        [i < n_decayed for i in sorted(states[1]["state"])]
    b = PackedTrainer.fresh(cfgs, data)
    for k in range(2):
        b.load_state(k, a.pack.state_dict(k), states[k], 5)
    assert torch.equal(b.optimizer.compensation, a.optimizer.compensation)
    older = copy.deepcopy(states[1])
    for st in older["state"].values():
        st.pop(COMPENSATION, None)
    c = PackedTrainer.fresh(cfgs, data)
    c.optimizer.compensation.fill_(1.0)  # (whatever was there before)
    for k, st in enumerate([states[0], older]):
        c.load_state(k, a.pack.state_dict(k), st, 5)
    assert not c.optimizer.compensation.any()
    for trainer in (a, b, c):
        trainer.run(6, 8)
    assert torch.equal(b.pack.flat, a.pack.flat)  # restored: the same run
    assert not torch.equal(c.pack.flat, a.pack.flat)  # the compensation mattered ...
    for k in range(2):  # ... by roundings
        assert_params_close(c.pack.state_dict(k), a.pack.state_dict(k), cfgs[k])


def test_what_cannot_be_packed_is_refused(tmp_path):
    base = configs(GRID[:2])
    other = load_config("tiny", [*RUN, "data.num_classes=32"])
    with pytest.raises(UserError, match="data.num_classes"):
        check_packable([base[0], other])
    with pytest.raises(UserError, match="2 configs but 1"):
        train_packed(base, [tmp_path / "a"])
    with pytest.raises(UserError, match="own run directory"):
        train_packed(base, [tmp_path / "a", tmp_path / "a"])
    assert not (tmp_path / "a").exists()  # refused before touching anything


@pytest.mark.cuda
def test_packed_equals_alone_on_cuda(tmp_path):
    """The CUDA path (captured step, one-chunk AdamW, batched kernels) against a pack of one."""
    cfgs = configs(GRID, ["train.device=cuda"])
    train_packed(cfgs, [tmp_path / f"p{k}" for k in range(3)])
    for k, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"a{k}")
        pd.testing.assert_frame_equal(science(tmp_path / f"p{k}"), science(tmp_path / f"a{k}"),
                                      check_exact=False, rtol=1e-3, atol=1e-5)
