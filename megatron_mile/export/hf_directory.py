"""A checkpoint -> a Hugging Face LlamaForCausalLM directory, written whole or not at all.

`export_checkpoint` reads the checkpoint into one process (megatron_mile.export.checkpoint), maps its weights
and settings (megatron_mile.export.hf_llama), adds the run's tokenizer files (megatron_mile.export.hf_tokenizer)
and writes config.json and model.safetensors into a temp directory beside the output, renamed when complete.

safetensors (the `eval` extra) is imported only when a directory is written: it is optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_mile.arguments import config_from_dict
from megatron_mile.atomic_io import atomic_directory, write_json_atomic
from megatron_mile.export import checkpoint
from megatron_mile.export.hf_llama import ExportError, check_llama_architecture, hf_config, to_hf_state_dict
from megatron_mile.export.hf_tokenizer import prepare_tokenizer, write_tokenizer_files
from megatron_mile.hf_import.safetensors_source import safetensors_function


def _safetensors_writer():
    return safetensors_function("safetensors.torch", "save_file", "exporting")


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """Write `state_dict` as one safetensors file. Raises ImportError naming the install when safetensors is
    missing."""
    # transformers refuses safetensors files whose metadata does not name their framework.
    _safetensors_writer()(state_dict, str(path), metadata={"format": "pt"})


def prepare_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty output directory unless asked (checked before any work is done)."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty: choose another path or pass --overwrite")


def export_checkpoint(load_dir, output, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
                      overwrite: bool = False, log=print) -> Path:
    """Export the latest checkpoint of `load_dir` (or `iteration`) to a LlamaForCausalLM directory `output`.

    The model settings come from the run's config saved with the checkpoint; the checkpoint may have any
    TP/PP layout (it is loaded in this one process). Files are written into a temp directory beside
    `output`, which is renamed when complete. Raises ExportError, FileNotFoundError or ValueError naming
    the problem, before anything is written when the input is unusable.
    """
    output = Path(output)
    metadata = checkpoint.read_metadata(load_dir, iteration)
    saved = config_from_dict(metadata["config"])
    model = saved.model
    check_llama_architecture(model)
    prepare_output(output, overwrite)
    real_vocab_size = int(metadata.get("vocab", {}).get("real", -1))
    to_export = prepare_tokenizer(saved.data, tokenizer, real_vocab_size)
    _safetensors_writer()  # a missing package fails now, not after minutes of loading

    full = checkpoint.load_full_checkpoint(load_dir, metadata=metadata)
    state_dict = to_hf_state_dict(full.params, model, full.real_vocab_size)
    del full.params
    dtype = state_dict["lm_head.weight"].dtype
    config = hf_config(model, full.real_vocab_size, dtype, to_export.eos_token_id)

    # `output` is never seen half-written: a crash leaves the old directory or the new one.
    with atomic_directory(output) as tmp:
        write_tokenizer_files(tmp, to_export, model.max_position_embeddings)
        write_json_atomic(tmp / "config.json", config, indent=2, sort_keys=True)
        save_safetensors(state_dict, tmp / "model.safetensors")
    kv_heads = config["num_key_value_heads"]
    log(f"exported {load_dir} iteration {full.iteration} ({model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads / {kv_heads} KV heads, vocabulary {full.real_vocab_size} of "
        f"{full.padded_vocab_size} padded rows, {dtype}) to {output}")
    log(f"  {to_export.note}")
    return output
