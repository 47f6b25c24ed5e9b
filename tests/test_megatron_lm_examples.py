"""Megatron-LM's own dense example launch scripts (tests/data/megatron_lm_examples: their arguments to
pretrain_gpt.py) work with pretrain_gpt_mile.py: every flag parses, a CPU machine stops them only for the
hardware they need (and for the features the project refuses, each named), and shrunk to a tiny model
without the GPU-only flags each one trains 3 steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_mile.arguments import build_parser, parse_args
from megatron_mile.config import ConfigError
from megatron_mile.megatron_lm_flags import REFUSED

EXAMPLES = sorted((Path(__file__).parent / "data" / "megatron_lm_examples").glob("*.txt"))

# Every flag other parts of the project implement has landed; kept (empty) so that a flag can be parked here.
IMPLEMENTED_ELSEWHERE_PENDING: set = set()
# Flags of these scripts this part of the project has not implemented yet (none; kept for the next one).
NOT_YET_IMPLEMENTED: set = set()
# Flag combinations of these scripts that Megatron-LM's own argument checks refuse too (its validate_args
# asserts "expected no batch-size rampup for iteration-based training"): flag -> the start of the message here.
# The parse tests keep them; the CPU run drops them.
MEGATRON_LM_REFUSES = {"--rampup-batch-size": "--rampup-batch-size needs --train-samples"}
# GPU-only flags, dropped for the CPU run (the parse tests above keep them).
GPU_ONLY = {"--fp8-format", "--fp8-param-gather", "--tp-comm-overlap", "--fp8-amax-history-len",
            "--fp8-amax-compute-algo", "--attention-backend", "--apply-layernorm-1p", "--sequence-parallel"}


def script_flags(path: Path) -> list:
    """[(flag, [values])] in the script's order (one argument a line in the file)."""
    flags = []
    for line in path.read_text().splitlines():
        if line.startswith("--"):
            flags.append((line, []))
        elif line:
            flags[-1][1].append(line)
    return flags


def argv_of(flags, drop=()) -> list:
    return [item for flag, values in flags if flag not in drop for item in (flag, *values)]


def layout_world_size(flags) -> int:
    """A world size the script's layout fits: TP * PP * 8 data-parallel ranks."""
    values = dict((flag, v[0] if v else None) for flag, v in flags)
    return int(values.get("--tensor-model-parallel-size", 1)) * int(values.get("--pipeline-model-parallel-size", 1)) * 8


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_flag_parses(path):
    build_parser().parse_args(argv_of(script_flags(path), IMPLEMENTED_ELSEWHERE_PENDING | NOT_YET_IMPLEMENTED))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_on_cpu_it_stops_only_for_the_hardware_and_the_refused_features(path):
    flags = script_flags(path)
    with pytest.raises(ConfigError) as error:
        parse_args(argv_of(flags, IMPLEMENTED_ELSEWHERE_PENDING | NOT_YET_IMPLEMENTED),
                   world_size=layout_world_size(flags), gpu_available=False)
    problems = [line[4:] for line in str(error.value).splitlines() if line.startswith("  - ")]
    refused = {flag for flag, _ in flags} & set(REFUSED)
    refusals = [p for p in problems if any(p.startswith(f"{flag} is not supported: ") for flag in refused)]
    assert len(refusals) == len(refused), refusals  # one line per refused flag
    assert problems  # each of these scripts needs a GPU or a refused feature
    refused_values = [message for (flag, values), message in REFUSED_VALUES.items() if (flag, list(values)) in flags]
    refused_values += [message for flag, message in MEGATRON_LM_REFUSES.items() if flag in dict(flags)]
    for problem in (p for p in problems if p not in refusals):
        assert "GPU" in problem or any(problem.startswith(m) for m in refused_values), problem


# The tiny shape the CPU run uses, in place of the script's.
SHRUNK = {"--num-layers": ["2"], "--hidden-size": ["64"], "--ffn-hidden-size": ["128"],
          "--num-attention-heads": ["4"], "--num-query-groups": ["2"], "--kv-channels": ["16"],
          "--seq-length": ["32"], "--max-position-embeddings": ["32"], "--micro-batch-size": ["2"],
          "--global-batch-size": ["4"], "--tensor-model-parallel-size": ["1"], "--pipeline-model-parallel-size": ["1"],
          "--train-iters": ["3"], "--lr-decay-iters": ["3"], "--train-samples": ["12"], "--lr-decay-samples": ["12"],
          "--lr-warmup-samples": ["4"], "--eval-iters": ["1"], "--eval-interval": ["2"], "--vocab-size": ["300"],
          # The pool's workers are daemonic processes, which cannot start DataLoader workers
          # (tests/test_data_loader_flags.py runs --num-workers).
          "--num-workers": ["0"],
          # Inside the 3 steps, so that the run writes a profile.
          "--profile-step-start": ["2"], "--profile-step-end": ["3"]}
# Flag values refused at start-up with their own message (a checkpoint format other than torch_dist).
REFUSED_VALUES = {("--ckpt-format", ("fsdp_dtensor",)): "--ckpt-format fsdp_dtensor: only torch_dist checkpoints"}
REAL_DATA = {"--data-path", "--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file", "--mock-data"}


def shrunk_argv(path: Path, tmp_path: Path) -> list:
    """The script's flags with a tiny model, mock data, its paths under tmp_path, and without the GPU-only,
    refused and not-yet-available flags."""
    drop = (IMPLEMENTED_ELSEWHERE_PENDING | NOT_YET_IMPLEMENTED | GPU_ONLY | set(REFUSED) | REAL_DATA
            | set(MEGATRON_LM_REFUSES))
    paths = {"--save": "ckpt", "--load": "ckpt", "--tensorboard-dir": "tb", "--data-cache-path": "cache"}
    flags = []
    for flag, values in script_flags(path):
        if flag in drop or (flag, tuple(values)) in REFUSED_VALUES:
            continue
        values = SHRUNK.get(flag, values)
        values = [str(tmp_path / paths[flag])] if flag in paths else values
        flags.append((flag, values))
    if "--num-query-groups" not in dict(flags):
        flags.append(("--num-query-groups", ["4"]))  # unused without --group-query-attention
    if "--profile" in dict(flags):
        flags.append(("--use-pytorch-profiler", []))  # the nsys mode of --profile needs a GPU
    if "--fp16" in dict(flags) and "--loss-scale" not in dict(flags):
        # 3 steps are too few for the dynamic loss scale to come down from 2**32 (every step would overflow
        # and be skipped): start it where the tiny model's fp16 gradients fit.
        flags.append(("--initial-loss-scale", ["4096"]))
    return argv_of(flags) + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300",
                             "--loss-type", "mile", "--no-progress"]


def train(argv):
    """Worker body: the steps a run of these flags trains."""
    from megatron_mile.training.loop import pretrain

    return [(r.iteration, r.loss) for r in pretrain(parse_args(argv, world_size=1)).history]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_shrunk_it_trains_three_steps_on_cpu(dist_pool, path, tmp_path):
    argv = shrunk_argv(path, tmp_path)
    history = dist_pool(1).run(train, argv)[0]
    assert [iteration for iteration, _ in history] == [1, 2, 3]
    if "--profile" in argv:  # step 2 profiled, its trace beside the TensorBoard events
        assert len(list((tmp_path / "tb").glob("rank0.*.pt.trace.json"))) == 1
