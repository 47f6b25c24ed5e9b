#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install megatron_mile into it.
# Source it (`source tools/setup_env.sh`) to get the venv's python on PATH; running it also works.
#
# Environment (all optional):
#   MILE_VENV           the venv's directory (default .venv in the clone)
#   MILE_PYTHON         the interpreter that creates it (default $PYTHON, else python3). Its version picks
#                       megatron-core through setup.py's markers: 0.16.1 below Python 3.12, 0.19.x from 3.12
#   MILE_MEGATRON_CORE  a pip version specifier that narrows megatron-core further (e.g. "==0.19.2")
#
# Why torch is installed first and pinned: an unpinned torch (asked for directly or by a dependency)
# resolves to a multi-GB CUDA build; torch==2.13.0 is the build this project is tested with (the CPU
# wheel on Python 3.11 machines; the index's wheel on 3.12, which brings the triton megatron-core 0.19
# imports), and every later install is constrained to it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MILE_VENV:-$REPO_ROOT/.venv}"
PYTHON="${MILE_PYTHON:-${PYTHON:-python3}}"
TORCH_PIN="torch==2.13.0"
MCORE_PIN="${MILE_MEGATRON_CORE:+megatron-core$MILE_MEGATRON_CORE}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Extras to install beside the package: tools/run_tests.sh asks for "test"; the quickstart needs none.
EXTRAS="${MILE_EXTRAS:-}"
SPEC="$REPO_ROOT"
[ -n "$EXTRAS" ] && SPEC="$REPO_ROOT[$EXTRAS]"
# Reinstall only when the install requirements changed: the stamp holds one line per installed extras set,
# "<sha256 of setup.py and the megatron-core pin> <extras>"; the package alone is satisfied by any line with
# the current hash.
STAMP="$VENV/.megatron_mile_installed"
SETUP_HASH="$( { cat "$REPO_ROOT/setup.py"; echo "$MCORE_PIN"; } | sha256sum | cut -d' ' -f1)"
installed() {
  [ -f "$STAMP" ] || return 1
  if [ -z "$EXTRAS" ]; then grep -q "^$SETUP_HASH " "$STAMP"; else grep -qx "$SETUP_HASH $EXTRAS" "$STAMP"; fi
}
# pip's own output, cut to one line per package it fetches and the final summary, so a long install shows
# what it is doing. (This machine's pip configuration may name package folders that do not exist; pip warns
# once per package about them: dropped.)
progress_pip() {
  "$VENV/bin/python" -m pip install --progress-bar off --disable-pip-version-check "$@" 2>&1 \
    | { grep --line-buffered -E "^(Collecting|Successfully installed|ERROR|error)" || true; } \
    | sed -u -e 's/^Successfully installed .*/  done/' -e 's/^Collecting /  fetching /'
}
if ! installed; then
  CONSTRAINTS="$(mktemp)"
  echo "$TORCH_PIN" > "$CONSTRAINTS"
  if [ -n "$MCORE_PIN" ]; then echo "$MCORE_PIN" >> "$CONSTRAINTS"; fi
  echo "[setup] installing $TORCH_PIN into $VENV"
  progress_pip "$TORCH_PIN"
  echo "[setup] installing megatron_mile${EXTRAS:+[$EXTRAS]} and its dependencies (megatron-core, ...)"
  progress_pip -c "$CONSTRAINTS" -e "$SPEC"
  rm -f "$CONSTRAINTS"
  [ -f "$STAMP" ] && grep -q "^$SETUP_HASH " "$STAMP" || : > "$STAMP"
  echo "$SETUP_HASH $EXTRAS" >> "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
