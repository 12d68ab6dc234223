"""Opening GGUF files: metadata as plain Python values, tensors as memory-mapped arrays.

The format's tables (value types, quant types and their block sizes) come from the `gguf`
package. Its `GGUFReader` materializes every vocabulary string as two small NumPy arrays:
for a 49k-token vocabulary that is ~300k objects and +170 MB of peak memory, more than the
model itself on a small board. So the header walk is done here, in one pass that decodes
strings straight to `str`, and tests check the result against `GGUFReader` field by field.

We also check what a reader does not: every tensor's bytes lie inside the file and match its
shape and type, so a truncated download fails here rather than as garbage logits later. No count
or length in the header is trusted before it is checked against the bytes left in the file, so a
corrupted or hostile header (a string "of 2^60 bytes", 2^40 array items, tensors overlapping or
past the end) fails with a GGUFFormatError naming the file, never with a huge allocation
(tests/test_fuzz_files.py).
"""

from __future__ import annotations

import math
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
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4        # arrays of arrays: real files use none; bounded so recursion is too
# The fewest bytes one item can take, to check a count against the bytes left before looping:
_MIN_FIELD_BYTES = 8 + 4 + 1          # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 4 + 8}

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

    def release_all(self) -> None:
        """Tell the OS we are done with every page of the file mapped so far (they stop counting
        as our memory; a page read again faults back in from the page cache). The whole
        mapping, not a tensor's range: reading a tensor maps more than its own pages (the
        kernel maps cached pages around each fault, read-ahead's included), and releasing
        tensor by tensor left ~1 MB per layer resident, 37 MB of SmolLM2's 96 MB file."""
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)


class _Cursor:
    """Reads little-endian GGUF values from a buffer, failing cleanly at its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """A header count, checked against what the rest of the file can hold."""
        if n * min_bytes > self.left():
            raise GGUFFormatError(f"{self.path}: truncated or corrupt header: at byte {self.pos} "
                                  f"it claims {n} {what}, "
                                  f"more than the {self.left()} bytes left in the file hold")
        return n

    def take(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.count(self.take("<Q"), 1, "string bytes")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        vtype = _value_type(vtype, self)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFFormatError(f"{self.path}: arrays nested more than {MAX_ARRAY_NESTING} "
                                      f"deep at byte {self.pos}")
            item_type = _value_type(self.take("<I"), self)
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                count = self.count(self.take("<Q"), dtype.itemsize, "array items")
                items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return items
            count = self.count(self.take("<Q"), _MIN_ITEM_BYTES[item_type], "array items")
            return [self.value(item_type, depth + 1) for _ in range(count)]
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
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            f.seek(0)
            raise GGUFFormatError(
                f"{path}: not a GGUF file (starts with {f.read(4)!r}, expected b'GGUF')")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        fields, tensors = _read(mapped, path)
    except BaseException:
        mapped.close()
        raise
    return GGUFFile(path, fields, tensors, mapped)


def _read(mapped: mmap.mmap, path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    size = len(mapped)
    with memoryview(mapped) as view:
        fields, infos, header_end = _read_header(_Cursor(view, path))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment is {alignment!r}, expected a power of 2")
    data_start = -(-header_end // alignment) * alignment

    placed = {}                    # name -> (type, shape, start, n_bytes): checked before mapping
    for name, dims, raw_type, offset in infos:
        if name in placed:
            raise GGUFFormatError(f"{path}: tensor {name!r} appears twice in the tensor table")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
        shape = tuple(int(n) for n in reversed(dims))          # ggml ne[] is innermost-first
        block, nbytes_per_block = GGML_QUANT_SIZES[qtype]
        n_elements = math.prod(dims)                           # Python ints: no overflow
        if n_elements % block:
            raise GGUFFormatError(f"{path}: tensor {name!r} of type {qtype.name} has {n_elements} "
                                  f"elements, not a whole number of {block}-element blocks")
        n_bytes = n_elements // block * nbytes_per_block
        if offset % alignment:
            raise GGUFFormatError(f"{path}: tensor {name!r} starts at data offset {offset}, not a "
                                  f"multiple of the alignment {alignment}")
        start = data_start + offset
        if start + n_bytes > size:
            raise GGUFFormatError(f"{path}: truncated: tensor {name!r} needs bytes up to "
                                  f"{start + n_bytes}, file has {size}")
        if qtype in QUANT_TYPES:
            try:
                check_tensor_bytes(name, qtype, shape, n_bytes)
            except GGUFFormatError as e:
                raise GGUFFormatError(f"{path}: {e}") from None
        placed[name] = (qtype, shape, start, n_bytes)
    _check_no_overlap(path, placed)
    return fields, {name: TensorInfo(name, qtype, shape, start, n_bytes,
                                     np.frombuffer(mapped, np.uint8, n_bytes, start))
                    for name, (qtype, shape, start, n_bytes) in placed.items()}


def _read_header(cur: _Cursor) -> tuple[dict, list, int]:
    """(metadata, [(name, dims, type, offset)] of the tensor table, where the header ends)."""
    path = cur.path
    cur.pos = len(GGUF_MAGIC)
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported "
                              f"(supported: {SUPPORTED_VERSIONS}; big-endian files are not)")
    n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
    cur.count(n_tensors * _MIN_TENSOR_INFO_BYTES + n_fields * _MIN_FIELD_BYTES, 1,
              f"bytes of header ({n_tensors} tensors, {n_fields} metadata keys)")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        if key in fields:
            raise GGUFFormatError(f"{path}: metadata key {key!r} appears twice")
        fields[key] = cur.value(cur.take("<I"))

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > MAX_DIMS:
            raise GGUFFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions, at most "
                                  f"{MAX_DIMS} are allowed")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        raw_type, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, dims, raw_type, offset))
    return fields, infos, cur.pos


def _check_no_overlap(path: Path, placed: dict) -> None:
    end, last = 0, None
    for start, n_bytes, name in sorted((start, n, name) for name, (_, _, start, n) in placed.items()):
        if start < end:
            raise GGUFFormatError(f"{path}: tensors {last!r} and {name!r} overlap in the file")
        if n_bytes:
            end, last = start + n_bytes, name
