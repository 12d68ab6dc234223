"""Batched multi-LoRA: every token with its own adapter, after one shared base matmul.

    y[b] += scale_a * B_a @ (A_a @ x[b])        a = the adapter of token b (-1: nothing)

The base projection y = x @ W.T has already run for the whole batch. These kernels add the
low-rank corrections: "shrink" (t = A_a x, R values per token) then "expand" (y += t B_a).

All resident adapters of one projection group share flat arrays (an adapter bank, see
adapters/bank.py); adapters of different ranks sit side by side, none padded to the largest.
A group is the projections that read the same input and write one output matrix:
q|k|v, o, gate|up, down. Each *rank row* j of the bank knows where its expansion lands:
    a     [R, K]  uint16 fp16 bits    row j of some adapter's A (the input side)
    b     [P]     uint16 fp16 bits    pool of B columns; row j owns b[bstart[j] : +width[j]]
    scale [R]     float32             alpha / r x user scale for row j's adapter and projection
    col0  [R]     int32               first output column of row j's projection in y
    width [R]     int32               that projection's output width
    bstart[R]     int64               where row j's B values start in the pool
    slot_row0 / slot_nrows [S]        the rows of each adapter slot
Adding a rank-r adapter on q, k and v adds 3r rows; nothing else changes shape.

Two kernels share this layout:
  bgmv  (decode: tokens of many adapters)   one token at a time, each reading its own rows
  sgmv  (prefill: runs of tokens sharing an adapter)   each adapter row is widened to float32
        once per chunk of tokens and reused by all of them
Rounding follows llama.cpp's F16 LoRA path: x is rounded to fp16 before A, t before B
(in the kernels: NumPy's float16 conversion cost more than the LoRA arithmetic itself).
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import f16_to_f32, round_to_f16

SEGMENT_CHUNK = 16   # tokens of one segment processed together in sgmv


@njit(cache=True, fastmath={"reassoc", "contract"})
def _shrink(a_row, xr_row):
    """t = a . x for one rank row: fp16 bits times float32, vectorized (reassociated sum)."""
    acc = np.float32(0.0)
    for k in range(xr_row.shape[0]):
        acc += f16_to_f32(a_row[k]) * xr_row[k]
    return acc


@njit(cache=True)
def _expand(y_row, t, b, start, width):
    """y += t * b[start:start+width] (fp16 bits), one rank row into its projection's columns."""
    for c in range(width):
        y_row[c] += t * f16_to_f32(b[start + c])


@njit(cache=True)
def _round_row(x_row, out):
    for k in range(x_row.shape[0]):
        out[k] = round_to_f16(x_row[k])


@njit(parallel=True, cache=True)
def lora_bgmv(x, y, token_slot, a, b, scale, col0, width, bstart, slot_row0, slot_nrows):
    """x [B, K], y [B, N] updated in place; token_slot [B] int32 (-1 = no adapter)."""
    B, K = x.shape
    for i in prange(B):
        s = token_slot[i]
        if s < 0 or slot_nrows[s] == 0:
            continue
        xr = np.empty(K, np.float32)
        _round_row(x[i], xr)
        for j in range(slot_row0[s], slot_row0[s] + slot_nrows[s]):
            t = round_to_f16(_shrink(a[j], xr)) * scale[j]
            _expand(y[i, col0[j]:], t, b, bstart[j], width[j])


@njit(parallel=True, cache=True)
def lora_sgmv(x, y, seg_begin, seg_end, seg_slot, a, b, scale, col0, width, bstart, slot_row0,
              slot_nrows):
    """Segments: tokens seg_begin[s]..seg_end[s]-1 all use adapter slot seg_slot[s].

    Work items are (segment, chunk of SEGMENT_CHUNK tokens); within one, each rank row's B
    values are widened to float32 once and reused by every token of the chunk. Per token, the
    arithmetic is the gather kernel's, so both give the same bits.
    """
    n_seg = seg_slot.shape[0]
    n_chunks = np.zeros(n_seg + 1, np.int64)
    for s in range(n_seg):
        n_tok = seg_end[s] - seg_begin[s]
        n_chunks[s + 1] = n_chunks[s] + (n_tok + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK
    for item in prange(n_chunks[n_seg]):
        s = 0
        while n_chunks[s + 1] <= item:
            s += 1
        slot = seg_slot[s]
        if slot < 0 or slot_nrows[slot] == 0:
            continue
        t0 = seg_begin[s] + (item - n_chunks[s]) * SEGMENT_CHUNK
        t1 = min(t0 + SEGMENT_CHUNK, seg_end[s])
        xr = np.empty((t1 - t0, x.shape[1]), np.float32)
        for i in range(t0, t1):
            _round_row(x[i], xr[i - t0])
        t = np.empty(t1 - t0, np.float32)
        for j in range(slot_row0[slot], slot_row0[slot] + slot_nrows[slot]):
            for i in range(t0, t1):
                t[i - t0] = round_to_f16(_shrink(a[j], xr[i - t0])) * scale[j]
            c0 = col0[j]
            w = width[j]
            brow = np.empty(w, np.float32)
            for c in range(w):
                brow[c] = f16_to_f32(b[bstart[j] + c])
            for i in range(t0, t1):
                ti = t[i - t0]
                for c in range(w):
                    y[i, c0 + c] += ti * brow[c]


def segments(token_slot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal adapter slots: (seg_begin, seg_end, seg_slot), each [S] int32."""
    token_slot = np.asarray(token_slot, dtype=np.int32)
    if len(token_slot) == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, empty
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(token_slot)) + 1, [len(token_slot)]])
    bounds = bounds.astype(np.int32)
    return bounds[:-1], bounds[1:], token_slot[bounds[:-1]]


# ---------------------------------------------------------------------------------------------
# NumPy reference: per token, the dense low-rank product of its adapter's matrices.

def lora_delta_ref(x, token_slot, a, b, scale, col0, width, bstart, slot_row0, slot_nrows,
                   n_out, with_bound=False):
    """The correction these kernels add to y [B, n_out], written row by row of the bank.

    With `with_bound`, also the largest difference float summation order can make: t is
    rounded to fp16, so a different order may land one fp16 step (2**-10 |t|) away.
    """
    B = x.shape[0]
    delta = np.zeros((B, n_out), np.float64)
    bound = np.zeros((B, n_out), np.float64)
    xr = x.astype(np.float16).astype(np.float32)
    af = a.view(np.float16).astype(np.float32)
    bf = b.view(np.float16).astype(np.float32)
    for i in range(B):
        s = token_slot[i]
        if s < 0:
            continue
        for j in range(slot_row0[s], slot_row0[s] + slot_nrows[s]):
            t = np.float32(af[j] @ xr[i]).astype(np.float16).astype(np.float32) * scale[j]
            bj = bf[bstart[j]:bstart[j] + width[j]]
            delta[i, col0[j]:col0[j] + width[j]] += t * bj
            bound[i, col0[j]:col0[j] + width[j]] += 2.0**-10 * abs(t) * np.abs(bj)
    return (delta, bound) if with_bound else delta
