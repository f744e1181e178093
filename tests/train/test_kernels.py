"""What a training step asks of the device, counted on any device: no host synchronisation in
the step loop, and one set of sampling kernels however many models a pack holds."""

import pytest
import torch

from icl.config import load_config, replace
from icl.data import load_data
from icl.train.kernels import KernelCounter
from icl.train.pack import PackedTrainer


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
