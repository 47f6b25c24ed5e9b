"""--async-save: checkpoints written in the background resume exactly, are committed only after every rank's
write, and a run that ends (or crashes) never leaves a half-written checkpoint as the latest.

Loop-level workers run pretrain() at DP 2 in spawned gloo processes (tests/conftest.py: dist_pool). The
writer is slowed down (or never finishes) by wrapping torch_dist.write_sharded_async, so that what a save
in flight means is seen on any machine.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from checkpoint_cases import LOOP_ARGS, latest_iteration, summary_history

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError

TRAIN = ["--train-iters", "8", "--save-interval", "3"]


class SimulatedCrash(RuntimeError):
    pass


def worker_train(argv, writer_delay=None, crash_at_step=None):
    """pretrain() with the background writer delayed by `writer_delay` seconds (inf: it never finishes) and
    step `crash_at_step` raising; returns the commits seen ((saved iteration, steps taken by then), ...) and
    the losses, or "crashed"."""
    from megatron_mile.checkpointing import async_save, torch_dist
    from megatron_mile.training import loop

    steps, commits = [], []
    real_write, real_finalize, real_step = torch_dist.write_sharded_async, async_save.PendingSave.finalize, loop.train_step

    delays = list(writer_delay) if isinstance(writer_delay, (list, tuple)) else None

    def slow_write(*args, **kwargs):
        written = real_write(*args, **kwargs)
        delay = delays.pop(0) if delays else writer_delay
        if delay is None:
            return written
        delayed = Future()

        def finish():
            error = written.exception()
            time.sleep(delay)
            delayed.set_exception(error) if error else delayed.set_result(None)

        if delay != float("inf"):
            threading.Thread(target=finish, daemon=True).start()
        return delayed

    def recording_finalize(self, blocking):
        committed = real_finalize(self, blocking)
        if committed:
            commits.append((self.iteration, len(steps), blocking))
        return committed

    def counting_step(*args, **kwargs):
        steps.append(None)
        if len(steps) == crash_at_step:
            raise SimulatedCrash(f"crash in step {crash_at_step}")
        return real_step(*args, **kwargs)

    torch_dist.write_sharded_async, async_save.PendingSave.finalize, loop.train_step = (
        slow_write, recording_finalize, counting_step)
    try:
        result = loop.pretrain(parse_args(argv, world_size=2))
    except SimulatedCrash:
        return "crashed", commits
    finally:
        torch_dist.write_sharded_async, async_save.PendingSave.finalize, loop.train_step = (
            real_write, real_finalize, real_step)
    return [h.loss for h in result.history], commits


@pytest.fixture(scope="module")
def synchronous(dist_pool, tmp_path_factory):
    save = tmp_path_factory.mktemp("sync")
    losses, _ = dist_pool(2).run(worker_train, [*LOOP_ARGS, *TRAIN, "--save", str(save)])[0]
    return save, losses


def test_background_saves_commit_after_the_next_step_and_resume_exactly(dist_pool, synchronous, tmp_path):
    sync_save, sync_losses = synchronous
    save = tmp_path / "async"
    argv = [*LOOP_ARGS, *TRAIN, "--save", str(save), "--async-save"]
    losses, commits = dist_pool(2).run(worker_train, argv, 0.5)[0]
    assert losses == sync_losses  # saving in the background changes nothing in the training
    # Iterations 3 and 6 were written while the next steps ran: each committed only after a later step.
    background = [(saved, steps) for saved, steps, _ in commits if saved in (3, 6)]
    assert [saved for saved, _ in background] == [3, 6] and all(steps > saved for saved, steps in background), commits
    assert latest_iteration(save) == 8 and not list(save.glob("iter_*.tmp-*"))
    # The checkpoint of iteration 6, written in the background, resumes to the same run as the synchronous one.
    (save / "latest_checkpointed_iteration.txt").write_text("6")
    resumed, _ = dist_pool(2).run(worker_train, [*argv, "--load", str(save)], 0.5)[0]
    assert resumed == sync_losses[6:]
    assert summary_history(save) == summary_history(sync_save)


def test_a_crash_while_a_save_is_written_leaves_the_previous_checkpoint_aslatest_iteration(dist_pool, tmp_path):
    save = tmp_path / "async"
    argv = [*LOOP_ARGS, *TRAIN, "--save", str(save), "--async-save"]
    # The writer of iteration 3 never finishes; step 5 crashes (a killed job looks the same on disk).
    outcome, commits = dist_pool(2).run(worker_train, argv, float("inf"), 5)[0]
    assert outcome == "crashed" and commits == []
    assert not (save / "latest_checkpointed_iteration.txt").exists() and not (save / "iter_0000003").exists()
    assert len(list(save.glob("iter_0000003.tmp-*"))) == 1  # left for loading to ignore
    # With a checkpoint before it: iteration 2 is committed, 4 is in flight when step 6 crashes; 2 stays the
    # latest, and a resume starts there.
    save2 = tmp_path / "async2"
    argv2 = [*LOOP_ARGS, "--train-iters", "8", "--save-interval", "2", "--save", str(save2), "--async-save"]
    outcome, commits = dist_pool(2).run(worker_train, argv2, [0.0, float("inf")], 6)[0]
    assert outcome == "crashed" and [saved for saved, _, _ in commits] == [2]
    assert latest_iteration(save2) == 2 and not (save2 / "iter_0000004").exists()
    assert len(list(save2.glob("iter_0000004.tmp-*"))) == 1
    resumed, _ = dist_pool(2).run(worker_train, [*argv2, "--load", str(save2)])[0]
    assert len(resumed) == 6  # iterations 3..8


def test_a_run_that_ends_waits_for_its_last_save(dist_pool, tmp_path):
    save = tmp_path / "async"
    argv = [*LOOP_ARGS, "--train-iters", "6", "--save-interval", "3", "--save", str(save), "--async-save"]
    losses, commits = dist_pool(2).run(worker_train, argv, 1.0)[0]
    assert len(losses) == 6
    assert commits[-1][0] == 6 and commits[-1][2]  # the save of the last iteration, waited for at the end
    assert latest_iteration(save) == 6 and (save / "iter_0000006" / "mile_checkpoint.json").is_file()


def test_async_save_needs_a_save_directory():
    with pytest.raises(ConfigError, match="--async-save needs --save"):
        parse_args([*LOOP_ARGS, "--async-save"], world_size=1)
