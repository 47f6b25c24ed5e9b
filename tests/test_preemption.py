"""Stopping early without losing work: --exit-signal-handler / --exit-signal and --exit-duration-in-mins.

The end-to-end tests run pretrain_gpt_mile.py in real processes at TP=2 on gloo, launched as srun launches
them (one process per rank, RANK/WORLD_SIZE in the environment, all in one process group) and once under
torchrun; SIGTERM goes to the whole process group at a drawn iteration, as Slurm signals a job's processes.
Each interrupted run must leave a checkpoint of the iteration it stopped at, exit 0 on every rank, and
resume to exactly the uninterrupted run's losses (dropout on: the RNG states must round-trip too).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_cases import LOOP_ARGS, latest_iteration, summary_history

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.parallel import find_free_port
from megatron_mile.training.run_control import ExitSignalHandler, RunControl

REPO = Path(__file__).resolve().parents[1]
TRAIN_ITERS = 30
RUN_ARGS = list(LOOP_ARGS) + ["--tensor-model-parallel-size", "2", "--train-iters", str(TRAIN_ITERS),
                              "--log-interval", "1"]
ITERATION_LINE = re.compile(r"iteration\s+(\d+)/")
EXIT_LINE = re.compile(r"exiting at iteration (\d+) \((.*)\); checkpoint saved")
# Iterations after which the signal is sent, drawn once (fixed seed: a failure reproduces).
SIGNAL_AFTER = sorted(random.Random(20261130).sample(range(1, TRAIN_ITERS - 8), 3))


# ------------------------------------------------------------------------------------------ in one process


def test_handler_notes_the_signal_and_gives_the_previous_handler_back():
    previous = signal.getsignal(signal.SIGUSR1)
    handler = ExitSignalHandler("SIGUSR1")
    handler.install()
    try:
        assert not handler.received
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process without the handler
        deadline = time.time() + 5
        while not handler.received and time.time() < deadline:
            time.sleep(0.01)
        assert handler.received
    finally:
        handler.release()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_exit_reason_without_collectives():
    config = parse_args([*LOOP_ARGS, "--exit-signal-handler", "--exit-signal", "SIGUSR2"], world_size=1)
    control = RunControl(config.training, start_time=time.time())
    control.start()
    try:
        assert control.exit_reason(step_seconds=0.0) is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert "SIGUSR2" in control.exit_reason(step_seconds=0.0)
    finally:
        control.finish()
    # The budget counts the next step: 1 minute left, a step of 2 minutes does not fit.
    config = parse_args([*LOOP_ARGS, "--exit-duration-in-mins", "1"], world_size=1)
    control = RunControl(config.training, start_time=time.time())
    assert control.exit_reason(step_seconds=1.0) is None
    assert "--exit-duration-in-mins 1" in control.exit_reason(step_seconds=120.0)


def test_flag_misuse_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="--exit-signal SIGUSR1 needs --exit-signal-handler"):
        parse_args([*LOOP_ARGS, "--exit-signal", "SIGUSR1"], world_size=1)
    out = subprocess.run([sys.executable, str(REPO / "pretrain_gpt_mile.py"), *LOOP_ARGS, "--exit-signal-handler",
                          "--exit-signal", "SIGKILL"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--exit-signal" in out.stderr and "SIGTERM" in out.stderr, out.stderr[-2000:]


def test_a_missing_load_directory_of_its_own_stays_an_error(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "pretrain_gpt_mile.py"), *LOOP_ARGS, "--save", str(tmp_path / "new"),
                          "--load", str(tmp_path / "typo")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode != 0 and f"checkpoint directory {tmp_path / 'typo'} does not exist" in out.stderr + out.stdout


# ------------------------------------------------------------------------------- real processes, TP=2


def _environment(rank: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def start_ranks(argv: list, logs: Path) -> list:
    """Both ranks of a TP=2 run, one process each as srun starts them, in one new process group (rank 0's)."""
    port = find_free_port()
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in range(2):
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *argv],
            env=_environment(rank, port), stdout=open(logs / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT,
            process_group=0 if rank == 0 else processes[0].pid,
        ))
    return processes


def start_torchrun(argv: list, logs: Path) -> list:
    """The same run under torchrun (2 workers), in a new process group."""
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--shutdown-timeout", "300", str(REPO / "pretrain_gpt_mile.py"), *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return [subprocess.Popen(command, env=env, stdout=open(logs / "torchrun.log", "w"), stderr=subprocess.STDOUT,
                             process_group=0)]


def wait_all(processes: list, timeout: float = 600) -> list:
    deadline = time.time() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    return codes


def signal_after_iteration(processes: list, log: Path, iteration: int, timeout: float = 600) -> None:
    """Send SIGTERM to the run's whole process group once `log` shows `iteration` done."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(m) for m in ITERATION_LINE.findall(log.read_text())] if log.exists() else []
        if done and max(done) >= iteration:
            os.killpg(processes[0].pid, signal.SIGTERM)
            return
        if any(p.poll() is not None for p in processes):
            pytest.fail(f"the run ended before iteration {iteration}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"iteration {iteration} not reached in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    save = tmp_path_factory.mktemp("uninterrupted")
    processes = start_ranks([*RUN_ARGS, "--save", str(save)], save / "logs")
    assert wait_all(processes) == [0, 0], (save / "logs" / "rank1.log").read_text()[-3000:]
    return summary_history(save)


def resume_and_compare(argv: list, save: Path, stopped_at: int, uninterrupted: dict) -> None:
    assert latest_iteration(save) == stopped_at
    assert list((save / f"iter_{stopped_at:07d}").glob("*.distcp")), "the checkpoint holds no tensors"
    processes = start_ranks(argv, save / "logs-resume")
    assert wait_all(processes) == [0, 0], (save / "logs-resume" / "rank1.log").read_text()[-3000:]
    assert latest_iteration(save) == TRAIN_ITERS
    assert summary_history(save) == uninterrupted  # every iteration, before and after the stop, bit for bit


@pytest.mark.parametrize("after", SIGNAL_AFTER)
def test_sigterm_saves_the_current_iteration_exits_0_and_resumes_exactly(tmp_path, uninterrupted, after):
    save = tmp_path / "run"
    argv = [*RUN_ARGS, "--save", str(save), "--load", str(save), "--exit-signal-handler"]
    processes = start_ranks(argv, save / "logs")
    signal_after_iteration(processes, save / "logs" / "rank1.log", after)
    codes = wait_all(processes)
    rank0 = (save / "logs" / "rank0.log").read_text()
    assert codes == [0, 0], rank0[-3000:]
    # The first job of a chain: --save and --load name one directory that does not exist yet.
    assert f"no checkpoint in {save}" in rank0 and "training from scratch" in rank0, rank0[-3000:]
    stopped = EXIT_LINE.search(rank0)
    assert stopped and "received SIGTERM" in stopped.group(2), rank0[-3000:]
    stopped_at = int(stopped.group(1))
    assert after <= stopped_at < TRAIN_ITERS
    resume_and_compare(argv, save, stopped_at, uninterrupted)


def test_sigterm_under_torchrun(tmp_path, uninterrupted):
    """torchrun forwards the signal to its workers and waits for them (--shutdown-timeout): they save and exit
    0; torchrun then reports the signal itself (docs/scale.md), so its own exit code is not the run's."""
    save = tmp_path / "run"
    argv = [*RUN_ARGS, "--save", str(save), "--load", str(save), "--exit-signal-handler", "--num-workers", "1"]
    processes = start_torchrun(argv, save / "logs")
    signal_after_iteration(processes, save / "logs" / "torchrun.log", SIGNAL_AFTER[0])
    wait_all(processes)
    log = (save / "logs" / "torchrun.log").read_text()
    stopped = EXIT_LINE.search(log)
    assert stopped, log[-3000:]
    # The one traceback is torchrun's own report of the signal; a worker that failed would add its own.
    assert log.count("Traceback") == log.count("SignalException: Process") <= 1, log[-3000:]
    resume_and_compare(argv, save, int(stopped.group(1)), uninterrupted)


def test_exit_duration_saves_and_resumes_exactly(tmp_path, uninterrupted):
    """A budget of 0 minutes: after the first step the next one cannot fit, on any machine."""
    save = tmp_path / "run"
    argv = [*RUN_ARGS, "--save", str(save), "--load", str(save)]
    processes = start_ranks([*argv, "--exit-duration-in-mins", "0"], save / "logs")
    codes = wait_all(processes)
    rank0 = (save / "logs" / "rank0.log").read_text()
    assert codes == [0, 0], rank0[-3000:]
    stopped = EXIT_LINE.search(rank0)
    assert stopped and "--exit-duration-in-mins 0" in stopped.group(2), rank0[-3000:]
    assert int(stopped.group(1)) == 1
    resume_and_compare(argv, save, 1, uninterrupted)
