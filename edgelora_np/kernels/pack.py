"""Repacking GGUF tensors, once at load time, into the tiled layouts the matmul kernels read.

GGUF stores each weight row as a run of quant blocks. We split every block into its fields
(integer codes, scales, offsets) and store rows in tiles of T (layouts in kernels/qmatmul.py).
Repacking keeps the file's bits per weight: Q4_0/Q4_1/Q8_0 become codes plus fp16 scales per
32-block; Q5_0/Q5_1/IQ4_NL add their fifth bits or keep their table indices; the K-quants keep
their 2- or 4-bit codes, their high bits, their 4-, 6- or 8-bit sub-block scales and their fp16
super-block scales, each field in its own array. Only packed 6-bit sub-block scales (Q3_K,
Q4_K, Q5_K, IQ4_XS) are widened to a byte each (+2 to +4 bytes per 256 weights).

Which activation format each weight type is multiplied with follows ggml's vec_dot_type.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgelora_np.errors import UnsupportedQuantError
from edgelora_np.gguf.quants import (
    IQ4_NL_VALUES,
    iq4_xs_scales,
    k_scales_mins,
    q3_k_scales,
)
from edgelora_np.kernels.actquant import (
    quantize_activations,
    quantize_activations_q8_k,
    quantize_activations_q8_k_ref,
    quantize_activations_ref,
)
from edgelora_np.kernels.qmatmul import (
    matmul_f16,
    matmul_f32,
    matmul_kquant,
    matmul_q4,
    matmul_q8,
    scale_array_f32,
)
from edgelora_np.kernels.qmatmul_decoded import (
    KIND_IQ4XS,
    KIND_K2,
    KIND_K3,
    matmul_b32_decoded,
    matmul_k_decoded,
)

MAX_TILE = 512     # rows per tile; bounds the per-thread accumulators
TILE_ALIGN = 16    # tiles are a whole number of 512-bit float32 vectors
QK = 32            # elements per block of Q4_0/Q4_1/Q8_0
QK_K = 256         # elements per K-quant super-block

# ggml's vec_dot_type: the format activations are quantized to for each weight type.
ACTIVATION_FORMAT = {
    QT.Q4_0: "q8_0", QT.Q8_0: "q8_0", QT.Q4_1: "q8_1",
    QT.Q5_0: "q8_0", QT.Q5_1: "q8_1", QT.IQ4_NL: "q8_0",
    QT.Q2_K: "q8_K", QT.Q3_K: "q8_K", QT.Q4_K: "q8_K", QT.Q5_K: "q8_K", QT.Q6_K: "q8_K",
    QT.IQ4_XS: "q8_K",
    QT.F16: "f16", QT.BF16: "bf16", QT.F32: "f32",
}
SUPPORTED = tuple(ACTIVATION_FORMAT)


K_BITS = {"k4": 4, "k5": 5, "k6": 6}     # code bits of the K-quant kinds of kernels/qmatmul.py
# The 256-block kinds of kernels/qmatmul_decoded.py, by their kernel's kind code.
K_DECODED = {"k2": KIND_K2, "k3": KIND_K3, "iq4xs": KIND_IQ4XS}
K_KINDS = (*K_BITS, *K_DECODED)         # every kind multiplied against q8_K activations
SUB_BLOCK = {"k2": 16, "k3": 16, "k4": 32, "k5": 32, "k6": 16, "iq4xs": 32}


@dataclass(frozen=True)
class PackedMatrix:
    """A weight matrix W [n_rows, n_cols] in a kernel layout. See kernels/qmatmul.py."""

    kind: str            # "q4", "q5", "q8", "iq4nl", "k2".."k6", "iq4xs", "f16", "bf16", "f32"
    n_rows: int          # N, output features
    n_cols: int          # K, input features
    act: str             # activation format: "q8_0", "q8_1", "q8_K", "f16", "bf16", "f32"
    qs: np.ndarray       # codes (q4/q8: all bits, k*: the low 4) or the f16/bf16/f32 weights
    d: np.ndarray | None = None    # scales: per 32-block (q4/q8), per super-block (k*)
    m: np.ndarray | None = None    # offsets per 32-block (q4/q8), dmin per super-block (k4/k5)
    qh: np.ndarray | None = None   # q5, k3, k5, k6: the high bits of the codes
    sc: np.ndarray | None = None   # k*, iq4xs: integer sub-block scales (k2: scale | min << 4)
    mn: np.ndarray | None = None   # k4/k5: integer sub-block mins

    FIELDS = ("qs", "d", "m", "qh", "sc", "mn")

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The tiled arrays this matrix holds, by field name."""
        return {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def choose_tile(n_rows: int, n_threads: int) -> int:
    """Rows per tile: the fewest tiles, a multiple of the thread count, of at most MAX_TILE."""
    n_tiles = n_threads
    while -(-n_rows // n_tiles) > MAX_TILE:
        n_tiles += n_threads
    rows = -(-n_rows // n_tiles)
    return -(-rows // TILE_ALIGN) * TILE_ALIGN


# ---------------------------------------------------------------------------------------------
# Splitting GGUF blocks into their fields. Q4_0/Q4_1/Q8_0: codes [N, K/32, 16 or 32] and fp16
# bits d, m [N, K/32] (m None for Q8_0).

def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per value -> fp16 bits as uint16 (copies, so unaligned input is fine)."""
    return np.ascontiguousarray(raw).view(np.uint16)[..., 0]


def _split_q4_0(blocks):   # 18 bytes: d fp16 | 16 bytes of nibbles;  w = d * (q - 8)
    return blocks[..., 2:], _f16(blocks[..., 0:2]), None


def _split_q4_1(blocks):   # 20 bytes: d fp16 | m fp16 | 16 bytes of nibbles;  w = d * q + m
    return blocks[..., 4:], _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _split_q8_0(blocks):   # 34 bytes: d fp16 | 32 int8;  w = d * q
    return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2]), None


def _k_scales_mins(scales12):
    """[..., 12] packed bytes -> the 8 (scale, min) pairs [..., 8] of each super-block, uint8."""
    sc, mn = k_scales_mins(scales12.reshape(-1, 12))
    shape = (*scales12.shape[:-1], 8)
    return sc.astype(np.uint8).reshape(shape), mn.astype(np.uint8).reshape(shape)


# K-quant splitters: -> (codes [..., 256] uint8, d, dmin fp16 bits [...], sc, mn [..., 8|16]).
# Codes are unsigned: Q4_K 0..15, Q5_K 0..31, Q6_K 0..63 (its weight is d * sc * (q - 32)).

def _split_q4_k(blocks):
    # 144 bytes: d | dmin | 12 bytes scales | 128 bytes nibbles. Each 32 bytes of nibbles hold
    # two sub-blocks of 32: low nibbles the first, high nibbles the second.
    sc, mn = _k_scales_mins(blocks[..., 4:16])
    nib = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 32)
    q = np.stack([nib & 0x0F, nib >> 4], axis=-2)                      # [..., 4, 2, 32]
    return (q.reshape(*blocks.shape[:-1], QK_K), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]),
            sc, mn)


def _split_q5_k(blocks):
    # 176 bytes: d | dmin | 12 bytes scales | 32 bytes high bits | 128 bytes nibbles.
    sc, mn = _k_scales_mins(blocks[..., 4:16])
    qh = blocks[..., 16:48]                                              # [..., 32]
    nib = blocks[..., 48:].reshape(*blocks.shape[:-1], 4, 32)
    low = np.stack([nib & 0x0F, nib >> 4], axis=-2)                     # [..., 4, 2, 32]
    bit = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)                  # sub-block i uses bit i
    high = (qh[..., None, None, :] >> bit) & 1
    q = low | (high << 4)
    return (q.reshape(*blocks.shape[:-1], QK_K), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]),
            sc, mn)


def _split_q6_k(blocks):
    # 210 bytes: 128 bytes low nibbles | 64 bytes 2-bit highs | 16 int8 scales | d fp16.
    # Two halves of 128; in each, element l + 32*i (i = 0..3) takes nibble and 2-bit field i.
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 64)
    qh = blocks[..., 128:192].reshape(*lead, 2, 32)
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F,
                    ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)     # [..., 2, 4, 32]
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)
    high = (qh[..., None, :] >> shift) & 3                               # [..., 2, 4, 32]
    q = low | (high << 4)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8)       # [..., 16]
    return q.reshape(*lead, QK_K), _f16(blocks[..., 208:210]), None, sc, None


def _split_q5(blocks):
    # Q5_0, 22 bytes: d | qh 4 | qs 16;  Q5_1, 24 bytes: d | m | qh 4 | qs 16.
    has_m = blocks.shape[-1] == 24
    o = 4 if has_m else 2
    return dict(qs=blocks[..., o + 4:], qh=blocks[..., o:o + 4], d=_f16(blocks[..., 0:2]),
                m=_f16(blocks[..., 2:4]) if has_m else None)


def _split_iq4_nl(blocks):   # 18 bytes: d | qs 16 (indices into IQ4_NL_VALUES)
    return dict(qs=blocks[..., 2:], d=_f16(blocks[..., 0:2]))


def _split_iq4_xs(blocks):
    # 136 bytes: d | scales_h 2 | scales_l 4 | 8 sub-blocks of 16 bytes, nibble order as q4.
    R, n = blocks.shape[:2]
    sc = iq4_xs_scales(blocks[..., 2:4].reshape(-1, 2), blocks[..., 4:8].reshape(-1, 4))
    return dict(qs=blocks[..., 8:].reshape(R, n * 8, 16), d=_f16(blocks[..., 0:2]),
                sc=sc.reshape(R, n * 8))


def _two_bit_fields(blocks, offset):
    """Q2_K/Q3_K: the 64 bytes of 2-bit codes at `offset` -> k2 layout [R, K/16, 4] (element
    j of a sub-block at bits 2 * (j // 4) of byte j % 4), via codes in element order."""
    R, n = blocks.shape[:2]
    q = _two_bit_codes(blocks[..., offset:offset + 64].reshape(-1, 64))    # [R*n, 256]
    q = q.reshape(R, n * 16, 4, 4)                                        # [R, sub, j // 4, j % 4]
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)
    return np.bitwise_or.reduce(q << shift, axis=2)                      # [R, K/16, 4]


def _split_q2_k(blocks):     # 84 bytes: scales 16 | qs 64 | d | dmin
    R, n = blocks.shape[:2]
    return dict(qs=_two_bit_fields(blocks, 16), sc=blocks[..., 0:16].reshape(R, n * 16),
                d=_f16(blocks[..., 80:82]), m=_f16(blocks[..., 82:84]))


def _split_q3_k(blocks):     # 110 bytes: hmask 32 | qs 64 | scales 12 | d
    R, n = blocks.shape[:2]
    hm = blocks[..., 0:32].reshape(-1, 32, 1)
    high = np.unpackbits(hm, axis=2, bitorder="little").transpose(0, 2, 1)  # [R*n, b, l]
    qh = np.packbits(high.reshape(R, n * 16, 16), axis=2, bitorder="little")  # [R, K/16, 2]
    sc = q3_k_scales(blocks[..., 96:108].reshape(-1, 12))
    return dict(qs=_two_bit_fields(blocks, 32), qh=qh, sc=sc.reshape(R, n * 16),
                d=_f16(blocks[..., 108:110]))


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """uint8 [M, 64] -> codes [M, 256]: in half h, element 128h + 32j + l is bits 2j.. of
    byte 32h + l (gguf/quants.py _two_bit_codes, ggml dequantize_row_q2_K)."""
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shift) & 3).reshape(-1, 256)


def _encode_codes(q: np.ndarray, bits: int):
    """Codes [N, K] (bits wide) -> nibbles [N, K/bs, bs/2] and high bits [N, K/bs, 4] (or None),
    with sub-blocks of bs = 16 for 6-bit codes and 32 otherwise (layouts in kernels/qmatmul.py).
    """
    n = q.shape[0]
    half = 8 if bits == 6 else 16
    v = q.reshape(n, -1, 2, half)                                        # [N, K/bs, 2, half]
    nibbles = (v[:, :, 0] & 0x0F) | ((v[:, :, 1] & 0x0F) << 4)
    if bits == 4:
        return nibbles, None
    shifts, per_byte = _high_bit_shifts(bits)
    high = (v >> 4).reshape(n, v.shape[1], 2, half // per_byte, per_byte).astype(np.uint8)
    qh = np.bitwise_or.reduce(high << shifts, axis=(2, 4))               # [N, K/bs, 4] uint8
    return nibbles, qh


def _decode_codes(nibbles: np.ndarray, qh: np.ndarray | None, bits: int) -> np.ndarray:
    """Inverse of _encode_codes: nibbles (+ high bits) of R rows -> codes [R, K] int64."""
    v = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2).astype(np.int64)  # [R, K/bs, 2, half]
    if bits > 4:
        shifts, per_byte = _high_bit_shifts(bits)
        high = (qh[:, :, None, :, None] >> shifts) & ((1 << (bits - 4)) - 1)
        v |= high.reshape(v.shape) << 4
    return v.reshape(len(v), -1)


def _high_bit_shifts(bits: int):
    """Bit position of each (half, j % per_byte) in a high-bit byte, shaped [2, 1, per_byte]."""
    width = bits - 4                                     # high bits per element: 1 or 2
    per_byte = 4 // width                                # pairs (j, j + bs/2) per byte: 4 or 2
    shifts = 2 * width * np.arange(per_byte) + width * np.arange(2)[:, None, None]
    return shifts.astype(np.uint8), per_byte


# type -> (packed kind, block elements, block bytes, split function)
_SPLIT = {
    QT.Q4_0: ("q4", QK, 18, _split_q4_0),
    QT.Q4_1: ("q4", QK, 20, _split_q4_1),
    QT.Q8_0: ("q8", QK, 34, _split_q8_0),
    QT.Q4_K: ("k4", QK_K, 144, _split_q4_k),
    QT.Q5_K: ("k5", QK_K, 176, _split_q5_k),
    QT.Q6_K: ("k6", QK_K, 210, _split_q6_k),
}
# The types of kernels/qmatmul_decoded.py, whose split functions return the fields by name.
_SPLIT_FIELDS = {
    QT.Q5_0: ("q5", QK, 22, _split_q5),
    QT.Q5_1: ("q5", QK, 24, _split_q5),
    QT.IQ4_NL: ("iq4nl", QK, 18, _split_iq4_nl),
    QT.Q2_K: ("k2", QK_K, 84, _split_q2_k),
    QT.Q3_K: ("k3", QK_K, 110, _split_q3_k),
    QT.IQ4_XS: ("iq4xs", QK_K, 136, _split_iq4_xs),
}


def pack_gguf(raw: np.ndarray, qtype: QT, n_rows: int, n_cols: int, n_threads: int,
              name: str = "tensor") -> PackedMatrix:
    """GGUF tensor data (rows of blocks, as gguf.GGUFReader maps it) -> PackedMatrix."""
    return pack_stacked([(raw, n_rows)], qtype, n_cols, n_threads, name)


def pack_stacked(parts: list[tuple[np.ndarray, int]], qtype: QT, n_cols: int, n_threads: int,
                 name: str = "tensor") -> PackedMatrix:
    """Tensors of one type and width, given as (raw data, rows), stacked by rows into one
    PackedMatrix: q|k|v or gate|up then take one kernel call and one activation quantization.

    Packed one tile at a time, straight into the result: the only scratch is one tile's fields.
    """
    if qtype not in ACTIVATION_FORMAT:
        supported = ", ".join(t.name for t in SUPPORTED)
        raise UnsupportedQuantError(
            f"{name}: quantization type {qtype.name} is not supported (supported: {supported})")
    act = ACTIVATION_FORMAT[qtype]
    if qtype in (QT.F16, QT.BF16, QT.F32):
        kind = act
        dtype = np.float32 if qtype == QT.F32 else np.uint16
        sources = [np.ascontiguousarray(raw).view(dtype).reshape(n, n_cols) for raw, n in parts]
    else:
        kind, per_block, nbytes, _ = {**_SPLIT, **_SPLIT_FIELDS}[qtype]
        sources = [np.ascontiguousarray(raw).view(np.uint8).reshape(n, n_cols // per_block, nbytes)
                   for raw, n in parts]
    n_rows = sum(n for _, n in parts)
    tile = choose_tile(n_rows, n_threads)
    groups = -(-n_rows // tile)
    out = None
    for g in range(groups):
        rows = _row_range(sources, g * tile, min((g + 1) * tile, n_rows))
        fields = {"qs": rows} if kind == act else _split_fields(qtype, rows, n_cols)
        if out is None:       # rows past n_rows stay zero
            out = {f: np.zeros((groups, *a.shape[1:], tile), a.dtype) for f, a in fields.items()}
        for f, a in fields.items():
            out[f][g, ..., :len(a)] = np.moveaxis(a, 0, -1)
    return PackedMatrix(kind, n_rows, n_cols, act, **out)


def _row_range(sources: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows start..stop of the sources stacked (a view when they lie in one source)."""
    pieces, offset = [], 0
    for src in sources:
        lo, hi = max(start - offset, 0), min(stop - offset, len(src))
        if lo < hi:
            pieces.append(src[lo:hi])
        offset += len(src)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _split_fields(qtype: QT, blocks: np.ndarray, n_cols: int) -> dict[str, np.ndarray]:
    """GGUF blocks [R, blocks per row, block bytes] -> the packed fields of those R rows."""
    if qtype in _SPLIT_FIELDS:
        fields = _SPLIT_FIELDS[qtype][3](blocks)
        return {f: a for f, a in fields.items() if a is not None}
    kind, _, _, split = _SPLIT[qtype]
    R = len(blocks)
    if kind not in K_BITS:
        # q4 codes are already in canonical nibble order: byte j = element j | element j+16 << 4
        q, d, m = split(blocks)                                         # [R, K/32, 16 or 32]
        fields = dict(qs=q, d=d, m=m)
    else:
        q, d, dmin, sc, mn = split(blocks)
        qs, qh = _encode_codes(q.reshape(R, n_cols), K_BITS[kind])
        fields = dict(qs=qs, d=d, m=dmin, qh=qh, sc=sc.reshape(R, -1),
                      mn=mn.reshape(R, -1) if mn is not None else None)
    return {f: a for f, a in fields.items() if a is not None}


# ---------------------------------------------------------------------------------------------
# Multiplying.

def _round_activations(x: np.ndarray, act: str) -> np.ndarray:
    if act == "f16":
        return x.astype(np.float16).astype(np.float32)
    if act == "bf16":     # round to nearest even on the top 16 bits
        bits = x.astype(np.float32).view(np.uint32)
        bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (bits & np.uint32(0xFFFF0000)).view(np.float32)
    return x


def matmul(w: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y [B, N] = x [B, K] @ W.T, x float32 C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty((x.shape[0], w.n_rows), np.float32)
    if w.kind in K_BITS:
        xq, xd, bsums = quantize_activations_q8_k(x)
        qh = w.qh if w.qh is not None else _NO_HIGH_BITS
        mn = w.mn if w.mn is not None else _NO_MINS
        dmin = w.m if w.m is not None else _NO_OFFSETS
        matmul_kquant(w.qs, qh, w.sc, mn, w.d, dmin, K_BITS[w.kind], xq, xd, bsums, out)
    elif w.kind in K_DECODED:
        xq, xd, bsums = quantize_activations_q8_k(x)
        qh = w.qh if w.qh is not None else _no_bytes(w.qs)
        dmin = w.m if w.m is not None else _NO_OFFSETS
        matmul_k_decoded(K_DECODED[w.kind], w.qs, qh, w.sc, w.d, dmin, xq, xd, bsums, out)
    elif w.kind in ("q5", "iq4nl"):
        xq, xd, xs = quantize_activations(x, w.act)
        qh = w.qh if w.qh is not None else _no_bytes(w.qs)
        m = w.m if w.m is not None else _NO_OFFSETS
        matmul_b32_decoded(w.qs, qh, w.d, m, xq, xd, xs, out)
    elif w.kind in ("q4", "q8"):
        xq, xd, xs = quantize_activations(x, w.act)
        m = w.m if w.m is not None else _NO_OFFSETS
        kernel = matmul_q4 if w.kind == "q4" else matmul_q8
        kernel(w.qs, w.d, m, xq, xd, xs, out)
    elif w.kind == "f32":
        matmul_f32(w.qs, x, out)
    else:
        matmul_f16(w.qs, w.kind == "bf16", _round_activations(x, w.act), out)
    return out


# Stand-ins for the fields a kind does not have, so each kernel keeps one signature.
_NO_OFFSETS = np.zeros((1, 0, 1), np.uint16)
_NO_HIGH_BITS = np.zeros((1, 1, 0, 1), np.uint8)
_NO_MINS = np.zeros((1, 0, 1), np.uint8)


def _no_bytes(qs: np.ndarray) -> np.ndarray:
    """A per-block field with no bytes, [G, blocks, 0, T]: the kernels slice it per block.
    One per shape, made once (it is asked for on every matmul)."""
    G, nb, _, T = qs.shape
    return _empty_field(G, nb, T)


@functools.cache
def _empty_field(G: int, nb: int, T: int) -> np.ndarray:
    return np.zeros((G, nb, 0, T), np.uint8)     # writeable: a read-only array is another
                                                 # Numba type, so another compilation


# ---------------------------------------------------------------------------------------------
# NumPy references.

def _gather(w: PackedMatrix, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each field of the selected rows, untiled: [len(rows), ...]."""
    tile = w.qs.shape[-1]
    g, t = rows // tile, rows % tile
    return {f: a[g, ..., t] for f, a in w.arrays.items()}


def _widen_scales(s: np.ndarray) -> np.ndarray:
    out = np.empty(s.shape, np.float32)
    scale_array_f32(np.ascontiguousarray(s), out)
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes, q4 order -> codes [..., 32] int64."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)


def _k_parts(w: PackedMatrix, f: dict[str, np.ndarray]):
    """The integers and scales of a K-kind W's rows `f`:
        v [R, K] int64 signed weights, sc [R, K/bs] and mn [R, K/bs] (or None) integer sub-block
        scales and mins, d and dmin (or None) [R, K/256] float32 super-block scales,
    so that w = d * sc * v - dmin * mn, per sub-block."""
    R = len(f["qs"])
    sc, mn = f["sc"].astype(np.int64), f.get("mn")
    if w.kind in K_BITS:
        bits = K_BITS[w.kind]
        v = _decode_codes(f["qs"], f.get("qh"), bits) - (32 if bits == 6 else 0)
    elif w.kind == "iq4xs":
        v = IQ4_NL_VALUES[_nibbles(f["qs"])].reshape(R, -1).astype(np.int64)
    else:                                                      # k2, k3: [R, K/16, 4] bytes
        shift = (2 * np.arange(4)).reshape(4, 1)
        v = ((f["qs"][:, :, None, :].astype(np.int64) >> shift) & 3).reshape(R, -1, 16)
        if w.kind == "k2":
            sc, mn = sc & 15, sc >> 4
        else:
            high = np.unpackbits(f["qh"], axis=-1, bitorder="little")   # [R, K/16, 16]
            v = v + 4 * high.astype(np.int64) - 4
        v = v.reshape(R, -1)
    dmin = _widen_scales(f["m"]) if "m" in f else None
    return v, sc, (mn.astype(np.int64) if mn is not None else None), _widen_scales(f["d"]), dmin


def _codes_and_scales(w: PackedMatrix, f: dict[str, np.ndarray]):
    """Integer codes q [R, K/bs, bs] and float32 scale d and offset m [R, K/bs] per block,
    w = d * q + m, for the rows `f` of a quantized W (bs = the kind's block or sub-block)."""
    R = len(f["qs"])
    if w.kind in K_KINDS:
        v, sc, mn, d_super, dmin = _k_parts(w, f)
        sub = sc.shape[1] // d_super.shape[1]                            # sub-blocks per 256
        d = np.repeat(d_super, sub, axis=1) * sc.astype(np.float32)
        m = np.zeros_like(d) if mn is None else \
            -(np.repeat(dmin, sub, axis=1) * mn.astype(np.float32))
        return v.reshape(R, d.shape[1], -1), d, m
    d = _widen_scales(f["d"])
    if "m" in f:
        m = _widen_scales(f["m"])
    else:                      # Q4_0: w = d * (q - 8); others: q is already signed
        m = np.float32(-8.0) * d if w.kind == "q4" else np.zeros_like(d)
    codes = f["qs"]
    if w.kind in ("q4", "q5", "iq4nl"):                                 # [R, K/32, 16] bytes
        codes = _nibbles(codes)                                          # [R, K/32, 32]
    if w.kind == "q5":
        codes = codes | (np.unpackbits(f["qh"], axis=-1, bitorder="little").astype(np.int64) << 4)
        if "m" not in f:                                                 # Q5_0: w = d * (q - 16)
            codes = codes - 16
    elif w.kind == "iq4nl":
        codes = IQ4_NL_VALUES[codes].astype(np.int64)
    return codes.astype(np.int64), d, m


def packed_rows(w: PackedMatrix, rows: np.ndarray) -> np.ndarray:
    """Dequantize selected rows of W: [len(rows), K] float32 (ggml get_rows: embeddings)."""
    rows = np.asarray(rows, dtype=np.int64)
    f = _gather(w, rows)
    if w.kind == "f32":
        return f["qs"]
    if w.kind in ("f16", "bf16"):
        bits = f["qs"]
        if w.kind == "f16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    q, d, m = _codes_and_scales(w, f)
    return (d[..., None] * q.astype(np.float32) + m[..., None]).reshape(len(rows), w.n_cols)


def dequantize_packed(w: PackedMatrix) -> np.ndarray:
    """The packed matrix as dense float32 [N, K] (for tests and references only)."""
    return packed_rows(w, np.arange(w.n_rows))


def matmul_ref(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """Reference for `matmul`, in float64, written as ggml's vec_dot formulas. Per block k:
        y[b, n] = sum_k  d[n,k] * xd[b,k] * sum_j(q[n,k,j] * xq[b,k,j])  +  m[n,k] * xs[b,k]
    and for the K-quants per super-block s, over its sub-blocks k (isum as above, bsum the
    activations' sum over sub-block k):
        y[b, n] = sum_s  d[n,s] * xd[b,s] * sum_k(sc[n,k] * isum[b,n,k])
                       - dmin[n,s] * xd[b,s] * sum_k(mn[n,k] * bsum[b,k])
    """
    x = np.asarray(x, dtype=np.float32)
    if w.kind in K_KINDS:
        return _matmul_k_ref(w, x)
    if w.kind not in ("q4", "q5", "q8", "iq4nl"):
        dense = dequantize_packed(w).astype(np.float64)
        return (_round_activations(x, w.act).astype(np.float64) @ dense.T).astype(np.float32)
    B = x.shape[0]
    xq, xd, xs = quantize_activations_ref(x, w.act)
    q, d, m = _codes_and_scales(w, _gather(w, np.arange(w.n_rows)))     # [N, nb, bs], [N, nb]
    xq = xq.reshape(B, q.shape[1], q.shape[2]).astype(np.int64)          # [B, nb, bs]
    isum = np.einsum("bkj,nkj->bnk", xq, q)                              # [B, N, nb] exact
    y = (d[None].astype(np.float64) * xd[:, None, :] * isum
         + m[None].astype(np.float64) * xs[:, None, :])
    return y.sum(-1).astype(np.float32)


def _matmul_k_ref(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    B, K = x.shape
    N, S = w.n_rows, K // QK_K
    q, sc, mn, d, dmin = _k_parts(w, _gather(w, np.arange(N)))         # [N, K], [N, K/bs] ...
    xq, xd, bsums = quantize_activations_q8_k_ref(x)                    # [B, K], [B, S], [B, K/16]
    bs = SUB_BLOCK[w.kind]
    isum = np.einsum("bkj,nkj->bnk", xq.reshape(B, -1, bs).astype(np.int64),
                     q.reshape(N, -1, bs))                               # [B, N, K/bs] exact
    itot = (isum * sc[None]).reshape(B, N, S, -1).sum(-1)                # [B, N, S] exact
    dx = xd.astype(np.float64)[:, None, :]                               # [B, 1, S]
    y = d.astype(np.float64)[None] * dx * itot
    if mn is not None:
        bsum = bsums.reshape(B, K // bs, -1).sum(-1).astype(np.int64)   # [B, K/bs]
        imin = (bsum[:, None, :] * mn[None]).reshape(B, N, S, -1)
        y -= dmin.astype(np.float64)[None] * dx * imin.sum(-1)
    return y.sum(-1).astype(np.float32)
