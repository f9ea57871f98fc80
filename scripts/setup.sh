#!/usr/bin/env bash
# Creates .venv with everything d3d-cluster needs, on a fresh Debian machine or an existing one.
# Idempotent: a second run only re-checks. Run as root (or with sudo available) for the apt step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Another apt run (a parallel setup, unattended upgrades) may hold the lock: wait for it instead of failing.
APT="apt-get -o DPkg::Lock::Timeout=600"

apt_install() {
  $SUDO $APT update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO $APT install -y -qq "$@" >/dev/null
}

# Package scripts start their services (munged, slurmctld, slurmd, prometheus); the tests run their own private daemons,
# so the system ones must not run. Where no policy-rc.d exists, one that refuses every start is in place while
# apt runs; an existing one (containers ship one that refuses) is left alone.
apt_install_without_services() {
  local policy=/usr/sbin/policy-rc.d
  if [ -e "$policy" ]; then
    apt_install "$@"
    return
  fi
  printf '#!/bin/sh\n# d3d-cluster setup: refuse service starts while apt runs\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f '"$policy" EXIT
  apt_install "$@"
  $SUDO rm -f "$policy"
  trap - EXIT
}

# System packages: a Python that can make virtual environments and build DeepSpeed's small JIT ops (gcc).
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
command -v gcc >/dev/null || missing+=(build-essential)
python3 -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null \
  || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi

# Slurm and munge for the test suite's private one-machine cluster (tests/slurm_cluster.py); iproute2 for its
# two-node variant (one network namespace per node, tests/netns.py).
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
slurm_missing=()
{ have slurmctld && have slurmd && have sbatch; } || slurm_missing+=(slurm-wlm)
have munged || slurm_missing+=(munge)
have ip || slurm_missing+=(iproute2)
if [ ${#slurm_missing[@]} -gt 0 ]; then
  echo "setup: installing ${slurm_missing[*]} (their system services are not started)"
  apt_install_without_services "${slurm_missing[@]}"
fi

# Prometheus (with promtool) and the Pushgateway for the monitoring tests, which start their own.
monitoring=()
{ command -v prometheus && command -v promtool; } >/dev/null || monitoring+=(prometheus)
command -v prometheus-pushgateway >/dev/null || monitoring+=(prometheus-pushgateway)
if [ ${#monitoring[@]} -gt 0 ]; then
  echo "setup: installing ${monitoring[*]} (their system services are not started)"
  apt_install_without_services --no-install-recommends "${monitoring[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$VENV/.d3dc-installed" ] || [ pyproject.toml -nt "$VENV/.d3dc-installed" ]; then
  "$PY" -m pip install -q --upgrade pip
  # The CPU build of torch first: a looser request would pull the multi-GB CUDA build on CPU machines.
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[test]"
  touch "$VENV/.d3dc-installed"
fi
echo "setup: ready ($("$PY" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "nvidia-dali-cuda120", "submitit")))'))"
