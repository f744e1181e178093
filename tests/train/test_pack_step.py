"""The packed step as the GPU runs it: the static-buffer step a CUDA graph captures equals the
eager step, bf16 training reads bf16 weight copies instead of casting every weight every step
(with autocast's numbers), a restored frozen projection reaches its bf16 copy, and on a GPU
graph replays equal eager steps."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icl.config import load_config, replace
from icl.data import load_data
from icl.train.precision import autocast
from icl.train.kernels import KernelCounter
from icl.schedule import lr_at
from icl.train.optim import make_optimizer, set_lr
from icl.train.stack import initial_model
from icl.train.step import PackedTrainer, data_for

RUN = ["train.steps=40", "train.eval_every=20", "train.threads=1"]
GRID = [(0, 0.0), (1, 0.1), (2, 0.5)]


def configs(k, extra=()):
    return [load_config("tiny", [*RUN, *extra, f"seed={s}", f"optim.weight_decay={wd}"]) for s, wd in GRID[:k]]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def state(trainer: PackedTrainer) -> list[torch.Tensor]:
    return [trainer.pack.flat, trainer.optimizer.exp_avg, trainer.optimizer.exp_avg_sq,
            *trainer.pack.buffers.values()]


def assert_states_close(a: PackedTrainer, b: PackedTrainer, rtol: float) -> None:
    for x, y in zip(state(a), state(b), strict=True):
        x, y = x.double(), y.double()
        assert (x - y).abs().max() <= rtol * x.abs().max().clamp_min(1e-12)


@pytest.mark.parametrize("embedder, k, precision, forward", [
    ("linear", 1, "fp32", "vmap"), ("linear", 3, "fp32", "loop"),
    pytest.param("resnet", 3, "fp64", "vmap", marks=pytest.mark.slow),
])
def test_the_static_step_a_graph_captures_equals_the_eager_step(embedder, k, precision, forward):
    cfgs = configs(k, [f"model.embedder={embedder}", f"train.precision={precision}", f"train.pack_forward={forward}"])
    data = load_data(cfgs[0])
    eager, static = PackedTrainer.fresh(cfgs, data), PackedTrainer.fresh(cfgs, data)
    steps = 6
    sums = [x.clone() for x in eager.run(1, steps)]
    static.optimizer.schedule(1, steps)
    static.t_dev.fill_(1)
    for _ in range(steps):
        static.static_step()
    assert int(static.t_dev) == steps + 1 and int(static.i_dev) == steps
    assert_states_close(static, eager, 1e-5 if precision == "fp32" else 1e-12)
    torch.testing.assert_close(static.loss_sum, sums[0], rtol=1e-5, atol=0)
    assert torch.equal(static.correct_sum, sums[1])


def test_the_static_step_never_waits_for_the_device():
    trainer = PackedTrainer.fresh(configs(2), load_data(configs(2)[0]))
    trainer.optimizer.schedule(1, 4)
    trainer.t_dev.fill_(1)
    trainer.static_step()  # caches
    with KernelCounter() as counter:
        trainer.static_step()
    assert counter.syncs == [] and counter.kernels > 0


def autocast_reference(cfg, data, steps: int):
    """Today's bf16 training, written plainly: fp32 weights under torch.autocast (which casts
    every weight to bf16 at every use), torch.optim.AdamW."""
    model = initial_model(cfg).train()
    opt = make_optimizer(model, cfg.optim, fused=False)
    losses = []
    for t in range(1, steps + 1):
        set_lr(opt, lr_at(t, cfg.optim, cfg.train.steps))
        batch = data.train_batch(t - 1)
        with autocast(cfg, torch.device("cpu"), enabled=True):
            logits = model(data.bank.render(batch.classes, batch.exemplars), batch.labels)
        loss = F.cross_entropy(logits.float(), batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses


@pytest.mark.parametrize("embedder, k, forward", [("linear", 1, "loop"), ("frozen", 2, "loop"), ("frozen", 2, "vmap")])
def test_bf16_training_reads_bf16_copies_with_autocasts_numbers(embedder, k, forward):
    """CPU autocast stands in for CUDA's (the same rule: Linear/Conv operands in bf16). Model
    by model, the pack with bf16 copies computes exactly what the same pack without them
    computes (fp32 weights that autocast casts at every use). Batched, they agree to bf16
    rounding: under vmap autocast leaves the bias additions of the batched Linear layers in
    fp32, while the copies make them bf16 as they are for a model alone. Either way the
    losses are those of plain PyTorch under autocast."""
    cfgs = configs(k, [f"model.embedder={embedder}", f"train.pack_forward={forward}"])
    data = load_data(cfgs[0])
    ours = PackedTrainer.fresh(cfgs, data, mixed=True)
    assert ours.pack.low.shadow.dtype == torch.bfloat16 and ours.pack.n_cast > ours.pack.n_decay
    casting = PackedTrainer.fresh(cfgs, data)  # fp32 weights, no copies ...
    casting.mixed = True  # ... under autocast: a cast per weight per use
    steps = 5
    ours_losses = []
    for t in range(1, steps + 1):
        a, b = ours.run(t, t), casting.run(t, t)
        if forward == "loop":
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        else:
            torch.testing.assert_close(a[0], b[0], rtol=2e-3, atol=0)
        ours_losses.append(a[0].tolist())
    if forward == "loop":
        assert torch.equal(ours.pack.flat, casting.pack.flat)
        assert torch.equal(ours.optimizer.exp_avg_sq, casting.optimizer.exp_avg_sq)
    for i, cfg in enumerate(cfgs):
        _, theirs = autocast_reference(cfg, data_for(cfg, data), steps)
        assert [row[i] for row in ours_losses] == pytest.approx(theirs, rel=2e-3)


def test_a_frozen_projection_loaded_into_a_bf16_pack_reaches_its_bf16_copy():
    """A checkpoint restored into a bf16 pack brings its own frozen projection; the forward
    must read that one (its bf16 copy), not the projection the pack was built with."""
    cfg = configs(1, ["model.embedder=frozen"])[0]
    data = load_data(cfg)
    other = replace(cfg, seed=7)  # another seed: another projection
    trainer = PackedTrainer.fresh([cfg], data, mixed=True)
    saved = initial_model(other)
    assert not torch.equal(saved.embedder.weight, trainer.models[0].embedder.weight)
    trainer.load_state(0, saved.state_dict(), trainer.optimizer_state(0, 0), 0)
    assert torch.equal(trainer.pack.forward_buffers["embedder.weight"][0], saved.embedder.weight.bfloat16())
    built_on_it = PackedTrainer([initial_model(other)], [cfg], [data_for(cfg, data)], mixed=True)
    assert torch.equal(trainer.run(1, 3)[0], built_on_it.run(1, 3)[0])


class CastShapes(KernelCounter):
    """Also records the shape of every tensor cast to another dtype."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "aten._to_copy.default":
            self.shapes.append(tuple(args[0].shape))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("forward", ["loop", "vmap"])
def test_bf16_training_casts_no_weight(forward):
    """Plain autocast casts every Linear weight and bias at every step (and their gradients
    back); a bf16 step of the pack casts activations only, and its weight copies are
    refreshed by one kernel for all of them."""
    cfg = configs(1, ["model.layers=4", f"train.pack_forward={forward}"])[0]
    data = load_data(cfg)
    trainer = PackedTrainer.fresh([cfg], data, mixed=True)
    trainer.optimizer.schedule(1, 3)
    trainer.step(1)
    with CastShapes() as ours:
        trainer.step(2)
    model = initial_model(cfg)
    weights = {tuple(p.shape) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    batch = data.train_batch(0)
    with CastShapes() as plain:
        with autocast(cfg, torch.device("cpu"), enabled=True):
            logits = model(data.bank.render(batch.classes, batch.exemplars), batch.labels)
        F.cross_entropy(logits.float(), batch.targets).backward()
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(shape in weights for shape in plain.shapes) >= 2 * linears  # weight and bias of every Linear
    assert not [shape for shape in ours.shapes if shape in weights], ours.shapes
    assert ours.ops["aten.copy_.default"] <= 2  # the refresh of all copies (and nothing per weight)


def load_gpu_checks():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_checks = load_gpu_checks()


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(gpu_checks.CASES))
def test_graph_replays_equal_eager_steps_on_cuda(case):
    """Replays of the captured step against eager steps (two runs: the second replays the graph
    the first captured), judged against the device's own nondeterminism floor (two eager runs:
    cuDNN's bf16 convolution gradients need not be deterministic), the noise-only key-bias
    slice left out as on the CPU; benchmarks/gpu_checks.py, which the GPU session runs first."""
    extra, k = gpu_checks.CASES[case]
    device = torch.device("cuda")
    cfgs = gpu_checks.configs(device, extra, k)
    data = load_data(cfgs[0], device)
    store = {}
    floor = gpu_checks.eager_vs_eager(cfgs, data, store)
    assert floor["status"] == "pass", floor["detail"]
    graph = gpu_checks.graph_vs_eager(cfgs, data, store)
    assert graph["status"] == "pass", graph["detail"]
