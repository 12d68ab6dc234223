"""The Llama forward pass in plain NumPy float64: the oracle for model/llama.py, and its teaching text.

No KV cache, no batching, no kernels: one sequence, every weight dequantized to a dense float64
matrix, every step written with `@`. It shares only the file reader and the config with the
engine, so that a bug in a kernel cannot hide by being in both.

Shape letters (model/config.py): n tokens of the sequence, D model dim, H query heads,
KVH key/value heads, HD head dim, F feed-forward dim, V vocabulary.

The engine rounds where llama.cpp does: activations to 8 bits before a quantized matmul (to
fp16 or bf16 before an F16 or BF16 one), q, k and v to fp16 (the KV cache), attention
probabilities to fp16. This reference rounds nowhere, so the two agree only as closely as
those roundings allow (tests/test_forward_reference.py derives the bounds).
"""

from __future__ import annotations

import os

import numpy as np

from edgelora_np.gguf.quants import dequantize
from edgelora_np.gguf.reader import GGUFFile, open_gguf
from edgelora_np.model.config import LlamaConfig, config_from_gguf


def reference_logits(gguf_path: str | os.PathLike, token_ids,
                     merged: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """float64 [n, V]: the logits after every token of `token_ids`, from position 0.

    `merged` maps tensor names (e.g. "blk.3.attn_q.weight") to dense deltas [out, in] added to
    the dequantized weights: a LoRA adapter merged in, W + scale * B @ A.
    """
    gf = open_gguf(gguf_path)
    cfg = config_from_gguf(gf)
    weight = _weights(gf, merged or {})
    x = _blocks(gf, cfg, weight, token_ids, cfg.n_layers)                # [n, D]
    h = rmsnorm(x, weight("output_norm.weight"), cfg.rms_eps)            # [n, D]
    # Llama models without an output matrix reuse the embedding (tied weights).
    out_name = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
    return h @ weight(out_name).T                                        # [n, V]


def reference_hidden_states(gguf_path: str | os.PathLike, token_ids, n_layers: int) -> np.ndarray:
    """float64 [n, D]: the residual stream after blocks 0..n_layers-1 (Llama.hidden_states)."""
    gf = open_gguf(gguf_path)
    cfg = config_from_gguf(gf)
    return _blocks(gf, cfg, _weights(gf, {}), token_ids, n_layers)


def _weights(gf: GGUFFile, merged: dict[str, np.ndarray]):
    """name -> the dense float64 weight, plus its merged delta if any."""
    def weight(name: str) -> np.ndarray:
        t = gf.tensor(name)
        w = dequantize(t.data, t.qtype, t.shape, name=name).astype(np.float64)
        return w + merged[name] if name in merged else w
    return weight


def _blocks(gf: GGUFFile, cfg: LlamaConfig, weight, token_ids, n_layers: int) -> np.ndarray:
    """The embeddings of `token_ids` through blocks 0..n_layers-1: x [n, D]."""
    ids = np.asarray(token_ids, dtype=np.int64)                          # [n]
    n = len(ids)
    cos, sin = rope_angles(cfg, np.arange(n), _rope_freq_factors(gf))    # [n, rope_dim/2] x2
    x = weight("token_embd.weight")[ids]                                 # [n, D]
    for i in range(n_layers):
        p = f"blk.{i}."
        # Attention block: x = x + Wo @ attention(rope(Wq h), rope(Wk h), Wv h)
        h = rmsnorm(x, weight(p + "attn_norm.weight"), cfg.rms_eps)      # [n, D]
        q = (h @ weight(p + "attn_q.weight").T).reshape(n, cfg.n_heads, cfg.head_dim)     # [n, H, HD]
        k = (h @ weight(p + "attn_k.weight").T).reshape(n, cfg.n_kv_heads, cfg.head_dim)  # [n, KVH, HD]
        v = (h @ weight(p + "attn_v.weight").T).reshape(n, cfg.n_kv_heads, cfg.head_dim)  # [n, KVH, HD]
        q, k = rope(q, cos, sin), rope(k, cos, sin)                      # rotated, same shapes
        a = causal_attention(q, k, v)                                    # [n, H, HD]
        x = x + a.reshape(n, cfg.dim) @ weight(p + "attn_output.weight").T                # [n, D]
        # Feed-forward block: x = x + Wdown @ (silu(Wgate h) * (Wup h))
        h = rmsnorm(x, weight(p + "ffn_norm.weight"), cfg.rms_eps)       # [n, D]
        gate = h @ weight(p + "ffn_gate.weight").T                       # [n, F]
        up = h @ weight(p + "ffn_up.weight").T                           # [n, F]
        x = x + (silu(gate) * up) @ weight(p + "ffn_down.weight").T      # [n, D]
    return x


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w, per row (Zhang & Sennrich 2019, eq. 4)."""
    ms = (x * x).mean(axis=-1, keepdims=True)                            # [n, 1]
    return x / np.sqrt(ms + eps) * w                                     # [n, D]


def rope_angles(cfg: LlamaConfig, positions: np.ndarray,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n, rope_dim/2] of angle pos * freq_scale * base^(-2i/rope_dim) / factor_i.

    (RoFormer, Su et al. 2021, eq. 15; linear scaling multiplies positions, llama.cpp
    ggml_rope_ext; Llama 3.1 style models divide theta_i by rope_freqs.weight[i].)
    """
    i = np.arange(cfg.rope_dim // 2)                                     # [rope_dim/2]
    inv_freq = cfg.rope_base ** (-2.0 * i / cfg.rope_dim)                # [rope_dim/2]
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = np.outer(positions * cfg.rope_freq_scale, inv_freq)         # [n, rope_dim/2]
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by angle i (llama.cpp rope mode 0).

    x [n, heads, HD]; dims past rope_dim are left as they are.
    """
    half = cos.shape[1]                                                  # rope_dim / 2
    c, s = cos[:, None, :], sin[:, None, :]                              # [n, 1, rope_dim/2]
    x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]                  # [n, heads, rope_dim/2]
    y = x.copy()                                                         # [n, heads, HD]
    y[..., 0:2 * half:2] = x0 * c - x1 * s
    y[..., 1:2 * half:2] = x0 * s + x1 * c
    return y


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(HD) + causal mask) v with grouped-query heads.

    q [n, H, HD], k and v [n, KVH, HD] -> [n, H, HD]. Query head h reads kv head h // (H/KVH)
    (Ainslie et al. 2023, GQA). Token t sees tokens 0..t.
    """
    n, H, HD = q.shape
    group = H // k.shape[1]
    k = np.repeat(k, group, axis=1)                                      # [n, H, HD]
    v = np.repeat(v, group, axis=1)                                      # [n, H, HD]
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(HD)               # [H, n, n]
    future = np.triu(np.ones((n, n), dtype=bool), k=1)                   # [n, n] s > t
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)                    # [H, n, n]
    return np.einsum("hts,shd->thd", probs, v)                           # [n, H, HD]


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) (the SwiGLU gate, Shazeer 2020)."""
    return x / (1.0 + np.exp(-x))


def _rope_freq_factors(gf: GGUFFile) -> np.ndarray | None:
    if "rope_freqs.weight" not in gf.tensors:
        return None
    t = gf.tensor("rope_freqs.weight")
    return dequantize(t.data, t.qtype, t.shape, name=t.name).astype(np.float64)
