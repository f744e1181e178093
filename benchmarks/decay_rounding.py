"""How much of a decoupled weight decay survives fp32 over a whole schedule: the factor a weight
without gradient ends at, by each AdamW, against exp(-wd * sum lr_t).

    python benchmarks/decay_rounding.py [--config paper] [--wd 3e-4 1e-2] [--set KEY=VALUE ...]

For each weight decay: ``exp(-wd * sum lr_t)`` (icl.schedule), the float64 product of the
per-step factors ``prod (1 - lr_t * wd)``, and in fp32 the packed AdamW's compensated decay
(``icl.train.adamw.decay_`` with the rates of PackedAdamW's own table, the only part of the
update that moves a weight whose gradient is zero; tests/train/test_adamw.py holds the whole
update to it), torch's single-tensor AdamW (``torch.optim.adamw.adamw``, what
``torch.optim.AdamW`` steps with by default on the CPU) and torch's fused CPU AdamW, every
update of the schedule. Each fp32 weight starts at 1.0 (and at a few other values: the worst
is reported). Prints a markdown table; also the share of updates whose fp32 factor
``1 - lr_t * wd`` is exactly 1. Needs no data; a minute or so on one core.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.optim.adamw import adamw

from icl.config import load_config
from icl.schedule import decay_exponent, lr_at, shrink_factor
from icl.train.adamw import PackedAdamW, decay_

START = (1.0, 0.7071, -0.3, 0.02, 1.5e-3, -0.999)


def packed(cfgs) -> torch.Tensor:
    """Each model's weights after the run under the packed AdamW's compensated decay, as factors."""
    total, chunk = cfgs[0].train.steps, cfgs[0].train.eval_every
    with torch.inference_mode():
        flat = torch.tensor([START] * len(cfgs))
        opt = PackedAdamW(flat, flat.shape[1], cfgs)
        for first in range(1, total + 1, chunk):
            last = min(first + chunk - 1, total)
            opt.schedule(first, last)
            for rate in opt.table[: last - first + 1, 2:, None]:
                decay_(opt.flat, opt.compensation, rate)
    return flat.double() / torch.tensor(START, dtype=torch.float64)


def torch_adamw(cfg, lrs: list[float], fused: bool) -> torch.Tensor:
    o = cfg.optim
    p, g = torch.tensor(START), torch.zeros(len(START))
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    for lr in lrs:
        adamw([p], [g], [m], [v], [], [step], foreach=False, fused=fused, amsgrad=False, beta1=o.beta1,
              beta2=o.beta2, lr=lr, weight_decay=o.weight_decay, eps=o.eps, maximize=False)
    return p.double() / torch.tensor(START, dtype=torch.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="paper")
    p.add_argument("--wd", type=float, nargs="+", default=[3e-4, 1e-2])
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfgs = [load_config(args.config, [*args.sets, f"optim.weight_decay={wd}"]) for wd in args.wd]
    o, total = cfgs[0].optim, cfgs[0].train.steps
    lrs = [lr_at(t, o, total) for t in range(1, total + 1)]
    t0 = time.perf_counter()
    ours = packed(cfgs)
    print(f"{args.config}: {total:,} updates, lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps}), "
          f"sum lr_t = {sum(lrs):.4f}; weights start at {', '.join(map(str, START))}\n")
    print("| wd | exp(-wd sum lr) | fp64 prod(1 - lr wd) | packed AdamW, fp32 | torch AdamW, fp32 | "
          "torch fused AdamW, fp32 | factor exactly 1 in fp32 |")
    print("|---|---|---|---|---|---|---|")
    for k, cfg in enumerate(cfgs):
        wd = cfg.optim.weight_decay
        exact = math.exp(math.fsum(math.log1p(-lr * wd) for lr in lrs))
        unit = sum(float(torch.tensor(1 - lr * wd, dtype=torch.float64).float()) == 1.0 for lr in lrs) / total

        def shown(factors: torch.Tensor) -> str:
            worst = factors[(factors - exact).abs().argmax()]
            share = math.log(float(worst)) / -decay_exponent(cfg)
            return f"{float(worst):.6f} ({share:.2f}x the decay)"

        plain, fused = torch_adamw(cfg, lrs, fused=False), torch_adamw(cfg, lrs, fused=True)
        print(f"| {wd:g} | {shrink_factor(cfg):.6f} | {exact:.6f} | {shown(ours[k])} | {shown(plain)} | "
              f"{shown(fused)} | {unit:.1%} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
