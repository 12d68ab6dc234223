"""The prefix cache policy: full KV pages addressable by (adapter identity, tokens up to them).

A full page i of a sequence holds the keys and values of positions 32i..32i+31. Those depend on
every token up to the end of the page and on the weights that computed them: the base model and,
with a LoRA adapter, the adapter's content and the request's scale. So the key of page i chains:

    key_0 = H(identity, tokens[0:32])
    key_i = H(key_{i-1}, tokens[32i:32i+32])             H = blake2b, 16 bytes

where `identity` is b"base" for the base model, or the adapter's content fingerprint plus the
request's scale (`adapter_identity`), never the adapter's name: an adapter reloaded under the
same name with other weights has another fingerprint and never hits. (llama.cpp's cache_prompt
once reused a slot's KV across adapters; vLLM had to add the adapter to its key. Ours cannot.)

The cache itself (model/kv_cache.py) owns the pages and their reference counts; this class only
knows which pages have a key and which keyed pages no sequence uses (`idle`, in LRU order: the
free list draws from its oldest when it runs dry). A page in use is never idle, so it can never
be evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

PAGE_SIZE = 32          # positions per KV page (model/kv_cache.py imports it from here)
BASE_IDENTITY = b"base"


def adapter_identity(fingerprint: str | None, scale: float) -> bytes:
    """What computed a KV page besides the base weights: b"base", or content + scale."""
    if fingerprint is None:
        return BASE_IDENTITY
    return f"lora:{fingerprint}:scale={float(scale)!r}".encode()


def page_keys(identity: bytes, tokens: np.ndarray, n_pages: int, prev: bytes | None = None,
              first: int = 0) -> list[bytes]:
    """Keys of full pages first..first+n_pages-1 of `tokens` [n] (n >= 32*(first+n_pages)).

    `prev` is the key of page first-1 (None when first == 0)."""
    keys = []
    ids = np.ascontiguousarray(tokens, dtype=np.int32)
    for i in range(first, first + n_pages):
        h = hashlib.blake2b(digest_size=16)
        h.update(identity if prev is None else prev)
        h.update(ids[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


class PrefixCache:
    """Keys of full, computed pages; the LRU of keyed pages no sequence holds; counters."""

    def __init__(self):
        self._page_of: dict[bytes, int] = {}            # key -> page
        self._key_of: dict[int, bytes] = {}             # page -> key
        self._idle: OrderedDict[int, None] = OrderedDict()   # keyed, unreferenced; oldest first
        self.hit_tokens = 0                             # prompt positions served from the cache
        self.evictions = 0                              # keyed pages reused for other content

    @property
    def n_idle(self) -> int:
        return len(self._idle)

    @property
    def n_keyed(self) -> int:
        return len(self._page_of)

    def keyed(self, page: int) -> bool:
        return page in self._key_of

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest run keys[0..k-1] that is cached, in order."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> bool:
        """Make a full, computed page (held by a sequence) addressable; False if the key or
        the page already has one (another copy of that content stays private)."""
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def acquire(self, page: int) -> None:
        """A sequence maps a keyed page: it is no longer evictable."""
        self._idle.pop(page, None)

    def release(self, page: int) -> bool:
        """The last sequence let go of `page`: keep it as idle (True) if keyed, else False."""
        if page not in self._key_of:
            return False
        self._idle[page] = None
        return True

    def evict(self) -> int:
        """Forget the least recently released idle page and hand it back for reuse."""
        page, _ = self._idle.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        self.evictions += 1
        return page
