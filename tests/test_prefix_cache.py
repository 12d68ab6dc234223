"""The prefix cache's page accounting, without a model: keys, sharing, idle LRU, eviction.

The state machine drives a PagedKVCache the way the engine does (map the cached prefix, grow,
key full pages, release) and shadows what each page holds: a page in use is never handed to
other content, and a key always leads to a page holding exactly that content.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_kernels import tiny_config

from edgelora_np.errors import ContextOverflowError
from edgelora_np.model.kv_cache import PAGE_SIZE, PagedKVCache
from edgelora_np.model.prefix_cache import BASE_IDENTITY, adapter_identity, page_keys

A = adapter_identity("fp-a", 1.0)


def tokens(*values) -> np.ndarray:
    """One full page per value: [32 * len(values)] int32."""
    return np.repeat(np.array(values, np.int32), PAGE_SIZE)


def test_identity_is_content_and_scale_never_name():
    assert adapter_identity(None, 1.0) == BASE_IDENTITY
    assert adapter_identity("fp-a", 1.0) != adapter_identity("fp-a", 0.5)
    assert adapter_identity("fp-a", 1.0) != adapter_identity("fp-b", 1.0)
    assert adapter_identity("fp-a", 1.0) != BASE_IDENTITY
    ids = tokens(1, 2, 3)
    base, lora = page_keys(BASE_IDENTITY, ids, 3), page_keys(A, ids, 3)
    assert len(set(base) | set(lora)) == 6               # no page key shared across identities
    # The chain: a page's key depends on every page before it, and can be resumed.
    assert page_keys(BASE_IDENTITY, tokens(9, 2, 3), 3)[1:] != base[1:]
    assert page_keys(BASE_IDENTITY, ids, 2, base[0], first=1) == base[1:]


def test_shared_pages_are_counted_once_and_kept_idle_lru():
    cache = PagedKVCache(tiny_config(), n_tokens=6 * PAGE_SIZE)
    ids = tokens(1, 2, 3)
    keys = page_keys(BASE_IDENTITY, ids, 3)
    cache.reserve(0, 2 * PAGE_SIZE + 5)                   # 3 pages, the last partial
    for i in range(2):
        assert cache.share(0, i, keys[i])
    with pytest.raises(ValueError, match="not full"):
        cache.share(0, 2, keys[2])
    hit = cache.prefix.lookup(keys)
    assert hit == cache.pages(0)[:2]
    cache.map_prefix(1, hit)                              # a second sequence on the same pages
    assert cache.length(1) == 2 * PAGE_SIZE and cache.prefix.hit_tokens == 2 * PAGE_SIZE
    cache.reserve(1, 2 * PAGE_SIZE + 1)                   # its own third page
    assert cache.held_pages == 4 and cache.free_pages == 2
    cache.release(0)
    assert cache.held_pages == 3                          # the shared pages stay held by 1
    cache.release(1)
    assert cache.held_pages == 0 and cache.prefix.n_idle == 2
    assert cache.free_tokens == 6 * PAGE_SIZE             # idle pages are room too
    # Room runs out: free pages go first, then the oldest idle page (the prefix's last page).
    first, second = hit
    cache.reserve(2, 4 * PAGE_SIZE)
    assert cache.prefix.evictions == 0
    cache.reserve(2, 5 * PAGE_SIZE)
    assert cache.prefix.evictions == 1 and cache.prefix.lookup(keys) == [first]
    assert second in cache.pages(2)
    cache.map_prefix(3, [first])                          # an idle page taken back into use
    assert cache.free_pages == 0
    with pytest.raises(ContextOverflowError, match="full"):
        cache.reserve(3, PAGE_SIZE + 1)                   # the held page is never evicted
    assert cache.prefix.lookup(keys) == [first]


def test_a_key_or_page_registers_once():
    cache = PagedKVCache(tiny_config(), n_tokens=4 * PAGE_SIZE)
    key = page_keys(BASE_IDENTITY, tokens(7), 1)[0]
    cache.reserve(0, PAGE_SIZE)
    cache.reserve(1, PAGE_SIZE)
    assert cache.share(0, 0, key)
    assert not cache.share(1, 0, key)                     # a second copy stays private
    cache.release(1)
    assert cache.prefix.n_idle == 0 and cache.free_pages == 3
    with pytest.raises(ValueError, match="not a cached page"):
        cache.map_prefix(2, cache.pages(0) + [cache._free[-1]])
    cache.map_prefix(2, cache.pages(0))
    with pytest.raises(ValueError, match="already holds"):
        cache.map_prefix(2, cache.pages(0))


# --- the state machine ---------------------------------------------------------------------------

N_PAGES = 8
SEQS = range(4)
IDENTITIES = (BASE_IDENTITY, adapter_identity("fp-a", 1.0), adapter_identity("fp-a", 0.5))


class PrefixMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.cache = PagedKVCache(tiny_config(), n_tokens=N_PAGES * PAGE_SIZE)
        self.live: dict[int, tuple[bytes, np.ndarray]] = {}     # seq -> identity, tokens so far
        self.keys: dict[int, list[bytes]] = {}                  # seq -> keys of its full pages
        self.shadow: dict[int, object] = {}                     # page -> what it holds
        self.uid_of: dict[int, int] = {}                        # seq -> its start's number
        self.uid = 0

    def expected(self, seq: int, i: int):
        """What page i of a live sequence holds: its prefix key if full, else its own tail."""
        identity, ids = self.live[seq]
        if (i + 1) * PAGE_SIZE <= len(ids):
            return page_keys(identity, ids, i + 1)[i]
        return ("tail", self.uid_of[seq], i)

    def write(self, seq: int, start: int) -> None:
        """The sequence computed positions start..: the pages they touch now hold its content."""
        pages, n = self.cache.pages(seq), len(self.live[seq][1])
        for i in range(start // PAGE_SIZE, -(-n // PAGE_SIZE)):
            self.shadow[pages[i]] = self.expected(seq, i)
        identity, ids = self.live[seq]
        full = n // PAGE_SIZE
        have = self.keys[seq]
        new = page_keys(identity, ids, full - len(have), have[-1] if have else None, len(have))
        for i, key in enumerate(new, len(have)):
            self.cache.share(seq, i, key)
        have.extend(new)

    @rule(seq=st.sampled_from(SEQS), identity=st.sampled_from(IDENTITIES),
          values=st.lists(st.integers(0, 2), min_size=1, max_size=4),
          extra=st.integers(0, PAGE_SIZE - 1))
    def start(self, seq, identity, values, extra):
        if seq in self.live:
            return
        ids = np.concatenate([tokens(*values), np.full(extra, 5, np.int32)])
        if len(ids) < 2:
            return
        keys = page_keys(identity, ids, (len(ids) - 1) // PAGE_SIZE)
        hit = self.cache.prefix.lookup(keys)
        for page, key in zip(hit, keys):
            assert self.shadow[page] == key                   # a hit holds exactly that content
        need = -(-len(ids) // PAGE_SIZE) - len(hit)
        if need > self.cache.free_pages - sum(self.cache.prefix.is_idle(p) for p in hit):
            event("start: no room")
            return
        event(f"start: {len(hit)} pages hit")
        self.uid += 1
        self.uid_of[seq] = self.uid
        self.cache.map_prefix(seq, hit)
        self.live[seq], self.keys[seq] = (identity, ids), keys[:len(hit)]
        self.cache.reserve(seq, len(ids))
        self.write(seq, len(hit) * PAGE_SIZE)

    @rule(seq=st.sampled_from(SEQS), n=st.integers(1, 40), value=st.integers(0, 2))
    def grow(self, seq, n, value):
        if seq not in self.live:
            return
        identity, ids = self.live[seq]
        try:
            self.cache.reserve(seq, len(ids) + n)
        except ContextOverflowError:
            event("grow: full")
            return
        self.live[seq] = (identity, np.concatenate([ids, np.full(n, value, np.int32)]))
        self.write(seq, len(ids))

    @rule(seq=st.sampled_from(SEQS))
    def release(self, seq):
        self.cache.release(seq)
        self.live.pop(seq, None)
        self.keys.pop(seq, None)

    @invariant()
    def count_evictions(self):
        if hasattr(self, "cache") and self.cache.prefix.evictions:
            event("evicted cached pages")

    @invariant()
    def pages_are_accounted_and_never_stolen(self):
        if not hasattr(self, "cache"):
            return
        cache, prefix = self.cache, self.cache.prefix
        holders: dict[int, int] = {}
        for seq in self.live:
            pages = cache.pages(seq)
            assert len(pages) == -(-len(self.live[seq][1]) // PAGE_SIZE)
            for i, page in enumerate(pages):
                holders[page] = holders.get(page, 0) + 1
                assert self.shadow[page] == self.expected(seq, i)   # nobody overwrote it
        for page in range(N_PAGES):
            assert cache._refs[page] == holders.get(page, 0)
            if holders.get(page, 0) > 1:
                assert prefix.keyed(page)                  # sharing only through the cache
        idle, free = set(prefix._idle), set(cache._free)
        assert len(free) == len(cache._free) and not idle & free
        assert not (idle | free) & set(holders)
        assert idle | free | set(holders) == set(range(N_PAGES))
        assert idle <= set(prefix._key_of)
        for key, page in prefix._page_of.items():        # a key leads to exactly that content
            assert prefix._key_of[page] == key and self.shadow[page] == key


TestPrefixCache = PrefixMachine.TestCase
TestPrefixCache.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
