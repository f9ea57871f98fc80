#!/usr/bin/env bash
# Creates .venv with everything d3d-cluster needs, on a fresh Debian machine or an existing one.
# Idempotent: a second run only re-checks. Run as root (or with sudo available) for the apt step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Another installer (Slurm's, say) may hold the dpkg lock: wait for it instead of failing.
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
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

# Monitoring tests run a real Prometheus (with promtool) and Pushgateway, started by the tests themselves.
# A policy-rc.d that forbids service starts keeps the packages' own services (a system Prometheus on 9090)
# from starting during the install; one that is already there (as in Docker images) is left as it is.
monitoring=()
{ command -v prometheus && command -v promtool; } >/dev/null || monitoring+=(prometheus)
command -v prometheus-pushgateway >/dev/null || monitoring+=(prometheus-pushgateway)
if [ ${#monitoring[@]} -gt 0 ]; then
  echo "setup: installing ${monitoring[*]} (services not started)"
  policy=/usr/sbin/policy-rc.d
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ -e "$policy" ]; then
    apt_install --no-install-recommends "${monitoring[@]}"
  else
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    trap '$sudo rm -f "$policy"' EXIT
    apt_install --no-install-recommends "${monitoring[@]}"
    $sudo rm -f "$policy"
    trap - EXIT
  fi
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
