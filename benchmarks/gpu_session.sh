#!/usr/bin/env bash
# Every GPU check and measurement in one call of a short GPU lease, most important first,
# within DEADLINE_S seconds for the whole call (benchmarks/README.md, "On a GPU"):
#
#   checks   benchmarks/gpu_checks.py: correctness, before any speed figure
#   tests    the CUDA-marked tests (pytest -m cuda)
#   frozen   throughput.py: the 12-layer transformer with the frozen embedder, K = 1 and FROZEN_PACK
#   resnet   throughput.py: CONFIG with the ResNet embedder, K = 1 and RESNET_PACK
#   train    icl-train end to end (the resnet phase's config, TRAIN_STEPS with its evaluations) against it
#   profile  profile_step.py, frozen and ResNet, K = 1: device-busy time, launches, top kernels
#   science  pack_curve.py: CONFIG as a pack of 5 weight decays for the time left, its ICL/IWL curve
#
# A phase starts only if the seconds it needs (need, below) are left, and is cut when its share
# (3x that; the science phase: all that is left) or the deadline runs out; a phase skipped or cut
# says so. After every phase $OUT (else gpu_results/) holds three files: summary.txt (one line
# per result), run.log (everything printed) and results.tar.gz (every JSON, CSV, log, profile and
# figure). Nothing here imports Ray or tensorboardX (the GPU machines have neither).
#
#   bash benchmarks/gpu_session.sh                                                # on the GPU machine
#   DEVICE=cpu CONFIG=tiny DEADLINE_S=120 OUT=/tmp/gs bash benchmarks/gpu_session.sh  # its check here
#
# Knobs: DEVICE (cuda), CONFIG (paper), DEADLINE_S (450), PHASES (all, in the order above),
# FROZEN_PACK (512), RESNET_PACK (15), STEPS and REPEATS (throughput blocks), TRAIN_STEPS (5000);
# on the CPU (DEVICE=cpu, a dry run of the script) small values.
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$SECONDS MARGIN=5  # seconds kept for the last archive
DEVICE=${DEVICE:-cuda} CONFIG=${CONFIG:-paper} DEADLINE_S=${DEADLINE_S:-450} PYTHON=${PYTHON:-python3}
pick() { if [ "$DEVICE" = cpu ]; then echo "$2"; else echo "$1"; fi; }  # pick GPU_VALUE CPU_VALUE
FROZEN_PACK=${FROZEN_PACK:-$(pick 512 2)} RESNET_PACK=${RESNET_PACK:-$(pick 15 2)}
STEPS=${STEPS:-$(pick 30 2)} REPEATS=${REPEATS:-$(pick 3 1)} TRAIN_STEPS=${TRAIN_STEPS:-$(pick 5000 100)}
OUT_DIR=${OUT:-gpu_results} WORK=$(mktemp -d) RUNS=$(mktemp -d)  # WORK is archived, RUNS (checkpoints) not
trap 'rm -rf "$WORK" "$RUNS"' EXIT
mkdir -p "$OUT_DIR" && rm -f "$OUT_DIR/summary.txt" "$OUT_DIR/run.log" "$OUT_DIR/results.tar.gz"
SUMMARY=$OUT_DIR/summary.txt LOG=$OUT_DIR/run.log
export ICL_DATA_DIR=${ICL_DATA_DIR:-$PWD/data/omniglot} ICL_CACHE_DIR=${ICL_CACHE_DIR:-/tmp/icl-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$DEVICE" != cpu ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a dry run: OpenMP threads fighting neighbours

need() {  # seconds a phase needs to be worth starting: on a GPU with paper, on the CPU with tiny
    case $1 in
    checks) pick 60 40 ;; tests) pick 30 10 ;; frozen) pick 60 12 ;; resnet) pick 60 15 ;;
    train) pick 60 12 ;; profile) pick 40 25 ;; science) pick 60 15 ;;
    esac
}
left() { echo $((DEADLINE_S - MARGIN - (SECONDS - START))); }
say() { echo "$*" | tee -a "$LOG"; }                # stdout and run.log
note() { echo "$*" | tee -a "$SUMMARY" "$LOG"; }    # and a line of summary.txt
failure() { case $1 in 124 | 137) echo "cut at the deadline" ;; 200) echo "not started: its time was up" ;; *) echo "failed (exit $1)" ;; esac; }
archive() {  # one file under the 16 MiB a file may bring back (the profiler's traces go first)
    tar -czf "$RUNS/results.tar.gz" -C "$WORK" . && { (($(stat -c %s "$RUNS/results.tar.gz") < 15000000)) ||
        tar -czf "$RUNS/results.tar.gz" --exclude='*.trace.json' -C "$WORK" .; } &&
        mv "$RUNS/results.tar.gz" "$OUT_DIR/results.tar.gz"
}

run() {  # run FILE CMD...: CMD, its output into $WORK/FILE and run.log, killed when the phase's time is up
    local file=$1 t=$((PHASE_END - SECONDS))
    shift
    ((t > 0)) || return 200
    timeout -k 5 "$t" "$@" 2>&1 | tee "$WORK/$file" >>"$LOG"
}

phase_checks() {
    run checks.log $PYTHON benchmarks/gpu_checks.py --device "$DEVICE" --jsonl "$WORK/checks.jsonl"
    local rc=$? line
    grep -E '^[a-z0-9_]+ \[.*\]: (pass|fail|skipped): ' "$WORK/checks.log" | while read -r line; do note "check $line"; done
    ((rc == 0 || rc == 1)) || note "checks: $(failure $rc); see checks.log"
}

phase_tests() {
    run tests.log $PYTHON -m pytest -q -p no:cacheprovider -m cuda $(grep -rl --include='test_*.py' 'mark\.cuda' tests)
    local rc=$?
    note "$($PYTHON benchmarks/gpu_summary.py tests "$WORK/tests.log")"
    ((rc != 124 && rc != 137)) || note "tests: $(failure $rc)"
}

measure() {  # measure NAME ARGS...: throughput.py -> NAME.json, and its lines against the targets
    local name=$1
    shift
    run "$name.log" $PYTHON benchmarks/throughput.py --device "$DEVICE" --steps "$STEPS" --repeats "$REPEATS" \
        --also-eager --quiet --json "$WORK/$name.json" "$@"
    local rc=$?
    if ((rc == 0)); then
        $PYTHON benchmarks/gpu_summary.py throughput "$name" "$WORK/$name.json" | tee -a "$SUMMARY" "$LOG"
    else
        note "$name: $(failure $rc); see $name.log"
    fi
}
phase_frozen() { measure frozen --config "$CONFIG" --set model.embedder=frozen --pack "$FROZEN_PACK"; }
phase_resnet() { measure resnet --config "$CONFIG" --set model.embedder=resnet --pack "$RESNET_PACK"; }

phase_train() {
    local t0=$EPOCHREALTIME rc
    run train.log $PYTHON -m icl.train.cli --config "$CONFIG" --set model.embedder=resnet --set "train.device=$DEVICE" \
        --set "train.steps=$TRAIN_STEPS" --no-progress --out "$RUNS/train"
    rc=$?
    if ((rc == 0)) && cp "$RUNS/train/metrics.csv" "$WORK/train_metrics.csv"; then
        $PYTHON benchmarks/gpu_summary.py train "$WORK/train_metrics.csv" "$t0" "$EPOCHREALTIME" "$WORK/resnet.json" \
            | tee -a "$SUMMARY" "$LOG"
    else
        note "train: $(failure $rc); see train.log"
    fi
}

phase_profile() {
    local name
    for name in frozen resnet; do
        if run "profile_$name.txt" $PYTHON benchmarks/profile_step.py --config "$CONFIG" --device "$DEVICE" --pack 1 \
            --set "model.embedder=$name" --json "$WORK/profile_$name.json" --trace "$WORK/profile_$name.trace.json"; then
            note "profile $name K=1: $(grep -m1 'ms/step wall' "$WORK/profile_$name.txt")"
        else
            note "profile $name: $(failure $?); see profile_$name.txt"
        fi
    done
}

phase_science() {
    if run science.log $PYTHON benchmarks/pack_curve.py --config "$CONFIG" --device "$DEVICE" \
        --seconds $((PHASE_END - SECONDS - 15)) $(pick "--eval-every 1000" "") --out "$RUNS/science" \
        --csv "$WORK/science_curve.csv" --png "$WORK/science_curve.png"; then
        note "$(grep -m1 '^science: ' "$WORK/science.log")"
    else
        note "science: $(failure $?); see science.log (science_curve.csv holds the evaluations made)"
    fi
}

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
note "session: $(date -u '+%F %H:%M UTC'), DEVICE=$DEVICE (${gpu:-no nvidia-smi}), CONFIG=$CONFIG," \
    "DEADLINE_S=$DEADLINE_S, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for phase in ${PHASES:-checks tests frozen resnet train profile science}; do
    n=$(need $phase) l=$(left)
    [ -n "$n" ] || { note "error: unknown phase '$phase' (checks tests frozen resnet train profile science)"; exit 2; }
    if ((l < n)); then
        note "$phase: skipped: needs $n s, $l s left of DEADLINE_S=$DEADLINE_S"
        continue
    fi
    share=$((3 * n < l ? 3 * n : l))
    [ $phase != science ] || share=$l
    PHASE_END=$((SECONDS + share))
    say "== $phase: up to $share s ($l s left)"
    "phase_$phase"
    archive
done
note "session: $((SECONDS - START)) s of DEADLINE_S=$DEADLINE_S"
archive
echo "== $SUMMARY"
cat "$SUMMARY"
