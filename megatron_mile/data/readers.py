"""Readers for JSON-lines corpora: plain, zstandard- and gzip-compressed, a directory or a glob of them.

Compressed files are decompressed as a stream, never to disk: the Pile ships as ``.jsonl.zst`` shards of
several GB each. Lines come out as raw bytes so that the expensive steps (UTF-8 decoding, JSON parsing)
can run in worker processes; :func:`iter_documents` does those steps in-process for small jobs.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".zst", ".jsonl.gz", ".json.gz", ".gz")


class InputError(OSError):
    """The input could not be found or opened; the message says which path and why."""


def _is_supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def resolve_inputs(spec: str) -> List[str]:
    """The input files named by ``spec``: a file, a directory (its supported files, sorted, not
    recursive) or a glob pattern (sorted matches).

    Raises:
        InputError: nothing matches, or a directory holds no supported file.
    """
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec)
                       if _is_supported(n) and os.path.isfile(os.path.join(spec, n)))
        if not files:
            raise InputError(f"--input {spec!r}: directory holds no {', '.join(SUPPORTED_SUFFIXES)} file")
        return files
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        if not files:
            raise InputError(f"--input {spec!r}: the pattern matches no file")
        return files
    raise InputError(f"--input {spec!r}: no such file or directory")


def _open(path: str) -> Tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(decompressed byte stream, the file on disk it reads from); closing the first closes both."""
    try:
        if path.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise InputError(f"{path!r} is zstandard-compressed: pip install zstandard") from None
            raw = open(path, "rb")
            # A large read size keeps the decompressor busy; max_window_size admits Pile shards that were
            # compressed with --long (window above zstandard's default limit).
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(raw, read_size=1 << 20,
                                                                                     closefd=True)
            return io.BufferedReader(reader, buffer_size=1 << 20), raw
        if path.endswith(".gz"):
            raw = open(path, "rb")
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        plain = open(path, "rb", buffering=1 << 20)
        return plain, plain
    except InputError:
        raise
    except OSError as err:
        raise InputError(f"cannot open {path!r}: {err.strerror or err}") from err


def open_binary(path: str) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, decompressing ``.zst``/``.gz`` on the fly.

    Raises:
        InputError: the file cannot be opened, or zstandard is needed but not installed.
    """
    return _open(path)[0]


class InputProgress:
    """How far reading has got through a list of input files, in on-disk bytes (compressed bytes for
    .zst/.gz), so that progress and an ETA can be given without knowing the decompressed size."""

    def __init__(self, files: List[str]) -> None:
        self.total_bytes = sum(os.path.getsize(f) for f in files)
        self._finished_bytes = 0
        self._current = None  # the on-disk file being read

    def bytes_read(self) -> int:
        """On-disk bytes consumed so far (up to the decompressor's read-ahead)."""
        current = self._current
        position = current.tell() if current is not None and not current.closed else 0
        return min(self.total_bytes, self._finished_bytes + position)

    def fraction(self) -> float:
        return self.bytes_read() / self.total_bytes if self.total_bytes else 1.0


def iter_lines(path: str, progress: Optional[InputProgress] = None) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` from one file, 1-based, newline kept; ``progress`` (if given)
    follows the on-disk position.

    Raises:
        InputError: the file cannot be opened or is not valid compressed data.
    """
    f, raw = _open(path)
    if progress is not None:
        progress._current = raw
    line_number = 0
    try:
        for line_number, line in enumerate(f, start=1):
            yield line_number, line
    except (OSError, EOFError) as err:  # zstandard.ZstdError subclasses neither; caught below
        raise InputError(f"{path!r}: read failed after line {line_number}: {err}") from err
    except Exception as err:  # corrupt zstd frames raise zstandard.ZstdError
        if type(err).__name__ == "ZstdError":
            raise InputError(f"{path!r}: corrupt zstandard data after line {line_number}: {err}") from err
        raise
    finally:
        f.close()
        raw.close()
        if progress is not None:
            progress._current = None
            progress._finished_bytes += os.path.getsize(path)


@dataclass
class Document:
    """One JSON line: the parsed object, or ``error`` (a short reason) when it could not be parsed."""

    path: str
    line_number: int
    obj: Optional[Any] = None
    error: Optional[str] = None


def parse_line(raw: bytes) -> Tuple[Optional[Any], Optional[str]]:
    """Parse one raw JSON line: ``(obj, None)`` or ``(None, reason)``; reasons are the bad-input
    categories ``invalid_utf8`` and ``malformed_json``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        return json.loads(text), None
    except ValueError:
        return None, "malformed_json"


def iter_documents(spec: str) -> Iterator[Document]:
    """Every non-blank line of every input file, parsed (in this process)."""
    for path in resolve_inputs(spec):
        for line_number, raw in iter_lines(path):
            if not raw.strip():
                continue
            obj, error = parse_line(raw)
            yield Document(path, line_number, obj, error)


def iter_texts(spec: str, keys=("text",)) -> Iterator[str]:
    """The string values of ``keys`` in every well-formed document; anything else is passed over."""
    for doc in iter_documents(spec):
        if doc.error is None and isinstance(doc.obj, dict):
            for key in keys:
                value = doc.obj.get(key)
                if isinstance(value, str) and value:
                    yield value


def pile_set_name(obj: Any) -> Optional[str]:
    """The Pile domain of a document (``meta.pile_set_name``), or None."""
    if isinstance(obj, dict):
        meta = obj.get("meta")
        if isinstance(meta, dict):
            name = meta.get("pile_set_name")
            if isinstance(name, str):
                return name
    return None
