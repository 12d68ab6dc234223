"""Causal grouped-query attention over a paged KV cache.

The cache holds keys and values as fp16 bits (uint16) in pages of PS positions:
    k, v [P, KVH, PS, HD]   (one layer)
A sequence's positions live in the pages listed in its row of the block table. Query head h
reads key/value head h // (H / KVH). Each query token at position p attends to positions
0..p of its own sequence, so one call serves prefill chunks and decode tokens of many
sequences at once.

Rounding follows llama.cpp without flash attention: q is rounded to fp16 before q.k (ggml
converts it to the cache's type), softmax runs in float32 (exp within 1 ulp, as ggml's own
vectorized expf) with a float64 sum, and the probabilities are rounded to fp16 before they
weight V.
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import bits_to_f32, f16_to_f32, round_to_f16
from edgelora_np.kernels.scratch import empty_lines


# Not inline="always": Numba would inline it into the kernel's IR under the kernel's flags, and
# "reassoc" lets LLVM fold the two-part ln 2 reduction back into one (4 ulp). LLVM still inlines
# it, keeping these flags on its instructions, and the loop still vectorizes.
@njit(cache=True, fastmath={"contract", "nsz"})
def exp_f32(x):
    """e**x in float32 for x <= 0 (a softmax's arguments), within 1 ulp of the exact value for
    x >= -87, and e**-87 below: Cephes' expf, exp(x) = 2**n * exp(r) with |r| <= ln(2)/2 and a
    degree-6 polynomial for exp(r), 2**n put together from its bits. Branch-free, so a loop of
    it vectorizes (a call to libm's expf does not): a third of attention's time went there."""
    x = max(x, np.float32(-87.0))
    n = np.float32(np.rint(x * np.float32(1.4426950408889634)))    # x / ln 2
    r = x - n * np.float32(0.693359375)                              # ln 2 in two parts
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * bits_to_f32(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "nsz", "arcp"})
def attention(q, k_cache, v_cache, block_table, token_rows, positions, scale, out):
    """q [B, H, HD] float32; out [B, H, HD]. token_rows[b] is b's row of block_table.

    A page at a time: its keys (or values) [PS, HD] are widened to float32 in one loop, then
    every query head of the group takes its dot products with them."""
    B, H, HD = q.shape
    KVH = k_cache.shape[1]
    PS = k_cache.shape[2]
    group = H // KVH
    for item in prange(B * KVH):
        b = item // KVH
        kvh = item % KVH
        n_ctx = positions[b] + 1
        n_pages = (n_ctx + PS - 1) // PS
        pages = block_table[token_rows[b]]
        qh = empty_lines((group, HD), np.float32)
        for g in range(group):
            for i in range(HD):
                qh[g, i] = round_to_f16(q[b, kvh * group + g, i])
        scores = empty_lines((group, n_ctx), np.float32)
        page = empty_lines((PS, HD), np.float32)
        for pg in range(n_pages):
            src = k_cache[pages[pg], kvh]
            first, n = pg * PS, min(PS, n_ctx - pg * PS)
            for j in range(n):
                for i in range(HD):
                    page[j, i] = f16_to_f32(src[j, i])
            for g in range(group):
                for j in range(n):
                    s = np.float32(0.0)
                    for i in range(HD):
                        s += qh[g, i] * page[j, i]
                    scores[g, first + j] = s * scale
        for g in range(group):
            mx = scores[g, 0]
            for p in range(1, n_ctx):
                mx = max(mx, scores[g, p])
            for p in range(n_ctx):
                scores[g, p] = exp_f32(scores[g, p] - mx)
            total = 0.0
            for p in range(n_ctx):
                total += scores[g, p]
            inv = np.float32(1.0 / total)
            for p in range(n_ctx):
                scores[g, p] = round_to_f16(scores[g, p] * inv)
        acc = empty_lines((group, HD), np.float32)
        acc[...] = 0.0
        for pg in range(n_pages):
            src = v_cache[pages[pg], kvh]
            first, n = pg * PS, min(PS, n_ctx - pg * PS)
            for j in range(n):
                for i in range(HD):
                    page[j, i] = f16_to_f32(src[j, i])
            for g in range(group):
                for j in range(n):
                    w = scores[g, first + j]
                    for i in range(HD):
                        acc[g, i] += w * page[j, i]
        for g in range(group):
            for i in range(HD):
                out[b, kvh * group + g, i] = acc[g, i]


def attention_ref(q, k_cache, v_cache, block_table, token_rows, positions, scale):
    """Plain NumPy: gather each token's keys/values, then softmax(q k^T * scale) v."""
    B, H, HD = q.shape
    KVH, PS = k_cache.shape[1], k_cache.shape[2]
    group = H // KVH
    out = np.empty_like(q)
    for b in range(B):
        n_ctx = positions[b] + 1
        pos = np.arange(n_ctx)
        pages = block_table[token_rows[b]][pos // PS]
        k = k_cache[pages, :, pos % PS].view(np.float16).astype(np.float32)    # [n, KVH, HD]
        v = v_cache[pages, :, pos % PS].view(np.float16).astype(np.float32)
        k = np.repeat(k, group, axis=1)                                        # [n, H, HD]
        v = np.repeat(v, group, axis=1)
        qh = q[b].astype(np.float16).astype(np.float32)                        # [H, HD]
        scores = np.einsum("hd,nhd->hn", qh, k) * np.float32(scale)            # [H, n]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.astype(np.float64).sum(-1, keepdims=True)
        probs = probs.astype(np.float16).astype(np.float32)
        out[b] = np.einsum("hn,nhd->hd", probs, v)
    return out
