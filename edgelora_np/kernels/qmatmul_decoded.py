"""Matmul kernels for the types whose codes take more than a mask to read: Q5_0, Q5_1 and
IQ4_NL (32-blocks), Q2_K, Q3_K and IQ4_XS (256-blocks).

    y [B, N] = x [B, K] @ W[N, K].T

Rows are tiled as in kernels/qmatmul.py (T rows interleaved, the inner loop over them). For one
block of one tile, the Q5 and IQ4 kernels first turn the stored bits into the block's small
signed integer weights, w [bs, T] int16 (shifts and masks; for the IQ4 types int8, ggml's 16
levels kvalues_iq4nl, looked up 16 codes at a time by a byte shuffle in registers:
kernels/lookup.py),
then every token of the chunk takes its exact integer dot product with them. The decode is paid
once per block and tile and shared by the batch; weights stay at file size in memory and are
never widened to float. With one token there is nothing to share, and the Q5 types decode as
they multiply instead, without storing the block (the IQ4 types store it: a lookup is a whole
vector at once). Q2_K and Q3_K never decode: each token takes its products straight from the
packed bytes (_two_bit_token).
Where the products are small (Q5_0/Q5_1: |w| <= 31, Q2_K/Q3_K: |w| <= 4, times |x| <= 127),
8 to 16 rows are summed in int16 lanes before widening, as matmul_q4 does; the IQ4 levels
reach 127, so only the two products of one code byte share an int16 sum at one token, and with
more tokens the sums are int32 from the start.
On x86 (kernels/bytedot.py), more than one token multiplies byte pairs instead: Q2_K and Q3_K
codes unpacked once per sub-block (_k23_batch: 1.2x and 1.5x at 16 and 64 tokens on the Zen 5
VM), the IQ4 levels plus 128 split into two nibbles (_iq4_pairs, _iq4_pair_sums: 1.1-1.2x).

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
from edgelora_np.kernels.bytedot import (
    PAIR_MADD,
    PAIR_ROWS,
    pair_madd8,
    pair_madd8_2,
    pair_madd8_half,
    pair_madd8_half_2,
    pair_madd8_x16,
    pair_madd8_x16_2,
    pair_madd8_x16_half,
    pair_madd8_x16_half_2,
)
from edgelora_np.kernels.lookup import levels
from edgelora_np.kernels.prefetch import prefetch
from edgelora_np.kernels.qmatmul import _pair_sums, _splat_pairs
from edgelora_np.kernels.scratch import empty_lines, thread_parts, tile_run

TOKEN_CHUNK = 16          # tokens that share one decoded block (bounds the [BT, T] sums)

# The `kind` codes of matmul_k_decoded.
KIND_K2, KIND_K3, KIND_IQ4XS = 2, 3, 4

# Rows of products summed in int16 before widening, per weight range (|x| <= 127):
# Q5_0 |w| <= 16: 16 * 16 * 127 = 32512;  Q5_1 w <= 31: 8 * 31 * 127 = 31496.  Both < 2**15.
# (Q2_K and Q3_K sum a whole sub-block of 16 in int16: _two_bit_token.)
ROWS_IN_INT16_Q5_0, ROWS_IN_INT16_Q5_1 = 16, 8

# Multipliers that move bit s of a byte to bit 7 (TO_BIT_7[s]) in 16-bit lanes. A shift by a
# loop-invariant but non-constant amount makes LLVM widen the whole loop to 64-bit lanes; a
# multiply read from a table stays in 16-bit ones.
TO_BIT_7 = np.array([1 << (7 - s) for s in range(8)], np.int16)


@njit(inline="always")
def _decode_q5(qs_blk, ahead, qh_blk, zero, w):
    """One q5 32-block of a tile -> w [32, T] int16: q | fifth bit << 4, minus `zero`. `ahead`
    (shaped as qs_blk) is the block the caller works on next: its rows are prefetched."""
    T = w.shape[1]
    for j in range(16):
        qrow = qs_blk[j]
        prefetch(ahead[j])
        hlo, hhi = qh_blk[j >> 3], qh_blk[(j + 16) >> 3]     # fifth bits of elements j, j + 16
        p = TO_BIT_7[j & 7]                                   # both at bit j % 8
        for t in range(T):
            q = np.int16(qrow[t])
            a = (np.int16(np.int16(hlo[t]) * p) >> 3) & np.int16(16)
            b = (np.int16(np.int16(hhi[t]) * p) >> 3) & np.int16(16)
            w[j, t] = np.int16(((q & 15) | a) - zero)
            w[j + 16, t] = np.int16(((q >> 4) | b) - zero)


@njit(inline="always")
def _dot_q5_one_token(qs_blk, ahead, qh_blk, zero, xr, o, rows, prow, irow):
    """irow[t] = sum_j w[j, t] * xr[o + j] for one token, decoding the q5 block as it goes (as
    _decode_q5) instead of storing it first: `rows` products at a time in int16 (prow)."""
    T = prow.shape[0]
    irow[:] = 0
    for j0 in range(0, 16, rows // 2):                       # two products per j
        prow[:] = 0
        for j in range(j0, j0 + rows // 2):
            qrow = qs_blk[j]
            prefetch(ahead[j])
            hlo, hhi = qh_blk[j >> 3], qh_blk[(j + 16) >> 3]
            p = TO_BIT_7[j & 7]
            xlo, xhi = np.int16(xr[o + j]), np.int16(xr[o + j + 16])
            for t in range(T):
                q = np.int16(qrow[t])
                a = (np.int16(np.int16(hlo[t]) * p) >> 3) & np.int16(16)
                b = (np.int16(np.int16(hhi[t]) * p) >> 3) & np.int16(16)
                prow[t] = np.int16(prow[t] + (((q & 15) | a) - zero) * xlo
                                   + (((q >> 4) | b) - zero) * xhi)
        for t in range(T):
            irow[t] += np.int32(prow[t])


@njit(inline="always")
def _decode_iq4(qs_blk, ahead, w):
    """One IQ4 32-block of a tile -> w [32, T] int8: the level of each code, looked up 16
    codes at a time in registers (kernels/lookup.py); `ahead`'s rows prefetched as in
    _decode_q5."""
    for j in range(16):
        prefetch(ahead[j])
        levels(qs_blk[j], w[j], 0)
        levels(qs_blk[j], w[j + 16], 4)


@njit(inline="always")
def _dot_iq4_one_token(qs_blk, ahead, xr, o, irow, w):
    """irow[t] = sum_j w[j, t] * xr[o + j] for one token over an IQ4 32-block: the block's
    levels looked up into w [32, T] int8 first (_decode_iq4), then the two products of a code byte
    summed in int16 (|level| <= 127, |x| <= 127: at most 32,258), four code bytes' sums
    widened and added to irow in one pass (one load and store of it per four)."""
    T = irow.shape[0]
    _decode_iq4(qs_blk, ahead, w)
    irow[:] = 0
    for j in range(0, 16, 4):
        x0, y0 = np.int16(xr[o + j]), np.int16(xr[o + j + 16])
        x1, y1 = np.int16(xr[o + j + 1]), np.int16(xr[o + j + 17])
        x2, y2 = np.int16(xr[o + j + 2]), np.int16(xr[o + j + 18])
        x3, y3 = np.int16(xr[o + j + 3]), np.int16(xr[o + j + 19])
        w0, v0, w1, v1 = w[j], w[j + 16], w[j + 1], w[j + 17]
        w2, v2, w3, v3 = w[j + 2], w[j + 18], w[j + 3], w[j + 19]
        for t in range(T):
            irow[t] += (np.int32(np.int16(np.int16(w0[t]) * x0 + np.int16(v0[t]) * y0))
                        + np.int32(np.int16(np.int16(w1[t]) * x1 + np.int16(v1[t]) * y1))
                        + np.int32(np.int16(np.int16(w2[t]) * x2 + np.int16(v2[t]) * y2))
                        + np.int32(np.int16(np.int16(w3[t]) * x3 + np.int16(v3[t]) * y3)))


@njit(inline="always")
def _nibble_pair(pair, wa, wb, high):
    """pair[2t], pair[2t + 1] = the low (or `high`) nibbles of wa[t] + 128 and wb[t] + 128."""
    T = wa.shape[0]
    if high:
        for t in range(T):
            pair[2 * t] = (wa[t] + np.int16(128)) >> 4
            pair[2 * t + 1] = (wb[t] + np.int16(128)) >> 4
    else:
        for t in range(T):
            pair[2 * t] = (wa[t] + np.int16(128)) & 15
            pair[2 * t + 1] = (wb[t] + np.int16(128)) & 15


@njit(inline="always")
def _iq4_pairs(qs_blk, ahead, w, lo_l, hi_l, lo_h, hi_h):
    """An IQ4 32-block's levels as byte pairs (kernels/bytedot.py), split so that the
    products fit: u = level + 128 (1..241) is 16 h + l with h and l nibbles, lo_l[p] and
    lo_h[p] holding l and h of elements 2p and 2p+1 at bytes 2t and 2t+1, hi_l[p] and hi_h[p]
    those of elements 16+2p and 17+2p (_iq4_pair_sums). The levels are decoded into w
    [32, T] int8 first; then each pair row takes a pass of its own (passes writing several
    rows did not vectorize)."""
    _decode_iq4(qs_blk, ahead, w)
    for p in range(8):
        _nibble_pair(lo_l[p], w[2 * p], w[2 * p + 1], False)
        _nibble_pair(lo_h[p], w[2 * p], w[2 * p + 1], True)
        _nibble_pair(hi_l[p], w[16 + 2 * p], w[17 + 2 * p], False)
        _nibble_pair(hi_h[p], w[16 + 2 * p], w[17 + 2 * p], True)


@njit(inline="always")
def _iq4_token_sums(isum, bb, T, lo_l, hi_l, lo_h, hi_h, xpairs, two):
    """_iq4_pair_sums's calls for token bb (or bb and bb + 1) over all of a tile's rows."""
    full_rows = T - T % PAIR_ROWS
    for t0 in range(0, full_rows, PAIR_ROWS):
        if two:
            pair_madd8_2(isum, bb, t0, lo_l, xpairs, 0, False)
            pair_madd8_2(isum, bb, t0, hi_l, xpairs, 8, True)
            pair_madd8_x16_2(isum, bb, t0, lo_h, xpairs, 0, True)
            pair_madd8_x16_2(isum, bb, t0, hi_h, xpairs, 8, True)
        else:
            pair_madd8(isum, bb, t0, lo_l, xpairs, 0, False)
            pair_madd8(isum, bb, t0, hi_l, xpairs, 8, True)
            pair_madd8_x16(isum, bb, t0, lo_h, xpairs, 0, True)
            pair_madd8_x16(isum, bb, t0, hi_h, xpairs, 8, True)
    if full_rows < T:
        if two:
            pair_madd8_half_2(isum, bb, full_rows, lo_l, xpairs, 0, False)
            pair_madd8_half_2(isum, bb, full_rows, hi_l, xpairs, 8, True)
            pair_madd8_x16_half_2(isum, bb, full_rows, lo_h, xpairs, 0, True)
            pair_madd8_x16_half_2(isum, bb, full_rows, hi_h, xpairs, 8, True)
        else:
            pair_madd8_half(isum, bb, full_rows, lo_l, xpairs, 0, False)
            pair_madd8_half(isum, bb, full_rows, hi_l, xpairs, 8, True)
            pair_madd8_x16_half(isum, bb, full_rows, lo_h, xpairs, 0, True)
            pair_madd8_x16_half(isum, bb, full_rows, hi_h, xpairs, 8, True)


@njit(inline="always")
def _iq4_pair_sums(xq, b0, nbt, o, lo_l, hi_l, lo_h, hi_h, xpairs, isum):
    """isum[bb] = sum_j (level[j] + 128) * xq[b0 + bb, o + j] over an IQ4 32-block split by
    _iq4_pairs, for bb < nbt: the l pairs' products plus 16 times the h pairs', each pair_madd8
    summing 8 pairs in int16 (2 * 15 * 128 * 8 = 30720 < 2**15), two tokens per call as
    qmatmul._pair_sums does. The caller subtracts 128 times the activations' sum."""
    T = isum.shape[1]
    for bb in range(0, nbt - 1, 2):
        _splat_pairs(xpairs, 0, xq, b0 + bb, o, 16, 4)
        _splat_pairs(xpairs, 16, xq, b0 + bb + 1, o, 16, 4)
        _iq4_token_sums(isum, bb, T, lo_l, hi_l, lo_h, hi_h, xpairs, True)
    if nbt % 2:
        _splat_pairs(xpairs, 0, xq, b0 + nbt - 1, o, 16, 4)
        _iq4_token_sums(isum, nbt - 1, T, lo_l, hi_l, lo_h, hi_h, xpairs, False)


@njit(inline="always")
def _k23_pair(pair, qa, qb, shift, hrow, hbit, has_h):
    """One byte pair row for _k23_pairs: bits shift and shift + 1 of code rows qa and qb at
    bytes 2t and 2t + 1, with (k3) their third bits, bits hbit and hbit + 1 of hrow, at bit 2.
    Called with constant shifts: one by a variable amount puts the loop in 64-bit lanes."""
    T = qa.shape[0]
    if has_h:
        for t in range(T):
            h = hrow[t] >> hbit
            pair[2 * t] = ((qa[t] >> shift) & 3) | ((h & 1) << 2)
            pair[2 * t + 1] = ((qb[t] >> shift) & 3) | ((h & 2) << 1)
    else:
        for t in range(T):
            pair[2 * t] = (qa[t] >> shift) & 3
            pair[2 * t + 1] = (qb[t] >> shift) & 3


@njit(inline="always")
def _k23_pairs(qs_blk, qh_blk, has_h, lows):
    """A k2 or k3 sub-block's 16 codes as 8 byte pairs for qmatmul._pair_sums: lows[p] holds
    the codes of elements 2p and 2p+1 at bytes 2t and 2t+1, for k3 with the third bit (q + 4,
    0..7). Pair p = 2k + m reads code rows 2m and 2m+1 at bits 2k; pair p = 4r + i, its third
    bits from byte row r at bits 2i and 2i+1. One pass per pair row: a pass writing several
    rows of `lows` did not vectorize (8x slower)."""
    q0, q1, q2, q3 = qs_blk[0], qs_blk[1], qs_blk[2], qs_blk[3]
    h0, h1 = (qh_blk[0], qh_blk[1]) if has_h else (q0, q1)     # (unread without third bits)
    _k23_pair(lows[0], q0, q1, 0, h0, 0, has_h)
    _k23_pair(lows[1], q2, q3, 0, h0, 2, has_h)
    _k23_pair(lows[2], q0, q1, 2, h0, 4, has_h)
    _k23_pair(lows[3], q2, q3, 2, h0, 6, has_h)
    _k23_pair(lows[4], q0, q1, 4, h1, 0, has_h)
    _k23_pair(lows[5], q2, q3, 4, h1, 2, has_h)
    _k23_pair(lows[6], q0, q1, 6, h1, 4, has_h)
    _k23_pair(lows[7], q2, q3, 6, h1, 6, has_h)


@njit(inline="always")
def _two_bit_token(qs_blk, qh_blk, sc_row, has_h, xr, o, bsum, prow, tot, mins):
    """One token over a k2/k3 sub-block of 16: its integer sum isum[t] = sum_j q[j, t] *
    xr[o + j] taken straight from the packed bytes, without decoding the codes one by one, and
    added to the super-block's sums at once, weighted by the sub-block's scale from its byte in
    sc_row: tot[t] += scale * isum[t], and for Q2_K mins[t] += min * bsum (the activations'
    sum over the sub-block). One pass over the tile's rows after the products, not four.
    Every token of a batch takes this too: it beat decoding the block once into int16 weights
    shared by the batch (1.3-1.6x at 16 and 64 tokens, docs/benchmarks.md).

    Byte r of a code row holds the 2-bit codes c0..c3 of elements r, r+4, r+8, r+12 at bits 0,
    2, 4, 6, so with x0..x3 those elements' activations
        c0 x0 + c1 x1 + c2 x2 + c3 x3 = q x0 + (q >> 2)(x1 - 4 x0) + (q >> 4)(x2 - 4 x1)
                                        + (q >> 6)(x3 - 4 x2)
    (each shift's term cancels the higher codes the previous one counted): four products and
    three constant shifts per byte, where decoding each code takes a multiply, a shift and a
    mask of its own. Q3_K's third bits, element j's at bit j % 8 of byte j // 8, telescope the
    same way with shifts by one, and its offset of -4 is -4 times bsum.
    The terms may wrap around in int16, but int16 arithmetic is exact modulo 2**16 and the
    row's true sum stays within its bound: |low part| <= 16 * 3 * 128, |4 * third bits part|
    <= 4 * 16 * 128, together 14336 < 2**15.
    """
    T = prow.shape[0]
    prow[:] = 0
    for r in range(4):
        qrow = qs_blk[r]
        x0, x1 = np.int16(xr[o + r]), np.int16(xr[o + r + 4])
        x2, x3 = np.int16(xr[o + r + 8]), np.int16(xr[o + r + 12])
        a1 = np.int16(x1 - np.int16(4) * x0)
        a2 = np.int16(x2 - np.int16(4) * x1)
        a3 = np.int16(x3 - np.int16(4) * x2)
        for t in range(T):
            q = np.int16(qrow[t])
            prow[t] = np.int16(prow[t] + q * x0 + (q >> 2) * a1 + (q >> 4) * a2 + (q >> 6) * a3)
    if has_h:
        for r in range(2):
            hrow = qh_blk[r]
            e = o + 8 * r
            c0 = np.int16(np.int16(4) * np.int16(xr[e]))          # 4 x: the bit's weight is 4
            c1 = np.int16(np.int16(4) * (np.int16(xr[e + 1]) - np.int16(2) * np.int16(xr[e])))
            c2 = np.int16(np.int16(4) * (np.int16(xr[e + 2]) - np.int16(2) * np.int16(xr[e + 1])))
            c3 = np.int16(np.int16(4) * (np.int16(xr[e + 3]) - np.int16(2) * np.int16(xr[e + 2])))
            c4 = np.int16(np.int16(4) * (np.int16(xr[e + 4]) - np.int16(2) * np.int16(xr[e + 3])))
            c5 = np.int16(np.int16(4) * (np.int16(xr[e + 5]) - np.int16(2) * np.int16(xr[e + 4])))
            c6 = np.int16(np.int16(4) * (np.int16(xr[e + 6]) - np.int16(2) * np.int16(xr[e + 5])))
            c7 = np.int16(np.int16(4) * (np.int16(xr[e + 7]) - np.int16(2) * np.int16(xr[e + 6])))
            for t in range(T):
                h = np.int16(hrow[t])
                prow[t] = np.int16(prow[t] + h * c0 + (h >> 1) * c1 + (h >> 2) * c2
                                   + (h >> 3) * c3 + (h >> 4) * c4 + (h >> 5) * c5
                                   + (h >> 6) * c6 + (h >> 7) * c7)
        offset = np.int32(4) * np.int32(bsum)
        for t in range(T):
            tot[t] += np.int32(np.int8(sc_row[t])) * (np.int32(prow[t]) - offset)
    else:
        for t in range(T):
            b = np.int32(sc_row[t])
            tot[t] += (b & 15) * np.int32(prow[t])
            mins[t] += (b >> 4) * bsum


@njit(inline="always")
def _subtract(row, c):
    for t in range(row.shape[0]):
        row[t] -= c


@njit(cache=True)
def _k23_batch(qs_blk, qh_blk, sc_row, has_h, xq, b0, nbt, o, bsums, lows, xpairs, isum, tot, mins):
    """_two_bit_token's sums for tokens b0..b0+nbt-1 at once, in byte pairs (kernels/bytedot.py):
    the sub-block's codes unpacked once (_k23_pairs), each token's products taken by
    qmatmul._pair_sums, then weighted by the scales as _two_bit_token weights them. A function
    of its own, not inlined: inlined, it made LLVM compile the one-token path of
    matmul_k_decoded (Q3_K) a quarter slower."""
    _k23_pairs(qs_blk, qh_blk, has_h, lows)
    _pair_sums(xq, b0, nbt, o, 8, lows, lows, xpairs, isum, 3)
    T = isum.shape[1]
    for bb in range(nbt):
        bsum = np.int32(bsums[b0 + bb])
        t_row, m_row, row = tot[bb], mins[bb], isum[bb]
        if has_h:                                  # codes q + 4: minus 4 bsum
            offset = np.int32(4) * bsum
            for t in range(T):
                t_row[t] += np.int32(np.int8(sc_row[t])) * (row[t] - offset)
        else:
            for t in range(T):
                b = np.int32(sc_row[t])
                t_row[t] += (b & 15) * row[t]
                m_row[t] += (b >> 4) * bsum


@njit(inline="always")
def _dot_int16(w, xq, b0, nbt, o, rows, psum, isum):
    """isum[bb, t] = sum_j w[j, t] * xq[b0 + bb, o + j], exactly: `rows` rows at a time in int16
    (psum), then widened. Four rows per pass over the tile's rows (rows is a multiple of 4),
    so the partial sums are loaded and stored once per four products, not once per product."""
    bs, T = w.shape
    for bb in range(nbt):
        irow, prow = isum[bb], psum[bb]
        xr = xq[b0 + bb, o:]
        irow[:] = 0
        for j0 in range(0, bs, rows):
            prow[:] = 0
            for j in range(j0, j0 + rows, 4):
                x0, x1 = np.int16(xr[j]), np.int16(xr[j + 1])
                x2, x3 = np.int16(xr[j + 2]), np.int16(xr[j + 3])
                w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
                for t in range(T):
                    prow[t] = np.int16(prow[t] + w0[t] * x0 + w1[t] * x1 + w2[t] * x2
                                       + w3[t] * x3)
            for t in range(T):
                irow[t] += np.int32(prow[t])


@njit(inline="always")
def _dot_int32(w, xq, b0, nbt, o, isum):
    """isum[bb, t] = sum_j w[j, t] * xq[b0 + bb, o + j] in int32, four rows per pass (bs is a
    multiple of 4)."""
    bs, T = w.shape
    for bb in range(nbt):
        row = isum[bb]
        xr = xq[b0 + bb, o:]
        row[:] = 0
        for j in range(0, bs, 4):
            x0, x1 = np.int32(xr[j]), np.int32(xr[j + 1])
            x2, x3 = np.int32(xr[j + 2]), np.int32(xr[j + 3])
            w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
            for t in range(T):
                row[t] += w0[t] * x0 + w1[t] * x1 + w2[t] * x2 + w3[t] * x3


@njit(parallel=True, cache=True)
def matmul_b32_decoded(qs, qh, d, m, xq, xd, xs, out):
    """out [B, N] for a q5 or iq4nl W. q5: `m` has a zero-length block axis for Q5_0
    (w = d * (q - 16)); iq4nl: `qh` has a zero-length byte axis."""
    G, nb, _, T = qs.shape
    B = xq.shape[0]
    N = out.shape[1]
    has_m = m.shape[1] > 0
    is_q5 = qh.shape[2] > 0
    zero = np.int16(0) if has_m else np.int16(16)
    rows = ROWS_IN_INT16_Q5_1 if has_m else ROWS_IN_INT16_Q5_0
    n_parts = thread_parts(G)
    for part in prange(n_parts):                  # a run of tiles per thread (kernels/scratch.py)
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        isum = empty_lines((TOKEN_CHUNK, T), np.int32)
        psum = empty_lines((TOKEN_CHUNK, T), np.int16)
        w16 = empty_lines((32, T), np.int16)      # the decoded block, q5
        w8 = empty_lines((32, T), np.int8)        # the decoded block, iq4nl
        lo_l, hi_l = empty_lines((8, 2 * T), np.uint8), empty_lines((8, 2 * T), np.uint8)
        lo_h, hi_h = empty_lines((8, 2 * T), np.uint8), empty_lines((8, 2 * T), np.uint8)
        xpairs = empty_lines((32, PAIR_ROWS), np.int16)
        dw = empty_lines((T,), np.float32)
        mw = empty_lines((T,), np.float32)
        mw[...] = 0
        first, end = tile_run(part, n_parts, G)
        for g in range(first, end):
            for b0 in range(0, B, TOKEN_CHUNK):
                nbt = min(TOKEN_CHUNK, B - b0)
                acc[:nbt] = 0.0
                for ib in range(nb):
                    ahead = min(ib + 1, nb - 1)       # the next block's bytes, as this one's go
                    prefetch(qh[g, ahead])
                    prefetch(d[g, ahead])
                    if has_m:
                        prefetch(m[g, ahead])
                    if is_q5 and nbt == 1:
                        _dot_q5_one_token(qs[g, ib], qs[g, ahead], qh[g, ib], zero, xq[b0], ib * 32,
                                          rows, psum[0], isum[0])
                    elif is_q5:
                        _decode_q5(qs[g, ib], qs[g, ahead], qh[g, ib], zero, w16)
                        _dot_int16(w16, xq, b0, nbt, ib * 32, rows, psum, isum)
                    elif nbt == 1:
                        _dot_iq4_one_token(qs[g, ib], qs[g, ahead], xq[b0], ib * 32, isum[0], w8)
                    elif PAIR_MADD:
                        _iq4_pairs(qs[g, ib], qs[g, ahead], w8, lo_l, hi_l, lo_h, hi_h)
                        _iq4_pair_sums(xq, b0, nbt, ib * 32, lo_l, hi_l, lo_h, hi_h, xpairs, isum)
                        for bb in range(nbt):               # the levels' offset of 128
                            xr = xq[b0 + bb, ib * 32:ib * 32 + 32]
                            c = np.int32(0)
                            for j in range(32):
                                c += np.int32(xr[j])
                            _subtract(isum[bb], 128 * c)
                    else:
                        _decode_iq4(qs[g, ib], qs[g, ahead], w8)
                        _dot_int32(w8, xq, b0, nbt, ib * 32, isum)
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
                rows_out = min(T, N - g * T)
                for bb in range(nbt):
                    out[b0 + bb, g * T:g * T + rows_out] = acc[bb, :rows_out]


@njit(parallel=True, cache=True)
def matmul_k_decoded(kind, qs, qh, sc, d, dmin, xq, xd, bsums, out):
    """out [B, N] for a k2, k3 or iq4xs W (`kind` one of KIND_*), against q8_K activations
    xq [B, K] int8, xd [B, K/256] float32, bsums [B, K/16] int32. Fields a kind lacks are
    passed with a zero-length axis."""
    G, nsub, _, T = qs.shape
    bs = 32 if kind == KIND_IQ4XS else 16
    per_super = 256 // bs
    B = xq.shape[0]
    N = out.shape[1]
    n_parts = thread_parts(G)
    for part in prange(n_parts):                  # a run of tiles per thread (kernels/scratch.py)
        acc = empty_lines((TOKEN_CHUNK, T), np.float32)
        isum = empty_lines((TOKEN_CHUNK, T), np.int32)
        psum = empty_lines((TOKEN_CHUNK, T), np.int16)
        itot = empty_lines((TOKEN_CHUNK, T), np.int32)
        imin = empty_lines((TOKEN_CHUNK, T), np.int32)
        wiq4 = empty_lines((32, T), np.int8)
        lo_l, hi_l = empty_lines((8, 2 * T), np.uint8), empty_lines((8, 2 * T), np.uint8)
        lo_h, hi_h = empty_lines((8, 2 * T), np.uint8), empty_lines((8, 2 * T), np.uint8)
        xpairs = empty_lines((32, PAIR_ROWS), np.int16)
        s = empty_lines((T,), np.int32)           # an IQ4_XS sub-block's scales
        dws = empty_lines((2, T), np.float32)
        dws[...] = 0
        dw, mw = dws[0], dws[1]                   # the super-block's d and (Q2_K) dmin
        first, end = tile_run(part, n_parts, G)
        for g in range(first, end):
            for b0 in range(0, B, TOKEN_CHUNK):
                nbt = min(TOKEN_CHUNK, B - b0)
                acc[:nbt] = 0.0
                n_super = nsub // per_super
                for isb in range(n_super):
                    itot[:nbt] = 0
                    imin[:nbt] = 0
                    next_super = min(isb + 1, n_super - 1)     # its scales, while this one works
                    prefetch(d[g, next_super])
                    if kind == KIND_K2:
                        prefetch(dmin[g, next_super])
                    for ib in range(isb * per_super, (isb + 1) * per_super):
                        ahead = min(ib + 1, nsub - 1)     # the next sub-block's bytes
                        prefetch(sc[g, ahead])
                        if kind != KIND_IQ4XS:            # 4 rows of codes (2 KB at most): at once
                            prefetch(qs[g, ahead])
                            if kind == KIND_K3:
                                prefetch(qh[g, ahead])
                        if kind == KIND_IQ4XS:
                            if nbt == 1:
                                _dot_iq4_one_token(qs[g, ib], qs[g, ahead], xq[b0], ib * bs,
                                                   isum[0], wiq4)
                            elif PAIR_MADD:
                                _iq4_pairs(qs[g, ib], qs[g, ahead], wiq4, lo_l, hi_l, lo_h, hi_h)
                                _iq4_pair_sums(xq, b0, nbt, ib * bs, lo_l, hi_l, lo_h, hi_h, xpairs,
                                               isum)
                                for bb in range(nbt):       # the levels' offset of 128
                                    c = np.int32(bsums[b0 + bb, 2 * ib]) + np.int32(
                                        bsums[b0 + bb, 2 * ib + 1])
                                    _subtract(isum[bb], 128 * c)
                            else:
                                _decode_iq4(qs[g, ib], qs[g, ahead], wiq4)
                                _dot_int32(wiq4, xq, b0, nbt, ib * bs, isum)
                            for t in range(T):
                                s[t] = np.int32(np.int8(sc[g, ib, t]))
                            for bb in range(nbt):
                                tot, row = itot[bb], isum[bb]
                                for t in range(T):
                                    tot[t] += s[t] * row[t]
                        elif PAIR_MADD and nbt > 1:
                            _k23_batch(qs[g, ib], qh[g, ib], sc[g, ib], kind == KIND_K3, xq, b0, nbt,
                                       ib * bs, bsums[:, ib], lo_l, xpairs, isum, itot, imin)
                        else:                             # adds its sums itself
                            for bb in range(nbt):
                                _two_bit_token(qs[g, ib], qh[g, ib], sc[g, ib], kind == KIND_K3,
                                               xq[b0 + bb], ib * bs, bsums[b0 + bb, ib],
                                               psum[0], itot[bb], imin[bb])
                    for t in range(T):
                        dw[t] = f16_to_f32(d[g, isb, t])
                    if kind == KIND_K2:
                        for t in range(T):
                            mw[t] = f16_to_f32(dmin[g, isb, t])
                    for bb in range(nbt):
                        dx = xd[b0 + bb, isb]
                        arow, tot, mins = acc[bb], itot[bb], imin[bb]
                        for t in range(T):
                            arow[t] += dw[t] * dx * np.float32(tot[t]) - mw[t] * dx * np.float32(mins[t])
                rows_out = min(T, N - g * T)
                for bb in range(nbt):
                    out[b0 + bb, g * T:g * T + rows_out] = acc[bb, :rows_out]
