#!/usr/bin/env bash
# The benchmark harness: fused vs eager vs torch.compile. Arguments go to `python -m bench` (try --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
exec python -m bench "$@"
