"""The embedding score's vectors: the base model's own hidden states, nothing else downloaded.

A prompt's embedding is the residual stream after the first `n_layers` blocks
(Llama.hidden_states), averaged over the prompt's tokens, without the chat template:

    x = embed(tokens)                          [T, D]
    x = blocks 0..n_layers-1 (x)               [T, D]   n_layers/30 of a prefill here
    e = mean(x[1:])                            [D]      (x[0] if the prompt is one token)

The first token is left out of the mean: every Llama routes attention to position 0 (the
"attention sink") and its hidden state grows a few huge dimensions from the middle layers on,
which would otherwise outweigh the rest of the prompt. Intermediate layers embed sentences
better than the last one (Skean et al. 2025, "Layer by Layer"); tools/eval_router.py sweeps
n_layers (docs/router.md).

Raw embeddings share a large common component and a few dimensions of huge variance, so cosine
between them says little. The router standardizes every dimension first (`Standardizer`, by the
mean and spread of all example prompts it knows: the base model's card and every adapter's),
then compares directions. An adapter is summarized by the moments of its examples' embeddings
(`Moments`: count, sum, sum of squares), so that the store keeps three vectors per adapter,
the global statistics are exact sums, and an adapter's centroid in standardized space is

    c_a = unit((sum_a / n_a - mu) / sigma)      [D]

(the mean of standardized embeddings: standardizing is affine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora_np.model.batch import Batch

BATCH_TOKENS = 256           # prompt tokens per forward when embedding many prompts (indexing)


def pool(states: np.ndarray) -> np.ndarray:
    """[T, D] hidden states of one prompt -> [D]: the mean over tokens 1..T-1 (see above)."""
    return states[1:].mean(axis=0) if len(states) > 1 else states[0]


def embed_tokens(llama, token_lists: list[np.ndarray], n_layers: int) -> np.ndarray:
    """[N, D] float32 embeddings of N tokenized prompts; each forward gets a fresh cache of its
    own (never an engine's), so this may run beside other forwards on other threads."""
    out = np.empty((len(token_lists), llama.cfg.dim), np.float32)
    start = 0
    while start < len(token_lists):
        stop, n_tokens = start, 0
        while stop < len(token_lists) and (stop == start or n_tokens + len(token_lists[stop])
                                           <= BATCH_TOKENS):
            n_tokens += len(token_lists[stop])
            stop += 1
        group = token_lists[start:stop]
        lengths = np.array([len(t) for t in group])
        tokens = np.concatenate(group).astype(np.int32)                  # [B]
        seq_ids = np.repeat(np.arange(len(group), dtype=np.int32), lengths)
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        batch = Batch(tokens, seq_ids, positions, np.full(len(tokens), -1, np.int32),
                      np.zeros(1, np.int32))
        cache = llama.new_cache(int(lengths.sum()) + len(group) * 32)    # room for page padding
        states = llama.hidden_states(batch, cache, n_layers)             # [B, D]
        ends = np.cumsum(lengths)
        for i, (end, n) in enumerate(zip(ends, lengths)):
            out[start + i] = pool(states[end - n:end])
        start = stop
    return out


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of some embeddings: enough for their centroid and for
    pooled per-dimension statistics, and additive."""

    n: int
    sum: np.ndarray          # [D] float64
    sumsq: np.ndarray        # [D] float64

    @classmethod
    def of(cls, embeddings: np.ndarray) -> Moments:
        e = np.asarray(embeddings, np.float64)                           # [n, D]
        return cls(len(e), e.sum(axis=0), (e * e).sum(axis=0))

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def to_bytes(self) -> bytes:
        """float32 [2, D] (sum, sum of squares): 4.6 KB per adapter for D = 576."""
        return np.stack([self.sum, self.sumsq]).astype(np.float32).tobytes()

    @classmethod
    def from_bytes(cls, n: int, blob: bytes, dim: int) -> Moments:
        both = np.frombuffer(blob, np.float32).reshape(2, dim).astype(np.float64)
        return cls(n, both[0], both[1])


@dataclass(frozen=True)
class Standardizer:
    """x -> unit((x - mu) / sigma), per dimension; mu, sigma of pooled embeddings."""

    mu: np.ndarray           # [D] float32
    sigma: np.ndarray        # [D] float32, > 0

    @classmethod
    def pooled(cls, moments: list[Moments]) -> Standardizer:
        n = sum(m.n for m in moments)
        mu = sum(m.sum for m in moments) / n                             # [D]
        var = np.maximum(sum(m.sumsq for m in moments) / n - mu * mu, 0.0)
        sigma = np.sqrt(var)
        sigma = np.where(sigma > 0, sigma, 1.0)         # a constant dimension carries nothing
        return cls(mu.astype(np.float32), sigma.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[..., D] -> [..., D] float32 unit vectors (a zero vector stays zero)."""
        z = (np.asarray(x, np.float32) - self.mu) / self.sigma
        norm = np.linalg.norm(z, axis=-1, keepdims=True)
        return z / np.where(norm > 0, norm, 1.0)
