"""Matmul of float activations against quantized weights, without dequantizing the weights.

    y [B, N] = x [B, K] @ W[N, K].T

Weights are repacked at load time (see kernels/pack.py) into row *tiles*: T consecutive output
rows stored interleaved, so that for a fixed input position k the T weights of a tile are
contiguous in memory. The innermost loop of every kernel then runs over those T rows: a long,
flat, dependency-free loop that LLVM vectorizes on any SIMD width (AVX-512, AVX2, NEON).
(Short loops over a 32-element block with a horizontal sum do not vectorize in Numba; this
"vertical" layout plays the role of llama.cpp's hand-written SIMD and of its ARM repacking.)

Packed layouts, with G = ceil(N / T) tiles (rows past N are zero padding):
    q4   qs [G, K/32, 16, T] uint8   byte j of a 32-block holds element j (low nibble) and
                                     element j+16 (high nibble), value q in 0..15
         d, m [G, K/32, T]           w = d * q + m      (fp16 bits as uint16, or float32)
    q8   qs [G, K/bs, bs, T] int8    value q, block size bs = 32 (or 16 for Q6_K)
         d [G, K/bs, T], m likewise or with a zero-length block axis when absent
    f16 / bf16 / f32  w [G, K, T]    raw 16-bit patterns (uint16) or float32

Arithmetic per block (ggml's vec_dot, e.g. ggml_vec_dot_q4_1_q8_1): with activations quantized
to xq, xd, xs (kernels/actquant.py) the block contributes
    d_w * xd * sum_j(q_w[j] * xq[j])  +  m_w * xs
with the integer sum exact. Each output element accumulates its blocks in the same order
whatever the batch size, so a token's result does not depend on which other tokens share the
batch: batches are bit-for-bit invariant.
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import bf16_to_f32, f16_to_f32, scale_f32

# Tokens processed together against one tile: bounds the [BT, T] accumulators to L1/L2.
TOKEN_CHUNK = 16


@njit(parallel=True, cache=True)
def matmul_q4(qs, d, m, xq, xd, xs, out):
    """out [B, N] = dequant(x) @ dequant(W).T for a q4-packed W (see module docstring)."""
    G, nb, half, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    accs = np.empty((G, TOKEN_CHUNK, T), np.float32)
    isums = np.empty((G, TOKEN_CHUNK, T), np.int32)
    dws = np.empty((G, T), np.float32)
    mws = np.empty((G, T), np.float32)
    for g in prange(G):
        acc = accs[g]
        isum = isums[g]
        dw = dws[g]
        mw = mws[g]
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for ib in range(nb):
                isum[:nbt] = 0
                for j in range(half):
                    qrow = qs[g, ib, j]                                  # [T] uint8
                    for bb in range(nbt):
                        xlo = np.int32(xq[b0 + bb, ib * 32 + j])
                        xhi = np.int32(xq[b0 + bb, ib * 32 + half + j])
                        row = isum[bb]
                        for t in range(T):
                            q = np.int32(qrow[t])
                            row[t] += (q & 15) * xlo + (q >> 4) * xhi
                for t in range(T):
                    dw[t] = scale_f32(d[g, ib, t])
                    mw[t] = scale_f32(m[g, ib, t])
                for bb in range(nbt):
                    dx = xd[b0 + bb, ib]
                    sx = xs[b0 + bb, ib]
                    arow = acc[bb]
                    irow = isum[bb]
                    for t in range(T):
                        arow[t] += dw[t] * dx * np.float32(irow[t]) + mw[t] * sx
            rows = min(T, N - g * T)
            for bb in range(nbt):
                out[b0 + bb, g * T:g * T + rows] = acc[bb, :rows]


@njit(parallel=True, cache=True)
def matmul_q8(qs, d, m, xq, xd, xs, out):
    """out [B, N] for a q8-packed W; `m` may have a zero-length block axis (no offsets)."""
    G, nb, bs, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    has_m = m.shape[1] > 0
    accs = np.empty((G, TOKEN_CHUNK, T), np.float32)
    isums = np.empty((G, TOKEN_CHUNK, T), np.int32)
    dws = np.empty((G, T), np.float32)
    mws = np.zeros((G, T), np.float32)
    for g in prange(G):
        acc = accs[g]
        isum = isums[g]
        dw = dws[g]
        mw = mws[g]
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for ib in range(nb):
                isum[:nbt] = 0
                for j in range(bs):
                    qrow = qs[g, ib, j]                                  # [T] int8
                    for bb in range(nbt):
                        x = np.int32(xq[b0 + bb, ib * bs + j])
                        row = isum[bb]
                        for t in range(T):
                            row[t] += np.int32(qrow[t]) * x
                for t in range(T):
                    dw[t] = scale_f32(d[g, ib, t])
                if has_m:
                    for t in range(T):
                        mw[t] = scale_f32(m[g, ib, t])
                for bb in range(nbt):
                    dx = xd[b0 + bb, ib]
                    sx = xs[b0 + bb, ib]
                    arow = acc[bb]
                    irow = isum[bb]
                    for t in range(T):
                        arow[t] += dw[t] * dx * np.float32(irow[t]) + mw[t] * sx
            rows = min(T, N - g * T)
            for bb in range(nbt):
                out[b0 + bb, g * T:g * T + rows] = acc[bb, :rows]


@njit(inline="always")
def _widen(w, is_bf16):
    if is_bf16:
        return bf16_to_f32(w)
    return f16_to_f32(w)


@njit(parallel=True, cache=True)
def matmul_f16(w, is_bf16, x, out):
    """out [B, N] = x @ W.T for W stored as fp16 or bf16 bits, w [G, K, T] uint16."""
    G, K, T = w.shape
    B = x.shape[0]
    N = out.shape[1]
    for g in prange(G):
        acc = np.empty((TOKEN_CHUNK, T), np.float32)
        wk = np.empty(T, np.float32)
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for k in range(K):
                for t in range(T):
                    wk[t] = _widen(w[g, k, t], is_bf16)
                for bb in range(nbt):
                    xv = x[b0 + bb, k]
                    arow = acc[bb]
                    for t in range(T):
                        arow[t] += xv * wk[t]
            rows = min(T, N - g * T)
            for bb in range(nbt):
                out[b0 + bb, g * T:g * T + rows] = acc[bb, :rows]


@njit(parallel=True, cache=True)
def matmul_f32(w, x, out):
    """out [B, N] = x @ W.T for float32 W, w [G, K, T]."""
    G, K, T = w.shape
    B = x.shape[0]
    N = out.shape[1]
    for g in prange(G):
        acc = np.empty((TOKEN_CHUNK, T), np.float32)
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for k in range(K):
                wk = w[g, k]
                for bb in range(nbt):
                    xv = x[b0 + bb, k]
                    arow = acc[bb]
                    for t in range(T):
                        arow[t] += xv * wk[t]
            rows = min(T, N - g * T)
            for bb in range(nbt):
                out[b0 + bb, g * T:g * T + rows] = acc[bb, :rows]


@njit(cache=True)
def scale_array_f32(s, out):
    """Widen a whole scale array (fp16 bits or float32) to float32; used by the references."""
    flat = s.ravel()
    o = out.ravel()
    for i in range(flat.shape[0]):
        o[i] = scale_f32(flat[i])
