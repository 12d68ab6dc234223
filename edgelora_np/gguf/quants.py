"""GGML tensor formats as data: one table row per type, one small NumPy decode per type.

A GGUF tensor of logical shape (rows, cols) is stored row by row; each row is cut into blocks
of `block_size` consecutive elements and each block is encoded in `bytes_per_block` bytes.
Plain floats are the degenerate case of one element per block. The table `QUANT_TYPES`
lists the types a model file may use; `ACTIVATION_TYPES` lists the two formats ggml
quantizes *activations* to before an integer dot product (Q8_1, Q8_K). They are never
stored in files, but the matmul kernels consume them.

Every decode here is the plain NumPy reference: bit-exact against `gguf.quants.dequantize`
(which is tested bit-exact against ggml's C code), and the oracle for the Numba kernels.
docs/quant_formats.md draws each layout.

Shape letters: N blocks, QK elements per block, BB bytes per block.
All multi-byte fields are little-endian; fp16 `d`/`dmin` scales are IEEE half floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from gguf import GGMLQuantizationType

from edgelora_np.errors import GGUFFormatError, UnsupportedQuantError

QK = 32  # elements per block of the "legacy" formats Q4_0, Q4_1, Q8_0, Q8_1
QK_K = 256  # elements per super-block of the K-quants Q4_K, Q5_K, Q6_K, Q8_K
K_SCALE_BYTES = 12  # Q4_K/Q5_K: 8 six-bit scales + 8 six-bit mins packed into 12 bytes

# dequantize() decodes this many blocks at a time, so a big tensor needs a bounded scratch.
_BLOCKS_PER_CHUNK = 1 << 14


# --------------------------------------------------------------------------------------------
# Field readers shared by the decoders


def _f16(raw: np.ndarray) -> np.ndarray:
    """uint8[N, 2] little-endian fp16 bytes -> float32[N, 1]."""
    return raw.view("<f2").astype(np.float32)


def k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K sub-block scales and mins: uint8[N, 12] -> (float32[N, 8], float32[N, 8]).

    Eight 6-bit scales s0..s7 and eight 6-bit mins m0..m7 share 12 bytes (ggml get_scale_min_k4):
        bytes 0-3   bits 0-5: s0..s3          bits 6-7: bits 4-5 of s4..s7
        bytes 4-7   bits 0-5: m0..m3          bits 6-7: bits 4-5 of m4..m7
        bytes 8-11  bits 0-3: bits 0-3 of s4..s7   bits 4-7: bits 0-3 of m4..m7
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # [N, 4] each
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)  # [N, 8]
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)  # [N, 8]
    return scales.astype(np.float32), mins.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Reference decoders: uint8[N, BB] -> float32[N, QK]


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: 4 bytes per element, IEEE single. uint8[N, 4] -> float32[N, 1]."""
    return blocks.view("<f4").astype(np.float32, copy=False)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: 2 bytes per element, IEEE half. uint8[N, 2] -> float32[N, 1]."""
    return _f16(blocks)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: 2 bytes per element, the top half of an IEEE single. uint8[N, 2] -> float32[N, 1]."""
    top = blocks.view("<u2").astype(np.uint32)  # [N, 1]
    return (top << 16).view(np.float32)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0, 18 bytes -> 32 weights, w = d * (q - 8) with q in 0..15.

    bytes 0-1   d    fp16 scale
    bytes 2-17  qs   byte j: low nibble = q of element j, high nibble = q of element j+16
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    qs = blocks[:, 2:18]  # [N, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [N, 32], elements 0..15 then 16..31
    return d * (q.astype(np.float32) - np.float32(8))


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1, 20 bytes -> 32 weights, w = d * q + m with q in 0..15.

    bytes 0-1   d    fp16 scale
    bytes 2-3   m    fp16 offset (the block minimum)
    bytes 4-19  qs   byte j: low nibble = q of element j, high nibble = q of element j+16
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    m = _f16(blocks[:, 2:4])  # [N, 1]
    qs = blocks[:, 4:20]  # [N, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [N, 32]
    return d * q.astype(np.float32) + m


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0, 34 bytes -> 32 weights, w = d * q with q an int8.

    bytes 0-1   d    fp16 scale
    bytes 2-33  qs   int8 q of elements 0..31 in order
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    q = blocks[:, 2:34].view(np.int8)  # [N, 32]
    return d * q.astype(np.float32)


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 codes 0..31: uint8[N, 4] fifth bits (bit e of the little-endian 32-bit word is
    element e's) and uint8[N, 16] nibbles (as Q4_0) -> uint8[N, 32]."""
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [N, 32]
    high = np.unpackbits(qh, axis=1, bitorder="little")  # [N, 32], element order
    return low | (high << 4)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0, 22 bytes -> 32 weights, w = d * (q - 16) with q in 0..31.

    bytes 0-1   d    fp16 scale
    bytes 2-5   qh   the fifth bit of each q: bit e of this little-endian word is element e's
    bytes 6-21  qs   low 4 bits, nibble order as in Q4_0
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    q = _q5_codes(blocks[:, 2:6], blocks[:, 6:22]).astype(np.int8) - np.int8(16)  # [N, 32]
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1, 24 bytes -> 32 weights, w = d * q + m with q in 0..31.

    bytes 0-1   d    fp16 scale
    bytes 2-3   m    fp16 offset
    bytes 4-7   qh   fifth bits, as in Q5_0
    bytes 8-23  qs   low 4 bits, nibble order as in Q4_0
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    m = _f16(blocks[:, 2:4])  # [N, 1]
    q = _q5_codes(blocks[:, 4:8], blocks[:, 8:24])  # [N, 32]
    return d * q.astype(np.float32) + m


# IQ4_NL's 16 levels (ggml kvalues_iq4nl): a non-linear 4-bit grid, denser near zero.
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
IQ4_NL_VALUES.flags.writeable = False


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """IQ4_NL, 18 bytes -> 32 weights, w = d * IQ4_NL_VALUES[q] with q in 0..15.

    bytes 0-1   d    fp16 scale
    bytes 2-17  qs   nibble order as in Q4_0 (byte j: element j low, element j+16 high)
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    qs = blocks[:, 2:18]  # [N, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [N, 32]
    return d * IQ4_NL_VALUES[q].astype(np.float32)


def iq4_xs_scales(scales_h: np.ndarray, scales_l: np.ndarray) -> np.ndarray:
    """IQ4_XS sub-block scales: uint8[N, 2] high bits and uint8[N, 4] low nibbles -> int8[N, 8]
    in -32..31. Sub-block s: low 4 bits = nibble s of scales_l (low nibble first), high 2 bits
    = bits 2s..2s+1 of the little-endian 16-bit scales_h."""
    low = np.stack([scales_l & 0x0F, scales_l >> 4], axis=2).reshape(-1, 8)  # [N, 8]
    high = np.unpackbits(scales_h, axis=1, bitorder="little").reshape(-1, 8, 2)  # [N, 8, 2]
    high = high[..., 0] | (high[..., 1] << 1)  # [N, 8]
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS, 136 bytes -> 256 weights in 8 sub-blocks of 32, w = d * sc[s] * IQ4_NL_VALUES[q].

    bytes 0-1     d         fp16 super-block scale
    bytes 2-3     scales_h  high 2 bits of the 8 six-bit sub-block scales (see iq4_xs_scales)
    bytes 4-7     scales_l  low 4 bits of the scales, two per byte
    bytes 8-135   qs        16 bytes per sub-block, nibble order as in Q4_0
    """
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])  # [N, 1]
    sc = iq4_xs_scales(blocks[:, 2:4], blocks[:, 4:8]).astype(np.float32)  # [N, 8]
    qs = blocks[:, 8:136].reshape(n, 8, 16)  # [N, sub-block, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [N, 8, 32]
    scale = (d * sc)[:, :, None]  # [N, 8, 1]
    return (scale * IQ4_NL_VALUES[q].astype(np.float32)).reshape(n, QK_K)


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low 2 bits: uint8[N, 64] -> uint8[N, 256]. Two halves of 128; in half h,
    element 128h + 32j + l (j = 0..3, l = 0..31) is bits 2j..2j+1 of byte 32h + l."""
    n = qs.shape[0]
    shift = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]  # [1, 1, j, 1]
    return ((qs.reshape(n, 2, 1, 32) >> shift) & 3).reshape(n, QK_K)


def dequantize_q2_K(blocks: np.ndarray) -> np.ndarray:
    """Q2_K, 84 bytes -> 256 weights in 16 sub-blocks of 16, w = d*sc[s] * q - dmin*mn[s].

    bytes 0-15   scales  byte s: low nibble sc[s], high nibble mn[s] (4 bits each)
    bytes 16-79  qs      2-bit q in 0..3 (see _two_bit_codes)
    bytes 80-81  d       fp16 scale of the sub-block scales
    bytes 82-83  dmin    fp16 scale of the sub-block mins
    """
    n = blocks.shape[0]
    scales = blocks[:, 0:16]  # [N, 16]
    q = _two_bit_codes(blocks[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    d = _f16(blocks[:, 80:82])  # [N, 1]
    dmin = _f16(blocks[:, 82:84])  # [N, 1]
    scale = (d * (scales & 0x0F).astype(np.float32))[:, :, None]  # [N, 16, 1]
    offset = (dmin * (scales >> 4).astype(np.float32))[:, :, None]  # [N, 16, 1]
    return (scale * q - offset).reshape(n, QK_K)


def q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K sub-block scales: uint8[N, 12] -> int8[N, 16] in -32..31. Scale s: low 4 bits =
    nibble s // 8 of byte s % 8, high 2 bits = bits 2(s // 4).. of byte 8 + s % 4."""
    low = np.stack([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1).reshape(-1, 16)
    shift = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]  # [1, s // 4, 1]
    high = ((packed[:, None, 8:12] >> shift) & 3).reshape(-1, 16)  # [N, 16]
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def dequantize_q3_K(blocks: np.ndarray) -> np.ndarray:
    """Q3_K, 110 bytes -> 256 weights in 16 sub-blocks of 16, w = d * sc[s] * q, q in -4..3.

    bytes 0-31    hmask   bit b of byte l belongs to element 32b + l; q = low - 4 where it
                          is 0 and q = low where it is 1
    bytes 32-95   qs      low 2 bits (see _two_bit_codes)
    bytes 96-107  scales  16 six-bit scales (see q3_k_scales)
    bytes 108-109 d       fp16 super-block scale
    """
    n = blocks.shape[0]
    high = np.unpackbits(blocks[:, 0:32, None], axis=2, bitorder="little")  # [N, l, b]
    high = high.transpose(0, 2, 1).reshape(n, QK_K)  # element 32b + l
    q = _two_bit_codes(blocks[:, 32:96]).astype(np.int8) - (4 * (1 - high)).astype(np.int8)
    sc = q3_k_scales(blocks[:, 96:108]).astype(np.float32)  # [N, 16]
    d = _f16(blocks[:, 108:110])  # [N, 1]
    scale = (d * sc)[:, :, None]  # [N, 16, 1]
    return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def dequantize_q4_K(blocks: np.ndarray) -> np.ndarray:
    """Q4_K, 144 bytes -> 256 weights in 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s].

    bytes 0-1     d       fp16 scale of the sub-block scales
    bytes 2-3     dmin    fp16 scale of the sub-block mins
    bytes 4-15    scales  8 six-bit scales sc + 8 six-bit mins mn (see k_scales_mins)
    bytes 16-143  qs      4 chunks of 32 bytes; chunk c, byte l: low nibble = element 64c+l
                          (sub-block 2c), high nibble = element 64c+32+l (sub-block 2c+1)
    """
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])  # [N, 1]
    dmin = _f16(blocks[:, 2:4])  # [N, 1]
    sc, mn = k_scales_mins(blocks[:, 4:16])  # [N, 8] each
    qs = blocks[:, 16:144].reshape(n, 4, 1, 32)  # [N, chunk, 1, 32]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [N, chunk, low/high, 32]
    q = q.reshape(n, 8, 32).astype(np.float32)  # [N, sub-block, 32]
    scale = (d * sc)[:, :, None]  # [N, 8, 1]
    offset = (dmin * mn)[:, :, None]  # [N, 8, 1]
    return (scale * q - offset).reshape(n, QK_K)


def dequantize_q5_K(blocks: np.ndarray) -> np.ndarray:
    """Q5_K, 176 bytes -> 256 weights; Q4_K plus a fifth bit: q = nibble + 16 * high bit.

    bytes 0-1     d       fp16 scale of the sub-block scales
    bytes 2-3     dmin    fp16 scale of the sub-block mins
    bytes 4-15    scales  as in Q4_K
    bytes 16-47   qh      byte l, bit s: fifth bit of element 32s+l
    bytes 48-175  qs      low 4 bits, nibble order as in Q4_K
    """
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])  # [N, 1]
    dmin = _f16(blocks[:, 2:4])  # [N, 1]
    sc, mn = k_scales_mins(blocks[:, 4:16])  # [N, 8] each
    qh = blocks[:, 16:48]  # [N, 32]
    qs = blocks[:, 48:176].reshape(n, 4, 1, 32)  # [N, chunk, 1, 32]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # [N, sub-block, 32]
    bit = np.arange(8, dtype=np.uint8)[None, :, None]  # [1, sub-block, 1]
    high = (qh[:, None, :] >> bit) & 1  # [N, sub-block, 32]
    q = (low | (high << 4)).astype(np.float32)  # [N, 8, 32], values 0..31
    scale = (d * sc)[:, :, None]  # [N, 8, 1]
    offset = (dmin * mn)[:, :, None]  # [N, 8, 1]
    return (scale * q - offset).reshape(n, QK_K)


def dequantize_q6_K(blocks: np.ndarray) -> np.ndarray:
    """Q6_K, 210 bytes -> 256 weights in 16 sub-blocks of 16, w = d * sc[e // 16] * (q - 32).

    The 256 elements form two halves of 128; in half h, element 128h + 32k + l (k=0..3,
    l=0..31) takes its 6 bits from:
    bytes 0-127    ql      64 bytes per half: k=0 low nibble of ql[l], k=1 low nibble of
                           ql[32+l], k=2 high nibble of ql[l], k=3 high nibble of ql[32+l]
    bytes 128-191  qh      32 bytes per half: bits 2k..2k+1 of qh[l] are bits 4-5 of q
    bytes 192-207  scales  16 int8 sub-block scales sc
    bytes 208-209  d       fp16 super-block scale (stored last, unlike Q4_K/Q5_K)
    """
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # [N, half, first/second 32 bytes, 32]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # [N, half, 1, 32]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # [N, 16]
    d = _f16(blocks[:, 208:210])  # [N, 1]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [N, half, k, 32], k = 0..3
    shift = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]  # [1, 1, k, 1]
    high = (qh >> shift) & 3  # [N, half, k, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [N, half, k, 32], values -32..31
    q = q.reshape(n, 16, 16).astype(np.float32)  # [N, sub-block, 16]
    scale = (d * sc)[:, :, None]  # [N, 16, 1]
    return (scale * q).reshape(n, QK_K)


def dequantize_q8_1(blocks: np.ndarray) -> np.ndarray:
    """Q8_1 (activations), 36 bytes -> 32 values, x = d * q.

    bytes 0-1   d    fp16 scale
    bytes 2-3   s    fp16 of d * sum(q), with the float32 d (ggml quantize_row_q8_1_ref)
    bytes 4-35  qs   int8 q of elements 0..31 in order
    """
    d = _f16(blocks[:, 0:2])  # [N, 1]
    q = blocks[:, 4:36].view(np.int8)  # [N, 32]
    return d * q.astype(np.float32)


def dequantize_q8_K(blocks: np.ndarray) -> np.ndarray:
    """Q8_K (activations), 292 bytes -> 256 values, x = d * q.

    bytes 0-3     d      float32 scale (not fp16)
    bytes 4-259   qs     int8 q of elements 0..255 in order
    bytes 260-291 bsums  16 int16: bsums[g] = sum of q[16g : 16g+16]
    """
    d = blocks[:, 0:4].view("<f4").astype(np.float32)  # [N, 1]
    q = blocks[:, 4:260].view(np.int8)  # [N, 256]
    return d * q.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class QuantType:
    """One tensor format: how many elements a block holds and how to decode it."""

    qtype: GGMLQuantizationType  # the type id stored in the GGUF tensor info
    block_size: int  # elements per block (1 for plain floats)
    bytes_per_block: int  # bytes per encoded block
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]  # uint8[N, BB] -> float32[N, QK]
    formula: str  # what one element decodes to, for messages and docs

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / self.block_size


def _table(*rows: QuantType) -> Mapping[GGMLQuantizationType, QuantType]:
    return MappingProxyType({row.qtype: row for row in rows})


_T = GGMLQuantizationType

# Types a model file may store. Columns: type, elements per block, bytes per block written
# out field by field (in storage order), decoder, formula of one element.
QUANT_TYPES: Mapping[GGMLQuantizationType, QuantType] = _table(
    QuantType(_T.F32, 1, 4, dequantize_f32, "x"),
    QuantType(_T.F16, 1, 2, dequantize_f16, "x"),
    QuantType(_T.BF16, 1, 2, dequantize_bf16, "x"),
    QuantType(_T.Q4_0, QK, 2 + QK // 2, dequantize_q4_0, "d * (q - 8)"),
    QuantType(_T.Q4_1, QK, 2 + 2 + QK // 2, dequantize_q4_1, "d * q + m"),
    QuantType(_T.Q8_0, QK, 2 + QK, dequantize_q8_0, "d * q"),
    QuantType(_T.Q5_0, QK, 2 + 4 + QK // 2, dequantize_q5_0, "d * (q - 16)"),
    QuantType(_T.Q5_1, QK, 2 + 2 + 4 + QK // 2, dequantize_q5_1, "d * q + m"),
    QuantType(_T.IQ4_NL, QK, 2 + QK // 2, dequantize_iq4_nl, "d * IQ4_NL_VALUES[q]"),
    QuantType(_T.Q2_K, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2, dequantize_q2_K,
              "d * sc[s] * q - dmin * mn[s]"),
    QuantType(_T.Q3_K, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2, dequantize_q3_K,
              "d * sc[s] * q"),
    QuantType(_T.Q4_K, QK_K, 2 + 2 + K_SCALE_BYTES + QK_K // 2, dequantize_q4_K,
              "d * sc[s] * q - dmin * mn[s]"),
    QuantType(_T.Q5_K, QK_K, 2 + 2 + K_SCALE_BYTES + QK_K // 8 + QK_K // 2, dequantize_q5_K,
              "d * sc[s] * q - dmin * mn[s]"),
    QuantType(_T.Q6_K, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, dequantize_q6_K,
              "d * sc[s] * (q - 32)"),
    QuantType(_T.IQ4_XS, QK_K, 2 + 2 + QK_K // 64 + QK_K // 2, dequantize_iq4_xs,
              "d * sc[s] * IQ4_NL_VALUES[q]"),
)

# Formats ggml quantizes activations to before an integer dot product; never in model files.
# (gguf-py's GGML_QUANT_SIZES still lists Q8_1 at 40 bytes, from when d and s were float32.)
ACTIVATION_TYPES: Mapping[GGMLQuantizationType, QuantType] = _table(
    QuantType(_T.Q8_1, QK, 2 + 2 + QK, dequantize_q8_1, "d * q"),
    QuantType(_T.Q8_K, QK_K, 4 + QK_K + 2 * (QK_K // 16), dequantize_q8_K, "d * q"),
)


def _type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"unknown type id {int(qtype)}"


def quant_type(qtype: int, tensor: str | None = None) -> QuantType:
    """The table row of a model-file type; UnsupportedQuantError names it and lists the others."""
    if qtype not in QUANT_TYPES:
        where = f"tensor '{tensor}' is stored as" if tensor else "tensor type"
        supported = ", ".join(t.name for t in QUANT_TYPES)
        raise UnsupportedQuantError(
            f"{where} {_type_name(qtype)}, which edgelora_np cannot read; "
            f"supported types: {supported}"
        )
    return QUANT_TYPES[qtype]


def row_bytes(qtype: int, n_cols: int) -> int:
    """Bytes one row of n_cols elements takes in this format (file or activation type)."""
    qt = ACTIVATION_TYPES[qtype] if qtype in ACTIVATION_TYPES else quant_type(qtype)
    if n_cols % qt.block_size != 0:
        raise GGUFFormatError(
            f"a {qt.name} row holds whole blocks of {qt.block_size} elements; "
            f"{n_cols} columns is not a multiple of {qt.block_size}"
        )
    return n_cols // qt.block_size * qt.bytes_per_block


def check_tensor_bytes(name: str, qtype: int, shape: Sequence[int], n_bytes: int) -> int:
    """Check a tensor's stored byte count against its logical shape; returns the byte count.

    `shape` is in NumPy order, the last axis contiguous (rows, cols) -- GGUF's ne reversed.
    """
    qt = quant_type(qtype, tensor=name)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    if n_cols % qt.block_size != 0:
        raise GGUFFormatError(
            f"tensor '{name}': {qt.name} rows hold whole blocks of {qt.block_size} elements, "
            f"but shape {shape} has {n_cols} columns"
        )
    n_rows = math.prod(shape[:-1])
    expected = n_rows * row_bytes(qt.qtype, n_cols)
    if n_bytes != expected:
        raise GGUFFormatError(
            f"tensor '{name}': {qt.name} shape {shape} needs {expected} bytes, found {n_bytes}"
        )
    return expected


def _as_bytes(raw: np.ndarray) -> np.ndarray:
    """Any array as gguf.GGUFReader exposes it (typed or uint8, any shape) -> flat uint8 view."""
    arr = np.asarray(raw)
    if arr.dtype.byteorder == ">":  # a big-endian typed view: bring it to file order
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def dequantize(
    raw: np.ndarray, qtype: int, shape: Sequence[int], *, name: str = "<unnamed>"
) -> np.ndarray:
    """Decode a whole tensor: raw bytes (uint8 or typed) -> float32 of the logical `shape`.

    `raw` is what gguf.GGUFReader gives: uint8[rows, row_bytes] for block types, the typed
    float32/float16 array for F32/F16, uint8 or uint16 for BF16. `shape` is (rows, cols)
    or (cols,), NumPy order. `name` only goes into error messages.
    """
    qt = quant_type(qtype, tensor=name)
    shape = tuple(int(s) for s in shape)
    data = _as_bytes(raw)  # [n_bytes]
    check_tensor_bytes(name, qt.qtype, shape, data.size)
    blocks = data.reshape(-1, qt.bytes_per_block)  # [N, BB]
    out = np.empty((blocks.shape[0], qt.block_size), dtype=np.float32)  # [N, QK]
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        stop = start + _BLOCKS_PER_CHUNK
        out[start:stop] = qt.dequantize_blocks(blocks[start:stop])
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# Lookup tables for the Numba kernels


@functools.cache
def f16_to_f32_table() -> np.ndarray:
    """float32[65536]: entry b is the value of the fp16 with bit pattern b (read-only)."""
    table = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    table.setflags(write=False)
    return table


@functools.cache
def bf16_to_f32_table() -> np.ndarray:
    """float32[65536]: entry b is the value of the bf16 with bit pattern b (read-only)."""
    table = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    table.setflags(write=False)
    return table


# --------------------------------------------------------------------------------------------
# Reference quantizers for activations (ggml quantize_row_q8_{0,1,K}_ref)


def _split_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """float[..., n] -> float32[..., n / block_size, block_size]."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or n % block_size != 0:
        raise ValueError(
            f"quantizing needs rows of a multiple of {block_size} values, got shape {x.shape}"
        )
    return x.reshape(*x.shape[:-1], n // block_size, block_size)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: nearest integer, ties away from zero (np.rint would send ties to even).

    Not trunc(v + 0.5): in float32, 0.49999997 + 0.5 rounds up to 1.
    """
    a = np.abs(v)
    whole = np.floor(a)
    up = (a - whole) >= np.float32(0.5)  # a - floor(a) is exact in float32
    return np.copysign(whole + up.astype(np.float32), v)


def _zero_if_not_finite(scaled: np.ndarray) -> np.ndarray:
    """A block whose largest magnitude is below ~4e-37 overflows its inverse scale to inf.

    ggml then rounds inf or NaN; built for x86 that comes out as q = 0 (and gguf-py agrees),
    so the reference says so explicitly instead of casting inf to int8.
    """
    return np.where(np.isfinite(scaled), scaled, np.float32(0))


def _scale_and_round(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Q8_0/Q8_1 recipe: d = amax / 127, q = roundf(x * (1 / d)).

    float32[..., nb, 32] -> (d float32[..., nb, 1], q int8[..., nb, 32]).
    """
    amax = np.abs(xb).max(axis=-1, keepdims=True)  # [..., nb, 1]
    d = amax / np.float32(127)
    with np.errstate(over="ignore", invalid="ignore"):
        inv_d = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        scaled = _zero_if_not_finite(xb * inv_d)  # [..., nb, 32]
    q = _round_half_away(scaled).astype(np.int8)  # [..., nb, 32]
    return d, q


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32[..., 1] -> uint8[..., 2], round to nearest even like GGML_FP32_TO_FP16."""
    return v.astype("<f2").view(np.uint8)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32[..., n] -> uint8[..., n/32, 34] Q8_0 blocks: fp16 d, int8 q[32]."""
    xb = _split_blocks(x, QK)  # [..., nb, 32]
    d, q = _scale_and_round(xb)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=-1)


def quantize_q8_1(x: np.ndarray) -> np.ndarray:
    """float32[..., n] -> uint8[..., n/32, 36] Q8_1 blocks: fp16 d, fp16 s, int8 q[32].

    d and q are exactly Q8_0's; s = fp16(d * sum(q)) with the float32 d, before rounding to
    fp16. A Q4_1 dot product uses s to fold in the weight offset m: sum((dw*qw + m) * dx*qx)
    = dw*dx * sum(qw*qx) + m * s.
    """
    xb = _split_blocks(x, QK)  # [..., nb, 32]
    d, q = _scale_and_round(xb)
    q_sum = q.astype(np.int32).sum(axis=-1, keepdims=True)  # [..., nb, 1], exact
    s = q_sum.astype(np.float32) * d  # [..., nb, 1]
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(s), q.view(np.uint8)], axis=-1)


def quantize_q8_K(x: np.ndarray) -> np.ndarray:
    """float32[..., n] -> uint8[..., n/256, 292] Q8_K blocks: f32 d, int8 q[256], int16 bsums[16].

    Unlike Q8_0, the scale comes from the *signed* element of largest magnitude (the first
    one on ties): iscale = -127 / max, q = nearest_int(iscale * x) (ties to even), d = 1 / iscale.
    So d has the opposite sign of that element, and that element's q is -127.
    """
    xb = _split_blocks(x, QK_K)  # [..., nb, 256]
    first_largest = np.argmax(np.abs(xb), axis=-1)[..., None]  # [..., nb, 1]
    peak = np.take_along_axis(xb, first_largest, axis=-1)  # [..., nb, 1], signed
    nonzero = peak != 0
    with np.errstate(over="ignore", invalid="ignore"):
        iscale = np.divide(np.float32(-127), peak, out=np.zeros_like(peak), where=nonzero)
        scaled = _zero_if_not_finite(iscale * xb)  # [..., nb, 256]
    q = np.minimum(np.rint(scaled), np.float32(127)).astype(np.int8)  # [..., nb, 256]
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=nonzero)
    groups = q.reshape(*q.shape[:-1], QK_K // 16, 16).astype(np.int32)  # [..., nb, 16, 16]
    bsums = groups.sum(axis=-1).astype("<i2")  # [..., nb, 16]
    return np.concatenate(
        [d.astype("<f4").view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=-1
    )
