"""Repacking GGUF tensors, once at load time, into the tiled layouts the matmul kernels read.

GGUF stores each weight row as a run of quant blocks. We split every block into integer codes
and per-block scale/offset so that w = d * q + m, and store rows in tiles of T (layouts in
kernels/qmatmul.py). Repacking keeps the bits per weight of the file for Q4_0/Q4_1/Q8_0
(fp16 scales stay fp16); K-quants become per-32 (Q6_K: per-16) blocks with float32 scales,
d * sub_scale and -dmin * sub_min, which is exact: an fp16 times a 6-bit integer fits in float32.

Which activation format each weight type is multiplied with follows ggml's vec_dot_type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgelora_np.errors import UnsupportedQuantError
from edgelora_np.gguf.quants import k_scales_mins
from edgelora_np.kernels.actquant import quantize_activations, quantize_activations_ref
from edgelora_np.kernels.qmatmul import (
    matmul_f16,
    matmul_f32,
    matmul_q4,
    matmul_q8,
    scale_array_f32,
)

MAX_TILE = 512     # rows per tile; bounds the per-thread accumulators
TILE_ALIGN = 16    # tiles are a whole number of 512-bit float32 vectors
QK = 32            # elements per block of Q4_0/Q4_1/Q8_0 (and per K-quant sub-block)
QK_K = 256         # elements per K-quant super-block

# ggml's vec_dot_type: the format activations are quantized to for each weight type.
ACTIVATION_FORMAT = {
    QT.Q4_0: "q8_0", QT.Q8_0: "q8_0", QT.Q4_1: "q8_1",
    QT.Q4_K: "q8_K", QT.Q5_K: "q8_K", QT.Q6_K: "q8_K",
    QT.F16: "f16", QT.BF16: "bf16", QT.F32: "f32",
}
SUPPORTED = tuple(ACTIVATION_FORMAT)


@dataclass(frozen=True)
class PackedMatrix:
    """A weight matrix W [n_rows, n_cols] in a kernel layout. See kernels/qmatmul.py."""

    kind: str            # "q4", "q8", "f16", "bf16" or "f32"
    n_rows: int          # N, output features
    n_cols: int          # K, input features
    act: str             # activation format: "q8_0", "q8_1", "q8_K", "f16", "bf16", "f32"
    qs: np.ndarray       # codes (q4/q8) or the weights themselves (f16/bf16/f32)
    d: np.ndarray | None = None
    m: np.ndarray | None = None

    @property
    def block(self) -> int:
        """Elements per scale block (q4/q8), the granularity of activation quantization."""
        return self.qs.shape[2] * (2 if self.kind == "q4" else 1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.qs, self.d, self.m) if a is not None)


def choose_tile(n_rows: int, n_threads: int) -> int:
    """Rows per tile: the fewest tiles, a multiple of the thread count, of at most MAX_TILE."""
    n_tiles = n_threads
    while -(-n_rows // n_tiles) > MAX_TILE:
        n_tiles += n_threads
    rows = -(-n_rows // n_tiles)
    return -(-rows // TILE_ALIGN) * TILE_ALIGN


def tile_rows(a: np.ndarray, tile: int) -> np.ndarray:
    """[N, ...] -> [G, ..., T]: rows grouped in tiles of T, the row axis moved innermost.

    Filled one tile at a time, so the only scratch is the result (rows past N are zeros).
    """
    n = a.shape[0]
    groups = -(-n // tile)
    out = np.zeros((groups, *a.shape[1:], tile), a.dtype)
    for g in range(groups):
        rows = a[g * tile:(g + 1) * tile]                                # [T, ...]
        out[g, ..., :len(rows)] = np.moveaxis(rows, 0, -1)
    return out


def untile_rows(a: np.ndarray, n_rows: int) -> np.ndarray:
    """Inverse of tile_rows."""
    a = np.moveaxis(a, -1, 1)
    return a.reshape(-1, *a.shape[2:])[:n_rows]


# ---------------------------------------------------------------------------------------------
# Splitting GGUF blocks into codes and scales. Each returns q [N, K] and d, m [N, K/block].

def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per value -> fp16 bits as uint16 (copies, so unaligned input is fine)."""
    return np.ascontiguousarray(raw).view(np.uint16)[..., 0]


def _split_q4_0(blocks):   # 18 bytes: d fp16 | 16 bytes of nibbles;  w = d * (q - 8)
    d = _f16(blocks[..., 0:2])
    m = (-8.0 * d.view(np.float16)).astype(np.float16).view(np.uint16)  # exact: power of 2
    return blocks[..., 2:], d, m


def _split_q4_1(blocks):   # 20 bytes: d fp16 | m fp16 | 16 bytes of nibbles;  w = d * q + m
    return blocks[..., 4:], _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _split_q8_0(blocks):   # 34 bytes: d fp16 | 32 int8;  w = d * q
    return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2]), None


def _k_scales_mins(scales12):
    """[..., 12] packed bytes -> the 8 (scale, min) pairs [..., 8] of each super-block."""
    sc, mn = k_scales_mins(scales12.reshape(-1, 12))
    return sc.reshape(*scales12.shape[:-1], 8), mn.reshape(*scales12.shape[:-1], 8)


def _kquant_scales(blocks, sc, mn):
    d = _f16(blocks[..., 0:2]).view(np.float16).astype(np.float32)[..., None]
    dmin = _f16(blocks[..., 2:4]).view(np.float16).astype(np.float32)[..., None]
    return d * sc, -(dmin * mn)


def _split_q4_k(blocks):
    # 144 bytes: d | dmin | 12 bytes scales | 128 bytes nibbles. Each 32 bytes of nibbles hold
    # two sub-blocks of 32: low nibbles the first, high nibbles the second.
    sc, mn = _k_scales_mins(blocks[..., 4:16])
    nib = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 32)
    q = np.stack([nib & 0x0F, nib >> 4], axis=-2)                      # [..., 4, 2, 32]
    d, m = _kquant_scales(blocks, sc, mn)
    return q.reshape(*blocks.shape[:-1], QK_K), d, m


def _split_q5_k(blocks):
    # 176 bytes: d | dmin | 12 bytes scales | 32 bytes high bits | 128 bytes nibbles.
    sc, mn = _k_scales_mins(blocks[..., 4:16])
    qh = blocks[..., 16:48]                                              # [..., 32]
    nib = blocks[..., 48:].reshape(*blocks.shape[:-1], 4, 32)
    low = np.stack([nib & 0x0F, nib >> 4], axis=-2)                     # [..., 4, 2, 32]
    bit = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)                  # sub-block i uses bit i
    high = (qh[..., None, None, :] >> bit) & 1
    q = low | (high << 4)
    d, m = _kquant_scales(blocks, sc, mn)
    return q.reshape(*blocks.shape[:-1], QK_K), d, m


def _split_q6_k(blocks):
    # 210 bytes: 128 bytes low nibbles | 64 bytes 2-bit highs | 16 int8 scales | d fp16.
    # Two halves of 128; in each, element l + 32*i (i = 0..3) takes nibble and 2-bit field i.
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 64)
    qh = blocks[..., 128:192].reshape(*lead, 2, 32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)          # [..., 16]
    d = _f16(blocks[..., 208:210]).view(np.float16).astype(np.float32)[..., None]
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F,
                    ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)     # [..., 2, 4, 32]
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)
    high = (qh[..., None, :] >> shift) & 3                               # [..., 2, 4, 32]
    q = (low | (high << 4)).astype(np.int16) - 32
    return q.reshape(*lead, QK_K).astype(np.int8), d * sc, None


# type -> (packed kind, block elements, block bytes, split function, sub-block size)
_SPLIT = {
    QT.Q4_0: ("q4", QK, 18, _split_q4_0, QK),
    QT.Q4_1: ("q4", QK, 20, _split_q4_1, QK),
    QT.Q8_0: ("q8", QK, 34, _split_q8_0, QK),
    QT.Q4_K: ("q4", QK_K, 144, _split_q4_k, QK),
    QT.Q5_K: ("q8", QK_K, 176, _split_q5_k, QK),
    QT.Q6_K: ("q8", QK_K, 210, _split_q6_k, 16),
}


def pack_gguf(raw: np.ndarray, qtype: QT, n_rows: int, n_cols: int, n_threads: int,
              name: str = "tensor") -> PackedMatrix:
    """GGUF tensor data (rows of blocks, as gguf.GGUFReader maps it) -> PackedMatrix."""
    if qtype not in ACTIVATION_FORMAT:
        supported = ", ".join(t.name for t in SUPPORTED)
        raise UnsupportedQuantError(
            f"{name}: quantization type {qtype.name} is not supported (supported: {supported})")
    tile = choose_tile(n_rows, n_threads)
    act = ACTIVATION_FORMAT[qtype]
    if qtype in (QT.F16, QT.BF16, QT.F32):
        dtype = np.float32 if qtype == QT.F32 else np.uint16
        w = np.ascontiguousarray(raw).view(dtype).reshape(n_rows, n_cols)
        return PackedMatrix(act, n_rows, n_cols, act, tile_rows(w, tile))
    kind, per_block, nbytes, split, sub = _SPLIT[qtype]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n_rows, n_cols // per_block, nbytes)
    q, d, m = split(blocks)
    nsub = n_cols // sub
    d = d.reshape(n_rows, nsub)
    m = m.reshape(n_rows, nsub) if m is not None else None
    if kind == "q4":
        # Canonical nibble order: byte j of each 32-block = element j | element j+16 << 4.
        if qtype in (QT.Q4_0, QT.Q4_1):
            codes = q.reshape(n_rows, nsub, 16)
        else:
            vals = q.reshape(n_rows, nsub, 2, 16)
            codes = vals[:, :, 0] | (vals[:, :, 1] << 4)
        qs = tile_rows(np.ascontiguousarray(codes, dtype=np.uint8), tile)
    else:
        qs = tile_rows(q.reshape(n_rows, nsub, sub).view(np.int8), tile)
    d_t = tile_rows(d, tile)
    m_t = tile_rows(m, tile) if m is not None else None
    return PackedMatrix(kind, n_rows, n_cols, act, qs, d_t, m_t)


def concat_rows(parts: list[PackedMatrix], n_threads: int) -> PackedMatrix:
    """Stack matrices with the same input and format into one (e.g. q, k, v -> qkv).

    One kernel call then computes all of them from one activation quantization.
    """
    first = parts[0]
    if any(p.kind != first.kind or p.n_cols != first.n_cols or p.act != first.act
           or (p.d is None) != (first.d is None) or (p.m is None) != (first.m is None)
           or (p.d is not None and p.d.dtype != first.d.dtype) for p in parts):
        return None
    n_rows = sum(p.n_rows for p in parts)
    tile = choose_tile(n_rows, n_threads)

    def stack(arrs):
        return tile_rows(np.concatenate([untile_rows(a, p.n_rows) for a, p in zip(arrs, parts)]),
                         tile)

    qs = stack([p.qs for p in parts])
    d = stack([p.d for p in parts]) if first.d is not None else None
    m = stack([p.m for p in parts]) if first.m is not None else None
    return PackedMatrix(first.kind, n_rows, first.n_cols, first.act, qs, d, m)


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
    if w.kind in ("q4", "q8"):
        xq, xd, xs = quantize_activations(x, w.act, w.block)
        m = w.m if w.m is not None else _NO_OFFSETS
        kernel = matmul_q4 if w.kind == "q4" else matmul_q8
        kernel(w.qs, w.d, m, xq, xd, xs, out)
    elif w.kind == "f32":
        matmul_f32(w.qs, x, out)
    else:
        matmul_f16(w.qs, w.kind == "bf16", _round_activations(x, w.act), out)
    return out


_NO_OFFSETS = np.zeros((1, 0, 1), np.float32)


# ---------------------------------------------------------------------------------------------
# NumPy references.

def _unpacked(w: PackedMatrix):
    """Codes q [N, K/bs, bs] (int), scales d and offsets m [N, K/bs] float32 of a q4/q8 W."""
    d = _widen_scales(untile_rows(w.d, w.n_rows))
    m = _widen_scales(untile_rows(w.m, w.n_rows)) if w.m is not None else np.zeros_like(d)
    codes = untile_rows(w.qs, w.n_rows)
    if w.kind == "q4":                                                  # [N, K/32, 16] bytes
        codes = np.concatenate([codes & 0x0F, codes >> 4], axis=-1)      # [N, K/32, 32]
    return codes.astype(np.int64), d, m


def dequantize_packed(w: PackedMatrix) -> np.ndarray:
    """The packed matrix as dense float32 [N, K] (for tests and references only)."""
    if w.kind == "f32":
        return untile_rows(w.qs, w.n_rows).copy()
    if w.kind in ("f16", "bf16"):
        bits = untile_rows(w.qs, w.n_rows)
        if w.kind == "f16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    q, d, m = _unpacked(w)
    return (d[..., None] * q.astype(np.float32) + m[..., None]).reshape(w.n_rows, w.n_cols)


def _widen_scales(s: np.ndarray) -> np.ndarray:
    out = np.empty(s.shape, np.float32)
    scale_array_f32(np.ascontiguousarray(s), out)
    return out


def matmul_ref(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """Reference for `matmul`, in float64, written as ggml's vec_dot formula per block:
    y[b, n] = sum over blocks k of  d[n,k] * xd[b,k] * sum_j(q[n,k,j] * xq[b,k,j]) + m[n,k] * xs[b,k]
    """
    x = np.asarray(x, dtype=np.float32)
    if w.kind not in ("q4", "q8"):
        dense = dequantize_packed(w).astype(np.float64)
        return (_round_activations(x, w.act).astype(np.float64) @ dense.T).astype(np.float32)
    B = x.shape[0]
    xq, xd, xs = quantize_activations_ref(x, w.act, w.block)
    q, d, m = _unpacked(w)                                               # [N, nb, bs], [N, nb]
    xq = xq.reshape(B, q.shape[1], q.shape[2]).astype(np.int64)          # [B, nb, bs]
    isum = np.einsum("bkj,nkj->bnk", xq, q)                              # [B, N, nb] exact
    y = (d[None].astype(np.float64) * xd[:, None, :] * isum
         + m[None].astype(np.float64) * xs[:, None, :])
    return y.sum(-1).astype(np.float32)


def packed_rows(w: PackedMatrix, rows: np.ndarray) -> np.ndarray:
    """Dequantize selected rows of W: [len(rows), K] float32 (ggml get_rows: embeddings)."""
    rows = np.asarray(rows, dtype=np.int64)
    tile = w.qs.shape[-1]
    g, t = rows // tile, rows % tile
    if w.kind == "f32":
        return w.qs[g, :, t]
    if w.kind in ("f16", "bf16"):
        bits = w.qs[g, :, t]
        if w.kind == "f16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    codes = w.qs[g, :, :, t]                                            # [R, K/bs, bs or 16]
    d = _widen_scales(np.ascontiguousarray(w.d[g, :, t]))                 # [R, K/bs]
    m = (_widen_scales(np.ascontiguousarray(w.m[g, :, t])) if w.m is not None
         else np.zeros_like(d))
    if w.kind == "q4":
        codes = np.concatenate([codes & 0x0F, codes >> 4], axis=-1)
    return (d[..., None] * codes.astype(np.float32) + m[..., None]).reshape(len(rows), w.n_cols)
