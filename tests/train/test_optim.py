"""AdamW decay groups and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from icl.config import load_config
from icl.model import build_model
from icl.train.optim import decay_groups, lr_at, make_optimizer


def resnet_model():
    cfg = load_config("tiny", ["model.embedder=resnet", "data.num_classes=10"])
    return build_model(cfg), cfg


def test_decay_groups_hold_exactly_linear_and_conv_weights():
    model, _ = resnet_model()
    decay, no_decay = decay_groups(model)
    expected = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(decay) == expected
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    assert not set(decay) & set(no_decay)
    assert "head.weight" in decay and "embedder.stem.0.weight" in decay
    assert "label_embedding.weight" in no_decay
    for name in no_decay:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert name.endswith(".bias") or isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)), name
    assert any("bn" in n for n in no_decay) and any("ln" in n for n in no_decay)


def test_only_the_decay_group_shrinks_under_zero_gradient():
    model, cfg = resnet_model()
    cfg.optim.weight_decay, cfg.optim.lr = 0.1, 1.0
    opt = make_optimizer(model, cfg.optim)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    for n in decay:
        torch.testing.assert_close(params[n], before[n] * 0.9)
    for n in no_decay:
        assert torch.equal(params[n], before[n]), n


def test_fused_adamw_is_the_plain_update_within_rounding():
    """make_optimizer uses PyTorch's fused AdamW (few kernels); it must be the same update as
    the plain single-tensor one, per group (decay, no decay), through warmup."""
    (a, cfg), (b, _) = resnet_model(), resnet_model()
    b.load_state_dict(a.state_dict())
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    cfg.optim.weight_decay = 0.1
    fused, plain = make_optimizer(a, cfg.optim), make_optimizer(b, cfg.optim, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        for opt in (fused, plain):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * step
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert not torch.equal(pa, start[name]), name  # every tensor moved
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_warmup_then_inverse_sqrt():
    cfg = load_config("paper").optim
    assert lr_at(1, cfg, 500_000) == pytest.approx(3e-4 / 4000)
    assert lr_at(2000, cfg, 500_000) == pytest.approx(1.5e-4)
    assert lr_at(4000, cfg, 500_000) == pytest.approx(3e-4)
    assert lr_at(16000, cfg, 500_000) == pytest.approx(1.5e-4)  # sqrt(4000/16000) = 1/2


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_constant_and_cosine(schedule):
    cfg = load_config("paper", [f"optim.schedule={schedule}", "optim.warmup_steps=10"]).optim
    assert lr_at(5, cfg, 110) == pytest.approx(1.5e-4)
    if schedule == "constant":
        assert lr_at(100, cfg, 110) == pytest.approx(3e-4)
    else:
        assert lr_at(60, cfg, 110) == pytest.approx(1.5e-4)  # half way through the decay
        assert lr_at(110, cfg, 110) == pytest.approx(0.0, abs=1e-12)
        assert all(lr_at(s, cfg, 110) >= lr_at(s + 1, cfg, 110) for s in range(10, 110))
    assert math.isfinite(lr_at(10**7, cfg, 110))
