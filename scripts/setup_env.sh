#!/usr/bin/env bash
# Creates .venv (if needed) with torch 2.14.1 and the tools, and builds fusedlayers into it (editable).
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (it rebuilds only what changed).
# The CUDA kernels are built whenever nvcc is present; FUSEDLAYERS_CUDA=0 skips them, =1 requires them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.14.1" -r requirements-dev.txt
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
