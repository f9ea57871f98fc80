#!/usr/bin/env bash
# Creates .venv with everything d3d-cluster needs, on a fresh Debian machine or an existing one.
# Idempotent: a second run only re-checks. Run as root (or with sudo available) for the apt step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
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
