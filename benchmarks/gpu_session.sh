#!/usr/bin/env bash
# Every GPU check and measurement of benchmarks/README.md, phase by phase, for a short GPU lease.
#
#   bash benchmarks/gpu_session.sh [PHASE ...]     phases: tests eager compiled (default: all three)
#
# Results go to $OUT (the device tool's output folder) or else gpu_results/: tests.log,
# throughput.jsonl (one JSON object per measurement, as throughput.py writes them),
# dispatch.jsonl and summary.txt (one line per measurement) -- at most 8 files.
# Data: $ICL_DATA_DIR, default data/omniglot in the checkout (a device machine receives the
# checkout only: copy ../shared/data/omniglot there first; *.npz is git-ignored, so carry it).
# What is measured can be changed: CONFIG (paper), FROZEN_PACKS ("1 16 64 128"), COMPILE_PACK (64),
# STEPS (20), REPEATS (3), DEVICE (cuda). The script checks itself without a GPU with
#   DEVICE=cpu CONFIG=tiny FROZEN_PACKS="1 2" COMPILE_PACK=2 STEPS=2 REPEATS=1 bash benchmarks/gpu_session.sh eager
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu_results}
mkdir -p "$OUT_DIR"
export ICL_DATA_DIR=${ICL_DATA_DIR:-$PWD/data/omniglot} ICL_CACHE_DIR=${ICL_CACHE_DIR:-/tmp/icl-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-paper} DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-20} REPEATS=${REPEATS:-3}
FROZEN_PACKS=${FROZEN_PACKS:-1 16 64 128} COMPILE_PACK=${COMPILE_PACK:-64}
PYTHON=${PYTHON:-python3}
PHASES=${*:-tests eager compiled}
TMP=$(mktemp -d)

measure() {  # measure NAME ARGS...: one throughput.py run, appended to throughput.jsonl and summary.txt
    local name=$1; shift
    echo "== $name: throughput.py $*"
    if timeout "${LIMIT:-400}" $PYTHON benchmarks/throughput.py --device "$DEVICE" --steps "$STEPS" \
        --repeats "$REPEATS" --quiet --json "$TMP/$name.json" "$@"; then
        $PYTHON - "$TMP/$name.json" "$name" >>"$OUT_DIR/summary.txt" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {r['config']} {' '.join(r['overrides'])} on {r['machine'].get('gpu', r['device'])}, pack {r['pack']}: "
      f"trainer {r['trainer_steps_per_s']:.1f} model-steps/s, baseline {r['baseline_steps_per_s']:.1f}, ratio {r['ratio']:.2f}"
      + (f", packed/unpacked {r['packed_vs_unpacked']:.2f}" if r['pack'] > 1 else "")
      + f"; x{r['trainer_steps_per_s'] / 72:.1f} the published 72 steps/s")
EOF
        tr -d '\n' <"$TMP/$name.json" >>"$OUT_DIR/throughput.jsonl" && echo >>"$OUT_DIR/throughput.jsonl"
    else
        echo "$name: FAILED or timed out (exit $?)" | tee -a "$OUT_DIR/summary.txt"
    fi
}

for phase in $PHASES; do
    case $phase in
    tests)  # correctness on the device first: CUDA sampling equals the CPU's, packed equals alone
        $PYTHON -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
            | tee -a "$OUT_DIR/tests.log"
        $PYTHON -m pytest -q -p no:cacheprovider tests/data/test_data_sequences.py tests/data/test_data_rng.py \
            tests/train/test_packed.py tests/train/test_kernels.py tests/model 2>&1 | tail -30 | tee -a "$OUT_DIR/tests.log"
        ;;
    eager)
        for k in $FROZEN_PACKS; do
            measure "frozen_pack$k" --config "$CONFIG" --set model.embedder=frozen --pack "$k"
        done
        measure "${CONFIG}_preset" --config "$CONFIG"  # the preset as it is (paper: ResNet embedder), pack 1
        $PYTHON benchmarks/dispatch_count.py --config "$CONFIG" --set model.embedder=frozen --pack 1 $COMPILE_PACK \
            --repeats 2 --json "$TMP/dispatch.json" && tr -d '\n' <"$TMP/dispatch.json" >>"$OUT_DIR/dispatch.jsonl" \
            && echo >>"$OUT_DIR/dispatch.jsonl"
        ;;
    compiled)  # compilation takes minutes: one pack size, each variant under its own time limit
        measure "frozen_pack${COMPILE_PACK}_compile" --config "$CONFIG" --set model.embedder=frozen --pack "$COMPILE_PACK" --compile
        if [ "$DEVICE" != cpu ]; then
            measure "frozen_pack${COMPILE_PACK}_graphs" --config "$CONFIG" --set model.embedder=frozen --pack "$COMPILE_PACK" --cuda-graphs
        fi
        ;;
    *) echo "error: unknown phase '$phase' (tests, eager or compiled)" >&2; exit 2 ;;
    esac
done
rm -rf "$TMP"
echo "== summary ($OUT_DIR/summary.txt)"
cat "$OUT_DIR/summary.txt" 2>/dev/null
