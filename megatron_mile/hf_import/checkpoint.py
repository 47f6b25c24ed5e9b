"""A Hugging Face Llama directory -> a checkpoint of this project at a chosen TP x PP layout, whole or not at all.

How: every check that needs no weights runs first (config.json, the weight files' headers, the tokenizer,
the flags of the model it implies, the output directory). Then T * P CPU processes (a gloo group, spawned by
megatron_mile.testing.distributed) each build their stage and tensor-parallel shard of the model with the
project's own model code, fill it with the slices of the Hugging Face tensors they own
(megatron_mile.llama_layout says which; safetensors reads only those bytes), and write it with the project's
save_checkpoint, so the files are exactly what training writes: megatron-core's torch_dist tensors,
common.pt with Megatron-LM's fields, mile_checkpoint.json.

What is written: iteration 0 (`iter_0000000`, latest_checkpointed_iteration.txt = 0), weights only (no
optimizer state, no RNG states), the run config of the printed flags, and the tokenizer files beside it.
Training starts from it with --pretrained-checkpoint <save> (or --load <save> --finetune): weights loaded,
fresh optimizer, schedule and data position. Everything is written into a temp directory beside --save and
renamed at the end, so a failure leaves nothing under --save.

Memory: each process holds its own shard of the model plus one slice being copied; the Hugging Face files
are memory-mapped, never loaded whole.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from megatron_mile.arguments import build_parser, config_from_namespace, config_to_dict, parse_args
from megatron_mile.atomic_io import atomic_directory
from megatron_mile.config import ConfigError
from megatron_mile.hf_import.hf_config import HFImportError, HFLlamaConfig, model_flags, read_hf_config
from megatron_mile.hf_import.safetensors_source import SafetensorsSource, check_weights
from megatron_mile.hf_import.tokenizer import ImportedTokenizer, copy_tokenizer, find_tokenizer
from megatron_mile.llama_layout import LlamaShape
from megatron_mile.vocab import padded_vocab_size

# Seconds the processes may take to build, fill and save (a large model on CPU takes minutes).
IMPORT_TIMEOUT_S = 24 * 3600.0
# Flags a configuration check needs but the checkpoint does not depend on (data and length of a run).
_CHECK_ONLY_FLAGS = ["--mock-data", "--train-iters", "1", "--micro-batch-size", "1"]


@dataclass(frozen=True)
class ImportPlan:
    """What every process needs to build and fill its part (picklable: it travels to spawned processes)."""

    hf_dir: str
    config_dict: dict
    """The run config saved with the checkpoint (the printed flags, at the import's TP/PP)."""
    shape: LlamaShape


@dataclass(frozen=True)
class ImportResult:
    save_dir: Path
    training_flags: List[str]
    """pretrain_gpt_mile.py flags of the model, its layout, tokenizer and the checkpoint to start from."""
    notes: List[str]


def import_rank(plan: ImportPlan, save_dir: str) -> None:
    """On every rank of a TP x PP group (megatron's parallel state set up): build this rank's model stage,
    fill it from the Hugging Face tensors, save it as iteration 0 of `save_dir`.

    Collectives: those of megatron's model construction (the tied embedding's all-reduce between the first
    and last stage) and of checkpointing.save_checkpoint.
    """
    # megatron-core (seconds to import) only in the processes that build the model.
    from megatron.core import parallel_state  # noqa: PLC0415

    from megatron_mile import checkpointing  # noqa: PLC0415
    from megatron_mile.arguments import config_from_dict  # noqa: PLC0415
    from megatron_mile.hf_import.fill import fill_chunk  # noqa: PLC0415
    from megatron_mile.model import build_model_chunk, transformer_config  # noqa: PLC0415

    config = config_from_dict(plan.config_dict)
    tf_config = transformer_config(config)
    # Every weight is overwritten from the Hugging Face tensors: skip drawing them (minutes for large models).
    tf_config.perform_initialization = False
    chunk = build_model_chunk(config, tf_config, plan.shape.vocab_size,
                              pre_process=parallel_state.is_pipeline_first_stage(),
                              post_process=parallel_state.is_pipeline_last_stage())
    with SafetensorsSource(plan.hf_dir) as source:
        fill_chunk(chunk, source, plan.shape, parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_tensor_model_parallel_world_size())
    checkpointing.save_checkpoint(save_dir, 0, [chunk], None, None, 0, plan.config_dict, save_rng=False)


def _check_save_dir(save_dir: Path) -> None:
    if save_dir.exists() and not save_dir.is_dir():
        raise HFImportError(f"--save {save_dir} is a file; give a directory path")
    if save_dir.is_dir() and any(save_dir.iterdir()):
        raise HFImportError(f"--save {save_dir} exists and is not empty: choose a new directory")


def _shape(hf: HFLlamaConfig, vocab_size: int, padded: int) -> LlamaShape:
    return LlamaShape(num_layers=hf.num_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
                      num_query_groups=hf.num_query_groups, head_dim=hf.head_dim, ffn_hidden_size=hf.ffn_hidden_size,
                      vocab_size=vocab_size, padded_vocab_size=padded, tied_embeddings=hf.tied_embeddings,
                      qkv_bias=hf.qkv_bias)


def _run_config(flags: List[str], world_size: int):
    """The run config saved with the checkpoint, after the project's start-up checks of the same flags
    (TP dividing the heads and groups, PP the layers, ...). Raises HFImportError listing the problems."""
    try:
        parse_args(flags + _CHECK_ONLY_FLAGS, world_size=world_size)
    except ConfigError as error:
        problems = "; ".join(line.removeprefix("  - ") for line in str(error).splitlines()[1:]) or str(error)
        raise HFImportError(f"this model cannot be built at the asked layout: {problems}") from None
    config = config_from_namespace(build_parser().parse_args(flags))
    config.finalize(world_size)
    return config


def plan_import(hf_dir, save_dir, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                make_vocab_size_divisible_by: int = 128):
    """(ImportPlan, ImportedTokenizer, ImportResult) after every check that reads no weights.

    Raises HFImportError naming the problem; nothing is written.
    """
    hf_dir, save_dir = Path(hf_dir).resolve(), Path(save_dir).resolve()
    hf = read_hf_config(hf_dir)
    source = SafetensorsSource(hf_dir)  # finds the weight files (refuses pickles) before anything else is read
    tokenizer = find_tokenizer(hf_dir)
    if tokenizer.vocab_size > hf.vocab_size:
        raise HFImportError(f"the tokenizer has {tokenizer.vocab_size} tokens, config.json's vocab_size is only "
                            f"{hf.vocab_size}: token ids past the embedding would have no weights")
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    padded = padded_vocab_size(tokenizer.vocab_size, tp, make_vocab_size_divisible_by)
    shape = _shape(hf, tokenizer.vocab_size, padded)
    # The files hold config.json's vocab_size rows; the rows past the tokenizer's are left out.
    with source:
        check_weights(source, dataclasses.replace(shape, vocab_size=hf.vocab_size))
    _check_save_dir(save_dir)

    parallel = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    model = model_flags(hf, make_vocab_size_divisible_by)
    config = _run_config(model + parallel + ImportedTokenizer.flags(save_dir), world_size=tp * pp)
    notes = [tokenizer.note,
             f"vocabulary: {tokenizer.vocab_size} tokens padded to {padded} rows (multiple of "
             f"{make_vocab_size_divisible_by} x TP {tp}); the padding rows are zeros"]
    if tokenizer.vocab_size < hf.vocab_size:
        notes.append(f"the weights' rows {tokenizer.vocab_size}..{hf.vocab_size - 1} belong to no token of the "
                     "tokenizer and are left out")
    flags = parallel + model + ImportedTokenizer.flags(save_dir) + ["--pretrained-checkpoint", str(save_dir)]
    plan = ImportPlan(str(hf_dir), config_to_dict(config), shape)
    return plan, tokenizer, ImportResult(save_dir, flags, notes)


def _default_runner(fn: Callable, world_size: int, *args, **kwargs):
    """fn on `world_size` spawned CPU processes (gloo). Why CPU even on a GPU machine: the import only copies
    tensors and writes files, and T x P processes would otherwise all build their shard on the same GPU."""
    from megatron_mile.testing.distributed import run_distributed  # noqa: PLC0415 - spawns processes

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the processes spawned now
    try:
        return run_distributed(fn, world_size, *args, timeout_s=IMPORT_TIMEOUT_S, **kwargs)
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def import_checkpoint(hf_dir, save_dir, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                      make_vocab_size_divisible_by: int = 128, runner: Optional[Callable] = None,
                      log=print) -> ImportResult:
    """Import the Llama in `hf_dir` as iteration 0 of a new checkpoint directory `save_dir` (module docstring).

    `runner(fn, world_size, *args, tensor_model_parallel_size=, pipeline_model_parallel_size=)` runs
    fn(*args) on world_size processes with megatron's parallel state set up (default: spawned gloo
    processes; tests pass their pool's run). Raises HFImportError (bad input, before anything is written)
    or what a process raised (megatron_mile.testing.distributed.RemoteError), leaving nothing under `save_dir`.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    plan, tokenizer, result = plan_import(hf_dir, save_dir, tp, pp, make_vocab_size_divisible_by)
    runner = runner or _default_runner
    with atomic_directory(result.save_dir) as tmp:
        runner(import_rank, tp * pp, plan, str(tmp), tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        copy_tokenizer(tokenizer, tmp)
    shape = plan.shape
    log(f"imported {plan.hf_dir} ({shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} "
        f"heads / {shape.num_query_groups} KV heads, {'tied' if shape.tied_embeddings else 'untied'} embeddings) "
        f"at TP {tp} x PP {pp} to {result.save_dir} (iteration 0, weights only)")
    for note in result.notes:
        log(f"  {note}")
    return result
