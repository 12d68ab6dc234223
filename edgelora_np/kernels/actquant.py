"""Quantizing activations to 8 bit before a quantized matmul, as ggml does.

ggml never multiplies float activations by quantized weights: it first quantizes each row of
activations to the weight type's "vec_dot_type", then takes integer dot products per block.
We do the same, both for speed (int8 x int4 products) and to track llama.cpp's rounding.

Every format here produces the same three arrays, so that one matmul kernel serves them all:
    xq [B, K]      int8     the quantized values
    xd [B, K/bs]   float32  per-block scale        x ~= xd * xq
    xs [B, K/bs]   float32  per-block scaled sum   xs = xd * sum(xq over the block)
where bs is the weight format's block size (32, or 16 for Q6_K).

  q8_0  (Q4_0, Q8_0 weights)  32-blocks, d = max|x| / 127 stored as fp16
  q8_1  (Q4_1 weights)        as q8_0, and xs rounded to fp16 (ggml keeps s = d*sum(q) in fp16)
  q8_K  (K-quant weights)     256-blocks, d = max/-127 in float32 (sign of the largest |x|),
                              expanded here to per-bs scales so the kernels stay generic
ggml rounds x/d to nearest, ties to even, on x86 (`_mm256_round_ps`) and ARM (`vcvtnq`).
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import round_to_f16

ACT_FORMATS = ("q8_0", "q8_1", "q8_K")
QK8 = 32     # block of q8_0 / q8_1
QK_K = 256   # super-block of q8_K


@njit(parallel=True, cache=True)
def quantize_act_q8(x, block, round_sum, xq, xd, xs):
    """q8_0 (round_sum False) or q8_1 (True) for `block`-sized blocks of x [B, K]."""
    B, K = x.shape
    nb = K // block
    for b in prange(B):
        for ib in range(nb):
            o = ib * block
            amax = np.float32(0.0)
            for j in range(block):
                amax = max(amax, abs(x[b, o + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            total = 0
            for j in range(block):
                q = np.int32(np.rint(x[b, o + j] * inv))
                xq[b, o + j] = q
                total += q
            d16 = round_to_f16(d)
            xd[b, ib] = d16
            s = d * np.float32(total)
            xs[b, ib] = round_to_f16(s) if round_sum else d16 * np.float32(total)


@njit(parallel=True, cache=True)
def quantize_act_q8_k(x, block, xq, xd, xs):
    """q8_K: one float32 scale per 256 values, expanded to per-`block` xd/xs."""
    B, K = x.shape
    per_super = QK_K // block
    for b in prange(B):
        for isb in range(K // QK_K):
            o = isb * QK_K
            vmax = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(QK_K):
                v = x[b, o + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                d = np.float32(0.0)
                for j in range(QK_K):
                    xq[b, o + j] = 0
            else:
                iscale = np.float32(-127.0) / vmax
                d = np.float32(1.0) / iscale
                for j in range(QK_K):
                    q = np.int32(np.rint(iscale * x[b, o + j]))
                    xq[b, o + j] = min(127, q)
            for sb in range(per_super):
                total = 0
                for j in range(block):
                    total += np.int32(xq[b, o + sb * block + j])
                xd[b, isb * per_super + sb] = d
                xs[b, isb * per_super + sb] = d * np.float32(total)


def quantize_activations(x: np.ndarray, fmt: str, block: int):
    """x [B, K] float32 -> (xq int8 [B, K], xd, xs float32 [B, K/block]) in format `fmt`."""
    B, K = x.shape
    xq = np.empty((B, K), np.int8)
    xd = np.empty((B, K // block), np.float32)
    xs = np.empty((B, K // block), np.float32)
    if fmt == "q8_K":
        quantize_act_q8_k(x, block, xq, xd, xs)
    else:
        quantize_act_q8(x, block, fmt == "q8_1", xq, xd, xs)
    return xq, xd, xs


# ---------------------------------------------------------------------------------------------
# NumPy reference: the same formats written with whole-array operations.

def quantize_activations_ref(x: np.ndarray, fmt: str, block: int):
    B, K = x.shape
    if fmt == "q8_K":
        sup = x.reshape(B, K // QK_K, QK_K)                                  # [B, K/256, 256]
        pick = np.abs(sup).argmax(-1)[..., None]
        vmax = np.take_along_axis(sup, pick, -1)                             # [B, K/256, 1]
        with np.errstate(divide="ignore"):
            iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, 0).astype(np.float32)
        q = np.minimum(np.rint(iscale * sup), 127).astype(np.int8)
        d = np.where(vmax != 0, np.float32(1.0) / np.where(iscale != 0, iscale, 1), 0)
        d = d.astype(np.float32)
        qb = q.reshape(B, K // block, block).astype(np.int32)
        xd = np.repeat(d[..., 0], QK_K // block, axis=1)                     # [B, K/bs]
        xs = xd * qb.sum(-1).astype(np.float32)
        return q.reshape(B, K), xd, xs.astype(np.float32)
    blocks = x.reshape(B, K // block, block)                                 # [B, K/bs, bs]
    amax = np.abs(blocks).max(-1)                                            # [B, K/bs]
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
