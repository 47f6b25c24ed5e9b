"""A run resumed with --load is the same run: its validation continues on the samples the uninterrupted run
evaluates (losses equal bit for bit), and {save}/summary.json keeps the history of the whole run, without the
iterations of an abandoned branch.

Loop-level workers run pretrain() at DP 2 in spawned gloo processes (tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_cases import COMPARED_COLUMNS, LOOP_ARGS

from megatron_mile.training import summary as run_summary

# Validation of 2 global batches after every iteration: each one reads new samples, so a validation that
# restarted at the first sample would differ from the uninterrupted run's.
EVAL_ARGS = ["--eval-iters", "2", "--eval-interval", "1"]


class SimulatedCrash(RuntimeError):
    pass


def worker_pretrain_with_validation(extra, world_size, crash_at_step=None):
    """(train losses, validation, final iteration); with `crash_at_step`, that step raises SimulatedCrash."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import loop

    original, calls = loop.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(None)
        if len(calls) == crash_at_step:
            raise SimulatedCrash(f"crash in step {crash_at_step}")
        return original(*args, **kwargs)

    loop.train_step = crashing_step
    try:
        result = loop.pretrain(parse_args(LOOP_ARGS + EVAL_ARGS + extra, world_size=world_size))
    except SimulatedCrash:
        return None
    finally:
        loop.train_step = original
    return [h.loss for h in result.history], list(result.validation), result.final_iteration


def _summary(save: Path) -> dict:
    return json.loads((save / "summary.json").read_text())


def _history(summary: dict) -> dict:
    return {column: summary["history"][column] for column in COMPARED_COLUMNS}


@pytest.fixture(scope="module")
def uninterrupted(dist_pool, tmp_path_factory):
    """4 iterations without interruption: (train losses, validation, final iteration) and its summary."""
    save = tmp_path_factory.mktemp("uninterrupted") / "run"
    outcome = dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save)], 2)[-1]
    return outcome, _summary(save)


def test_resumed_validation_continues_on_the_uninterrupted_runs_samples(dist_pool, tmp_path, uninterrupted):
    (losses, validation, _), _ = uninterrupted
    assert len(validation) == 4 and len({v[1] for v in validation}) == 4
    save = str(tmp_path / "run")
    first = dist_pool(2).run(worker_pretrain_with_validation, ["--save", save, "--exit-interval", "2"], 2)[-1]
    second = dist_pool(2).run(worker_pretrain_with_validation, ["--save", save, "--load", save], 2)[-1]
    assert first == (losses[:2], validation[:2], 2)
    assert second[0] == losses[2:]  # training was already exact
    assert second[1] == validation[2:]  # exactly: same samples, same bits


def test_resumed_summary_keeps_the_whole_run(dist_pool, tmp_path, uninterrupted):
    _, full_summary = uninterrupted
    save = tmp_path / "run"
    dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save), "--exit-interval", "2"], 2)
    assert _summary(save)["history"]["iteration"] == [1, 2]
    dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save), "--load", str(save)], 2)
    resumed = _summary(save)
    assert _history(resumed) == _history(full_summary)
    assert resumed["history"]["iteration"] == [1, 2, 3, 4]
    assert resumed["validation"] == full_summary["validation"]
    assert resumed["final_train_lm_loss_last10"] == full_summary["final_train_lm_loss_last10"]
    assert (resumed["iterations"], resumed["consumed_samples"]) == (4, 16)


def test_resume_from_an_earlier_checkpoint_drops_the_abandoned_branch(dist_pool, tmp_path, uninterrupted):
    _, full_summary = uninterrupted
    save = tmp_path / "run"
    # Iterations 1..3, checkpoints at 2 and 3; then resume from 2: iteration 3 of the first segment is abandoned.
    dist_pool(2).run(worker_pretrain_with_validation,
                     ["--save", str(save), "--save-interval", "2", "--exit-interval", "3"], 2)
    assert _summary(save)["history"]["iteration"] == [1, 2, 3]
    (save / "latest_checkpointed_iteration.txt").write_text("2\n")
    dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save), "--load", str(save)], 2)
    resumed = _summary(save)
    assert _history(resumed) == _history(full_summary)
    assert resumed["validation"] == full_summary["validation"]


def test_a_crashed_run_resumes_with_the_history_up_to_its_checkpoint(dist_pool, tmp_path, uninterrupted):
    _, full_summary = uninterrupted
    save = tmp_path / "run"
    # The summary is written with each checkpoint: a crash in step 3 leaves it at iteration 2.
    assert dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save), "--save-interval", "2"], 2, 3) \
        == [None, None]
    assert _summary(save)["history"]["iteration"] == [1, 2]
    saved = json.loads((save / "iter_0000002" / "mile_checkpoint.json").read_text())
    assert saved["consumed_valid_samples"] == 2 * 2 * 4  # 2 validations of --eval-iters 2 global batches of 4
    dist_pool(2).run(worker_pretrain_with_validation, ["--save", str(save), "--load", str(save)], 2)
    resumed = _summary(save)
    assert _history(resumed) == _history(full_summary)
    assert resumed["validation"] == full_summary["validation"]


# ------------------------------------------------------------------ reading an earlier summary (no processes)


def _write(path: Path, summary) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def _a_summary(iterations):
    return {
        "wall_seconds": 12.5,
        "history": {"iteration": iterations, "lm_loss": [5.0 + i for i in iterations],
                    "loss": [4.0 + i for i in iterations], "skipped": [False] * len(iterations),
                    "seconds": [0.1] * len(iterations)},
        "validation": [{"iteration": i, "lm_loss": 7.0 + i, "ppl": 1.0, "training_loss": 6.0} for i in iterations],
    }


def test_read_run_history_keeps_the_iterations_up_to_the_resumed_one(tmp_path):
    directory = _write(tmp_path, _a_summary([1, 2, 3, 4]))
    earlier = run_summary.read_run_history(str(directory), 2, log=pytest.fail)
    assert earlier["history"] == {"iteration": [1, 2], "lm_loss": [6.0, 7.0], "loss": [5.0, 6.0],
                                  "skipped": [False, False], "seconds": [0.1, 0.1]}
    assert [v["iteration"] for v in earlier["validation"]] == [1, 2]
    assert earlier["wall_seconds"] == 12.5


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps([1, 2]),
    json.dumps({"history": {"iteration": [1, 2]}, "validation": []}),  # columns missing
    json.dumps({**_a_summary([1, 2]), "history": {**_a_summary([1, 2])["history"], "iteration": [2, 1]}}),
    json.dumps({**_a_summary([1, 2]), "history": {**_a_summary([1, 2])["history"], "lm_loss": ["x", 1.0]}}),
    json.dumps({**_a_summary([1, 2]), "validation": "none"}),
])
def test_an_invalid_earlier_summary_is_ignored_with_a_note(tmp_path, content):
    (tmp_path / "summary.json").write_text(content)
    notes = []
    earlier = run_summary.read_run_history(str(tmp_path), 2, log=notes.append)
    assert earlier["history"]["iteration"] == [] and earlier["validation"] == []
    assert len(notes) == 1 and "ignoring" in notes[0] and str(tmp_path / "summary.json") in notes[0]


def test_a_missing_earlier_summary_is_noted(tmp_path):
    notes = []
    assert run_summary.read_run_history(str(tmp_path), 3, log=notes.append)["history"]["iteration"] == []
    assert len(notes) == 1 and "does not exist" in notes[0]
