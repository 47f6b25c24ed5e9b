"""Measure the memory of one forward + backward step of a MileGPTModel on CPU, from the process's RSS.

This is the independent reference the memory planner (megatron_mile.planning.memory) is checked against:
it knows nothing of the planner's formulas, it only reads what the kernel says the process holds.

Why RSS is trustworthy here: glibc's malloc normally raises its mmap threshold after large frees (up to
32 MiB), after which freed tensors stay in the heap and RSS no longer drops. `measure_in_subprocess` starts
a fresh interpreter with `MALLOC_MMAP_THRESHOLD_` fixed at 64 KiB, which disables that adjustment: every
tensor larger than 64 KiB is its own mapping and goes back to the OS when freed, so RSS follows the live
tensors to within a page per tensor. The high-water mark (VmHWM) is reset by writing 5 to
/proc/self/clear_refs (Linux), so each phase's peak is read on its own.

What is measured, relative to the memory held before the step (weights, gradients already allocated by a
warm-up step, megatron's persistent buffers):
- `activations`: RSS when the output layer is about to run (forward hook): every tensor the transformer
  layers saved for backward (with recomputation: what the checkpoints keep), the embeddings' output and the
  final norm's input and output.
- `logits_and_loss`: RSS at the end of forward minus the above: the logits and what the loss keeps.
- `forward_peak`, `backward_peak`: VmHWM over each phase; `loss_backward_peak`: VmHWM from the start of
  backward until it reaches the final norm (the loss's and the output layer's backward).

Run it as `python -m megatron_mile.planning.measure '<json of MeasureSpec fields>'` (prints JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from megatron_mile import parallel
from megatron_mile.arguments import parse_args

# Fixed (not dynamic) mmap threshold: see the module docstring.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}


@dataclass
class MeasureSpec:
    """The small model and batch to measure (fp32, dropout 0, TP = PP = 1, LLaMA layout), with or without
    activation recomputation."""

    num_layers: int = 2
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_attention_heads: int = 4
    num_query_groups: int = 4
    vocab_size: int = 32000
    seq_length: int = 512
    micro_batch_size: int = 4
    loss_type: str = "mile"
    recompute_granularity: Optional[str] = None  # Megatron-LM's flag: None, "selective" or "full"
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line: RSS measurement needs Linux")


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _hwm() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def run_flags(spec: MeasureSpec) -> list:
    """pretrain_gpt_mile.py flags of the measured model."""
    flags = (
        f"--num-layers {spec.num_layers} --hidden-size {spec.hidden_size} "
        f"--ffn-hidden-size {spec.ffn_hidden_size} --num-attention-heads {spec.num_attention_heads} "
        f"--seq-length {spec.seq_length} --micro-batch-size {spec.micro_batch_size} "
        "--normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope "
        "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
        f"--mock-data --tokenizer-type NullTokenizer --vocab-size {spec.vocab_size} --loss-type {spec.loss_type} "
        "--train-iters 1"  # the run length Megatron-LM requires; a measurement runs one step
    ).split()
    if spec.num_query_groups != spec.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(spec.num_query_groups)]
    for name in ("recompute_granularity", "recompute_method", "recompute_num_layers"):
        if getattr(spec, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(spec, name))]
    return flags


def measure(spec: MeasureSpec) -> Dict[str, int]:
    """Bytes held / peaked by one forward + backward (see the module docstring). Run in a fresh process."""
    # megatron-core and the model are imported in the measuring process only: the caller of
    # measure_in_subprocess needs neither.
    from megatron.core import tensor_parallel

    from megatron_mile.model import build_model

    torch.manual_seed(0)
    with parallel.single_process_parallel_state():
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = parse_args(run_flags(spec), world_size=1)
        model = build_model(config, spec.vocab_size)[0]
        model.train()
        b, s = spec.micro_batch_size, spec.seq_length
        tokens = torch.randint(0, spec.vocab_size, (b, s))
        labels = torch.randint(0, spec.vocab_size, (b, s))
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

        marks: Dict[str, int] = {}
        model.output_layer.register_forward_pre_hook(lambda module, args: marks.__setitem__("pre_output", _rss()))
        # Backward reaches the final norm once the loss and the output layer are done: the peak so far is
        # the logits/loss part of the step.
        model.decoder.final_layernorm.register_full_backward_pre_hook(
            lambda module, grad: marks.__setitem__("loss_backward_hwm", _hwm()))

        def step() -> None:
            out = model(tokens, position_ids, None, labels=labels)  # [b, s, 3]
            marks["end_forward"] = _rss()
            marks["forward_hwm"] = _hwm()
            _reset_hwm()
            out[..., 0].sum().backward()

        # Warm-up: allocates the weight gradients, rope caches and megatron's persistent attention buffer,
        # which a training run holds for its whole life (the planner counts them elsewhere).
        step()
        del marks["end_forward"]
        base = _rss()
        _reset_hwm()
        step()
        backward_hwm = _hwm()
        return {
            "activations": marks["pre_output"] - base,
            "logits_and_loss": marks["end_forward"] - marks["pre_output"],
            "forward_peak": marks["forward_hwm"] - base,
            "loss_backward_peak": marks["loss_backward_hwm"] - base,
            "backward_peak": backward_hwm - base,
            "base": base,
        }


def measure_in_subprocess(spec: MeasureSpec, timeout_s: float = 300.0) -> Dict[str, int]:
    """measure() in a fresh interpreter with the fixed mmap threshold; raises with its stderr on failure."""
    env = dict(os.environ, **MALLOC_ENV)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mile.planning.measure", json.dumps(asdict(spec))],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    torch.set_num_threads(2)
    result = measure(MeasureSpec(**json.loads(sys.argv[1])))
    print(json.dumps(result))
