#!/usr/bin/env bash
# The whole test suite: C++ CPU and Triton (interpreted) backends; the CUDA kernels are compiled by the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
exec python -m pytest tests -q "$@"
