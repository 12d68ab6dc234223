"""Quantizing activations to 8 bit before a quantized matmul, as ggml does.

ggml never multiplies float activations by quantized weights: it first quantizes each row of
activations to the weight type's "vec_dot_type", then takes integer dot products per block.
We do the same, both for speed (int8 x int4 products) and to track llama.cpp's rounding.

q8_0 and q8_1 produce the same three arrays, so that one matmul kernel serves both:
    xq [B, K]      int8     the quantized values
    xd [B, K/32]   float32  per-block scale        x ~= xd * xq
    xs [B, K/32]   float32  per-block scaled sum   xs = xd * sum(xq over the block)

  q8_0  (Q4_0, Q8_0 weights)  32-blocks, d = max|x| / 127 stored as fp16
  q8_1  (Q4_1 weights)        as q8_0, and xs rounded to fp16 (ggml keeps s = d*sum(q) in fp16)

q8_K (for the K-quant weights) is ggml's block_q8_K field for field:
    xq [B, K]      int8     the quantized values
    xd [B, K/256]  float32  per-super-block scale, d = max/-127 (sign of the largest |x|)
    bsums [B, K/16] int32   the sum of xq over each 16 values
ggml rounds x/d to nearest, ties to even, on x86 (`_mm256_round_ps`) and ARM (`vcvtnq`).
"""

import numpy as np
from numba import njit, prange

from edgelora_np.gguf.quants import quantize_q8_K
from edgelora_np.kernels.bits import round_to_f16

QK8 = 32     # block of q8_0 / q8_1
QK_K = 256   # super-block of q8_K


# Rows up to which the quantizers run on the calling thread: starting a parallel region costs
# about 1 us on the 2-core VM, as much as quantizing a 576-wide row, and one-token decode
# quantizes four activation rows per layer (docs/benchmarks.md).
SERIAL_ROWS = 4


@njit(inline="always")
def _q8_row(x, block, round_sum, xq, xd, xs):
    """q8_0 (round_sum False) or q8_1 (True) of one row x [K], into xq [K], xd, xs [K/block]."""
    for ib in range(x.shape[0] // block):
        o = ib * block
        amax = np.float32(0.0)
        for j in range(block):
            amax = max(amax, abs(x[o + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        total = 0
        for j in range(block):
            q = np.int32(np.rint(x[o + j] * inv))
            xq[o + j] = q
            total += q
        d16 = round_to_f16(d)
        xd[ib] = d16
        s = d * np.float32(total)
        xs[ib] = round_to_f16(s) if round_sum else d16 * np.float32(total)


@njit(parallel=True, cache=True)
def quantize_act_q8(x, block, round_sum, xq, xd, xs):
    """q8_0 (round_sum False) or q8_1 (True) for `block`-sized blocks of x [B, K], rows in
    parallel."""
    for b in prange(x.shape[0]):
        _q8_row(x[b], block, round_sum, xq[b], xd[b], xs[b])


@njit(cache=True)
def quantize_act_q8_serial(x, block, round_sum, xq, xd, xs):
    """quantize_act_q8 on the calling thread (for at most SERIAL_ROWS rows)."""
    for b in range(x.shape[0]):
        _q8_row(x[b], block, round_sum, xq[b], xd[b], xs[b])


@njit(inline="always")
def _q8_k_row(x, xq, xd, bsums):
    """q8_K of one row x [K]: one float32 scale per 256 values and the sum of each 16 quantized
    values, into xq [K], xd [K/256], bsums [K/16]."""
    for isb in range(x.shape[0] // QK_K):
        o = isb * QK_K
        vmax = np.float32(0.0)
        amax = np.float32(0.0)
        for j in range(QK_K):
            v = x[o + j]
            if abs(v) > amax:
                amax = abs(v)
                vmax = v
        if amax == 0:
            d = np.float32(0.0)
            for j in range(QK_K):
                xq[o + j] = 0
        else:
            iscale = np.float32(-127.0) / vmax
            d = np.float32(1.0) / iscale
            for j in range(QK_K):
                q = np.int32(np.rint(iscale * x[o + j]))
                xq[o + j] = min(127, q)
        xd[isb] = d
        for g in range(QK_K // 16):
            total = 0
            for j in range(16):
                total += np.int32(xq[o + 16 * g + j])
            bsums[isb * (QK_K // 16) + g] = total


@njit(parallel=True, cache=True)
def quantize_act_q8_k(x, xq, xd, bsums):
    """q8_K of x [B, K], rows in parallel."""
    for b in prange(x.shape[0]):
        _q8_k_row(x[b], xq[b], xd[b], bsums[b])


@njit(cache=True)
def quantize_act_q8_k_serial(x, xq, xd, bsums):
    """quantize_act_q8_k on the calling thread (for at most SERIAL_ROWS rows)."""
    for b in range(x.shape[0]):
        _q8_k_row(x[b], xq[b], xd[b], bsums[b])


def quantize_activations(x: np.ndarray, fmt: str):
    """x [B, K] float32 -> (xq int8 [B, K], xd, xs float32 [B, K/32]), fmt q8_0 or q8_1."""
    B, K = x.shape
    xq = np.empty((B, K), np.int8)
    xd = np.empty((B, K // QK8), np.float32)
    xs = np.empty((B, K // QK8), np.float32)
    kernel = quantize_act_q8_serial if B <= SERIAL_ROWS else quantize_act_q8
    kernel(x, QK8, fmt == "q8_1", xq, xd, xs)
    return xq, xd, xs


def quantize_activations_q8_k(x: np.ndarray):
    """x [B, K] float32 -> (xq int8 [B, K], xd float32 [B, K/256], bsums int32 [B, K/16])."""
    B, K = x.shape
    xq = np.empty((B, K), np.int8)
    xd = np.empty((B, K // QK_K), np.float32)
    bsums = np.empty((B, K // 16), np.int32)
    kernel = quantize_act_q8_k_serial if B <= SERIAL_ROWS else quantize_act_q8_k
    kernel(x, xq, xd, bsums)
    return xq, xd, bsums


# ---------------------------------------------------------------------------------------------
# NumPy reference: the same formats written with whole-array operations.

def quantize_activations_ref(x: np.ndarray, fmt: str):
    B, K = x.shape
    blocks = x.reshape(B, K // QK8, QK8)                                     # [B, K/32, 32]
    amax = np.abs(blocks).max(-1)                                            # [B, K/32]
    d = amax / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, 0).astype(np.float32)
    q = np.rint(blocks * inv[..., None]).astype(np.int8)
    total = q.astype(np.int32).sum(-1).astype(np.float32)
    xd = d.astype(np.float16).astype(np.float32)
    if fmt == "q8_1":
        xs = (d * total).astype(np.float16).astype(np.float32)
    else:
        xs = xd * total
    return q.reshape(B, K), xd, xs.astype(np.float32)


def quantize_activations_q8_k_ref(x: np.ndarray):
    """q8_K through gguf/quants.py's quantize_q8_K (tested against ggml's C loop)."""
    B, K = x.shape
    blocks = quantize_q8_K(x)                                                # [B, K/256, 292]
    xd = np.ascontiguousarray(blocks[..., 0:4]).view("<f4")[..., 0]
    xq = np.ascontiguousarray(blocks[..., 4:260]).view(np.int8).reshape(B, K)
    bsums = np.ascontiguousarray(blocks[..., 260:292]).view("<i2").reshape(B, K // 16)
    return xq, xd.astype(np.float32), bsums.astype(np.int32)
