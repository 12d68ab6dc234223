"""Opening GGUF files: metadata as plain Python values, tensors as memory-mapped arrays.

The format's tables (value types, quant types and their block sizes) come from the `gguf`
package. Its `GGUFReader` materializes every vocabulary string as two small NumPy arrays:
for a 49k-token vocabulary that is ~300k objects and +170 MB of peak memory, more than the
model itself on a small board. So the header walk is done here, in one pass that decodes
strings straight to `str`, and tests check the result against `GGUFReader` field by field.

We also check what a reader does not: every tensor's bytes lie inside the file and match its
shape and type, so a truncated download fails here rather than as garbage logits later.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from edgelora_np.errors import GGUFFormatError, ModelNotFoundError
from edgelora_np.gguf.quants import QUANT_TYPES, check_tensor_bytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF scalar value types: struct format (little-endian) and the NumPy dtype for arrays.
_SCALARS = {
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in NumPy order: (rows, cols) for a matrix."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int               # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray          # raw bytes, uint8 [n_bytes], a view of the file mapping


@dataclass
class GGUFFile:
    path: Path
    fields: dict[str, object]          # metadata key -> str, int, float, bool or list
    tensors: dict[str, TensorInfo]
    _map: mmap.mmap | None = None

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

    def release(self, t: TensorInfo) -> None:
        """Tell the OS we are done with a tensor's pages (they stop counting as our memory)."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        start = t.offset // page * page
        end = min(-(-(t.offset + t.n_bytes) // page) * page, len(self._map))
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Cursor:
    """Reads little-endian GGUF values from a buffer, failing cleanly at its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}")
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        vtype = _value_type(vtype, self)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = _value_type(self.take("<I"), self)
            count = self.take("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}")
                items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos = end
                return items
            return [self.value(item_type) for _ in range(count)]
        return self.take(_SCALARS[vtype][0])


def _value_type(raw: int, cur: _Cursor) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise GGUFFormatError(f"{cur.path}: unknown GGUF value type {raw} at byte {cur.pos}") from None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and map its tensors (no tensor data is read yet)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            f.seek(0)
            raise GGUFFormatError(
                f"{path}: not a GGUF file (starts with {f.read(4)!r}, expected b'GGUF')")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(memoryview(mapped), path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported "
                              f"(supported: {SUPPORTED_VERSIONS}; big-endian files are not)")
    n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.take("<I"))

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        raw_type, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, dims, raw_type, offset))
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    del cur                                   # releases the memoryview, so the map can close

    tensors = {}
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
        shape = tuple(int(n) for n in reversed(dims))          # ggml ne[] is innermost-first
        block, nbytes_per_block = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * nbytes_per_block
        start = data_start + offset
        if start + n_bytes > size:
            raise GGUFFormatError(f"{path}: truncated: tensor {name!r} needs bytes up to "
                                  f"{start + n_bytes}, file has {size}")
        if qtype in QUANT_TYPES:
            check_tensor_bytes(name, qtype, shape, n_bytes)
        data = np.frombuffer(mapped, np.uint8, n_bytes, start)
        tensors[name] = TensorInfo(name, qtype, shape, start, n_bytes, data)
    return GGUFFile(path, fields, tensors, mapped)
