#!/usr/bin/env bash
# Masked image-text pretraining: a thin wrapper around `mmmoe fit` (run from the repository root).
#   scripts/pretrain.sh                                   # configs/pretrain/tiny.yaml (built-in data)
#   CONFIG=configs/pretrain/base.yaml scripts/pretrain.sh --config configs/trainer/multi-gpu.yaml
#   scripts/pretrain.sh --ckpt_path last                  # resume
# Extra arguments go to `mmmoe fit` (see `mmmoe fit --help`); MMMOE picks another executable.
set -euo pipefail
MMMOE=${MMMOE:-mmmoe}
here=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v "$MMMOE" >/dev/null 2>&1 && [ -x "$here/.venv/bin/mmmoe" ]; then MMMOE="$here/.venv/bin/mmmoe"; fi
exec "$MMMOE" fit --config "${CONFIG:-configs/pretrain/tiny.yaml}" "$@"
