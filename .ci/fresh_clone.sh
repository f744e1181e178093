#!/usr/bin/env bash
# A new user's first two commands, from nothing (README: "Set up a fresh machine, run the main
# job"): a clean clone of this repository's HEAD in a temporary folder, a clean virtual
# environment (python -m venv, no system site-packages), the README's install command, then
# the main job (the demo sweep, shortened with --set train.steps=...) to its report.
#
# Clean means: nothing of this checkout's environment reaches the clone (ICL_DATA_DIR,
# ICL_CACHE_DIR, PYTHONPATH, VIRTUAL_ENV are unset; Ray runs in a folder of its own). The
# machine's pip configuration (its registry) is kept, as a user's would be. Omniglot is not
# configured: the clone must find it by itself, in ../shared/data/omniglot beside it (a link to
# the copy this checkout uses), as on a lab machine with a shared copy.
#
#   bash .ci/fresh_clone.sh              # 1000-step demo (FRESH_DEMO_STEPS), then remove the folder
#   KEEP=1 bash .ci/fresh_clone.sh       # keep the clone, venv and experiment (their path is printed)
#
# Prints the wall time of the install and of the main job. Needs: git, python3 (>= 3.11) with
# venv, the package registry, several GB of disk for the venv (torch).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
steps="${FRESH_DEMO_STEPS:-1000}"
data="${ICL_DATA_DIR:-$repo/../shared/data/omniglot}"
[ -d "$data" ] || { echo "error: no Omniglot at $data to put beside the clone; set ICL_DATA_DIR" >&2; exit 2; }
data="$(cd "$data" && pwd)"
work="$(mktemp -d /tmp/icl-fresh-XXXXXX)"
cleanup() {
    # nothing the run started outlives it: Ray's processes are found by their folder
    pids=$(pgrep -f "$work/" || true)
    [ -n "$pids" ] && kill $pids 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    git clone -q "$repo" "$work/icl-sweep"
else  # a checkout without its .git (an exported tree): its files, without data or outputs
    mkdir "$work/icl-sweep"
    tar -C "$repo" --exclude=./data/omniglot --exclude=./experiments --exclude='*/__pycache__' -cf - . |
        tar -C "$work/icl-sweep" -xf -
fi
mkdir -p "$work/shared/data"
ln -s "$data" "$work/shared/data/omniglot"
cd "$work/icl-sweep"
echo "fresh clone of $(git rev-parse --short HEAD 2>/dev/null || echo "an exported tree") in $work/icl-sweep; Omniglot beside it: ../shared/data/omniglot"

clean=(env -u ICL_DATA_DIR -u ICL_CACHE_DIR -u PYTHONPATH -u VIRTUAL_ENV -u RAY_ADDRESS
       RAY_TMPDIR="$work/ray" PATH="$work/venv/bin:$PATH")
mkdir -p "$work/ray"

t0=$SECONDS
python3 -m venv "$work/venv"
# README command 1 (the install)
"${clean[@]}" pip install -q -c constraints.txt -e ".[dev]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # this machine's registry layout
t1=$SECONDS
echo "install: $((t1 - t0)) s (python -m venv + pip install -c constraints.txt -e \".[dev]\")"

# README command 2 (the main job), shortened
"${clean[@]}" icl-sweep demo --storage experiments --set train.steps="$steps" | tail -n 12
t2=$SECONDS
echo "main job: $((t2 - t1)) s (icl-sweep demo --storage experiments --set train.steps=$steps)"

for f in results.csv results.parquet report/report.md report/report.html; do
    [ -s "experiments/demo/$f" ] || { echo "error: the demo did not write experiments/demo/$f" >&2; exit 1; }
done
grep -m1 '^\*\*' experiments/demo/report/report.md || true
echo "fresh clone: OK (install $((t1 - t0)) s, main job $((t2 - t1)) s)"
