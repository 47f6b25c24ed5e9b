#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install megatron_mile into it.
# Source it (`source tools/setup_env.sh`) to get the venv's python on PATH; running it also works.
#
# Why torch is installed first and pinned: an unpinned torch (asked for directly or by a dependency)
# resolves to a multi-GB CUDA build; torch==2.13.0 is the CPU build this project is tested with, and every
# later install is constrained to it. megatron-core 0.16.1 is the newest release for Python 3.11.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MILE_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the install requirements changed (a stamp holds setup.py's hash).
STAMP="$VENV/.megatron_mile_installed"
WANT="$(cat "$REPO_ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  CONSTRAINTS="$(mktemp)"
  echo "$TORCH_PIN" > "$CONSTRAINTS"
  echo "[setup] installing $TORCH_PIN and megatron_mile[test] (a minute on a fresh machine)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_PIN"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e "$REPO_ROOT[test]"
  rm -f "$CONSTRAINTS"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning}"
