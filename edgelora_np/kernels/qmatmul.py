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
         d, m [G, K/32, T]           w = d * q + m      (fp16 bits as uint16); Q4_0 has no
                                     m (a zero-length block axis): w = d * (q - 8)
    q8   qs [G, K/32, 32, T] int8    value q
         d [G, K/32, T], m likewise or with a zero-length block axis when absent
    k4, k5, k6 (Q4_K, Q5_K, Q6_K): sub-blocks of bs = 32 (k4, k5) or 16 (k6), eight or
         sixteen to a 256-element super-block
         qs [G, K/bs, bs/2, T] uint8 the low 4 bits of the codes, byte j pairing element j (low
                                     nibble) with element j + bs/2 (high nibble), as q4 does
         qh [G, K/bs, 4, T] uint8    the codes' high bits (k5: 1, k6: 2 per element; none for
                                     k4): byte j // P holds element j's at bit 2*W*(j % P) and
                                     element j + bs/2's W bits above, with W = bits - 4 high
                                     bits per element and P = 4 // W pairs per byte
         d, m [G, K/256, T]          super-block scale d and (k4, k5) min scale dmin, fp16 bits
         sc [G, K/bs, T]             sub-block scales, uint8 (6 bit) for k4/k5, int8 for k6
         mn [G, K/bs, T] uint8       k4, k5: sub-block mins (6 bit)
                                     k4, k5: w = d*sc*q - dmin*mn;  k6: w = d*sc*(q - 32)
    f16 / bf16 / f32  w [G, K, T]    raw 16-bit patterns (uint16) or float32

Arithmetic per block (ggml's vec_dot, e.g. ggml_vec_dot_q4_1_q8_1): with activations quantized
to xq, xd, xs (kernels/actquant.py) the block contributes
    d_w * xd * sum_j(q_w[j] * xq[j])  +  m_w * xs
with the integer sum exact. The K-quants follow ggml_vec_dot_qN_K_q8_K instead: everything
inside a super-block stays integer, sub-block sums weighted by their integer scales (and
mins against the activation block sums), and only the super-block total is scaled:
    d_w * xd * sum_s(sc[s] * isum[s])  -  dmin_w * xd * sum_s(mn[s] * bsum[s])
Each output element accumulates its blocks in the same order whatever the batch size, so a
token's result does not depend on which other tokens share the batch: batches are bit-for-bit
invariant.
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import bf16_to_f32, f16_to_f32, scale_f32
from edgelora_np.kernels.bytedot import (
    PAIR_MADD,
    PAIR_ROWS,
    pair_madd4_by2,
    pair_madd4_by2_2,
    pair_madd4_by2_half,
    pair_madd4_by2_half_2,
    pair_madd8,
    pair_madd8_2,
    pair_madd8_by4,
    pair_madd8_by4_2,
    pair_madd8_by4_half,
    pair_madd8_by4_half_2,
    pair_madd8_half,
    pair_madd8_half_2,
    splat_pair,
)
from edgelora_np.kernels.prefetch import prefetch
from edgelora_np.kernels.scratch import empty_lines, thread_parts, tile_run

# Tokens processed together against one tile: bounds the [BT, T] accumulators to L1/L2.
TOKEN_CHUNK = 16


# q4 code rows whose products are summed in int16 before widening: each row adds at most
# 2 * 15 * 128 = 3840 in magnitude, so 8 rows stay within 30720 < 2**15. 16-bit lanes hold
# twice the products of 32-bit ones per vector (AVX2 vpmullw, NEON mul/mla .8h; a test reads
# the assembly).
Q4_ROWS_IN_INT16 = 8


@njit(inline="always")
def _q4_pairs(qb, ahead, lows, highs):
    """A q4 block's codes as byte pairs for _pair_sums: lows[p] holds, for each tile row t, the
    low nibbles of code rows 2p and 2p+1 at bytes 2t and 2t+1 (elements 2p and 2p+1), highs[p]
    their high nibbles (elements 16+2p and 17+2p). `ahead`'s rows are prefetched."""
    T = qb.shape[1]
    for p in range(8):
        q0, q1 = qb[2 * p], qb[2 * p + 1]
        prefetch(ahead[2 * p:2 * p + 2])
        lo, hi = lows[p], highs[p]
        for t in range(T):
            lo[2 * t], lo[2 * t + 1] = q0[t] & 15, q1[t] & 15
            hi[2 * t], hi[2 * t + 1] = q0[t] >> 4, q1[t] >> 4


@njit(inline="always")
def _madd(isum, bb, t0, full, pairs, xpairs, first, bits, accumulate, two):
    """One bytedot pair_madd of `bits`-bit codes: 32 tile rows from t0 (`full`), else the 16 of
    a tile's last rows, for token bb or (`two`) tokens bb and bb + 1, added to isum
    (`accumulate`) or stored. The codes' width bounds how many pairs share an int16 sum: all 8
    up to 4 bits, 4 at 5 bits, 2 at 6 (of 4 pairs, a 16-element sub-block's half)."""
    if two:
        if full:
            if bits <= 4:
                pair_madd8_2(isum, bb, t0, pairs, xpairs, first, accumulate)
            elif bits == 5:
                pair_madd8_by4_2(isum, bb, t0, pairs, xpairs, first, accumulate)
            else:
                pair_madd4_by2_2(isum, bb, t0, pairs, xpairs, first, accumulate)
        elif bits <= 4:
            pair_madd8_half_2(isum, bb, t0, pairs, xpairs, first, accumulate)
        elif bits == 5:
            pair_madd8_by4_half_2(isum, bb, t0, pairs, xpairs, first, accumulate)
        else:
            pair_madd4_by2_half_2(isum, bb, t0, pairs, xpairs, first, accumulate)
    elif full:
        if bits <= 4:
            pair_madd8(isum, bb, t0, pairs, xpairs, first, accumulate)
        elif bits == 5:
            pair_madd8_by4(isum, bb, t0, pairs, xpairs, first, accumulate)
        else:
            pair_madd4_by2(isum, bb, t0, pairs, xpairs, first, accumulate)
    elif bits <= 4:
        pair_madd8_half(isum, bb, t0, pairs, xpairs, first, accumulate)
    elif bits == 5:
        pair_madd8_by4_half(isum, bb, t0, pairs, xpairs, first, accumulate)
    else:
        pair_madd4_by2_half(isum, bb, t0, pairs, xpairs, first, accumulate)


@njit(inline="always")
def _splat_pairs(xpairs, row0, xq, token, o, half, bits):
    """A token's activation pairs into xpairs rows row0.. (row0 + p: the pair lows[p]
    multiplies, row0 + 8 + p: highs[p]'s; 2- and 3-bit codes: 8 consecutive pairs)."""
    if bits <= 3:
        for p in range(8):
            splat_pair(xpairs, row0 + p, xq, token, o + 2 * p)
    else:
        for p in range(half // 2):
            splat_pair(xpairs, row0 + p, xq, token, o + 2 * p)
            splat_pair(xpairs, row0 + 8 + p, xq, token, o + half + 2 * p)


@njit(inline="always")
def _token_sums(isum, bb, T, lows, highs, xpairs, bits, two):
    """_pair_sums's calls for token bb (or bb and bb + 1) over all of a tile's rows."""
    full_rows = T - T % PAIR_ROWS
    for t0 in range(0, full_rows, PAIR_ROWS):
        _madd(isum, bb, t0, True, lows, xpairs, 0, bits, False, two)
        if bits > 3:
            _madd(isum, bb, t0, True, highs, xpairs, 8, bits, True, two)
    if full_rows < T:
        _madd(isum, bb, full_rows, False, lows, xpairs, 0, bits, False, two)
        if bits > 3:
            _madd(isum, bb, full_rows, False, highs, xpairs, 8, bits, True, two)


@njit(inline="always")
def _pair_sums(xq, b0, nbt, o, half, lows, highs, xpairs, isum, bits):
    """isum[bb] = the exact integer dot products of a block's `bits`-bit codes, unpacked into
    byte pairs (lows: elements 2p and 2p+1; highs: half + 2p and half + 2p + 1), with the
    activations xq[b0 + bb, o:o + 2 * half], for bb < nbt (kernels/bytedot.py). Codes of 2
    or 3 bits (16-element sub-blocks) come as 8 pairs in lows alone (elements 2p, 2p + 1),
    `half` and highs unused. Two tokens at a time lay out their activation pairs in xpairs
    [32, PAIR_ROWS] int16, rows 0-15 and 16-31, then each call adds the pair products of 32
    tile rows (16 for a tile's last rows when T % 32 == 16) for both, loading each weight
    vector once; an odd token last goes alone."""
    T = isum.shape[1]
    for bb in range(0, nbt - 1, 2):
        _splat_pairs(xpairs, 0, xq, b0 + bb, o, half, bits)
        _splat_pairs(xpairs, 16, xq, b0 + bb + 1, o, half, bits)
        _token_sums(isum, bb, T, lows, highs, xpairs, bits, True)
    if nbt % 2:
        _splat_pairs(xpairs, 0, xq, b0 + nbt - 1, o, half, bits)
        _token_sums(isum, nbt - 1, T, lows, highs, xpairs, bits, False)


@njit(inline="always")
def _q4_block_sums(qb, ahead, xq, b0, nbt, o, nibbles, psum, isum, lows, highs, xpairs):
    """isum[bb] = the exact integer dot products of one 32-block of q4 codes with the
    activations xq[b0 + bb, o:o + 32], for bb < nbt. `ahead` (shaped as qb) is the block the
    caller works on next: its rows are prefetched as qb's are consumed.

    qb [16, T] uint8: byte j of row t holds element j (low nibble) and j + 16 (high nibble).
    On x86, more than one token multiplies byte pairs (_q4_pairs, _pair_sums: 1.6-1.8x at 16
    and 64 tokens on the Zen 5 VM). The rest is one token anywhere, and more on AArch64:
    8 code rows are summed in int16 (Q4_ROWS_IN_INT16), then widened. With more than one
    token the nibbles of four code rows are unpacked once, into nibbles [8, T] int16, and each
    token's pass over the T rows takes all four (eight products per row): its int16 partial
    sums are loaded and stored once per four code rows, not once per row (1.07-1.09x at 16
    and 64 tokens). One token takes one code row per pass, straight from the bytes; four per
    pass was 4-5% slower there.
    """
    if PAIR_MADD and nbt > 1:
        _q4_pairs(qb, ahead, lows, highs)
        _pair_sums(xq, b0, nbt, o, 16, lows, highs, xpairs, isum, 4)
        return
    half, T = qb.shape
    lo0, hi0, lo1, hi1 = nibbles[0], nibbles[1], nibbles[2], nibbles[3]
    lo2, hi2, lo3, hi3 = nibbles[4], nibbles[5], nibbles[6], nibbles[7]
    isum[:nbt] = 0
    for j0 in range(0, half, Q4_ROWS_IN_INT16):
        psum[:nbt] = 0
        if nbt == 1:
            xr = xq[b0, o:]
            row = psum[0]
            for j in range(j0, j0 + Q4_ROWS_IN_INT16):
                qrow = qb[j]
                prefetch(ahead[j])
                # q x_lo + (q >> 4)(x_hi - 16 x_lo) = (q & 15) x_lo + (q >> 4) x_hi, one AND fewer
                # per byte. Its terms may wrap around in int16, but int16 arithmetic is exact
                # modulo 2**16 and the true row sum stays within Q4_ROWS_IN_INT16's bound.
                xlo = np.int16(xr[j])
                xadj = np.int16(np.int16(xr[half + j]) - np.int16(16) * xlo)
                for t in range(T):
                    q = np.int16(qrow[t])
                    row[t] = np.int16(row[t] + q * xlo + (q >> 4) * xadj)
        else:
            for j in range(j0, j0 + Q4_ROWS_IN_INT16, 4):
                q0, q1, q2, q3 = qb[j], qb[j + 1], qb[j + 2], qb[j + 3]
                prefetch(ahead[j:j + 4])
                for t in range(T):
                    lo0[t], hi0[t] = np.int16(q0[t] & 15), np.int16(q0[t] >> 4)
                    lo1[t], hi1[t] = np.int16(q1[t] & 15), np.int16(q1[t] >> 4)
                for t in range(T):
                    lo2[t], hi2[t] = np.int16(q2[t] & 15), np.int16(q2[t] >> 4)
                    lo3[t], hi3[t] = np.int16(q3[t] & 15), np.int16(q3[t] >> 4)
                for bb in range(nbt):
                    xr = xq[b0 + bb, o:]
                    x0, x1 = np.int16(xr[j]), np.int16(xr[half + j])
                    x2, x3 = np.int16(xr[j + 1]), np.int16(xr[half + j + 1])
                    x4, x5 = np.int16(xr[j + 2]), np.int16(xr[half + j + 2])
                    x6, x7 = np.int16(xr[j + 3]), np.int16(xr[half + j + 3])
                    row = psum[bb]
                    for t in range(T):
                        row[t] = np.int16(row[t] + lo0[t] * x0 + hi0[t] * x1
                                          + lo1[t] * x2 + hi1[t] * x3
                                          + lo2[t] * x4 + hi2[t] * x5
                                          + lo3[t] * x6 + hi3[t] * x7)
        for bb in range(nbt):
            irow = isum[bb]
            prow = psum[bb]
            for t in range(T):
                irow[t] += np.int32(prow[t])


@njit(parallel=True, cache=True)
def matmul_q4(qs, d, m, xq, xd, xs, out):
    """out [B, N] = dequant(x) @ dequant(W).T for a q4-packed W (see module docstring).

    `m` with a zero-length block axis means Q4_0: w = d * (q - 8), so the offset is -8 * d.
    The integer sums are _q4_block_sums's, exact.
    """
    G, nb, half, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    has_m = m.shape[1] > 0
    n_parts = thread_parts(G)
    for part in prange(n_parts):                  # a run of tiles per thread (kernels/scratch.py)
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        isum = empty_lines((TOKEN_CHUNK, T), np.int32)
        psum = empty_lines((TOKEN_CHUNK, T), np.int16)
        nibbles = empty_lines((8, T), np.int16)
        lows = empty_lines((8, 2 * T), np.uint8)
        highs = empty_lines((8, 2 * T), np.uint8)
        xpairs = empty_lines((32, PAIR_ROWS), np.int16)
        dw = empty_lines((T,), np.float32)
        mw = empty_lines((T,), np.float32)
        first, end = tile_run(part, n_parts, G)
        for g in range(first, end):
            for b0 in range(0, B, TOKEN_CHUNK):
                nbt = min(TOKEN_CHUNK, B - b0)
                acc[:nbt] = 0.0
                for ib in range(nb):
                    ahead = min(ib + 1, nb - 1)       # the next block's bytes, while this one works
                    prefetch(d[g, ahead])
                    if has_m:
                        prefetch(m[g, ahead])
                    _q4_block_sums(qs[g, ib], qs[g, ahead], xq, b0, nbt, ib * 32, nibbles,
                                   psum, isum, lows, highs, xpairs)
                    for t in range(T):
                        dw[t] = scale_f32(d[g, ib, t])
                    if has_m:
                        for t in range(T):
                            mw[t] = scale_f32(m[g, ib, t])
                    else:
                        for t in range(T):
                            mw[t] = np.float32(-8.0) * dw[t]
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


# q8 code rows whose products are summed in int16 before widening: a code is at most 128 in
# magnitude and an activation 127 (kernels/actquant.py), so a pair adds at most 32512 < 2**15.
Q8_ROWS_IN_INT16 = 2
# Code rows per pass of matmul_q8's token loop: four pairs, their int16 sums widened and added
# to the int32 row in one go (one load and store of it per eight rows, not per two). The loop
# body is written out for exactly eight rows; a block's 32 rows are four passes.
Q8_ROWS_PER_PASS = 8


@njit(parallel=True, cache=True)
def matmul_q8(qs, d, m, xq, xd, xs, out):
    """out [B, N] for a q8-packed W; `m` may have a zero-length block axis (no offsets).

    Code rows are multiplied in pairs in int16 and each pair's sum is stored to an int16 row
    before it is widened and added up in int32: exact (see Q8_ROWS_IN_INT16), and the store
    is what lets LLVM keep the products in 16-bit lanes (vpmullw; NEON smull/smlal .8h from
    int8), twice as many per vector as int32's. Four pairs at a time (Q8_ROWS_PER_PASS) are
    widened and added to the int32 row together: against one pair per pass, 1.26x at one token
    and 1.50x at 16 and 64 (docs/benchmarks.md).
    """
    G, nb, bs, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    has_m = m.shape[1] > 0
    n_parts = thread_parts(G)
    for part in prange(n_parts):                  # a run of tiles per thread (kernels/scratch.py)
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        isum = empty_lines((TOKEN_CHUNK, T), np.int32)
        pairs = empty_lines((4, T), np.int16)
        pair, pair2, pair3, pair4 = pairs[0], pairs[1], pairs[2], pairs[3]
        dw = empty_lines((T,), np.float32)
        mw = empty_lines((T,), np.float32)
        mw[...] = 0
        first, end = tile_run(part, n_parts, G)
        for g in range(first, end):
            for b0 in range(0, B, TOKEN_CHUNK):
                nbt = min(TOKEN_CHUNK, B - b0)
                acc[:nbt] = 0.0
                for ib in range(nb):
                    ahead = min(ib + 1, nb - 1)       # the next block's bytes, a row pair at a time
                    prefetch(d[g, ahead])
                    if has_m:
                        prefetch(m[g, ahead])
                    isum[:nbt] = 0
                    for j in range(0, bs, Q8_ROWS_PER_PASS):
                        q0, q1 = qs[g, ib, j], qs[g, ib, j + 1]              # [T] int8
                        q2, q3 = qs[g, ib, j + 2], qs[g, ib, j + 3]
                        q4, q5 = qs[g, ib, j + 4], qs[g, ib, j + 5]
                        q6, q7 = qs[g, ib, j + 6], qs[g, ib, j + 7]
                        # The next block's same eight rows, half now and half after the first
                        # token's products: all eight at once was slower on the 30 MB output
                        # projection at one token (docs/benchmarks.md).
                        prefetch(qs[g, ahead, j:j + 4])
                        for bb in range(nbt):
                            xr = xq[b0 + bb, ib * bs + j:]
                            x0, x1 = np.int16(xr[0]), np.int16(xr[1])
                            x2, x3 = np.int16(xr[2]), np.int16(xr[3])
                            x4, x5 = np.int16(xr[4]), np.int16(xr[5])
                            x6, x7 = np.int16(xr[6]), np.int16(xr[7])
                            for t in range(T):
                                pair[t] = np.int16(np.int16(q0[t]) * x0 + np.int16(q1[t]) * x1)
                                pair2[t] = np.int16(np.int16(q2[t]) * x2 + np.int16(q3[t]) * x3)
                                pair3[t] = np.int16(np.int16(q4[t]) * x4 + np.int16(q5[t]) * x5)
                                pair4[t] = np.int16(np.int16(q6[t]) * x6 + np.int16(q7[t]) * x7)
                            if bb == 0:
                                prefetch(qs[g, ahead, j + 4:j + 8])
                            row = isum[bb]
                            for t in range(T):
                                row[t] += (np.int32(pair[t]) + np.int32(pair2[t])
                                           + np.int32(pair3[t]) + np.int32(pair4[t]))
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
def _k5_pairs(qs_blk, qh_blk, ahead, ahead_h, lows, highs):
    """A k5 sub-block's 5-bit codes as byte pairs for _pair_sums. High-bit byte r holds
    elements 4r+i (bit 2i) and 4r+i+16 (bit 2i+1); a pair's two elements share a byte."""
    T = qs_blk.shape[1]
    for p in range(8):
        q0, q1 = qs_blk[2 * p], qs_blk[2 * p + 1]
        h_row = qh_blk[p // 2]
        shift = 4 * (p % 2)
        prefetch(ahead[2 * p:2 * p + 2])
        if p % 2 == 0:
            prefetch(ahead_h[p // 2])
        lo, hi = lows[p], highs[p]
        for t in range(T):
            h = h_row[t] >> shift
            lo[2 * t], lo[2 * t + 1] = (q0[t] & 15) | ((h & 1) << 4), (q1[t] & 15) | ((h & 4) << 2)
            hi[2 * t], hi[2 * t + 1] = (q0[t] >> 4) | ((h & 2) << 3), (q1[t] >> 4) | ((h & 8) << 1)


@njit(inline="always")
def _k6_pairs(qs_blk, qh_blk, ahead, ahead_h, lows, highs):
    """A k6 sub-block's 6-bit codes (q + 32) as byte pairs for _pair_sums. High-bit byte p
    holds elements 2p (bits 0-1), 2p + 8 (2-3), 2p + 1 (4-5) and 2p + 9 (6-7)."""
    T = qs_blk.shape[1]
    for p in range(4):
        q0, q1, h_row = qs_blk[2 * p], qs_blk[2 * p + 1], qh_blk[p]
        prefetch(ahead[2 * p:2 * p + 2])
        prefetch(ahead_h[p])
        lo, hi = lows[p], highs[p]
        for t in range(T):
            h = h_row[t]
            lo[2 * t], lo[2 * t + 1] = (q0[t] & 15) | ((h & 3) << 4), (q1[t] & 15) | (h & 48)
            hi[2 * t], hi[2 * t + 1] = (q0[t] >> 4) | ((h & 12) << 2), (q1[t] >> 4) | ((h & 192) >> 2)


@njit(inline="always")
def _pairs_of_four(xr, e, half):
    """Activations e..e+3 and, half a sub-block on, e+half..e+half+3: the values one k5/k6 row
    update multiplies (a code byte pairs element j with element j + half)."""
    return (np.int16(xr[e]), np.int16(xr[e + 1]), np.int16(xr[e + 2]), np.int16(xr[e + 3]),
            np.int16(xr[e + half]), np.int16(xr[e + half + 1]), np.int16(xr[e + half + 2]),
            np.int16(xr[e + half + 3]))


@njit(parallel=True, cache=True)
def matmul_kquant(qs, qh, sc, mn, d, dmin, bits, xq, xd, bsums, out):
    """out [B, N] for a K-quant W with `bits`-bit codes (k4, k5, k6 layouts above).

    xq [B, K] int8, xd [B, K/256] float32 and bsums [B, K/16] int32 are the q8_K activations.
    For k6 `mn` and `dmin` are unused: its codes are q + 32, so 32 * bsum is subtracted instead.
    The integer products are taken in int16 lanes, each partial sum stored to an int16 row (the
    store is what keeps LLVM in 16-bit lanes) before it is widened and added in int32. Exact,
    with q8_K activations reaching -128: a k4 sub-block is summed as a q4 block is
    (_q4_block_sums: 8 code rows, 8 * 2 * 15 * 128 = 30720 < 2**15); k5 one row update of 8
    products (8 * 31 * 128 = 31744); k6 half of one, 4 products (4 * 63 * 128 = 32256).
    On x86, more than one token multiplies byte pairs instead (kernels/bytedot.py): k4 as q4
    does, k5 and k6 through _k5_pairs or _k6_pairs and _pair_sums (1.55-1.64x at 16 and 64
    tokens on the Zen 5 VM), the same int16 bounds holding for 4 and 2 pairs.
    """
    G, nb, half, T = qs.shape
    bs = 2 * half                                  # elements per sub-block
    per_super = 256 // bs                          # sub-blocks per super-block
    B = xq.shape[0]
    N = out.shape[1]
    n_parts = thread_parts(G)
    for part in prange(n_parts):                  # a run of tiles per thread (kernels/scratch.py)
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        itot = empty_lines((TOKEN_CHUNK, T), np.int32)
        imin = empty_lines((TOKEN_CHUNK, T), np.int32)
        isum = empty_lines((TOKEN_CHUNK, T), np.int32)
        psums = empty_lines((2, TOKEN_CHUNK, T), np.int16)
        psum, psum2 = psums[0], psums[1]
        nibbles = empty_lines((8, T), np.int16)
        lows = empty_lines((8, 2 * T), np.uint8)
        highs = empty_lines((8, 2 * T), np.uint8)
        xpairs = empty_lines((32, PAIR_ROWS), np.int16)
        weights = empty_lines((2, T), np.int32)
        s0, s1 = weights[0], weights[1]           # the sub-block's scale and min
        scales = empty_lines((2, T), np.float32)
        scales[...] = 0
        dw, mw = scales[0], scales[1]             # the super-block's d and dmin
        first, end = tile_run(part, n_parts, G)
        for g in range(first, end):
            for b0 in range(0, B, TOKEN_CHUNK):
                nbt = min(TOKEN_CHUNK, B - b0)
                acc[:nbt] = 0.0
                n_super = nb // per_super
                for isb in range(n_super):
                    itot[:nbt] = 0
                    imin[:nbt] = 0
                    next_super = min(isb + 1, n_super - 1)     # its scales, while this one works
                    prefetch(d[g, next_super])
                    if bits != 6:
                        prefetch(dmin[g, next_super])
                    for ib in range(isb * per_super, (isb + 1) * per_super):
                        o = ib * bs
                        ahead = min(ib + 1, nb - 1)   # the next sub-block's bytes, as this one's go
                        prefetch(sc[g, ahead])
                        if bits != 6:
                            prefetch(mn[g, ahead])
                        if bits == 4:
                            _q4_block_sums(qs[g, ib], qs[g, ahead], xq, b0, nbt, o, nibbles,
                                           psum, isum, lows, highs, xpairs)
                        elif PAIR_MADD and nbt > 1:
                            if bits == 5:
                                _k5_pairs(qs[g, ib], qh[g, ib], qs[g, ahead], qh[g, ahead], lows, highs)
                            else:
                                _k6_pairs(qs[g, ib], qh[g, ib], qs[g, ahead], qh[g, ahead], lows, highs)
                            _pair_sums(xq, b0, nbt, o, half, lows, highs, xpairs, isum, bits)
                        elif bits == 5:
                            isum[:nbt] = 0
                            # High-bit byte r holds elements 4r+i (bit 2i) and 4r+i+16 (bit 2i+1).
                            for r in range(4):
                                h_row = qh[g, ib, r]
                                q0, q1 = qs[g, ib, 4 * r], qs[g, ib, 4 * r + 1]
                                q2, q3 = qs[g, ib, 4 * r + 2], qs[g, ib, 4 * r + 3]
                                prefetch(qh[g, ahead, r])
                                prefetch(qs[g, ahead, 4 * r:4 * r + 4])
                                for bb in range(nbt):
                                    x0, x1, x2, x3, y0, y1, y2, y3 = _pairs_of_four(
                                        xq[b0 + bb], o + 4 * r, half)
                                    prow = psum[bb]
                                    for t in range(T):
                                        h = np.int16(h_row[t])
                                        a, b = np.int16(q0[t]), np.int16(q1[t])
                                        c, d4 = np.int16(q2[t]), np.int16(q3[t])
                                        prow[t] = np.int16(((a & 15) | ((h & 1) << 4)) * x0
                                                           + ((a >> 4) | ((h & 2) << 3)) * y0
                                                           + ((b & 15) | ((h & 4) << 2)) * x1
                                                           + ((b >> 4) | ((h & 8) << 1)) * y1
                                                           + ((c & 15) | (h & 16)) * x2
                                                           + ((c >> 4) | ((h & 32) >> 1)) * y2
                                                           + ((d4 & 15) | ((h & 64) >> 2)) * x3
                                                           + ((d4 >> 4) | ((h & 128) >> 3)) * y3)
                                    row = isum[bb]
                                    for t in range(T):
                                        row[t] += np.int32(prow[t])
                        else:
                            isum[:nbt] = 0
                            # High-bit byte r holds elements 2r+i (bits 4i..4i+1) and 2r+i+8 (+2).
                            for r in range(0, 4, 2):
                                h_row, h_row1 = qh[g, ib, r], qh[g, ib, r + 1]
                                q0, q1 = qs[g, ib, 2 * r], qs[g, ib, 2 * r + 1]
                                q2, q3 = qs[g, ib, 2 * r + 2], qs[g, ib, 2 * r + 3]
                                prefetch(qh[g, ahead, r:r + 2])
                                prefetch(qs[g, ahead, 2 * r:2 * r + 4])
                                for bb in range(nbt):
                                    x0, x1, x2, x3, y0, y1, y2, y3 = _pairs_of_four(
                                        xq[b0 + bb], o + 2 * r, half)
                                    plo, phi = psum[bb], psum2[bb]
                                    for t in range(T):
                                        h, k = np.int16(h_row[t]), np.int16(h_row1[t])
                                        a, b = np.int16(q0[t]), np.int16(q1[t])
                                        c, d4 = np.int16(q2[t]), np.int16(q3[t])
                                        plo[t] = np.int16(((a & 15) | ((h & 3) << 4)) * x0
                                                          + ((a >> 4) | ((h & 12) << 2)) * y0
                                                          + ((b & 15) | (h & 48)) * x1
                                                          + ((b >> 4) | ((h & 192) >> 2)) * y1)
                                        phi[t] = np.int16(((c & 15) | ((k & 3) << 4)) * x2
                                                          + ((c >> 4) | ((k & 12) << 2)) * y2
                                                          + ((d4 & 15) | (k & 48)) * x3
                                                          + ((d4 >> 4) | ((k & 192) >> 2)) * y3)
                                    row = isum[bb]
                                    for t in range(T):
                                        row[t] += np.int32(plo[t]) + np.int32(phi[t])
                        for t in range(T):
                            s0[t] = np.int32(sc[g, ib, t])
                        if bits == 6:
                            for bb in range(nbt):
                                c = 32 * np.int32(bsums[b0 + bb, ib])
                                tot = itot[bb]
                                row = isum[bb]
                                for t in range(T):
                                    tot[t] += s0[t] * (row[t] - c)
                        else:
                            for t in range(T):
                                s1[t] = np.int32(mn[g, ib, t])
                            for bb in range(nbt):
                                bsum = np.int32(bsums[b0 + bb, 2 * ib]) + np.int32(
                                    bsums[b0 + bb, 2 * ib + 1])
                                tot = itot[bb]
                                mins = imin[bb]
                                row = isum[bb]
                                for t in range(T):
                                    tot[t] += s0[t] * row[t]
                                    mins[t] += s1[t] * bsum
                    for t in range(T):
                        dw[t] = f16_to_f32(d[g, isb, t])
                    if bits != 6:
                        for t in range(T):
                            mw[t] = f16_to_f32(dmin[g, isb, t])
                    for bb in range(nbt):
                        dx = xd[b0 + bb, isb]
                        arow = acc[bb]
                        tot = itot[bb]
                        mins = imin[bb]
                        for t in range(T):
                            arow[t] += dw[t] * dx * np.float32(tot[t]) - mw[t] * dx * np.float32(mins[t])
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
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        wk = empty_lines((T,), np.float32)
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
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
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
