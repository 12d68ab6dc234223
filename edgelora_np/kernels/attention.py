"""Causal grouped-query attention over a paged KV cache.

The cache holds keys and values as fp16 bits (uint16) in pages of PS positions:
    k, v [P, KVH, PS, HD]   (one layer)
A sequence's positions live in the pages listed in its row of the block table. Query head h
reads key/value head h // (H / KVH). Each query token at position p attends to positions
0..p of its own sequence, so one call serves prefill chunks and decode tokens of many
sequences at once.

Rounding follows llama.cpp without flash attention: q is rounded to fp16 before q.k (ggml
converts it to the cache's type), softmax runs in float32 with a float64 sum, and the
probabilities are rounded to fp16 before they weight V.
"""

import numpy as np
from numba import njit, prange

from edgelora_np.kernels.bits import f16_to_f32, round_to_f16


@njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "nsz", "arcp"})
def attention(q, k_cache, v_cache, block_table, token_rows, positions, scale, out):
    """q [B, H, HD] float32; out [B, H, HD]. token_rows[b] is b's row of block_table."""
    B, H, HD = q.shape
    KVH = k_cache.shape[1]
    PS = k_cache.shape[2]
    group = H // KVH
    for item in prange(B * KVH):
        b = item // KVH
        kvh = item % KVH
        n_ctx = positions[b] + 1
        pages = block_table[token_rows[b]]
        qh = np.empty((group, HD), np.float32)
        for g in range(group):
            for i in range(HD):
                qh[g, i] = round_to_f16(q[b, kvh * group + g, i])
        scores = np.empty((group, n_ctx), np.float32)
        kf = np.empty(HD, np.float32)
        for p in range(n_ctx):
            krow = k_cache[pages[p // PS], kvh, p % PS]
            for i in range(HD):
                kf[i] = f16_to_f32(krow[i])
            for g in range(group):
                s = np.float32(0.0)
                for i in range(HD):
                    s += qh[g, i] * kf[i]
                scores[g, p] = s * scale
        acc = np.zeros((group, HD), np.float32)
        for g in range(group):
            mx = scores[g, 0]
            for p in range(1, n_ctx):
                mx = max(mx, scores[g, p])
            total = 0.0
            for p in range(n_ctx):
                e = np.float32(np.exp(scores[g, p] - mx))
                scores[g, p] = e
                total += e
            inv = np.float32(1.0 / total)
            for p in range(n_ctx):
                scores[g, p] = round_to_f16(scores[g, p] * inv)
        vf = np.empty(HD, np.float32)
        for p in range(n_ctx):
            vrow = v_cache[pages[p // PS], kvh, p % PS]
            for i in range(HD):
                vf[i] = f16_to_f32(vrow[i])
            for g in range(group):
                w = scores[g, p]
                for i in range(HD):
                    acc[g, i] += w * vf[i]
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
