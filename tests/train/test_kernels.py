"""What a training step asks of the device, counted on any device: no host synchronisation in
the step loop, and one set of sampling kernels however many models a pack holds."""

import pytest
import torch

from icl.config import load_config, replace
from icl.data import load_data
from icl.train.kernels import KernelCounter
from icl.train.stack import initial_model
from icl.train.step import PackedTrainer


def test_counter_sees_kernels_syncs_and_device_copies():
    a, b = torch.ones(3), torch.arange(3.0)
    with KernelCounter() as k:
        c = a + b
        c.view(3, 1)  # a view launches no kernel
        float(c.sum())  # .item(): the host waits for the device
        torch.nonzero(c)  # output size depends on the data: waits too
    assert k.ops["aten.add.Tensor"] == 1 and k.views == 1
    assert k.kernels == 4  # add, sum, the scalar read, nonzero
    assert k.syncs == ["aten._local_scalar_dense.default", "aten.nonzero.default"]
    host, device = torch.tensor(1.0), torch.tensor(2.0)
    with KernelCounter(host_tensors=[host]) as k:  # a host-side value: reading it is no sync
        float(host)
        float(device)
    assert k.syncs == ["aten._local_scalar_dense.default"]
    if torch.cuda.is_available():
        with KernelCounter() as k:
            a.to("cuda")
        assert k.syncs == ["aten._to_copy.default cpu->cuda:0"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny", ["train.device=cpu", "train.pack_forward=vmap"])  # the GPU's batched forward
    return cfg, load_data(cfg)


def packed_trainer(cfg, data, k: int) -> PackedTrainer:
    cfgs = [replace(cfg, **{"seed": s, "optim.weight_decay": 0.1 * (1 + s % 2)}) for s in range(k)]
    trainer = PackedTrainer.fresh(cfgs, data)
    trainer.optimizer.schedule(1, 10)
    trainer.optimizer.single_pass()  # AdamW as on CUDA
    trainer.step(1)  # first step: caches
    return trainer


@pytest.mark.parametrize("k", [1, 3])
def test_a_training_step_never_waits_for_the_device(tiny, k):
    cfg, data = tiny
    trainer = packed_trainer(cfg, data, k)
    with KernelCounter() as counter:
        loss, correct = trainer.step(2)
    assert counter.syncs == [] and counter.kernels > 0
    with KernelCounter() as counter:
        float(trainer.step(3)[0].sum())  # what logging the loss every step would cost
    assert counter.syncs == ["aten._local_scalar_dense.default"]
    with KernelCounter() as counter:
        trainer.run(4, 6)  # a segment's steps (the loop waits for the device once, after them)
    assert counter.syncs == []


def test_a_pack_launches_the_same_kernels_for_any_number_of_models(tiny):
    cfg, data = tiny
    counts = {}
    for k in (2, 8):  # (K = 1 saves two copies inside vmap's batching rules)
        trainer = packed_trainer(cfg, data, k)
        with KernelCounter() as sampling:
            trainer.batch(1)
        with KernelCounter() as step:
            trainer.step(2)
        assert step.syncs == [], f"K={k}"
        counts[k] = (sampling.kernels, step.kernels)
    assert counts[2] == counts[8], counts


# Kernels of the tiny model's forward + backward, counted at c35f2bb (before the hook points)
# with the pinned torch: alone, and as the packed engine runs it (functional_call under vmap on
# a meta template, K = 2). Hook points must not add a single kernel. Re-count at that commit if
# torch is upgraded.
MODEL_STEP_KERNELS = {"alone": 114, "packed": 187}


def model_step_kernels(cfg, packed: bool) -> int:
    """Kernels of one forward + backward of the model (no optimiser, no sampling)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from icl.model import build_model

    g = torch.Generator().manual_seed(0)
    s, k = cfg.data.image_size, 2
    shape = (k, 4, 9, s, s) if packed else (4, 9, s, s)
    images, labels = torch.rand(*shape, generator=g), torch.randint(0, cfg.data.num_classes, shape[:-2], generator=g)
    torch.manual_seed(0)
    model = build_model(cfg)
    if not packed:
        def run():
            F.cross_entropy(model(images, labels), labels[:, -1]).backward()
    else:
        params = {n: torch.stack([p.detach()] * k).requires_grad_() for n, p in model.named_parameters()}
        buffers = {n: torch.stack([b] * k) for n, b in model.named_buffers()}
        with torch.device("meta"):
            template = build_model(cfg)

        def run():
            with sdpa_kernel(SDPBackend.MATH):
                out = torch.vmap(lambda p, b, x, y: torch.func.functional_call(template, (p, b), (x, y)))(
                    params, buffers, images, labels)
            torch.autograd.grad(F.cross_entropy(out.flatten(0, 1), labels[..., -1].flatten()), list(params.values()))
    run()  # warm-up
    with KernelCounter() as c:
        run()
    return c.kernels


@pytest.mark.parametrize("mode", ["alone", "packed"])
def test_hook_points_cost_training_nothing(tiny, mode):
    cfg, _ = tiny
    assert model_step_kernels(cfg, packed=mode == "packed") == MODEL_STEP_KERNELS[mode]


def test_a_hook_point_with_nothing_attached_reaches_no_kernel(tiny):
    from icl.model.hooks import hook_points, run_with_hooks

    cfg, _ = tiny
    model = initial_model(cfg)
    x = torch.ones(2, 17, cfg.model.d_model)
    with KernelCounter() as k:
        model.blocks[0].hook_resid_pre(x)
    assert k.kernels == 0 and k.views == 0
    images, labels = torch.rand(2, 9, 14, 14), torch.zeros(2, 9, dtype=torch.long)
    run_with_hooks(model, images, labels, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, h: None)])
    assert not any(p.active for p in hook_points(model).values())  # detached again: the fused path is back
    with KernelCounter() as k:
        model(images, labels)
    assert "aten.softmax.default" not in k.ops and "aten._softmax.default" not in k.ops
