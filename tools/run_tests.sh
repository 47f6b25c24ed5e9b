#!/usr/bin/env bash
# Set up the environment (tools/setup_env.sh) and run the test suite. Extra arguments go to pytest.
# The interpreter, the venv and the megatron-core release come from the environment, as setup_env.sh reads
# them (MILE_PYTHON, MILE_VENV, MILE_MEGATRON_CORE): the CI's Python 3.12 lane sets all three.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MILE_EXTRAS="${MILE_EXTRAS:-test}" source "$REPO_ROOT/tools/setup_env.sh"
cd "$REPO_ROOT"
# The tests check behaviour, not warnings: keep their output to the results.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning}"
python - <<'PY'
import sys
from importlib.metadata import version

print(f"[tests] Python {sys.version.split()[0]}, torch {version('torch')}, megatron-core {version('megatron-core')}")
PY
exec python -m pytest "$@"
