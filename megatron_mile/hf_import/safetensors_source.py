"""The weights of a Hugging Face directory, read slice by slice from its safetensors files.

Only safetensors is read: it is plain tensor data, where pytorch_model.bin files are pickles that can run
code when loaded (a directory a user hands us is data). A directory with pickled weights only is refused
with the way to convert it.

Nothing is loaded up front: `model.safetensors.index.json` (or the single `model.safetensors`) says which
file holds each tensor; files are opened lazily with safetensors' `safe_open` (memory-mapped) and `read`
copies out only the rows or columns asked for, so a rank holds its own shard of a tensor, never the whole.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Dict, Iterable, Tuple

import torch

from megatron_mile.hf_import.hf_config import HFImportError
from megatron_mile.llama_layout import HF_IGNORED, HF_OUTPUT, LlamaShape, Piece

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
# safetensors' dtype names that hold floating-point weights (converted to the model's dtype when read).
FLOAT_DTYPES = ("F32", "BF16", "F16")
INSTALL_HINT = "pip install -e .[eval]  (or: pip install safetensors transformers)"


def safetensors_function(module: str, name: str, purpose: str):
    """`name` of the optional safetensors package's `module` ("safetensors", "safetensors.torch"), imported when
    first needed; ImportError saying that `purpose` ("importing", "exporting") needs it and how to install it."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ImportError(f"{purpose} needs the safetensors package: {INSTALL_HINT}") from error


def _safe_open():
    return safetensors_function("safetensors", "safe_open", "importing")


def _weight_files(hf_dir: Path) -> Dict[str, str]:
    """{tensor name: file name} from the index, or the single file's tensors."""
    index = hf_dir / INDEX_FILENAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise HFImportError(f"{index} is not a safetensors index (a 'weight_map' object): {error}") from None
        if not isinstance(weight_map, dict):
            raise HFImportError(f"{index}: weight_map is not an object")
        for name, file_name in weight_map.items():
            # Files are named relative to the directory; anything else could read outside it.
            plain = isinstance(file_name, str) and Path(file_name).name == file_name
            if not plain or not file_name.endswith(".safetensors"):
                raise HFImportError(f"{index}: {name} is mapped to {file_name!r}, not a .safetensors file in {hf_dir}")
            if not (hf_dir / file_name).is_file():
                raise HFImportError(f"{index} names {file_name}, which is missing from {hf_dir}")
        return dict(weight_map)
    single = hf_dir / SINGLE_FILENAME
    if single.is_file():
        with _safe_open()(str(single), framework="pt") as handle:
            return {name: SINGLE_FILENAME for name in handle.keys()}
    pickled = sorted(p.name for p in hf_dir.glob("pytorch_model*.bin"))
    if pickled:
        raise HFImportError(
            f"{hf_dir} holds pickled weights only ({pickled[0]}): pickle files can run code when loaded, so they "
            "are not read. Convert them to safetensors first, where you trust them, e.g. "
            "LlamaForCausalLM.from_pretrained(dir).save_pretrained(out)")
    raise HFImportError(f"{hf_dir} has no {SINGLE_FILENAME} or {INDEX_FILENAME}: no weights to import")


class SafetensorsSource:
    """Read access to the tensors of one Hugging Face directory (open files are kept until close())."""

    def __init__(self, hf_dir) -> None:
        self.hf_dir = Path(hf_dir)
        self.files = _weight_files(self.hf_dir)
        self._handles: Dict[str, object] = {}

    def _slice(self, name: str):
        file_name = self.files[name]
        if file_name not in self._handles:
            self._handles[file_name] = _safe_open()(str(self.hf_dir / file_name), framework="pt")
        return self._handles[file_name].get_slice(name)

    def shape_and_dtype(self, name: str) -> Tuple[Tuple[int, ...], str]:
        """(shape, safetensors dtype name) from the file's header; no data read."""
        tensor = self._slice(name)
        return tuple(tensor.get_shape()), tensor.get_dtype()

    def read(self, piece: Piece, dtype: torch.dtype) -> torch.Tensor:
        """The rows (dim 0) or columns (dim 1) [start, stop) of `piece.hf_name`, as a new `dtype` tensor."""
        index = (slice(piece.start, piece.stop),) if piece.dim == 0 else (slice(None), slice(piece.start, piece.stop))
        return self._slice(piece.hf_name)[index].to(dtype)

    def close(self) -> None:
        self._handles.clear()  # safe_open's handles unmap their file when released

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_weights(source: SafetensorsSource, shape: LlamaShape) -> None:
    """Every tensor a Llama of `shape` has is present with its shape and a float dtype, and nothing else is.

    Reads only the files' headers. Raises HFImportError naming the first problem. A tied model's lm_head, if
    saved, is not read (transformers ties it to the embedding as well).
    """
    expected = shape.hf_shapes()
    for name, size in expected.items():
        if name not in source.files:
            raise HFImportError(f"the weights of {source.hf_dir} have no {name}, which config.json implies")
        actual, dtype = source.shape_and_dtype(name)
        if actual != size:
            raise HFImportError(f"{name} has shape {actual} in the weights, config.json implies {size}")
        if dtype not in FLOAT_DTYPES:
            raise HFImportError(f"{name} is stored as {dtype}; only {', '.join(FLOAT_DTYPES)} weights are imported")
    extra = sorted(_unexpected(source.files, expected, shape.tied_embeddings))
    if extra:
        raise HFImportError(f"the weights hold tensors a Llama of this config has no place for: {extra[:8]}"
                            f"{' ...' if len(extra) > 8 else ''}")


def _unexpected(names: Iterable[str], expected: dict, tied: bool):
    for name in names:
        if name in expected or HF_IGNORED.fullmatch(name) or (tied and name == HF_OUTPUT):
            continue
        yield name

