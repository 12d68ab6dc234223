"""Batched multi-LoRA: every token with its own adapter, after one shared base matmul.

    y[b] += c_b * scale_a * B_a @ (A_a @ x[b])    a = the adapter of token b (-1: nothing),
                                                  c_b = its request's scale (1 = as imported)

The base projection y = x @ W.T has already run for the whole batch. These kernels add the
low-rank corrections: "shrink" (t = A_a x, r values per token) then "expand" (y += t B_a).

Resident adapters live in one byte arena (adapters/pool.py), each in its own extent, in the
layout adapters/packed.py writes to disk; the kernels read them where they lie. Per projection
group (the projections that read the same input and write one output matrix: q|k|v, o,
gate|up, down) and per layer, a slot table says where slot s's sections start:
    arena16  [n]     uint16 view of the arena (fp16 bits)
    arena32  [n/2]   float32 view of the same bytes
    a_base   [S]     int64  arena16 index of slot s's A rows: [R_s, K], row after row
                            (-1: slot s does not adapt this layer)
    b_base   [S]     int64  arena16 index of its B values: per part p, r_p rows of width_p
    s_base   [S]     int64  arena32 index of its per-row scales (alpha / r x import scale)
    ranks    [S, P]  int32  rank of each part (q, k, v ...) for slot s; 0 = not adapted
    part_col0 / part_width [P]   where part p writes in the group's output y
Row j of the slot's A is a rank row; rows are ordered by part, so adapters of different ranks
sit side by side, none padded to the largest.

Two kernels share this layout:
  bgmv  (decode: tokens of many adapters)   one token at a time, each reading its own rows
  sgmv  (prefill: runs of tokens sharing an adapter)   each adapter row (A and B) is widened
        to float32 once per chunk of tokens and reused by all of them
Per token, token_scale [B] float32 multiplies the correction: a request's own LoRA scale
(llama-server's `lora: [{id, scale}]`), so two requests may share an adapter at different
strengths in one batch.
Rounding follows llama.cpp's F16 LoRA path: x is rounded to fp16 before A, t before B
(in the kernels: NumPy's float16 conversion cost more than the LoRA arithmetic itself).
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import f16_to_f32, round_to_f16
from edgelora_np.kernels.prefetch import prefetch
from edgelora_np.kernels.scratch import empty_lines

SEGMENT_CHUNK = 16   # tokens of one segment processed together in sgmv


@njit(cache=True, fastmath={"reassoc", "contract"})
def _shrink(a_row, xr_row):
    """t = a . x for one rank row, both float32, vectorized (reassociated sum). Callers pass
    rows indexed from 0 (scratch rows): that lets LLVM vectorize the loop."""
    acc = np.float32(0.0)
    for k in range(xr_row.shape[0]):
        acc += a_row[k] * xr_row[k]
    return acc


@njit(cache=True, fastmath={"reassoc", "contract"})
def _shrink16(a_row, xr_row):
    """_shrink with A's row as fp16 bits, widened as they are read (no float32 copy)."""
    acc = np.float32(0.0)
    for k in range(xr_row.shape[0]):
        acc += f16_to_f32(a_row[k]) * xr_row[k]
    return acc


@njit(cache=True)
def _widen(h_row, out):
    """fp16 bits -> float32, one row of the arena into a scratch row."""
    for k in range(h_row.shape[0]):
        out[k] = f16_to_f32(h_row[k])


@njit(cache=True)
def _expand(y_row, t, b_row):
    """y += t * b, one rank row (float32) into its projection's columns."""
    for c in range(b_row.shape[0]):
        y_row[c] += t * b_row[c]


@njit(cache=True)
def _expand16(y_row, t, b_row):
    """_expand from fp16 bits (elementwise, so the same bits as widening first)."""
    for c in range(b_row.shape[0]):
        y_row[c] += t * f16_to_f32(b_row[c])


@njit(cache=True)
def _expand4(y_row, t, b):
    """y += t[0] b[0], then t[1] b[1], t[2] b[2], t[3] b[3]: four rank rows (b [4, >= w]
    float32, w = len(y_row)) in one pass over y instead of four, each element's products added
    in the same order with the same roundings as four _expand calls, so the same bits."""
    t0, t1, t2, t3 = t[0], t[1], t[2], t[3]
    for c in range(y_row.shape[0]):
        v = y_row[c] + t0 * b[0, c]
        v = v + t1 * b[1, c]
        v = v + t2 * b[2, c]
        y_row[c] = v + t3 * b[3, c]


@njit(cache=True)
def _round_row(x_row, out):
    for k in range(x_row.shape[0]):
        out[k] = round_to_f16(x_row[k])


@njit(cache=True)
def _n_rows(ranks, s):
    n = 0
    for p in range(ranks.shape[1]):
        n += ranks[s, p]
    return n


@njit(cache=True)
def _n_values_b(ranks, part_width, s):
    """How many B values slot s holds in this group: sum over parts of rank x width."""
    n = 0
    for p in range(ranks.shape[1]):
        n += ranks[s, p] * part_width[p]
    return n


@njit(parallel=True, cache=True)
def lora_bgmv(x, y, token_slot, token_scale, arena16, arena32, a_base, b_base, s_base, ranks,
              part_col0, part_width):
    """x [B, K], y [B, N] updated in place; token_slot [B] int32 (-1 = no adapter),
    token_scale [B] float32.

    Decode tokens mostly read distinct adapters, whose rows come from memory: while a token
    works through its rank rows, the next token's A rows and B values are prefetched, one
    piece per rank row (kernels/prefetch.py)."""
    B, K = x.shape
    for i in prange(B):
        s = token_slot[i]
        n_rows = _n_rows(ranks, s) if s >= 0 and a_base[s] >= 0 else 0
        if n_rows == 0:
            continue
        a_next = b_next = a_len = b_len = 0
        if i + 1 < B:
            s2 = token_slot[i + 1]
            if s2 >= 0 and a_base[s2] >= 0:
                a_next, a_len = a_base[s2], _n_rows(ranks, s2) * K
                b_next, b_len = b_base[s2], _n_values_b(ranks, part_width, s2)
        a_piece = (a_len + n_rows - 1) // n_rows
        b_piece = (b_len + n_rows - 1) // n_rows
        xr = empty_lines((K,), np.float32)
        _round_row(x[i], xr)
        row = 0
        b_at = b_base[s]
        for p in range(ranks.shape[1]):
            c0, w = part_col0[p], part_width[p]
            for _ in range(ranks[s, p]):
                lo = min(row * a_piece, a_len)
                prefetch(arena16[a_next + lo:a_next + min(lo + a_piece, a_len)])
                lo = min(row * b_piece, b_len)
                prefetch(arena16[b_next + lo:b_next + min(lo + b_piece, b_len)])
                a0 = a_base[s] + row * K
                t = (round_to_f16(_shrink16(arena16[a0:a0 + K], xr)) * arena32[s_base[s] + row]
                     * token_scale[i])
                _expand16(y[i, c0:c0 + w], t, arena16[b_at:b_at + w])
                row += 1
                b_at += w


@njit(parallel=True, cache=True)
def lora_sgmv(x, y, seg_begin, seg_end, seg_slot, token_scale, arena16, arena32, a_base, b_base,
              s_base, ranks, part_col0, part_width):
    """Segments: tokens seg_begin[g]..seg_end[g]-1 all use adapter slot seg_slot[g].

    Work items are (segment, chunk of SEGMENT_CHUNK tokens); within one, each rank row's A
    and B values are widened to float32 once and reused by every token of the chunk (widening
    A per token took 12% of a batched step). Per token, the arithmetic is the gather kernel's,
    so both give the same bits.
    """
    K = x.shape[1]
    n_seg = seg_slot.shape[0]
    n_chunks = np.zeros(n_seg + 1, np.int64)
    for g in range(n_seg):
        n_tok = seg_end[g] - seg_begin[g]
        n_chunks[g + 1] = n_chunks[g] + (n_tok + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK
    for item in prange(n_chunks[n_seg]):
        g = 0
        while n_chunks[g + 1] <= item:
            g += 1
        s = seg_slot[g]
        if s < 0 or a_base[s] < 0 or _n_rows(ranks, s) == 0:
            continue
        t0 = seg_begin[g] + (item - n_chunks[g]) * SEGMENT_CHUNK
        t1 = min(t0 + SEGMENT_CHUNK, seg_end[g])
        xr = empty_lines((t1 - t0, K), np.float32)
        for i in range(t0, t1):
            _round_row(x[i], xr[i - t0])
        t = empty_lines((t1 - t0, 4), np.float32)
        a32 = empty_lines((K,), np.float32)
        b32 = empty_lines((4, y.shape[1]), np.float32)
        row = 0
        b_at = b_base[s]
        for p in range(ranks.shape[1]):
            c0, w = part_col0[p], part_width[p]
            r = ranks[s, p]
            for j0 in range(0, r, 4):               # four rank rows at a time
                n = min(4, r - j0)
                for j in range(n):
                    scale = arena32[s_base[s] + row]
                    a0 = a_base[s] + row * K
                    _widen(arena16[a0:a0 + K], a32)
                    for i in range(t0, t1):
                        t[i - t0, j] = (round_to_f16(_shrink(a32, xr[i - t0])) * scale
                                        * token_scale[i])
                    _widen(arena16[b_at:b_at + w], b32[j, :w])
                    row += 1
                    b_at += w
                for i in range(t0, t1):
                    if n == 4:                      # one pass over y for the four
                        _expand4(y[i, c0:c0 + w], t[i - t0], b32)
                    else:
                        for j in range(n):
                            _expand(y[i, c0:c0 + w], t[i - t0, j], b32[j, :w])


def segments(token_slot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal adapter slots: (seg_begin, seg_end, seg_slot), each [S] int32."""
    token_slot = np.asarray(token_slot, dtype=np.int32)
    if len(token_slot) == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, empty
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(token_slot)) + 1, [len(token_slot)]])
    bounds = bounds.astype(np.int32)
    return bounds[:-1], bounds[1:], token_slot[bounds[:-1]]


class LoraBatch:
    """How one batch's tokens map onto an adapter pool (adapters/pool.py): computed once per
    forward, used per layer.

    Runs of >= 2 tokens with the same adapter (prefill chunks) go to the segment kernel,
    the remaining tokens (decode steps, one per sequence) to the gather kernel.
    token_scale [B] is each token's request scale (None: 1 for every token).
    """

    def __init__(self, pool, token_slot: np.ndarray, token_scale: np.ndarray | None = None):
        self.pool = pool
        token_slot = np.ascontiguousarray(token_slot, dtype=np.int32)
        self.token_scale = (np.ones(len(token_slot), np.float32) if token_scale is None
                            else np.ascontiguousarray(token_scale, dtype=np.float32))
        begin, end, slot = segments(token_slot)
        long = (end - begin >= 2) & (slot >= 0)
        self.seg_begin, self.seg_end, self.seg_slot = begin[long], end[long], slot[long]
        gather = token_slot.copy()
        for b0, b1 in zip(self.seg_begin.tolist(), self.seg_end.tolist()):
            gather[b0:b1] = -1
        self.gather_slot = gather
        self.any_gather = bool((gather >= 0).any())
        self.active = self.any_gather or len(self.seg_slot) > 0

    def apply(self, group: str, layer: int, x: np.ndarray, y: np.ndarray) -> None:
        """y [B, N] += the LoRA corrections of `group` at `layer` for every token."""
        pool, t = self.pool, self.pool.tables[group]
        args = (pool.arena16, pool.arena32, t.a_base[layer], t.b_base[layer], t.s_base[layer],
                t.ranks, t.part_col0, t.part_width)
        if self.any_gather:
            lora_bgmv(x, y, self.gather_slot, self.token_scale, *args)
        if len(self.seg_slot):
            lora_sgmv(x, y, self.seg_begin, self.seg_end, self.seg_slot, self.token_scale, *args)


# ---------------------------------------------------------------------------------------------
# NumPy reference: per token, the dense low-rank product of its adapter's matrices.

def lora_delta_ref(x, token_slot, token_scale, arena16, arena32, a_base, b_base, s_base, ranks,
                   part_col0, part_width, n_out, with_bound=False):
    """The correction these kernels add to y [B, n_out], as dense matrices per adapter part.

    With `with_bound`, also the largest difference float summation order can make: t is
    rounded to fp16, so a different order may land one fp16 step (2**-10 |t|) away.
    """
    B, K = x.shape
    delta = np.zeros((B, n_out), np.float64)
    bound = np.zeros((B, n_out), np.float64)
    xr = x.astype(np.float16).astype(np.float32)
    for i in range(B):
        s = token_slot[i]
        if s < 0 or a_base[s] < 0:
            continue
        row, b_at = 0, int(b_base[s])
        for p in range(ranks.shape[1]):
            r, c0, w = int(ranks[s, p]), int(part_col0[p]), int(part_width[p])
            a0 = int(a_base[s]) + row * K
            A = arena16[a0:a0 + r * K].view(np.float16).astype(np.float32).reshape(r, K)
            Bm = arena16[b_at:b_at + r * w].view(np.float16).astype(np.float32).reshape(r, w)
            scale = arena32[int(s_base[s]) + row:int(s_base[s]) + row + r]
            t = (A @ xr[i]).astype(np.float16).astype(np.float32) * scale * token_scale[i]   # [r]
            delta[i, c0:c0 + w] += t @ Bm
            bound[i, c0:c0 + w] += 2.0**-10 * np.abs(t) @ np.abs(Bm)
            row += r
            b_at += r * w
    return (delta, bound) if with_bound else delta
