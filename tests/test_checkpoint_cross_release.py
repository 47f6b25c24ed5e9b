"""A checkpoint saved under one supported megatron-core release loads under the other and resumes exactly.

The other release's interpreter saves: a venv of the clone that runs the other release (`.venv`, Python 3.11
with 0.16.1, when this process runs 0.19; `.venv312` the other way round), or the interpreter named by
MILE_OTHER_RELEASE_PYTHON. The CI's Python 3.12 lane finds lane 1's `.venv` and so checks that a run saved
under 0.16.1 continues under 0.19; where no such interpreter exists the test is skipped (it says why).

The reference is independent of this process: the other release trains the same run for 4 iterations without
interruption (saving at iteration 2 on the way), and this release resumes from that iteration-2 checkpoint;
iterations 3 and 4 must give the same losses, and the resumed run keeps the history it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from checkpoint_cases import COMPARED_COLUMNS, LOOP_ARGS

from megatron_mile.megatron_core_api import MEGATRON_CORE_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venvs of the clone, one per release (.ci/run's two lanes: Python 3.11 / 0.16.1, Python 3.12 / 0.19).
_CLONE_VENVS = (".venv", ".venv312")
SAVE_EVERY = 2


def _release_of(python: str) -> str:
    """The megatron-core release `python` runs, or "" when it cannot tell."""
    probe = "from importlib.metadata import version; print(version('megatron-core'))"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture(scope="module")
def other_release_python() -> str:
    named = os.environ.get("MILE_OTHER_RELEASE_PYTHON")
    candidates = [named] if named else [str(REPO_ROOT / venv / "bin" / "python") for venv in _CLONE_VENVS]
    seen = []
    for python in candidates:
        release = _release_of(python) if Path(python).exists() else ""
        if release and release != str(MEGATRON_CORE_VERSION):
            return python
        seen.append(f"{python}: {release or 'absent'}")
    pytest.skip(f"no interpreter of a megatron-core release other than {MEGATRON_CORE_VERSION} ({'; '.join(seen)}); "
                "CI's Python 3.12 lane has lane 1's .venv, or set MILE_OTHER_RELEASE_PYTHON")


def worker_resume(argv, world_size):
    """Worker body: pretrain() with `argv`; the (iteration, lm loss, loss, skipped) of each iteration run."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import loop

    result = loop.pretrain(parse_args(argv, world_size=world_size))
    return [h.loss for h in result.history], result.final_iteration


def test_checkpoint_of_the_other_release_resumes_exactly(other_release_python, dist_pool, tmp_path):
    saved = tmp_path / "saved_by_other_release"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore::UserWarning")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single-process run of its own
    uninterrupted = subprocess.run(
        [other_release_python, str(REPO_ROOT / "pretrain_gpt_mile.py"), *LOOP_ARGS,
         "--save", str(saved), "--save-interval", str(SAVE_EVERY)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:] + uninterrupted.stderr[-3000:]
    reference = json.loads((saved / "summary.json").read_text())["history"]
    assert reference["iteration"] == [1, 2, 3, 4]

    resumed_dir = tmp_path / "resumed_here"
    argv = LOOP_ARGS + ["--load", str(saved), "--ckpt-step", str(SAVE_EVERY), "--save", str(resumed_dir),
                        "--save-interval", "100"]
    losses, final_iteration = dist_pool(1).run(worker_resume, argv, 1)[0]
    assert final_iteration == 4
    assert losses == reference["loss"][SAVE_EVERY:]  # iterations 3 and 4, bit for bit

    resumed = json.loads((resumed_dir / "summary.json").read_text())["history"]
    for column in COMPARED_COLUMNS:
        assert resumed[column] == reference[column], column
