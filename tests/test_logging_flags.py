"""Megatron-LM's logging flags: the FLOPs count behind --log-throughput against a hand count, the log
line's loss averaged over --log-interval, and the TensorBoard content of --tensorboard-log-interval,
--tensorboard-queue-size, --log-params-norm, --log-num-zeros-in-grad, --timing-log-level,
--log-timers-to-tensorboard, --log-validation-ppl-to-tensorboard and --log-memory-to-tensorboard (present with
the flag, absent without, values checked against the model where they can be computed); the W&B flags, with
a stand-in wandb module and, where the `wandb` extra is installed, the real package in offline mode."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import re
import struct
import sys
import types

import pytest

from megatron_mile.arguments import config_to_dict, parse_args
from megatron_mile.config import ConfigError
from tiny_model import mock_data_flags, model_flags

# 2 layers, hidden 32, 4 heads, sequence 32, untied embeddings; vocabulary 300 padded to 384.
TINY = model_flags(num_layers=2, hidden_size=32) + mock_data_flags(300) + (
    "--init-method-std 0.25 --lr 1e-3 --micro-batch-size 2 --global-batch-size 8 --seed 7 --no-progress "
    "--loss-type mile --train-iters 4"
).split()
PADDED_VOCAB = 384


# ------------------------------------------------------------------ FLOPs of a step (--log-throughput)

def hand_count_mha_gelu() -> float:
    """L=2, h=64, 4 heads (no GQA: q = k = v = h), ffn 256 without SwiGLU, s=32, V=384, 4 sequences.

    Forward, per token and layer, 2 operations per multiply-add: the Q, K, V projections 2 * h * 3h, the
    output projection 2 * h * h; the causal scores QK^T (2 * s * h, half of them needed) and their product
    with V (the same): 2 * s * h; the MLP's two matrices 2 * 2 * h * ffn. The logit layer 2 * h * V per token.
    A step is forward + two backward GEMMs: 3x.
    """
    L, h, ffn, s, V, B = 2, 64, 256, 32, 384, 4
    per_layer = 2 * h * 3 * h + 2 * h * h + 2 * s * h + 2 * 2 * h * ffn
    return 3 * B * s * (L * per_layer + 2 * h * V)


def hand_count_gqa_swiglu() -> float:
    """L=3, h=48, 6 heads of 16 channels (q = 96) in 2 query groups (k = v = 32), SwiGLU ffn 80, s=16,
    V=256, 2 sequences. As above, with Q, K, V widths q, k, v: 2 * h * (q + k + v), the output 2 * q * h,
    attention 2 * s * q, and SwiGLU's three matrices (gate, up, down) 3 * 2 * h * ffn."""
    L, h, q, kv, ffn, s, V, B = 3, 48, 96, 32, 80, 16, 256, 2
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * s * q + 3 * 2 * h * ffn
    return 3 * B * s * (L * per_layer + 2 * h * V)


def test_flops_per_step_match_the_hand_count():
    from megatron_mile.training.flops import num_floating_point_operations

    mha = parse_args(model_flags(num_layers=2, hidden_size=64, seq_length=32, llama=False) + mock_data_flags(300)
                     + ["--ffn-hidden-size", "256", "--micro-batch-size", "1", "--train-iters", "1"])
    assert num_floating_point_operations(mha.model, 4, 384) == hand_count_mha_gelu()
    gqa = parse_args(model_flags(num_layers=3, hidden_size=48, num_attention_heads=6, seq_length=16)
                     + mock_data_flags(200) + "--group-query-attention --num-query-groups 2 --kv-channels 16 "
                     "--ffn-hidden-size 80 --micro-batch-size 1 --train-iters 1".split())
    assert num_floating_point_operations(gqa.model, 2, 256) == hand_count_gqa_swiglu()


def train_capturing_stdout(argv, model_provider=None, world_size=1):
    """Worker body: (per-iteration (lm loss, loss), stdout of the run)."""
    from megatron_mile.training.loop import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = pretrain(parse_args(argv, world_size=world_size), model_provider=model_provider)
    return [(r.lm_loss, r.loss) for r in result.history], out.getvalue()


def log_lines(stdout: str) -> list:
    return [line for line in stdout.splitlines() if " iteration " in line and "consumed samples" in line]


def field(line: str, name: str) -> float:
    return float(re.search(re.escape(name) + r": ([^ |]+)", line).group(1))


def test_log_line_averages_the_losses_and_reports_throughput(dist_pool):
    argv = TINY + ["--log-interval", "2", "--eval-iters", "0", "--log-throughput", "--z-loss-coeff", "1e-3"]
    history, stdout = dist_pool(1).run(train_capturing_stdout, argv)[0]
    lines = log_lines(stdout)
    assert len(lines) == 2  # iterations 2 and 4
    for line, (first, second) in zip(lines, (history[0:2], history[2:4])):
        # Megatron-LM's log line: the mean over the interval's iterations, not the last one's.
        assert math.isclose(field(line, "lm loss"), (first[0] + second[0]) / 2, rel_tol=2e-6)
        assert math.isclose(field(line, "training loss (mile)"), (first[1] + second[1]) / 2, rel_tol=2e-6)
        assert not math.isclose(field(line, "lm loss"), second[0], rel_tol=1e-5)  # the test can tell them apart
        flops = 3 * 8 * 32 * (2 * (2 * 32 * 3 * 32 + 2 * 32 * 32 + 2 * 32 * 32 + 3 * 2 * 32 * 128) + 2 * 32 * 384)
        seconds = field(line, "elapsed time per iteration (ms)") / 1000.0
        # TFLOP/s per process: the step's FLOPs over the interval's time per iteration and the world size (1).
        assert math.isclose(field(line, "throughput per GPU (TFLOP/s/GPU)"), flops / seconds / 1e12, rel_tol=1e-2)
    assert "time across ranks" not in stdout  # --timing-log-level 0: the iteration time only


# ------------------------------------------------------------------ TensorBoard content

_MODELS = []


def recording_model_provider(config, vocab_size):
    """build_model, keeping the chunks so that the worker can read the trained weights and gradients."""
    from megatron_mile.model import build_model

    _MODELS[:] = build_model(config, vocab_size)
    return list(_MODELS)


def train_with_tensorboard(argv):
    """Worker body: history, stdout, the SummaryWriter's max_queue, and the final model's parameter norm
    and count of zero gradient entries, computed here from the weights and DDP's gradient buffers."""
    import torch
    import torch.utils.tensorboard as tensorboard

    queue_sizes = []
    original = tensorboard.SummaryWriter

    class RecordingWriter(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            queue_sizes.append(self.max_queue)

    tensorboard.SummaryWriter = RecordingWriter
    try:
        history, stdout = train_capturing_stdout(argv, recording_model_provider)
    finally:
        tensorboard.SummaryWriter = original
    params = [p for chunk in _MODELS for p in chunk.parameters()]
    norm = float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in params])))
    zeros = sum(int(p.main_grad.numel() - torch.count_nonzero(p.main_grad)) for p in params)
    return history, stdout, queue_sizes, norm, zeros


def read_scalars(directory) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_flags_write_their_scalars(dist_pool, tmp_path):
    argv = TINY + ["--tensorboard-dir", str(tmp_path), "--log-interval", "4", "--tensorboard-log-interval", "2",
                   "--tensorboard-queue-size", "7", "--eval-interval", "2", "--eval-iters", "1",
                   "--log-params-norm", "--log-num-zeros-in-grad", "--timing-log-level", "2",
                   "--log-timers-to-tensorboard", "--log-throughput", "--log-validation-ppl-to-tensorboard",
                   "--log-memory-to-tensorboard"]
    history, stdout, queue_sizes, norm, zeros = dist_pool(1).run(train_with_tensorboard, argv)[0]
    scalars = read_scalars(tmp_path)
    assert queue_sizes == [7]
    # Per-iteration scalars every --tensorboard-log-interval iterations, the iteration's own values.
    assert scalars["train/lm loss"] == pytest.approx({2: history[1][0], 4: history[3][0]}, rel=1e-6)
    # The parameters' L2 norm after the last update, against torch over the single process's model.
    assert set(scalars["train/params norm"]) == {2, 4}
    assert scalars["train/params norm"][4] == pytest.approx(norm, rel=1e-5)
    assert field(log_lines(stdout)[-1], "params norm") == pytest.approx(norm, abs=1e-3)
    # Zero gradient entries of the last step (at least the padded vocabulary rows of both embeddings).
    assert zeros >= 2 * (PADDED_VOCAB - 300) * 32
    assert scalars["train/num zeros"][4] == zeros and field(log_lines(stdout)[-1], "num zeros") == zeros
    # Timers of level 2 (and 1), iteration time and throughput, every --log-interval.
    for tag in ("forward-backward-time", "optimizer-time", "forward-compute-time", "backward-compute-time",
                "batch-generator-time", "train/iteration time", "train/throughput"):
        assert set(scalars[tag]) == {4}, tag
    assert "forward-compute" in stdout and "(min, max) time across ranks (ms):" in stdout
    validation = scalars["validation/lm loss"]
    assert set(validation) == {2, 4}
    assert scalars["validation/lm loss PPL"] == pytest.approx({k: math.exp(v) for k, v in validation.items()},
                                                              rel=1e-5)
    assert set(scalars["mem-rss-bytes"]) == {2, 4} and scalars["mem-rss-bytes"][4] > 50e6  # torch alone is more


def test_without_the_flags_tensorboard_gets_none_of_it(dist_pool, tmp_path):
    argv = TINY + ["--tensorboard-dir", str(tmp_path), "--log-interval", "2", "--eval-interval", "2",
                   "--eval-iters", "1", "--timing-log-level", "1"]
    _, stdout, queue_sizes, _, _ = dist_pool(1).run(train_with_tensorboard, argv)[0]
    scalars = read_scalars(tmp_path)
    assert queue_sizes == [1000]  # Megatron-LM's default --tensorboard-queue-size
    assert set(scalars["train/lm loss"]) == {1, 2, 3, 4}  # default --tensorboard-log-interval 1
    assert set(scalars["train/tokens per second"]) == {2, 4}
    for tag in ("train/params norm", "train/num zeros", "validation/lm loss PPL", "mem-rss-bytes",
                "forward-backward-time", "train/iteration time", "train/throughput"):
        assert tag not in scalars, tag
    line = log_lines(stdout)[-1]
    assert "params norm" not in line and "num zeros" not in line and "throughput" not in line
    # Level 1 reports the once-per-step timers, not the per-micro-batch ones of level 2.
    assert "forward-backward" in stdout and "optimizer-inner-step" in stdout and "forward-compute" not in stdout


def train(argv, world_size):
    """Worker body: the run's stdout on the logging (last) rank, '' elsewhere."""
    from megatron_mile.training.initialize import is_logging_rank

    _, stdout = train_capturing_stdout(argv, world_size=world_size)
    return stdout if is_logging_rank() else ""


def test_params_norm_and_num_zeros_count_each_part_once_over_ranks(dist_pool, tmp_path):
    """With DP=2 and the distributed optimizer each rank holds half of the fp32 main weights and gradients:
    the norm and the count must come out as one process's (the same model and global batch)."""
    flags = TINY + ["--log-interval", "2", "--eval-iters", "0", "--bf16", "--log-params-norm",
                    "--log-num-zeros-in-grad", "--tensorboard-log-interval", "2"]
    single = dist_pool(1).run(train, flags + ["--tensorboard-dir", str(tmp_path / "one")], 1)[0]
    sharded = dist_pool(2).run(train, flags + ["--tensorboard-dir", str(tmp_path / "two"),
                                               "--use-distributed-optimizer", "--timing-log-level", "1"], 2)[1]
    one, two = read_scalars(tmp_path / "one"), read_scalars(tmp_path / "two")
    assert two["train/params norm"] == pytest.approx(one["train/params norm"], rel=1e-5)
    assert two["train/num zeros"] == one["train/num zeros"] and one["train/num zeros"][4] > 0
    assert field(log_lines(sharded)[-1], "params norm") == pytest.approx(field(log_lines(single)[-1], "params norm"),
                                                                        abs=2e-3)
    assert "all-grads-sync" in sharded and "forward-backward" in sharded  # timers gathered over 2 ranks


def test_level_2_times_the_pipeline_communication(dist_pool):
    argv = TINY + ["--log-interval", "4", "--eval-iters", "0", "--pipeline-model-parallel-size", "2",
                   "--timing-log-level", "2"]
    stdout = dist_pool(2).run(train, argv, 2)[1]
    timed = set(re.findall(r"^ +([a-z-]+) \.+: \(", stdout, flags=re.MULTILINE))
    # Rank 1 (the last stage) receives activations and sends gradients; the timers are gathered over ranks.
    assert {"forward-recv", "backward-send", "forward-compute", "backward-compute", "batch-generator",
            "forward-backward", "optimizer"} <= timed, timed


# ------------------------------------------------------------------ start-up checks, W&B

@pytest.mark.parametrize("flag", ["--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                                  "--log-memory-to-tensorboard"])
def test_tensorboard_only_flags_need_a_tensorboard_dir(flag):
    with pytest.raises(ConfigError, match=f"{flag} writes to TensorBoard: add --tensorboard-dir <dir>"):
        parse_args(TINY + [flag])


def test_timing_log_level_takes_0_to_2(capsys):
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--timing-log-level", "3"])
    assert "--timing-log-level" in capsys.readouterr().err


def test_wandb_flags_without_the_wandb_package_stop_at_start_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whatever this machine has
    with pytest.raises(ConfigError) as error:
        parse_args(TINY + ["--wandb-project", "mile", "--wandb-exp-name", "run1"])
    assert ("  - --wandb-project needs the wandb package: pip install wandb (then runs log offline with "
            "WANDB_MODE=offline)") in str(error.value).splitlines()


def train_with_fake_wandb(argv):
    """Worker body: pretrain with a stand-in `wandb` module that records init's arguments and the logs."""
    calls = {"init": [], "log": [], "finished": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finished"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    real = sys.modules.get("wandb")  # a real wandb that an earlier test imported in this worker comes back
    sys.modules["wandb"] = fake
    try:
        history, _ = train_capturing_stdout(argv)
    finally:
        if real is None:
            del sys.modules["wandb"]
        else:
            sys.modules["wandb"] = real
    return history, calls


def test_wandb_gets_the_scalars(dist_pool, tmp_path):
    argv = TINY + ["--log-interval", "2", "--eval-iters", "0", "--wandb-project", "mile", "--wandb-exp-name",
                   "run1", "--wandb-entity", "team", "--wandb-save-dir", str(tmp_path)]
    history, calls = dist_pool(1).run(train_with_fake_wandb, argv)[0]
    (init,) = calls["init"]
    assert (init["project"], init["name"], init["entity"], init["dir"]) == ("mile", "run1", "team", str(tmp_path))
    lm_losses = {step: values["train/lm loss"] for step, values in calls["log"] if "train/lm loss" in values}
    assert lm_losses == pytest.approx({i + 1: lm for i, (lm, _) in enumerate(history)}, rel=1e-6)
    assert calls["finished"] == 1


# W&B in offline mode: no network, nothing outside the test's directory. Offline runs write their records
# to a local transaction log (wandb sync uploads it later); WANDB_CONSOLE=off keeps wandb from wrapping the
# stdout that the worker captures; WANDB_INIT_TIMEOUT bounds the wait for wandb's local service.
def offline_wandb_env(directory) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_ERROR_REPORTING": "false",
            "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_META": "true", "WANDB_INIT_TIMEOUT": "60",
            "WANDB_CONFIG_DIR": str(directory / "config"), "WANDB_CACHE_DIR": str(directory / "cache"),
            "WANDB_DATA_DIR": str(directory / "data"), "WANDB_ARTIFACT_DIR": str(directory / "artifacts")}


def train_with_offline_wandb(argv, env):
    """Worker body: pretrain with the real wandb package under `env`; the history (lm loss per iteration).
    wandb's local service is shut down after the run, so the pool worker holds no child process."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        history, _ = train_capturing_stdout(argv)
        import wandb

        wandb.teardown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return [lm for lm, _ in history]


# The transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB's
# log format in 32 KiB blocks: records of (crc32c, length, type) + payload, split over blocks as
# FIRST/MIDDLE/LAST; each whole payload is one serialized wandb.proto Record. wandb 0.31 has no Python
# reader of its own (its Go service reads it), so this reads the format directly.
_LOG_BLOCK, _LOG_HEADER, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 7, 1, 2, 3, 4


def read_wandb_records(path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:_LOG_HEADER]
    records, pending, pos = [], b"", _LOG_HEADER
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _LOG_HEADER])
        if kind == 0 and length == 0:  # zero padding (preallocated or the block's tail)
            pos += left
            continue
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), (pos, kind)
        pending += data[pos + _LOG_HEADER:pos + _LOG_HEADER + length]
        pos += _LOG_HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _item_name(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="needs the `wandb` package: pip install -e .[wandb] (the test extra includes it)")
def test_wandb_offline_run_holds_the_run(dist_pool, tmp_path):
    save_dir = tmp_path / "wandb_save"
    save_dir.mkdir()
    argv = TINY + ["--log-interval", "2", "--eval-iters", "0", "--wandb-project", "p", "--wandb-exp-name", "e",
                   "--wandb-save-dir", str(save_dir), "--tensorboard-dir", str(tmp_path / "tb")]
    lm_losses = dist_pool(1).run(train_with_offline_wandb, argv, offline_wandb_env(tmp_path), timeout_s=240)[0]
    (log,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("e", "p")
    # The config: the run's flags by section, as parsing the same command line gives them.
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config["loss"]["loss_type"] == "mile" and config["training"]["wandb_project"] == "p"
    expected = json.loads(json.dumps(config_to_dict(parse_args(argv)), default=str))
    assert config == expected
    # The history: one row per logged step; every TensorBoard scalar of the run is there with its value.
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {_item_name(i): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    tensorboard = read_scalars(tmp_path / "tb")
    assert {"train/lm loss", "train/training loss", "train/learning rate"} <= set(tensorboard)
    for tag, values in tensorboard.items():
        logged = {step: row[tag] for step, row in history.items() if tag in row}
        assert logged == pytest.approx(values, rel=1e-6), tag
    # The loss the run itself returns, iteration by iteration (TensorBoard stores float32: rel 1e-6).
    assert {step: row["train/lm loss"] for step, row in history.items()} == pytest.approx(
        {i + 1: lm for i, lm in enumerate(lm_losses)}, rel=1e-6)
