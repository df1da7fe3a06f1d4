#!/usr/bin/env bash
# Set up with the test dependencies, then run the whole test suite (strict ops: any
# fallback from a backend kernel to the reference is an error). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
export TORCH_DEVICE_BACKEND_AUTOLOAD=0 GLM_STRICT_OPS=1
# the multi-process tests skip without mpiexec (for a user's own environment); here the
# dev set-up installs it, so its absence is a broken set-up, not a reason to skip them
if [ ! -x .venv/bin/mpiexec ]; then
  echo "scripts/test.sh: .venv/bin/mpiexec is missing after set-up: the MPI tests would be skipped" >&2
  exit 1
fi
set +e
python -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
