#!/usr/bin/env bash
# Every GPU check and measurement of benchmarks/README.md in one call that fits a short GPU lease
# (at most ~8 minutes on an H100/H200), most important first.
#
#   bash benchmarks/gpu_session.sh [PHASE ...]   phases: tests frozen resnet train profile (default: all, in order)
#
# Each result is written to $OUT (the device tool's output folder), else gpu_results/, the
# moment it exists, so a time-out keeps everything before it:
#   tests.log             the CUDA tests (graph replays = eager steps, packed = alone, sampling)
#   NAME.json             one throughput.py measurement each (baseline vs trainer, graph vs eager)
#   train_paper.log/.csv  icl-train --config paper end to end, evaluations included
#   profile_NAME.json     torch.profiler per step: device-busy time, launches, top kernels
#   summary.txt           one line per result, each against the published 72 steps/s
# Data: $ICL_DATA_DIR, default data/omniglot in the checkout (a device machine receives the
# checkout only: copy ../shared/data/omniglot there and carry it; it is git-ignored).
# The GPU machines have torch 2.11 + CUDA 13 and no Ray: nothing here imports Ray.
# Knobs: DEVICE (cuda), CONFIG (paper), FROZEN_PACKS ("1 64 256 1024"), RESNET_PACKS ("1 15"),
# STEPS (30), REPEATS (3), TRAIN_STEPS (5000), LIMIT (seconds per measurement, 100).
# Checked without a GPU by:
#   DEVICE=cpu CONFIG=tiny FROZEN_PACKS="1 2" RESNET_PACKS="1 2" STEPS=2 REPEATS=1 TRAIN_STEPS=100 \
#     OUT=/tmp/gs bash benchmarks/gpu_session.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu_results}
mkdir -p "$OUT_DIR"
export ICL_DATA_DIR=${ICL_DATA_DIR:-$PWD/data/omniglot} ICL_CACHE_DIR=${ICL_CACHE_DIR:-/tmp/icl-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda} CONFIG=${CONFIG:-paper} STEPS=${STEPS:-30} REPEATS=${REPEATS:-3}
FROZEN_PACKS=${FROZEN_PACKS:-1 64 256 1024} RESNET_PACKS=${RESNET_PACKS:-1 15} TRAIN_STEPS=${TRAIN_STEPS:-5000}
LIMIT=${LIMIT:-100} PYTHON=${PYTHON:-python3}
PHASES=${*:-tests frozen resnet train profile}
SUMMARY="$OUT_DIR/summary.txt"

note() { echo "$*" | tee -a "$SUMMARY"; }

measure() {  # measure NAME ARGS...: one throughput.py run -> NAME.json + a summary line
    local name=$1; shift
    echo "== $name: throughput.py $*"
    if timeout "$LIMIT" $PYTHON benchmarks/throughput.py --device "$DEVICE" --steps "$STEPS" --repeats "$REPEATS" \
        --also-eager --quiet --json "$OUT_DIR/$name.json" "$@"; then
        $PYTHON - "$OUT_DIR/$name.json" "$name" >>"$SUMMARY" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
line = (f"{sys.argv[2]}: {' '.join([r['config'], *r['overrides']])} on {r['machine'].get('gpu', r['device'])} "
        f"(torch {r['versions']['torch']}), pack {r['pack']}: {r['trainer_steps_per_s']:.1f} model-steps/s "
        f"(graph: {r['cuda_graph']}), baseline {r['baseline_steps_per_s']:.1f}, ratio {r['ratio']:.2f}")
if "eager_steps_per_s" in r:
    line += f", eager {r['eager_steps_per_s']:.1f} (graph/eager {r['graph_vs_eager']:.2f})"
if r["pack"] > 1:
    line += f", unpacked {r['unpacked_steps_per_s']:.1f}"
print(line + f"; x{r['trainer_steps_per_s'] / 72:.1f} the published 72 steps/s")
EOF
        tail -1 "$SUMMARY"
    else
        note "$name: FAILED or timed out after ${LIMIT}s (exit $?)"
    fi
}

for phase in $PHASES; do
    case $phase in
    tests)  # correctness on the device first: graph replays = eager steps, packed = alone, CUDA sampling
        $PYTHON -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
            | tee -a "$OUT_DIR/tests.log"
        timeout "${TESTS_LIMIT:-150}" $PYTHON -m pytest -q -p no:cacheprovider tests/train/test_pack_step.py \
            tests/train/test_packed.py tests/train/test_kernels.py tests/data/test_data_rng.py \
            tests/data/test_data_sequences.py tests/model 2>&1 | tail -25 | tee -a "$OUT_DIR/tests.log"
        note "tests: $(grep -E "passed|failed|error" "$OUT_DIR/tests.log" | tail -1 || echo "no result (timed out?)")"
        ;;
    frozen)  # the 12-layer transformer with the frozen embedder: the launch-bound case
        for k in $FROZEN_PACKS; do
            measure "frozen_pack$k" --config "$CONFIG" --set model.embedder=frozen --pack "$k"
        done
        ;;
    resnet)  # the preset as it is (paper: the ResNet embedder), alone and as the study packs it
        for k in $RESNET_PACKS; do
            measure "${CONFIG}_pack$k" --config "$CONFIG" --pack "$k"
        done  # and a model alone under vmap (auto runs it as itself: half the kernels)
        measure "${CONFIG}_pack1_vmap" --config "$CONFIG" --pack 1 --set train.pack_forward=vmap
        ;;
    train)  # end to end: icl-train with its evaluations (every eval_every) against the benchmark's rate
        run=$(mktemp -d)/run
        if timeout "$((LIMIT * 2))" $PYTHON -m icl.train.cli --config "$CONFIG" --set "train.device=$DEVICE" \
            --set "train.steps=$TRAIN_STEPS" --out "$run" >"$OUT_DIR/train_$CONFIG.log" 2>&1; then
            cp "$run/metrics.csv" "$OUT_DIR/train_$CONFIG.csv"
            $PYTHON - "$run/metrics.csv" "$OUT_DIR/${CONFIG}_pack1.json" >>"$SUMMARY" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
steps, wall = int(rows[-1]["step"]), float(rows[-1]["wall_s"])
evals = sum(float(r["eval_s"]) for r in rows)
line = (f"icl-train end to end: {steps} steps in {wall:.1f} s with {len(rows)} evaluations ({evals:.1f} s): "
        f"{steps / wall:.1f} steps/s; training alone {steps / (wall - evals):.1f}")
try:
    bench = json.load(open(sys.argv[2]))["trainer_steps_per_s"]
    line += f"; benchmark {bench:.1f} -> end to end is {steps / wall / bench:.2f} of it"
except (OSError, KeyError, ValueError):
    pass
print(line)
EOF
            tail -1 "$SUMMARY"
        else
            note "train: icl-train FAILED or timed out (exit $?); see train_$CONFIG.log"
        fi
        ;;
    profile)  # where a step's device time goes
        for spec in "frozen1:--set model.embedder=frozen --pack 1" "${CONFIG}1:--pack 1" "${CONFIG}15:--pack 15"; do
            name=${spec%%:*}; args=${spec#*:}
            if timeout "$LIMIT" $PYTHON benchmarks/profile_step.py --config "$CONFIG" --device "$DEVICE" $args \
                --json "$OUT_DIR/profile_$name.json" >"$OUT_DIR/profile_$name.txt" 2>"$OUT_DIR/profile_$name.err"; then
                note "profile $name: $(head -1 "$OUT_DIR/profile_$name.txt")"
            else
                note "profile $name: FAILED or timed out (exit $?)"
            fi
        done
        ;;
    *) echo "error: unknown phase '$phase' (tests, frozen, resnet, train or profile)" >&2; exit 2 ;;
    esac
done
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
