"""The correctness checks a GPU must pass before any speed figure it gives counts, in order.

    python benchmarks/gpu_checks.py [--device cuda|cpu] [--jsonl FILE] [--clock-steps N]

1. ``eager_vs_eager``: two eager runs of the same 12 steps; their largest difference (relative
   to each tensor's scale) is the device's nondeterminism floor (atomics in some backward
   kernels make it positive on a GPU);
2. ``graph_vs_eager``: CUDA-graph replays of those steps against the first eager run, within
   ``max(10 x floor, 1e-4)``: a model alone (frozen embedder, bf16), packs of 3 with weight
   decay on chosen modules and with coupled L2 (fp32), a ResNet pack (bf16);
3. ``packed_resnet``: a ResNet pack (K = 3, fp64, vmap) against each model alone: parameters and
   BatchNorm running statistics within 1e-9 (tests/train/test_packed.py's bound);
4. ``bf16_copies``: the pack's bf16 weight copies against autocast casting the fp32 weights at
   every use: the losses of 5 steps within 2e-3;
5. ``divergence``: a model diverging in a pack of 2 leaves the other equal to its solo run:
   training loss and weights within 1e-3, accuracies within two answers of an evaluation set;
6. ``icl_train_clock``: ``icl-train`` timed from outside against its own ``wall_s``: never more
   than the time from outside, and on CUDA, where the host queues steps ahead of the device,
   runs of N and 2N steps (the difference cancels the start-up) agree within 10 % + 1 s (on
   the CPU one run: nothing is queued there); the line also says which TensorBoard writer
   wrote the run's events.

All train the ``tiny`` preset: the code paths are under test, not the sizes. Comparisons leave
out the key third of each qkv bias, whose gradient is rounding noise that Adam turns into
steps of ~lr (tests/train/test_packed.py); its largest difference is reported. One line per
result on stdout, one JSON object per line in ``--jsonl``; what needs CUDA says "skipped: no
CUDA" elsewhere. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl.config import Config, load_config  # noqa: E402
from icl.data import StudyData, load_data  # noqa: E402
from icl.layout import RunLayout  # noqa: E402
from icl.train import PackTrainingDiverged, RunDir, train, train_packed  # noqa: E402
from icl.train.step import PackedTrainer  # noqa: E402
from icl.train.tensorboard import read_events, writer  # noqa: E402

STEPS = 12  # per comparison, in two runs: the second replays the graph the first captured
GRID = [(0, 0.0), (1, 0.1), (2, 0.5)]  # (seed, weight decay)
CASES = {  # graph against eager: (overrides, K)
    "frozen bf16 K=1": (["model.embedder=frozen", "train.precision=bf16"], 1),
    "linear fp32 K=3, decay on attn and head": (["optim.decay_modules=attn,head"], 3),
    "linear fp32 K=3, coupled L2 on mlp": (["optim.l2=coupled", "optim.decay_modules=mlp"], 3),
    "resnet bf16 K=3": (["model.embedder=resnet", "train.precision=bf16"], 3),
}
Result = dict[str, object]


def configs(device: torch.device, extra: list[str], k: int = 3, grid=GRID) -> list[Config]:
    run = [f"train.device={device}", "train.steps=40", "train.eval_every=20", "train.checkpoint_every=20"]
    return [load_config("tiny", [*run, *extra, f"seed={s}", f"optim.weight_decay={wd}"]) for s, wd in grid[:k]]


def verdict(ok: bool, detail: str, **numbers: float) -> Result:
    return {"status": "pass" if ok else "fail", "detail": detail, **numbers}


def skipped(why: str = "no CUDA") -> Result:
    return {"status": "skipped", "detail": why}


def key_bias(name: str, n: int, offset: int = 0) -> slice | None:
    """The key third of a qkv bias of ``n`` values starting at ``offset`` (its gradient is pure
    rounding noise); None for any other tensor."""
    return slice(offset + n // 3, offset + 2 * n // 3) if name.endswith("attn.qkv.bias") else None


def split_noise(named: dict[str, Tensor], slots=None) -> dict[str, Tensor]:
    """``named`` (a state dict; or ``[K, N]`` stacks whose columns ``slots`` name) as float64
    on the host, every key-bias slice moved into one entry, ``key bias``."""
    out, noise = {}, []
    for name, t in named.items():
        t = t.detach().double().cpu()
        if slots is None:
            t = t.reshape(-1)
            cuts = [key_bias(name, t.numel())]
        else:
            cuts = [key_bias(s.name, s.stop - s.start, s.start) for s in slots]
        keep = torch.ones(t.shape[-1], dtype=torch.bool)
        for cut in filter(None, cuts):
            keep[cut] = False
        out[name] = t[..., keep]
        noise.append(t[..., ~keep].reshape(-1))
    out["key bias"] = torch.cat(noise)
    return out


def difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    """The largest difference of two snapshots relative to each tensor's scale (inf if not
    finite), and where; the key bias is left out."""
    worst, where = 0.0, ""
    for name in a:
        if name == "key bias" or not a[name].numel():
            continue
        d = float((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-12))
        d = d if math.isfinite(d) else math.inf
        if d > worst:
            worst, where = d, name
    return worst, where


def describe(d: float, where: str) -> str:
    return f"{d:.1e} (largest in {where})" if d else "0 (equal)"


def key_bias_drift(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return float((a["key bias"] - b["key bias"]).abs().max()) if a["key bias"].numel() else 0.0


def trained(trainer: PackedTrainer) -> dict[str, Tensor]:
    """Train ``STEPS`` updates; snapshot of weights, moments, buffers and loss sums (not the
    counts of correct answers: whole numbers, whose change by one would swamp the floor)."""
    sums = {}
    for first, last in ((1, 5), (6, STEPS)):
        sums[f"loss sum {first}-{last}"] = trainer.run(first, last)[0].clone()
    stack = {"weights": trainer.pack.flat, "exp_avg": trainer.optimizer.exp_avg,
             "exp_avg_sq": trainer.optimizer.exp_avg_sq}
    return {**split_noise(stack, trainer.pack.slots), **{n: b.double().cpu() for n, b in trainer.pack.buffers.items()},
            **{n: s.double().cpu() for n, s in sums.items()}}


# --------------------------------------------------------------------------- the checks


def eager_vs_eager(cfgs: list[Config], data: StudyData, store: dict) -> Result:
    runs = [trained(PackedTrainer.fresh(cfgs, data, cuda_graph=False)) for _ in range(2)]
    floor, where = difference(*runs)
    store.update(eager=runs[0], floor=floor)
    return verdict(math.isfinite(floor), f"floor {describe(floor, where)}; key bias {key_bias_drift(*runs):.1e}",
                   floor=floor)


def graph_vs_eager(cfgs: list[Config], data: StudyData, store: dict) -> Result:
    if data.device.type != "cuda":
        return skipped()
    trainer = PackedTrainer.fresh(cfgs, data)
    ours = trained(trainer)
    if trainer.graph is None:
        return verdict(False, "no CUDA graph was captured")
    diff, where = difference(ours, store["eager"])
    bound = max(10 * store["floor"], 1e-4)
    return verdict(diff <= bound, f"{describe(diff, where)} against max(10 x floor, 1e-4) = {bound:.1e}; "
                   f"key bias {key_bias_drift(ours, store['eager']):.1e}", difference=diff, bound=bound)


def packed_resnet(device: torch.device, data: StudyData) -> Result:
    extra = ["model.embedder=resnet", "train.precision=fp64"]
    pack = PackedTrainer.fresh(configs(device, [*extra, "train.pack_forward=vmap"]), data)
    pack.run(1, STEPS)
    worst, where = 0.0, ""
    for i, cfg in enumerate(configs(device, extra)):
        alone = PackedTrainer.fresh([cfg], data)  # auto: a model alone runs as itself
        alone.run(1, STEPS)
        d, name = difference(split_noise(alone.pack.state_dict(0)), split_noise(pack.pack.state_dict(i)))
        if d > worst:
            worst, where = d, f"{name} of model {i}"
    tracked = int(pack.models[0].embedder.stem[1].num_batches_tracked)
    return verdict(worst <= 1e-9 and tracked == STEPS,
                   f"{describe(worst, where)} <= 1e-9, BatchNorm running statistics included; "
                   f"{tracked} batches tracked", difference=worst)


def bf16_copies(cfgs: list[Config], data: StudyData) -> Result:
    if data.device.type != "cuda":
        return skipped()
    ours = PackedTrainer.fresh(cfgs, data)  # bf16 copies of the weights, the CUDA graph
    casting = PackedTrainer.fresh(cfgs, data, mixed=False, cuda_graph=False)  # fp32 weights ...
    casting.mixed = True  # ... under autocast, which casts them at every use
    assert ours.pack.low.shadow.dtype == torch.bfloat16 and casting.pack.n_cast == 0
    worst = 0.0
    for t in range(1, 6):
        a, b = ours.run(t, t)[0].double(), casting.run(t, t)[0].double()
        worst = max(worst, float(((a - b).abs() / b.abs()).max()))
    worst = worst if math.isfinite(worst) else math.inf
    return verdict(worst <= 2e-3, f"losses of 5 steps within {worst:.1e} of autocast's (bound 2e-3)", difference=worst)


def rows(run: Path) -> dict[str, Tensor]:
    """``metrics.csv`` by column."""
    with open(RunLayout(run).metrics) as f:
        table = list(csv.DictReader(f))
    return {k: torch.tensor([float(r[k] or "nan") for r in table]) for k in table[0]}


def divergence(device: torch.device) -> Result:
    cfgs = configs(device, [], k=2, grid=[(0, 0.0), (1, 1e6)])  # decay factor 1 - lr * 1e6 blows model 1 up
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            train_packed(cfgs, [root / "ok", root / "bad"], progress=False)
            return verdict(False, "model 1 (weight decay 1e6) did not diverge")
        except PackTrainingDiverged as e:
            if set(e.diverged) != {1}:
                return verdict(False, f"models {sorted(e.diverged)} diverged, not model 1 alone")
        train(cfgs[0], root / "solo", progress=False)
        solo, ok = rows(root / "solo"), rows(root / "ok")
        weights, where = difference(*(split_noise(RunDir(root / r).restore(cfgs[0]).model) for r in ("solo", "ok")))
    loss = difference({"loss": solo["train_loss"]}, {"loss": ok["train_loss"]})[0]
    accuracy = max(float((solo[c] - ok[c]).abs().max()) for c in solo if c.endswith("_acc"))
    answers = 2 / cfgs[0].eval.n_sequences  # a batched and a single model's kernels may flip an answer or two
    equal = max(loss, weights) <= 1e-3 and accuracy <= answers
    return verdict(equal, f"model 0 against its solo run: training loss {loss:.1e}, weights {describe(weights, where)} "
                   f"(bound 1e-3), accuracies {accuracy:.3f} apart (bound {answers:.3f}, two answers)",
                   difference=max(loss, weights), accuracy=accuracy)


def icl_train_clock(device: torch.device, n: int) -> Result:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cuda = device.type == "cuda"
    outside, wall = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (n, 2 * n) if cuda else (n,):
            out = Path(tmp) / f"run{steps}"
            cmd = [sys.executable, "-m", "icl.train.cli", "--config", "tiny", "--out", str(out), "--no-progress"]
            for item in (f"train.device={device}", f"train.steps={steps}", f"train.eval_every={n // 4}",
                         f"train.checkpoint_every={2 * n}"):
                cmd += ["--set", item]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            outside[steps] = time.perf_counter() - t0
            if done.returncode:
                return verdict(False, f"icl-train exited {done.returncode}: {done.stderr.strip()[-300:]}")
            with open(RunLayout(out).metrics) as f:
                wall[steps] = float(list(csv.DictReader(f))[-1]["wall_s"])
        w = writer()
        events = f"events by {w.package}: {len(read_events(out)['eval/icl_acc'])} rows" if w else "no event writer"
    within = all(wall[s] <= outside[s] for s in wall)
    runs = ", ".join(f"{s} steps: wall_s {wall[s]:.2f} of {outside[s]:.2f} s from outside" for s in wall)
    if not cuda:  # nothing is queued on the CPU, and a shared machine's load moves the start-up
        return verdict(within, f"{runs}; {events}")
    d_out, d_wall = outside[2 * n] - outside[n], wall[2 * n] - wall[n]
    agree = abs(d_out - d_wall) <= 0.1 * d_out + 1
    return verdict(within and agree, f"{n} more steps took {d_out:.2f} s from outside, {d_wall:.2f} s by wall_s "
                   f"(bound 10 % + 1 s); {runs}; {events}", outside_s=d_out, wall_s=d_wall)


# --------------------------------------------------------------------------- running them


def plan(device: torch.device, clock_steps: int) -> list[tuple[str, str, Callable[[], Result]]]:
    """(check, case, thunk) in the order they must pass."""
    data = load_data(configs(device, [])[0], device)
    steps: list[tuple[str, str, Callable[[], Result]]] = []
    for case, (extra, k) in CASES.items():
        cfgs, store = configs(device, extra, k), {}
        steps.append(("eager_vs_eager", case, lambda c=cfgs, s=store: eager_vs_eager(c, data, s)))
        steps.append(("graph_vs_eager", case, lambda c=cfgs, s=store: graph_vs_eager(c, data, s)))
    steps.append(("packed_resnet", "resnet fp64 K=3 vmap vs alone", lambda: packed_resnet(device, data)))
    for case, extra, k in (("frozen K=1", ["model.embedder=frozen"], 1), ("resnet K=2", ["model.embedder=resnet"], 2)):
        cfgs = configs(device, [*extra, "train.precision=bf16"], k)
        steps.append(("bf16_copies", case, lambda c=cfgs: bf16_copies(c, data)))
    steps.append(("divergence", "linear fp32 K=2", lambda: divergence(device)))
    runs = f"{clock_steps} and {2 * clock_steps}" if device.type == "cuda" else f"{clock_steps}"
    steps.append(("icl_train_clock", f"tiny, {runs} steps", lambda: icl_train_clock(device, clock_steps)))
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jsonl", type=Path, help="append one JSON object per result here")
    p.add_argument("--clock-steps", type=int, default=0, help="N of icl_train_clock (default: 4000 on CUDA, 200 else)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clock_steps = args.clock_steps or (4000 if device.type == "cuda" else 200)
    failed = 0
    for check, case, thunk in plan(device, clock_steps - clock_steps % 4):
        t0 = time.perf_counter()
        try:
            result = thunk()
        except Exception as e:  # a broken check is a failed one; the others still run
            result = verdict(False, f"error: {type(e).__name__}: {e}")
        result = {"check": check, "case": case, **result, "device": str(device),
                  "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{check} [{case}]: {result['status']}: {result['detail']}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
        failed += result["status"] == "fail"
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
