#!/usr/bin/env bash
# The main job: set up, then generate text with the bundled model on the CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
glmrt generate --backend cpu --prompt "The file object" --max-new-tokens 40 "$@"
