"""A flat batch of tokens from many sequences, the unit one forward pass processes.

Batch metadata is index arrays, never ragged Python lists: token b belongs to sequence
seq_ids[b], sits at position positions[b] and uses adapter adapters[b] (-1 = none) at strength
lora_scales[b] (its request's LoRA scale; None = 1 for every token).
Prefill chunks and decode tokens mix freely; logit_rows says which rows need logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray       # [B] int32 token ids
    seq_ids: np.ndarray      # [B] int32 KV-cache sequence ids
    positions: np.ndarray    # [B] int32 positions within their sequences
    adapters: np.ndarray     # [B] int32 adapter slot per token, -1 = base model only
    logit_rows: np.ndarray   # [R] int32 rows of the batch whose logits are returned
    lora_scales: np.ndarray | None = None   # [B] float32 LoRA scale per token, None = all 1

    @classmethod
    def single(cls, tokens, start: int = 0, seq_id: int = 0, adapter: int = -1,
               all_logits: bool = False) -> Batch:
        """Consecutive tokens of one sequence starting at position `start`."""
        tokens = np.asarray(tokens, dtype=np.int32)
        n = len(tokens)
        rows = np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], np.int32)
        return cls(tokens, np.full(n, seq_id, np.int32),
                   np.arange(start, start + n, dtype=np.int32), np.full(n, adapter, np.int32),
                   rows)

    def __len__(self) -> int:
        return len(self.tokens)
