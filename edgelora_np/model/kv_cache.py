"""A paged KV cache shared by all sequences.

Keys and values of every layer live in one pool of pages of PAGE_SIZE positions, stored as fp16
bits (uint16, the type llama.cpp caches in by default): k, v [L, P, KVH, PS, HD]. A sequence
owns a list of pages, so memory follows the tokens actually cached, not max_seqs x context.
The pool is an anonymous memory map, which the OS backs lazily: pages never written cost no RAM.
Transparent huge pages are turned off for it, or the first token written to each layer would
make 2 MB resident instead of 4 KB.

Pages are reference-counted: sequences with a common prefix (same adapter identity, same tokens)
map the same full pages (model/prefix_cache.py says which). A page is in exactly one of three
states: held (refcount > 0), idle (refcount 0 but keyed: kept for a later hit, evictable, LRU) or
free. Allocation takes a free page, else evicts the oldest idle one; a held page is never taken.
`free_tokens` counts free and idle pages: both are room for new tokens.
"""

from __future__ import annotations

import mmap

import numpy as np

from edgelora_np.errors import ContextOverflowError
from edgelora_np.model.config import LlamaConfig
from edgelora_np.model.prefix_cache import PAGE_SIZE, PrefixCache

__all__ = ["PAGE_SIZE", "PagedKVCache"]


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
        self._refs = np.zeros(n_pages, np.int32)           # [P] sequences holding each page
        self.prefix = PrefixCache()                        # keyed pages and the idle LRU

    @property
    def n_pages(self) -> int:
        return self.k.shape[1]

    @property
    def free_tokens(self) -> int:
        """Room for new positions: free pages and idle cached pages (evicted on demand)."""
        return self.free_pages * PAGE_SIZE

    @property
    def free_pages(self) -> int:
        return len(self._free) + self.prefix.n_idle

    @property
    def held_pages(self) -> int:
        """Pages some sequence holds (a page shared by several counts once)."""
        return self.n_pages - self.free_pages

    def pages(self, seq_id: int) -> list[int]:
        return list(self._pages.get(seq_id, ()))

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
        if need > self.free_pages:
            raise ContextOverflowError(
                f"KV cache full: sequence {seq_id} needs {need} more pages of {PAGE_SIZE}, "
                f"{self.free_pages} free")
        pages = self._pages.setdefault(seq_id, [])
        pages.extend(self._take() for _ in range(need))
        self._lengths[seq_id] = max(self._lengths.get(seq_id, 0), new_length)

    def map_prefix(self, seq_id: int, pages: list[int]) -> None:
        """Start a new sequence on cached full pages (from `prefix.lookup`): positions
        0..32*len(pages)-1 are cached already; its later pages are its own."""
        if self._pages.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds pages")
        for page in pages:
            if not self.prefix.keyed(page):
                raise ValueError(f"page {page} is not a cached page")
            self._hold(page)
        self._pages[seq_id] = list(pages)
        self._lengths[seq_id] = len(pages) * PAGE_SIZE
        self.prefix.hit_tokens += len(pages) * PAGE_SIZE

    def share(self, seq_id: int, index: int, key: bytes) -> bool:
        """Make page `index` of a sequence (full and computed) addressable by `key`."""
        if (index + 1) * PAGE_SIZE > self._lengths.get(seq_id, 0):
            raise ValueError(f"page {index} of sequence {seq_id} is not full")
        return self.prefix.register(self._pages[seq_id][index], key)

    def release(self, seq_id: int) -> None:
        """Let go of a sequence's pages: each one nobody else holds becomes idle (if keyed)
        or free. The last page goes first, so a prefix's first page is evicted last."""
        for page in reversed(self._pages.pop(seq_id, [])):
            self._refs[page] -= 1
            if self._refs[page] == 0 and not self.prefix.release(page):
                self._free.append(page)
        self._lengths.pop(seq_id, None)

    def _take(self) -> int:
        """A page for new content: a free one, else the oldest idle cached one."""
        page = self._free.pop() if self._free else self.prefix.evict()
        self._refs[page] = 1
        return page

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            self.prefix.acquire(page)
        self._refs[page] += 1

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
