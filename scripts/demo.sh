#!/usr/bin/env bash
# The main job: set up, then fill a [MASK] blank and continue a [gMASK] prompt with the
# bundled glm-tiny model on the CPU backend (seeded sampling: greedy decoding of this
# small model mostly closes a blank at once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
sample=(--backend cpu --do-sample --top-p 0.9 --seed 1 --max-new-tokens 24)
glmrt generate "${sample[@]}" --prompt "The quick brown [MASK] jumps over the lazy dog." "$@"
glmrt generate "${sample[@]}" --prompt "Beautiful is better than ugly. [gMASK]" "$@"
