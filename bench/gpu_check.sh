#!/usr/bin/env bash
# GPU check (issue 16): run bench/gpu_check.py with the repository's Python; arguments pass through.
# The table goes to stdout and, when $OUT is set (the device machine's output folder), to $OUT/gpu_check.md
# with the raw numbers in $OUT/gpu_check.json. Python: $PYTHON, else .venv/bin/python, else the active
# virtual environment's, else python3 (the device machine's image, which holds PyTorch).
#
#     bench/gpu_check.sh              # the full check (GPU machine, < 8 min)
#     bench/gpu_check.sh --dry-run    # tiny sizes, any machine, seconds
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    py="$VIRTUAL_ENV/bin/python"
else
    py=python3
fi
# this checkout's ctxrepro, not whichever one the environment has installed
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
outputs=()
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    outputs=(--out "$OUT/gpu_check.md" --json "$OUT/gpu_check.json")
fi
cd "$root"
exec "$py" bench/gpu_check.py ${outputs[@]+"${outputs[@]}"} "$@"
