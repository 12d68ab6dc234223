"""The Llama forward pass over a flat batch of tokens (see docs/forward.md for a walk-through).

    x = embed(tokens)                                    [B, D]
    for each block:
        h = rmsnorm(x) ; q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T    [B, H*HD], [B, KVH*HD] x2
        q, k = rope(q, pos), rope(k, pos) ; cache k, v
        x = x + attention(q, cache) @ Wo.T                [B, D]
        h = rmsnorm(x) ; x = x + (silu(h @ Wg.T) * (h @ Wu.T)) @ Wd.T
    logits = rmsnorm(x[rows]) @ Wout.T                   [R, V]

Every linear projection goes through `Llama.project`, the single place where LoRA adapters add
their per-token low-rank corrections (`lora`: a kernels.lora.LoraBatch, or None).
`Llama.hidden_states` runs only the first blocks and returns the residual stream x (the
router's prompt embedding, router/embed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora_np.errors import EdgeLoraError
from edgelora_np.kernels.attention import attention
from edgelora_np.kernels.elementwise import rmsnorm, rope_store, rope_tables, swiglu
from edgelora_np.kernels.pack import PackedMatrix, matmul, packed_rows
from edgelora_np.model import compute
from edgelora_np.model.batch import Batch
from edgelora_np.model.config import LlamaConfig
from edgelora_np.model.kv_cache import PAGE_SIZE, PagedKVCache
from edgelora_np.model.weights import ModelWeights


@dataclass(frozen=True)
class _Step:
    """What every block of one forward call reads besides the residual stream."""

    positions: np.ndarray    # [B] int32
    table: np.ndarray        # [S, pages] int32 block table of the batch's sequences
    token_rows: np.ndarray   # [B] int32 each token's row of `table`
    slot_page: np.ndarray    # [B] page, and offset in it, where each token's k/v go
    slot_off: np.ndarray     # [B]
    cos: np.ndarray          # [positions, rope_dim/2] rope tables, a matching pair
    sin: np.ndarray
    h: np.ndarray            # [B, D] scratch: the normed stream
    q: np.ndarray            # [B, H, HD] scratch: the rotated queries
    attn: np.ndarray         # [B, H, HD] scratch: attention output
    act: np.ndarray          # [B, F] scratch: SwiGLU output


class Llama:
    def __init__(self, cfg: LlamaConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights
        empty = np.empty((0, cfg.rope_dim // 2), np.float32)
        self._rope = (empty, empty)          # cos, sin [positions, rope_dim/2], grown on demand
        self._attn_scale = np.float32(1.0 / np.sqrt(cfg.head_dim))

    def new_cache(self, n_tokens: int | None = None, max_seq_len: int | None = None):
        return PagedKVCache(self.cfg, n_tokens or self.cfg.context_length, max_seq_len)

    def project(self, x: np.ndarray, mats: tuple[PackedMatrix, ...], group: str, layer: int,
                lora=None) -> np.ndarray:
        """x [B, K] -> y [B, sum of N]: one or more matrices sharing the input (one group),
        then each token's LoRA correction: y[b] += scale B_a (A_a x[b]) for its adapter a."""
        if len(mats) == 1:
            y = matmul(mats[0], x)
        else:
            y = np.concatenate([matmul(m, x) for m in mats], axis=1)
        if lora is not None:
            lora.apply(group, layer, x, y)
        return y

    def forward(self, batch: Batch, cache: PagedKVCache, lora=None) -> np.ndarray:
        """Run one batch, appending its keys/values to `cache`; logits [R, V] float32.

        `lora` maps the batch's adapter slots onto resident adapters (kernels.lora.LoraBatch);
        without it, every token runs on the base model. It runs on the compute thread
        (model/compute.py), whichever thread calls it.
        """
        return compute.run(self._forward, batch, cache, lora)

    def _forward(self, batch: Batch, cache: PagedKVCache, lora) -> np.ndarray:
        cfg, w = self.cfg, self.weights
        x, step = self._embed(batch, cache)                              # [B, D]
        for li in range(len(w.layers)):
            self._block(li, x, step, cache, lora)
        rows = np.ascontiguousarray(x[batch.logit_rows])                 # [R, D]
        out = np.empty_like(rows)
        rmsnorm(rows, w.output_norm, cfg.rms_eps, out)
        return matmul(w.output, out)                                     # [R, V]

    def hidden_states(self, batch: Batch, cache: PagedKVCache, n_layers: int, lora=None, *,
                      every_layer: bool = False) -> np.ndarray:
        """The residual stream after blocks 0..n_layers-1, before any final norm: [B, D]
        float32 (every_layer: [n_layers, B, D], the stream after each block). Keys and values
        of those blocks go to `cache` as in forward; the blocks after them do not run.

        The router embeds a prompt with it (router/embed.py): n_layers of 30 cost n_layers/30
        of a prefill. Like forward, it runs on the compute thread."""
        return compute.run(self._hidden_states, batch, cache, n_layers, lora, every_layer)

    def _hidden_states(self, batch: Batch, cache: PagedKVCache, n_layers: int, lora,
                       every_layer: bool) -> np.ndarray:
        if not 0 <= n_layers <= len(self.weights.layers):
            raise EdgeLoraError(f"n_layers must be between 0 and {len(self.weights.layers)}, "
                                f"got {n_layers}")
        x, step = self._embed(batch, cache)                              # [B, D]
        states = np.empty((n_layers, *x.shape), np.float32) if every_layer else None
        for li in range(n_layers):
            self._block(li, x, step, cache, lora)
            if every_layer:
                states[li] = x
        return states if every_layer else x

    def _embed(self, batch: Batch, cache: PagedKVCache) -> tuple[np.ndarray, _Step]:
        """Check a batch, reserve its cache slots; its token embeddings x [B, D] and the
        per-batch state every block reads (positions, block table, rope tables, scratch)."""
        cfg, w = self.cfg, self.weights
        B, D, H, HD, F = len(batch), cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_dim
        positions = batch.positions
        self._check(batch)

        # Cache slots for the new tokens, and each token's row of the block table.
        seqs, token_rows = np.unique(batch.seq_ids, return_inverse=True)
        for s in seqs.tolist():
            cache.reserve(s, int(positions[batch.seq_ids == s].max()) + 1)
        table = cache.block_table(seqs)                                  # [S, pages]
        token_rows = token_rows.astype(np.int32)
        slot_page = table[token_rows, positions // PAGE_SIZE]            # [B]
        slot_off = positions % PAGE_SIZE                                 # [B]

        if positions.max() >= len(self._rope[0]):
            self._grow_rope_tables(int(positions.max()) + 1)
        cos, sin = self._rope                              # read once: a matching pair
        x = packed_rows(w.token_embd, batch.tokens)                      # [B, D]
        step = _Step(positions, table, token_rows, slot_page, slot_off, cos, sin,
                     h=np.empty((B, D), np.float32), q=np.empty((B, H, HD), np.float32),
                     attn=np.empty((B, H, HD), np.float32),
                     act=np.empty((B, F), np.float32))
        return x, step

    def _block(self, li: int, x: np.ndarray, step: _Step, cache: PagedKVCache, lora) -> None:
        """Transformer block `li`, in place on the residual stream x [B, D]."""
        cfg, layer = self.cfg, self.weights.layers[li]
        B, D, H, KVH, F = len(x), cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
        h, attn, act = step.h, step.attn, step.act
        rmsnorm(x, layer.attn_norm, cfg.rms_eps, h)
        qkv = self.project(h, layer.qkv, "qkv", li, lora)                # [B, D + 2*KVH*HD]
        rope_store(qkv, H, KVH, step.positions, step.cos, step.sin, cache.k[li], cache.v[li],
                   step.slot_page, step.slot_off, step.q)                # k, v into the cache
        attention(step.q, cache.k[li], cache.v[li], step.table, step.token_rows, step.positions,
                  self._attn_scale, attn)
        x += self.project(attn.reshape(B, D), (layer.wo,), "o", li, lora)
        rmsnorm(x, layer.ffn_norm, cfg.rms_eps, h)
        gate_up = self.project(h, layer.gate_up, "gate_up", li, lora)    # [B, 2F]
        swiglu(gate_up, F, act)
        x += self.project(act, (layer.down,), "down", li, lora)

    def _grow_rope_tables(self, n_pos: int) -> None:
        """cos/sin for positions 0..n-1, grown by doubling up to the model's context."""
        n = min(max(n_pos, 2 * len(self._rope[0]), 256), self.cfg.context_length)
        # One assignment, so that a thread running another forward sees a matching pair.
        self._rope = rope_tables(n, self.cfg.rope_dim, self.cfg.rope_base,
                                 self.cfg.rope_freq_scale, self.weights.rope_freq_factors)

    def _check(self, batch: Batch) -> None:
        tokens = batch.tokens
        if len(tokens) == 0:
            raise EdgeLoraError("empty batch")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            bad = int(tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0])
            raise EdgeLoraError(f"token id {bad} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if batch.positions.max() >= self.cfg.context_length:
            raise EdgeLoraError(
                f"position {int(batch.positions.max())} is past the model's context length "
                f"{self.cfg.context_length}")
