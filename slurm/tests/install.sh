#!/usr/bin/env bash
# Install what the SLURM test harness (slurm/tests/cluster.py) needs: Debian's SLURM
# controller, compute daemon and client commands, and MUNGE. Idempotent: does nothing when
# they are already there. Needs root and apt-get; says why and exits 3 when it cannot.
#
#   bash slurm/tests/install.sh
#
# Installs no service and starts no daemon: the harness starts its own, with its own config.
set -euo pipefail

needed=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged munge unmunge)
missing=()
for exe in "${needed[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$exe" >/dev/null 2>&1 || missing+=("$exe")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "slurm/tests/install.sh: SLURM and MUNGE already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm/tests/install.sh: cannot install SLURM: not root (missing: ${missing[*]})" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm/tests/install.sh: cannot install SLURM: no apt-get (missing: ${missing[*]})" >&2
    exit 3
fi

echo "slurm/tests/install.sh: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the packages' maintainer scripts must not start the system's own
# munge/slurm services (harmless without an init system, but never wanted here).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
fi
trap '[ "$made_policy" -eq 1 ] && rm -f "$policy"' EXIT

apt-get update -qq || { echo "slurm/tests/install.sh: apt-get update failed" >&2; exit 3; }
if ! apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/slurm-apt-install.log 2>&1; then
    tail -20 /tmp/slurm-apt-install.log >&2
    echo "slurm/tests/install.sh: apt-get install failed (log: /tmp/slurm-apt-install.log)" >&2
    exit 3
fi
for exe in "${needed[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$exe" >/dev/null 2>&1 \
        || { echo "slurm/tests/install.sh: $exe still missing after install" >&2; exit 3; }
done
echo "slurm/tests/install.sh: installed $(PATH="$PATH:/usr/sbin" slurmctld -V)"
