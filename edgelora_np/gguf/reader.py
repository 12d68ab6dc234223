"""Opening GGUF files: metadata as plain Python values, tensors as memory-mapped arrays.

The `gguf` package does the parsing; this module turns its failures into errors that name the
file, and checks what it does not: that every tensor's bytes lie inside the file and match its
shape and type, so a truncated download fails here rather than as garbage logits later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from edgelora_np.errors import GGUFFormatError, ModelNotFoundError
from edgelora_np.gguf.quants import check_tensor_bytes

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in NumPy order: (rows, cols) for a matrix."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray          # memory-mapped raw data, as gguf.GGUFReader exposes it


@dataclass
class GGUFFile:
    path: Path
    fields: dict[str, object]          # metadata key -> str, int, float, bool or list
    tensors: dict[str, TensorInfo]

    def field(self, key: str):
        """A required metadata value; a missing key is an error that names it."""
        try:
            return self.fields[key]
        except KeyError:
            raise GGUFFormatError(f"{self.path}: metadata key {key!r} is missing") from None

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFFormatError(f"{self.path}: tensor {name!r} is missing") from None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and map its tensors (no tensor data is read yet)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise GGUFFormatError(f"{path}: cannot parse GGUF header: {e}") from None
    fields = {key: _field_value(field) for key, field in reader.fields.items()}
    file_size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))   # ggml ne[] is innermost-first
        qtype = GGMLQuantizationType(int(t.tensor_type))
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_size:
            raise GGUFFormatError(
                f"{path}: truncated: tensor {t.name!r} needs bytes up to {end}, "
                f"file has {file_size}")
        check_tensor_bytes(t.name, qtype, shape, int(t.n_bytes))
        tensors[t.name] = TensorInfo(t.name, qtype, shape, t.data)
    return GGUFFile(path, fields, tensors)


def _field_value(field):
    """A ReaderField as a plain Python value (strings decoded, arrays as lists)."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]][0].item()
