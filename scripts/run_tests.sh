#!/usr/bin/env bash
# Set up the CPU test environment (idempotent) and run the whole test suite.
# Usage: bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
# Lint first (ruff.toml): unused names, undefined names, import order.
"$root/.venv/bin/ruff" check --quiet "$root"
# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
export TRITON_INTERPRET=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# Include the end-to-end tests that start real SGLang servers on CPU (loopback only).
export SGLANG_MOE_LB_E2E=${SGLANG_MOE_LB_E2E:-1}
exec "$root/.venv/bin/python" -m pytest test -q -p no:cacheprovider "$@"
