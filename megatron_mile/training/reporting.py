"""What a run prints and records: Megatron-LM-style log lines, TensorBoard scalars, a progress line.

The log line keeps Megatron-LM's layout and key names (` iteration       10/     100 | consumed samples:
... | lm loss: ... |`) so existing log parsers work. `lm loss` is always plain cross-entropy, comparable
across loss types; the trained objective is `training loss`.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Dict, Optional

from megatron_mile.loss import StepLoss


def format_train_log(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms_per_iteration: float,
    learning_rate: float,
    global_batch_size: int,
    stats: StepLoss,
    grad_norm: Optional[float],
    tokens_per_second: float,
    skipped_iterations: int,
    nan_iterations: int,
    loss_type: str,
    iterations_per_second: Optional[float] = None,
    eta_seconds: Optional[float] = None,
    throughput: Optional[float] = None,
    num_zeros_in_grad: Optional[int] = None,
    params_norm: Optional[float] = None,
    loss_scale: float = 1.0,
) -> str:
    """One training log line in Megatron-LM's format, extended with the weighted-loss scalars and, when
    given, the run's rate (iterations/s since this run started) and the time left to --train-iters.

    Given, Megatron-LM's optional fields in its places: `throughput` (TFLOP/s per GPU, --log-throughput)
    after the time per iteration, `num_zeros_in_grad` and `params_norm` after the grad norm. `loss_scale`: the
    optimizer's loss scale after the step (--fp16; 1.0 otherwise), printed as Megatron-LM does."""
    timestamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{timestamp}] iteration {iteration:8d}/{train_iters:8d}",
        f" consumed samples: {consumed_samples:12d}",
        f" elapsed time per iteration (ms): {elapsed_ms_per_iteration:.1f}",
        *([f" throughput per GPU (TFLOP/s/GPU): {_throughput_text(throughput)}"] if throughput is not None else []),
        f" learning rate: {learning_rate:.6E}",
        f" global batch size: {global_batch_size:5d}",
        f" lm loss: {stats.lm_loss:.6E}",
        f" training loss ({loss_type}): {stats.loss:.6E}",
        f" mean entropy: {stats.mean_entropy:.4f}",
        f" weight min/mean/max: {stats.weight_min:.4f}/{stats.weight_mean:.4f}/{stats.weight_max:.4f}",
    ]
    if stats.z_loss:
        parts.append(f" z loss: {stats.z_loss:.6E}")
    parts.append(f" loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f" grad norm: {grad_norm:.3f}")
    if num_zeros_in_grad is not None:
        parts.append(f" num zeros: {num_zeros_in_grad}")
    if params_norm is not None:
        parts.append(f" params norm: {params_norm:.3f}")
    parts += [
        f" tokens per second: {tokens_per_second:.1f}",
        f" number of skipped iterations: {skipped_iterations:3d}",
        f" number of nan iterations: {nan_iterations:3d}",
    ]
    if iterations_per_second is not None:
        parts.append(f" iterations per second: {iterations_per_second:.3f}")
    if eta_seconds is not None:
        parts.append(f" ETA: {format_duration(eta_seconds)}")
    return " |".join(parts) + " |"


def _throughput_text(tflops: float) -> str:
    """Megatron-LM's one decimal, or three significant digits below 10 TFLOP/s (small or CPU runs, which one
    decimal would show as 0.0)."""
    return f"{tflops:.1f}" if tflops >= 10 else f"{tflops:#.3g}"


def format_duration(seconds: float) -> str:
    """H:MM:SS (or D days, H:MM:SS) for a non-negative number of seconds."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    text = str(datetime.timedelta(seconds=rest))
    return f"{days} days, {text}" if days else text


def format_validation_log(iteration: int, stats: StepLoss, label: str = "validation") -> str:
    """Megatron-LM's validation block: lm loss value and PPL, plus the weighted objective."""
    ppl = _safe_exp(stats.lm_loss)
    line = (
        f" {label} loss at iteration {iteration} | lm loss value: {stats.lm_loss:.6E} | lm loss PPL: {ppl:.6E} |"
        f" training loss value: {stats.loss:.6E} | mean entropy: {stats.mean_entropy:.4f} |"
    )
    rule = "-" * len(line)
    return f"{rule}\n{line}\n{rule}"


def _safe_exp(x: float) -> float:
    import math

    return math.exp(min(x, 20.0)) if math.isfinite(x) else float("nan")


class TensorBoardWriter:
    """The run's TensorBoard scalars and histograms; a no-op without --tensorboard-dir (and on the ranks
    that do not log). `queue_size` (--tensorboard-queue-size) events are held before a write to disk.
    `wandb_run`, a Weights & Biases run (start_wandb), receives the same scalars."""

    def __init__(self, log_dir: Optional[str], queue_size: int = 1000, wandb_run=None):
        self.writer = None
        self.wandb_run = wandb_run
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - tensorboard is an install requirement
            raise RuntimeError(
                "--tensorboard-dir needs the `tensorboard` package: pip install tensorboard"
            ) from error
        self.writer = SummaryWriter(log_dir=log_dir, max_queue=queue_size)

    def scalars(self, iteration: int, values: Dict[str, float]) -> None:
        """Write the values that are not None at step `iteration`."""
        values = {name: value for name, value in values.items() if value is not None}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration)
        if self.wandb_run is not None and values:
            self.wandb_run.log(values, step=iteration)

    def histogram_raw(self, iteration: int, name: str, histogram) -> None:
        """A histogram already binned (megatron_mile.training.token_histograms.Histogram); empty ones are skipped."""
        if self.writer is None or not histogram.num:
            return
        self.writer.add_histogram_raw(
            name, min=histogram.min, max=histogram.max, num=histogram.num, sum=histogram.sum,
            sum_squares=histogram.sum_squares, bucket_limits=histogram.bucket_limits,
            bucket_counts=histogram.bucket_counts, global_step=iteration,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(training, run_config: dict):
    """A Weights & Biases run for --wandb-project (None without it): --wandb-exp-name, --wandb-entity,
    --wandb-save-dir as Megatron-LM passes them to wandb.init, the run's flags as its config. The wandb
    package is imported only here (start-up checks refuse the flags when it is missing)."""
    if not training.wandb_project:
        return None
    import wandb

    return wandb.init(project=training.wandb_project, name=training.wandb_exp_name or None,
                      entity=training.wandb_entity or None, dir=training.wandb_save_dir or None,
                      config=run_config)


def interval_scalars(stats: StepLoss, tokens_per_second: float, prefix: str = "train") -> Dict[str, float]:
    """The scalars written with each log line (--log-interval): the logged iteration's entropy and weight
    statistics (the iterations between log lines do not compute the entropy) and the interval's rate."""
    return {
        f"{prefix}/mean entropy": stats.mean_entropy,
        f"{prefix}/weight min": stats.weight_min,
        f"{prefix}/weight mean": stats.weight_mean,
        f"{prefix}/weight max": stats.weight_max,
        f"{prefix}/tokens per second": tokens_per_second,
    }


class ProgressLine:
    """A single console line rewritten in place: iteration, lm loss and ETA (only on a terminal or when
    forced; log files get the Megatron lines only)."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.start = time.time()
        self.first_iteration: Optional[int] = None

    def update(self, iteration: int, lm_loss: float) -> None:
        if not self.enabled:
            return
        if self.first_iteration is None:
            self.first_iteration = iteration - 1
            self.start = time.time()
        done = iteration - self.first_iteration
        elapsed = time.time() - self.start
        remaining = (self.total - iteration) * elapsed / max(done, 1)
        width = 30
        filled = int(width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        eta = str(datetime.timedelta(seconds=int(remaining)))
        self.stream.write(f"\r[{bar}] {iteration}/{self.total} lm loss {lm_loss:.4f} ETA {eta} ")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
