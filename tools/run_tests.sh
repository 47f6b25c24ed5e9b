#!/usr/bin/env bash
# Set up the environment (tools/setup_env.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MILE_EXTRAS="${MILE_EXTRAS:-test}" source "$REPO_ROOT/tools/setup_env.sh"
cd "$REPO_ROOT"
# The tests check behaviour, not warnings: keep their output to the results.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning}"
exec python -m pytest "$@"
