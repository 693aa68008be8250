#!/usr/bin/env bash
# Build the CPU test/demo environment in .venv (idempotent; re-runs only when pins change).
# Usage: bash scripts/setup_env.sh        (VENV=path to override the location)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
pins=$root/3rdparty/constraints-cpu.txt
stamp=$venv/.moe_lb_stamp
want=$(cat "$pins" "$0" "$root/python/pyproject.toml" "$root/sgl-kernel/pyproject.toml" | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup_env] $venv is up to date"; exit 0
fi
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || { echo "[setup_env] error: $py not found (SGLang 0.5.23 + torch 2.13.0 CPU need Python 3.11)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip warns about every missing local index directory on this machine; keep its real errors.
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }
echo "[setup_env] torch (CPU build) ..."
quiet $pip install -q "torch==2.13.0"
echo "[setup_env] test/demo dependencies ..."
# Everything in the pin file except the two installed without their (CUDA-only) dependencies.
grep -vE '^(#|$|sglang==|xgrammar==)' "$pins" > "$venv/.reqs.txt"
quiet $pip install -q -r "$venv/.reqs.txt" -c "$pins"
echo "[setup_env] sglang (no deps: its CUDA-only deps are GPU extras) ..."
$pip install -q --no-deps $(grep -E '^(sglang|xgrammar)==' "$pins")
echo "[setup_env] sglang-moe-lb (editable) ..."
$pip install -q --no-deps -e "$root/python" -e "$root/sgl-kernel"
# torchvision cannot load beside CPU torch; SGLang imports it at module level. A .pth puts an
# import-only stand-in on the path of this test venv (spawned servers included).
site=$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root/test/cpu_stubs/torchvision_path" > "$site/moe_lb_torchvision_stub.pth"
echo "$want" > "$stamp"
echo "[setup_env] done: $venv"
