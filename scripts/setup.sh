#!/usr/bin/env bash
# Create .venv (if needed) and install glm-runtime into it, editable.
#   scripts/setup.sh          core dependencies (enough to generate text)
#   scripts/setup.sh dev      plus everything the test suite needs
# torch is pinned through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
target="."
[ -n "$extras" ] && target=".[$extras]"
python -m pip install -q -c constraints.txt -e "$target"
