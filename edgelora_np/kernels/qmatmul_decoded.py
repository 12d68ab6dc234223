"""Matmul kernels for the types whose codes are decoded per block before the integer dot product:
Q5_0, Q5_1 and IQ4_NL (32-blocks), Q2_K, Q3_K and IQ4_XS (256-blocks).

    y [B, N] = x [B, K] @ W[N, K].T

Rows are tiled as in kernels/qmatmul.py (T rows interleaved, the inner loop over them). For one
block of one tile, the kernel first turns the stored bits into the block's small signed integer
weights, w [bs, T] int16 (shifts, masks and, for the IQ4 types, a 16-entry table lookup: ggml's
kvalues_iq4nl), then every token of the chunk takes its exact integer dot product with them. The
decode is paid once per block and tile and shared by the batch; weights stay at file size in
memory and are never widened to float.

Packed layouts, G = ceil(N / T) tiles, sub-blocks of bs elements:
    q5     (Q5_0, Q5_1; bs 32)
           qs [G, K/32, 16, T] uint8   low 4 bits, byte j: element j low, element j+16 high
           qh [G, K/32, 4, T] uint8    fifth bits: byte e // 8, bit e % 8 is element e's
           d, m [G, K/32, T]           fp16 bits; Q5_0: w = d * (q - 16) (m absent),
                                       Q5_1: w = d * q + m
    iq4nl  (IQ4_NL; bs 32)   qs as q5, d;  w = d * IQ4_NL_VALUES[q]
    k2     (Q2_K; bs 16)
           qs [G, K/16, 4, T] uint8    2-bit codes: element j at bits 2*(j // 4) of byte j % 4
           sc [G, K/16, T] uint8       the file's scale byte: sub-block scale in the low nibble,
                                       sub-block min in the high nibble
           d, m [G, K/256, T]          d and dmin;  w = d * (sc & 15) * q - dmin * (sc >> 4)
    k3     (Q3_K; bs 16)
           qs as k2                    low 2 bits of q + 4
           qh [G, K/16, 2, T] uint8    third bits: byte j // 8, bit j % 8 is element j's
           sc [G, K/16, T] int8        signed scales (-32..31)
           d [G, K/256, T];            w = d * sc * q, q = (low | third bit << 2) - 4
    iq4xs  (IQ4_XS; bs 32)   qs as q5, sc [G, K/32, T] int8 (-32..31), d [G, K/256, T];
                             w = d * sc * IQ4_NL_VALUES[q]

Arithmetic follows ggml's vec_dot for each type: 32-block types against q8_0 (Q5_0, IQ4_NL) or
q8_1 (Q5_1) activations, d_w * xd * sum_j(w[j] * xq[j]) (+ m_w * xs); 256-block types against
q8_K, d_w * xd * sum_s(sc[s] * isum[s]) (- dmin_w * xd * sum_s(mn[s] * bsum[s]) for Q2_K).
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import f16_to_f32

TOKEN_CHUNK = 16          # tokens that share one decoded block (bounds the [BT, T] sums)

# The `kind` codes of matmul_k_decoded.
KIND_K2, KIND_K3, KIND_IQ4XS = 2, 3, 4


@njit(inline="always")
def _decode_nibbles(qs_blk, qh_blk, table, zero, w):
    """One 32-block of a tile -> w [32, T]: q5 (qh with 4 bytes) or iq4nl (qh empty, table)."""
    T = w.shape[1]
    has_h = qh_blk.shape[0] > 0
    for j in range(16):
        qrow = qs_blk[j]
        if has_h:
            hlo, slo = qh_blk[j >> 3], j & 7                  # element j's fifth bit
            hhi, shi = qh_blk[(j + 16) >> 3], j & 7           # element j + 16's
            for t in range(T):
                q = np.int16(qrow[t])
                w[j, t] = ((q & 15) | (np.int16((hlo[t] >> slo) & 1) << 4)) - zero
                w[j + 16, t] = ((q >> 4) | (np.int16((hhi[t] >> shi) & 1) << 4)) - zero
        else:
            for t in range(T):
                q = qrow[t]
                w[j, t] = table[q & 15]
                w[j + 16, t] = table[q >> 4]


@njit(inline="always")
def _dot_block(w, xq, b0, nbt, o, isum):
    """isum[bb, t] = sum_j w[j, t] * xq[b0 + bb, o + j] for the nbt tokens, exactly."""
    bs, T = w.shape
    for bb in range(nbt):
        row = isum[bb]
        row[:] = 0
        for j in range(bs):
            x = np.int32(xq[b0 + bb, o + j])
            wrow = w[j]
            for t in range(T):
                row[t] += np.int32(wrow[t]) * x


@njit(parallel=True, cache=True)
def matmul_b32_decoded(qs, qh, d, m, table, xq, xd, xs, out):
    """out [B, N] for a q5 or iq4nl W. q5: `table` is empty, `m` has a zero-length block axis
    for Q5_0 (w = d * (q - 16)); iq4nl: `qh` has a zero-length byte axis, `table` the levels."""
    G, nb, _, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    has_m = m.shape[1] > 0
    zero = np.int16(16) if qh.shape[2] > 0 and not has_m else np.int16(0)
    accs = np.empty((G, TOKEN_CHUNK, T), np.float32)
    isums = np.empty((G, TOKEN_CHUNK, T), np.int32)
    ws = np.empty((G, 32, T), np.int16)
    dws = np.empty((G, T), np.float32)
    mws = np.zeros((G, T), np.float32)
    for g in prange(G):
        acc, isum, w, dw, mw = accs[g], isums[g], ws[g], dws[g], mws[g]
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for ib in range(nb):
                _decode_nibbles(qs[g, ib], qh[g, ib], table, zero, w)
                _dot_block(w, xq, b0, nbt, ib * 32, isum)
                for t in range(T):
                    dw[t] = f16_to_f32(d[g, ib, t])
                if has_m:
                    for t in range(T):
                        mw[t] = f16_to_f32(m[g, ib, t])
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
def _decode_sub_block(kind, qs_blk, qh_blk, table, w):
    """One sub-block of a tile -> w [bs, T] signed weights without scales (layouts above)."""
    T = w.shape[1]
    if kind == KIND_IQ4XS:
        for j in range(16):
            qrow = qs_blk[j]
            for t in range(T):
                q = qrow[t]
                w[j, t] = table[q & 15]
                w[j + 16, t] = table[q >> 4]
        return
    for j in range(16):
        qrow = qs_blk[j & 3]
        shift = 2 * (j >> 2)
        if kind == KIND_K2:
            for t in range(T):
                w[j, t] = np.int16((qrow[t] >> shift) & 3)
        else:
            hrow, hshift = qh_blk[j >> 3], j & 7
            for t in range(T):
                w[j, t] = np.int16(((qrow[t] >> shift) & 3) | (((hrow[t] >> hshift) & 1) << 2)) - 4


@njit(parallel=True, cache=True)
def matmul_k_decoded(kind, qs, qh, sc, d, dmin, table, xq, xd, bsums, out):
    """out [B, N] for a k2, k3 or iq4xs W (`kind` one of KIND_*), against q8_K activations
    xq [B, K] int8, xd [B, K/256] float32, bsums [B, K/16] int32. Fields a kind lacks are
    passed with a zero-length axis."""
    G, nsub, _, T = qs.shape
    bs = 32 if kind == KIND_IQ4XS else 16
    per_super = 256 // bs
    B = xq.shape[0]
    N = out.shape[1]
    accs = np.empty((G, TOKEN_CHUNK, T), np.float32)
    isums = np.empty((G, TOKEN_CHUNK, T), np.int32)
    itots = np.empty((G, TOKEN_CHUNK, T), np.int32)
    imins = np.zeros((G, TOKEN_CHUNK, T), np.int32)
    ws = np.empty((G, bs, T), np.int16)
    scs = np.empty((G, 2, T), np.int32)
    dws = np.empty((G, 2, T), np.float32)
    for g in prange(G):
        acc, isum, itot, imin, w = accs[g], isums[g], itots[g], imins[g], ws[g]
        s, mn = scs[g, 0], scs[g, 1]                # the sub-block's scale and (Q2_K) min
        dw, mw = dws[g, 0], dws[g, 1]               # the super-block's d and (Q2_K) dmin
        for b0 in range(0, B, TOKEN_CHUNK):
            nbt = min(TOKEN_CHUNK, B - b0)
            acc[:nbt] = 0.0
            for isb in range(nsub // per_super):
                itot[:nbt] = 0
                for ib in range(isb * per_super, (isb + 1) * per_super):
                    _decode_sub_block(kind, qs[g, ib], qh[g, ib], table, w)
                    _dot_block(w, xq, b0, nbt, ib * bs, isum)
                    if kind == KIND_K2:
                        for t in range(T):
                            s[t] = np.int32(sc[g, ib, t] & 15)
                            mn[t] = np.int32(sc[g, ib, t] >> 4)
                        for bb in range(nbt):
                            bsum = bsums[b0 + bb, ib]
                            tot, mins, row = itot[bb], imin[bb], isum[bb]
                            if ib == isb * per_super:
                                mins[:] = 0
                            for t in range(T):
                                tot[t] += s[t] * row[t]
                                mins[t] += mn[t] * bsum
                    else:
                        for t in range(T):
                            s[t] = np.int32(np.int8(sc[g, ib, t]))
                        for bb in range(nbt):
                            tot, row = itot[bb], isum[bb]
                            for t in range(T):
                                tot[t] += s[t] * row[t]
                for t in range(T):
                    dw[t] = f16_to_f32(d[g, isb, t])
                if kind == KIND_K2:
                    for t in range(T):
                        mw[t] = f16_to_f32(dmin[g, isb, t])
                    for bb in range(nbt):
                        dx = xd[b0 + bb, isb]
                        arow, tot, mins = acc[bb], itot[bb], imin[bb]
                        for t in range(T):
                            arow[t] += dw[t] * dx * np.float32(tot[t]) \
                                - mw[t] * dx * np.float32(mins[t])
                else:
                    for bb in range(nbt):
                        dx = xd[b0 + bb, isb]
                        arow, tot = acc[bb], itot[bb]
                        for t in range(T):
                            arow[t] += dw[t] * dx * np.float32(tot[t])
            rows = min(T, N - g * T)
            for bb in range(nbt):
                out[b0 + bb, g * T:g * T + rows] = acc[bb, :rows]
