"""The RAM pool: a fixed byte budget holding the hot adapters, with pin/evict accounting.

Thousands of adapters live in the store on disk (adapters/store.py); the pool keeps the ones
in use, and as many recently used ones as fit, in one arena of `budget` bytes:

    arena   [budget]  one anonymous mapping; each resident adapter is one extent in it,
                      a copy of its packed payload (adapters/packed.py), 64-byte aligned
    tables  per projection group: where each slot's sections start, per layer (SlotTables)

The LoRA kernels read the arena in place through the tables (kernels/lora.py). Loading an
adapter is: pick a slot and an extent (evicting if needed), copy the payload in (checking it),
publish the slot's table rows. Nothing is rebuilt, so loads are cheap and a load never
disturbs the slots a running batch reads.

Accounting, the part the original EdgeLoRA code got wrong:
  - bytes, not adapter counts: adapters of different ranks take what they need; the only
    padding is the 64-byte alignment of each section (a few hundred bytes per adapter);
  - pins: every running sequence pins its adapter (`acquire` ... `release`); a pinned adapter
    is never evicted, and never moved while a forward may read it;
  - when no room can be made because the rest of the pool is pinned, `acquire` raises
    PoolFullError and the caller (the engine) keeps the request waiting: the budget is a
    hard limit;
  - adapters added from memory rather than a store (Engine.add_adapter) have no copy to reload
    from, so they are `sticky`: resident until removed, counted in the budget.

Eviction order comes from a small policy (LRU by default, LFU as the alternative; see
tools/bench_arena.py for which wins on a skewed workload). Fragmentation: extents are placed
first-fit; when enough bytes are free but no hole is large enough, the arena is compacted,
but never while a forward reads it: a forward holds `reading()`, and while any does, loads
only fill holes (a load that would need to move bytes waits, or gives up with PoolFullError).
Loads into free space, evictions and removals are safe during a forward, because a forward
reads only the slots it pinned. Prefetch never moves anything: it gives up and leaves the
load to admission.
"""

from __future__ import annotations

import mmap
import threading
import time
from bisect import insort
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from edgelora_np.adapters.packed import (
    ALIGN,
    PackedAdapter,
    check_layout,
    pack,
    projection_groups,
)
from edgelora_np.errors import AdapterError, CapacityError
from edgelora_np.model.config import LlamaConfig

# Upper bounds (ms) of the load-latency histogram buckets, Prometheus style (cumulative).
LOAD_BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0)


class PoolFullError(CapacityError):
    """No room can be made: the pool's other adapters are pinned (or it is too small)."""


# --- eviction policies ------------------------------------------------------------------------

class LRUPolicy:
    """Evict the adapter whose last access is oldest."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[str, None] = OrderedDict()

    def access(self, name: str) -> None:
        self._order[name] = None
        self._order.move_to_end(name)

    def forget(self, name: str) -> None:
        self._order.pop(name, None)

    evicted = forget      # no history of evicted adapters: the order holds resident ones only

    def victims(self, candidates: set[str]):
        """Candidates in eviction order (first = evict first), lazily."""
        yield from (n for n in candidates if n not in self._order)
        yield from (n for n in list(self._order) if n in candidates)


class LFUPolicy:
    """Evict the adapter accessed least often (counts survive eviction); ties go to the older."""

    name = "lfu"

    def __init__(self):
        self._count: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._tick = 0

    def access(self, name: str) -> None:
        self._tick += 1
        self._count[name] = self._count.get(name, 0) + 1
        self._last[name] = self._tick

    def forget(self, name: str) -> None:      # removal from the store, not eviction
        self._count.pop(name, None)
        self._last.pop(name, None)

    def evicted(self, name: str) -> None:     # counts outlive residency
        pass

    def victims(self, candidates: set[str]) -> list[str]:
        return sorted(candidates, key=lambda n: (self._count.get(n, 0), self._last.get(n, 0)))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


# --- tables the kernels read --------------------------------------------------------------------

class SlotTables:
    """One projection group: where each slot's A, B and scales start, per layer (see kernels/lora.py)."""

    def __init__(self, n_layers: int, n_slots: int, group):
        self.group = group
        self.a_base = np.zeros((n_layers, n_slots), np.int64)
        self.b_base = np.zeros((n_layers, n_slots), np.int64)
        self.s_base = np.zeros((n_layers, n_slots), np.int64)
        self.ranks = np.zeros((n_slots, len(group.parts)), np.int32)
        self.part_col0 = np.array([c0 for _, c0, _ in group.parts], np.int32)
        self.part_width = np.array([w for _, _, w in group.parts], np.int32)
        self.n_b = self.part_width.astype(np.int64)      # B values per rank row of each part

    def publish(self, slot: int, offset: int, layout) -> None:
        K = self.group.n_in
        if layout is None:
            self.ranks[slot] = 0
            return
        R = layout.rows
        pb = int(np.dot(layout.ranks, self.n_b))
        i = np.arange(len(layout.layers), dtype=np.int64)     # section index of each adapted layer
        at = np.array(layout.layers, np.int64)
        for base in (self.a_base, self.b_base, self.s_base):
            base[:, slot] = -1                                # layers not adapted: skipped
        self.a_base[at, slot] = (offset + layout.a) // 2 + i * R * K
        self.b_base[at, slot] = (offset + layout.b) // 2 + i * pb
        self.s_base[at, slot] = (offset + layout.s) // 4 + i * R
        self.ranks[slot] = layout.ranks                   # last: this makes the slot live

    def clear(self, slot: int) -> None:
        self.ranks[slot] = 0


# --- the pool -------------------------------------------------------------------------------------

@dataclass
class _Entry:
    name: str
    slot: int
    offset: int
    nbytes: int
    groups: dict
    fingerprint: str = ""            # its content's identity (see AdapterPool.fingerprint)
    pins: int = 0
    sticky: bool = False
    loading: bool = True


@dataclass
class PoolStats:
    """A snapshot of the pool's counters (the server publishes them as metrics)."""

    budget_bytes: int
    bytes_resident: int
    bytes_pinned: int
    resident: int
    pinned: int
    hits: int
    misses: int
    loads: int
    evictions: int
    load_failures: int
    compactions: int
    load_seconds_sum: float
    load_buckets_ms: tuple[float, ...] = LOAD_BUCKETS_MS
    load_bucket_counts: tuple[int, ...] = ()            # cumulative, one per bucket, then +Inf
    recent_load_seconds: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class AdapterPool:
    def __init__(self, cfg: LlamaConfig, budget_bytes: int, *, max_slots: int = 256,
                 policy: str = "lru"):
        if policy not in POLICIES:
            raise AdapterError(f"unknown eviction policy {policy!r} (choose from {sorted(POLICIES)})")
        if max_slots < 1:
            raise AdapterError("the adapter pool needs at least one slot")
        self.cfg = cfg
        self.budget = max(ALIGN, _aligned(int(budget_bytes)))
        self.max_slots = max_slots
        self.policy = POLICIES[policy]()
        # Anonymous memory: pages count toward RSS only once an adapter is copied in.
        self._map = mmap.mmap(-1, self.budget)
        self.arena = np.frombuffer(self._map, np.uint8)
        self.arena16 = self.arena.view(np.uint16)
        self.arena32 = self.arena.view(np.float32)
        self.groups = projection_groups(cfg)
        self.tables = {name: SlotTables(cfg.n_layers, max_slots, g) for name, g in self.groups.items()}
        self._entries: dict[str, _Entry] = {}
        self._extents: list[tuple[int, int, str]] = []      # (offset, nbytes, name), by offset
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._lock = threading.RLock()
        self._loaded = threading.Condition(self._lock)
        self._readers = 0                                   # forwards reading the arena now
        self._idle = threading.Condition(self._lock)        # notified when the last one ends
        self._counts = dict(hits=0, misses=0, loads=0, evictions=0, load_failures=0, compactions=0)
        self._load_sum = 0.0
        self._n_loads = 0                                   # loads started, failed ones too
        self._load_hist = [0] * (len(LOAD_BUCKETS_MS) + 1)
        self._recent = deque(maxlen=4096)

    # --- questions ------------------------------------------------------------------------------

    def resident(self, name: str) -> bool:
        e = self._entries.get(name)
        return e is not None and not e.loading

    def __contains__(self, name: str) -> bool:
        return self.resident(name)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if not e.loading]

    def slot(self, name: str) -> int:
        e = self._entries.get(name)
        if e is None or e.loading:
            raise AdapterError(f"adapter {name!r} is not resident")
        return e.slot

    def sticky(self, name: str) -> bool:
        """Added from memory (no store copy): resident until removed."""
        e = self._entries.get(name)
        return e is not None and e.sticky

    def pins(self, name: str) -> int:
        e = self._entries.get(name)
        return 0 if e is None else e.pins

    def fingerprint(self, name: str) -> str:
        """The identity of the weights resident under `name` (the prefix cache's key).

        The record's own `fingerprint` (a PackedAdapter's payload hash, a store row's source
        hash, checksum and scale); a record without one gets a fingerprint unique to this load,
        so its KV pages are shared only while it stays resident, never with other weights."""
        fingerprint = self.resident_fingerprint(name)
        if fingerprint is None:
            raise AdapterError(f"adapter {name!r} is not resident")
        return fingerprint

    def resident_fingerprint(self, name: str) -> str | None:
        """`fingerprint(name)` if `name` is resident now, else None (unpinned, it may go)."""
        with self._lock:
            e = self._entries.get(name)
            return None if e is None or e.loading else e.fingerprint

    def stats(self) -> PoolStats:
        with self._lock:
            entries = list(self._entries.values())
            cumulative, total = [], 0
            for c in self._load_hist:
                total += c
                cumulative.append(total)
            return PoolStats(
                budget_bytes=self.budget,
                bytes_resident=sum(e.nbytes for e in entries),
                bytes_pinned=sum(e.nbytes for e in entries if e.pins or e.sticky),
                resident=sum(not e.loading for e in entries),
                pinned=sum(bool(e.pins or e.sticky) for e in entries),
                load_seconds_sum=self._load_sum, load_bucket_counts=tuple(cumulative),
                recent_load_seconds=list(self._recent), **self._counts)

    # --- the operations ------------------------------------------------------------------------

    @contextmanager
    def reading(self):
        """Held around a forward that reads the arena: nothing is moved meanwhile."""
        with self._lock:
            self._readers += 1
        try:
            yield self
        finally:
            with self._lock:
                self._readers -= 1
                if not self._readers:
                    self._idle.notify_all()

    def access(self, name: str) -> bool:
        """Count a request for `name` (hit if resident) and tell the policy; returns the hit."""
        with self._lock:
            hit = self.resident(name)
            self._counts["hits" if hit else "misses"] += 1
            self.policy.access(name)
            return hit

    def acquire(self, name: str, record=None, *, may_move: bool = True) -> int:
        """Pin `name`, loading it from `record` first if needed; returns its slot.

        `record` may also be a function returning it, called only when `name` is not resident
        (checking and pinning happen under one lock, so an eviction cannot slip in between).
        Raises PoolFullError (nothing changed) when no room can be made, or the record's
        AdapterError when its bytes are bad (the pool is left as it was)."""
        with self._lock:
            while name in self._entries and self._entries[name].loading:
                self._loaded.wait()
            e = self._entries.get(name)
            if e is None:
                if record is None:
                    raise AdapterError(f"adapter {name!r} is not resident and has no source")
                if callable(record):
                    record = record()
                e = self._load(name, record, may_move=may_move, protect=(), pin=True)
            else:
                e.pins += 1
            return e.slot

    def release(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.pins <= 0:
                raise AdapterError(f"adapter {name!r} released more often than acquired")
            e.pins -= 1

    def prefetch(self, name: str, record, *, protect=()) -> bool:
        """Load `name` ahead of its request without pinning it or moving anything; never
        evicts a name in `protect`. Returns whether it is resident (or being loaded) now."""
        with self._lock:
            if name in self._entries:
                return True
            try:
                self._load(name, record, may_move=False, protect=set(protect), pin=False)
            except PoolFullError:
                return False
            return True

    def add(self, name: str, adapter, *, sticky: bool = True) -> int:
        """Make an in-memory adapter resident (a PackedAdapter, or a loaded adapter to pack)."""
        if not isinstance(adapter, PackedAdapter):
            adapter = pack(adapter, self.cfg)
        with self._lock:
            while True:
                if name in self._entries:
                    raise AdapterError(f"an adapter named {name!r} is already loaded")
                try:
                    return self._load(name, adapter, may_move=True, protect=(), pin=False,
                                      sticky=sticky).slot
                except PoolFullError:
                    if not self._readers:
                        raise
                    self._idle.wait()        # it may fit once compacting is allowed again

    def remove(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                raise AdapterError(f"adapter {name!r} is not loaded")
            if e.pins or e.loading:
                raise AdapterError(f"adapter {name!r} is in use by {e.pins} running request(s)")
            self._drop(e)
            self.policy.forget(name)

    def evict(self, name: str) -> None:
        """Drop an unpinned, non-sticky adapter now (tests; the pool evicts by itself)."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.pins or e.sticky or e.loading:
                raise AdapterError(f"adapter {name!r} cannot be evicted (absent, pinned or sticky)")
            self._drop(e)
            self.policy.evicted(name)
            self._counts["evictions"] += 1

    # --- inside ----------------------------------------------------------------------------------

    def _evictable(self, protect) -> set[str]:
        return {n for n, e in self._entries.items()
                if not (e.pins or e.sticky or e.loading) and n not in protect}

    def _load(self, name, record, *, may_move, protect, pin, sticky=False) -> _Entry:
        """Called with the lock held; copies the bytes with it released."""
        where = f"adapter {name!r}" + (f" ({record.path})" if hasattr(record, "path") else "")
        check_layout(self.cfg, record.groups, record.nbytes, where)
        n = _aligned(record.nbytes)
        if n > self.budget:
            raise PoolFullError(f"adapter {name!r} needs {n / 2**20:.1f} MiB, more than the whole "
                                f"pool ({self.budget / 2**20:.1f} MiB)")
        slot, offset = self._make_room(name, n, protect, may_move)
        self._n_loads += 1
        fingerprint = getattr(record, "fingerprint", None) or f"pool-load-{self._n_loads}"
        e = _Entry(name, slot, offset, n, record.groups, fingerprint, pins=int(pin), sticky=sticky)
        self._entries[name] = e
        insort(self._extents, (offset, n, name))
        self._free_slots.remove(slot)
        t0 = time.perf_counter()
        self._lock.release()
        try:
            record.copy_into(self.arena[offset:offset + record.nbytes])
            failure = None
        except BaseException as exc:           # noqa: BLE001 - re-raised below, pool restored
            failure = exc
        finally:
            self._lock.acquire()
        if failure is not None:
            self._drop(e)
            self._counts["load_failures"] += 1
            self._loaded.notify_all()
            raise failure
        for gname, tables in self.tables.items():
            tables.publish(slot, offset, e.groups.get(gname))
        e.loading = False
        dt = time.perf_counter() - t0
        self._counts["loads"] += 1
        self._load_sum += dt
        self._recent.append(dt)
        i = 0
        while i < len(LOAD_BUCKETS_MS) and dt * 1e3 > LOAD_BUCKETS_MS[i]:
            i += 1
        self._load_hist[i] += 1
        self._loaded.notify_all()
        return e

    def _make_room(self, name, n, protect, may_move) -> tuple[int, int]:
        """A free slot and a free extent of n bytes, evicting in policy order if needed.

        The victims are chosen on a copy of the layout first, so a PoolFullError leaves the
        pool as it was (no adapter evicted for a load that then gives up)."""
        candidates = self._evictable(protect)
        free = self.budget - sum(e.nbytes for e in self._entries.values())
        if free + sum(self._entries[c].nbytes for c in candidates) < n or \
                (not self._free_slots and not candidates):
            raise PoolFullError(f"adapter {name!r} ({n / 2**20:.1f} MiB) does not fit: "
                                f"{free / 2**20:.1f} MiB free, the rest pinned or protected")
        can_move = may_move and not self._readers and \
            not any(e.loading for e in self._entries.values())
        extents, slots, victims = list(self._extents), len(self._free_slots), []
        for victim in [None, *self.policy.victims(candidates)]:
            if victim is not None:
                e = self._entries[victim]
                extents.remove((e.offset, e.nbytes, victim))
                free, slots = free + e.nbytes, slots + 1
                victims.append(victim)
            if not slots:
                continue
            if self._hole(n, extents) is not None or (can_move and free >= n):
                break
            if free >= n and not may_move:     # enough bytes, but no hole holds them in one piece
                raise PoolFullError(f"adapter {name!r} does not fit in one piece without "
                                    "compacting the pool")
        else:
            raise PoolFullError(f"adapter {name!r} ({n / 2**20:.1f} MiB) does not fit in one "
                                "piece and the pool cannot be compacted now")
        for victim in victims:
            self._evict_one(victim)
        offset = self._hole(n)
        if offset is None:
            self._compact()
            offset = self._hole(n)
        return self._free_slots[-1], offset

    def _evict_one(self, name: str) -> None:
        self._drop(self._entries[name])
        self.policy.evicted(name)
        self._counts["evictions"] += 1

    def _hole(self, n: int, extents=None) -> int | None:
        """First fit: the lowest offset of a free run of n bytes (in `extents`, default the pool's)."""
        at = 0
        for offset, size, _ in self._extents if extents is None else extents:
            if offset - at >= n:
                return at
            at = offset + size
        return at if self.budget - at >= n else None

    def _drop(self, e: _Entry) -> None:
        for tables in self.tables.values():
            tables.clear(e.slot)
        del self._entries[e.name]
        self._extents.remove((e.offset, e.nbytes, e.name))
        self._free_slots.append(e.slot)

    def _compact(self) -> None:
        """Slide every extent down to close the holes (no forward is reading: see reading())."""
        at, moved = 0, []
        for offset, size, name in self._extents:
            e = self._entries[name]
            if offset != at:
                self.arena[at:at + size] = self.arena[offset:offset + size]   # overlap-safe copy
                e.offset = at
                for gname, tables in self.tables.items():
                    tables.publish(e.slot, at, e.groups.get(gname))
            moved.append((at, size, name))
            at += size
        self._extents = moved
        self._counts["compactions"] += 1

