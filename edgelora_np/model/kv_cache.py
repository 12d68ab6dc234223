"""A paged KV cache shared by all sequences.

Keys and values of every layer live in one pool of pages of PAGE_SIZE positions, stored as fp16
bits (uint16, the type llama.cpp caches in by default): k, v [L, P, KVH, PS, HD]. A sequence
owns a list of pages, so memory follows the tokens actually cached, not max_seqs x context.
The pool is an anonymous memory map, which the OS backs lazily: pages never written cost no RAM.
Transparent huge pages are turned off for it, or the first token written to each layer would
make 2 MB resident instead of 4 KB.
"""

from __future__ import annotations

import mmap

import numpy as np

from edgelora_np.errors import ContextOverflowError
from edgelora_np.model.config import LlamaConfig

PAGE_SIZE = 32


class PagedKVCache:
    def __init__(self, cfg: LlamaConfig, n_tokens: int, max_seq_len: int | None = None):
        """Room for `n_tokens` positions in total; one sequence may hold `max_seq_len`."""
        self.max_seq_len = min(max_seq_len or n_tokens, cfg.context_length, n_tokens)
        n_pages = -(-n_tokens // PAGE_SIZE)
        shape = (cfg.n_layers, n_pages, cfg.n_kv_heads, PAGE_SIZE, cfg.head_dim)
        self.k = _lazy_zeros(shape, np.uint16)
        self.v = _lazy_zeros(shape, np.uint16)
        self._free = list(range(n_pages - 1, -1, -1))      # a stack: low page ids first
        self._pages: dict[int, list[int]] = {}             # seq id -> its pages, in order
        self._lengths: dict[int, int] = {}                 # seq id -> positions cached

    @property
    def n_pages(self) -> int:
        return self.k.shape[1]

    @property
    def free_tokens(self) -> int:
        return len(self._free) * PAGE_SIZE

    def length(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def pages_needed(self, seq_id: int, new_length: int) -> int:
        have = len(self._pages.get(seq_id, ()))
        return max(0, -(-new_length // PAGE_SIZE) - have)

    def reserve(self, seq_id: int, new_length: int) -> None:
        """Make room for positions 0..new_length-1 of a sequence."""
        if new_length > self.max_seq_len:
            raise ContextOverflowError(
                f"sequence {seq_id} needs {new_length} positions, the context holds "
                f"{self.max_seq_len}")
        need = self.pages_needed(seq_id, new_length)
        if need > len(self._free):
            raise ContextOverflowError(
                f"KV cache full: sequence {seq_id} needs {need} more pages of {PAGE_SIZE}, "
                f"{len(self._free)} free")
        pages = self._pages.setdefault(seq_id, [])
        pages.extend(self._free.pop() for _ in range(need))
        self._lengths[seq_id] = max(self._lengths.get(seq_id, 0), new_length)

    def release(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool."""
        self._free.extend(reversed(self._pages.pop(seq_id, [])))
        self._lengths.pop(seq_id, None)

    def block_table(self, seq_ids: np.ndarray) -> np.ndarray:
        """[S, max pages] int32: row s lists the pages of seq_ids[s] (padding -1)."""
        width = max(len(self._pages[s]) for s in seq_ids.tolist())
        table = np.full((len(seq_ids), width), -1, np.int32)
        for row, s in enumerate(seq_ids.tolist()):
            pages = self._pages[s]
            table[row, :len(pages)] = pages
        return table


def _lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zero-filled array whose memory the OS provides 4 KB page by page, on first write."""
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype, count=int(np.prod(shape))).reshape(shape)
