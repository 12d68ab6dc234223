"""The adapter pool (adapters/pool.py): byte accounting, pins, eviction order, compaction, stats.

A hypothesis state machine runs random sequences of access / acquire / release / prefetch / evict /
remove / add (sticky) on a small pool (a few adapters' worth of bytes, three slots, adapters of
different ranks and target sets) against a model that knows what must happen:
    - whether room can be made (free + evictable bytes, a free or freeable slot), and if so which
      adapters go (a prefix of the policy's order), where the new one lands (first fit) and
      whether the arena is compacted; a refused or failed operation changes nothing else;
    - pins, sticky adapters and counters (hits, misses, loads, evictions, load failures).
After every step the pool's layout and data are checked: extents inside the arena and apart,
bytes resident = their sum <= budget, each extent a byte copy of its payload, and the LoRA
delta read through the slot tables (kernels/lora.py lora_delta_ref) equal to a dense NumPy
product of the original random adapter. The test reads the pool's private layout (_entries).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_lora_kernels import odd_config, random_adapter

from edgelora_np.adapters.packed import ALIGN, pack, projection_groups
from edgelora_np.adapters.pool import LOAD_BUCKETS_MS, AdapterPool, PoolFullError
from edgelora_np.errors import AdapterError, CapacityError
from edgelora_np.kernels.lora import lora_delta_ref

CFG = odd_config(dim=20, kv_dim=6, ffn=28, layers=2)
GROUPS = projection_groups(CFG)
ATTN, MLP = {"attn_q", "attn_k", "attn_v", "attn_output"}, {"ffn_gate", "ffn_up", "ffn_down"}


def _catalog():
    rng = np.random.default_rng(11)
    specs = {                         # name -> random_adapter keyword arguments
        "r1": dict(rank=1),
        "q2": dict(rank=2, projs={"attn_q", "attn_v"}),
        "mlp3": dict(rank=3, projs=MLP),
        "o6": dict(rank=6, projs={"attn_output"}, layers=[1]),
        "r4": dict(rank=4),
        "attn5": dict(rank=5, projs=ATTN),
        "pat": dict(rank=0, rank_of=lambda layer, proj: 1 + layer + len(proj) % 3),
        "r9": dict(rank=9),
        "huge": dict(rank=40),        # larger than the whole pool
    }
    adapters = {name: random_adapter(CFG, rng, **kw) for name, kw in specs.items()}
    return adapters, {name: pack(a, CFG) for name, a in adapters.items()}


ADAPTERS, PACKED = _catalog()
NAMES = list(PACKED)
SIZE = {name: p.nbytes for name, p in PACKED.items()}
assert all(n % ALIGN == 0 for n in SIZE.values())
assert len(set(SIZE.values())) == len(SIZE)                       # every size differs
BUDGET = SIZE["r4"] + SIZE["attn5"] + SIZE["pat"]                 # a few adapters' worth
assert SIZE["r9"] < BUDGET < SIZE["huge"]                          # r9 fits only alone
SLOTS = 4


class FailingRecord:
    """A record whose bytes turn out bad half-way (as a store file with a bad checksum)."""

    def __init__(self, name):
        self.name, self.packed = name, PACKED[name]
        self.groups, self.nbytes = self.packed.groups, self.packed.nbytes

    def copy_into(self, dst):
        dst[: len(dst) // 2] = 0xAB                                   # scribbles first
        raise AdapterError(f"adapter {self.name!r}: injected bad bytes")


class SlowRecord:
    """A good record that takes `delay` seconds to copy (a cold read from disk)."""

    def __init__(self, name, delay):
        self.packed, self.delay = PACKED[name], delay
        self.groups, self.nbytes = self.packed.groups, self.packed.nbytes

    def copy_into(self, dst):
        time.sleep(self.delay)
        self.packed.copy_into(dst)


# --- checks shared by the state machine and the unit tests ---------------------------------------

def layout(pool) -> dict[str, tuple[int, int, int]]:
    """name -> (slot, offset, bytes) of every resident adapter (the pool's private state)."""
    return {n: (e.slot, e.offset, e.nbytes) for n, e in pool._entries.items() if not e.loading}


def dense_delta(adapter, group: str, layer: int, x: np.ndarray) -> np.ndarray:
    """[n_out] float64: sum over the group's parts of scale * B (A x), fp16-stored A, B and x."""
    def f16(a):
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)

    g = GROUPS[group]
    out = np.zeros(g.n_out)
    for proj, c0, w in g.parts:
        pair = adapter.pairs.get((layer, proj))
        if pair is not None:
            out[c0:c0 + w] += np.float32(pair.scale) * (f16(pair.b) @ (f16(pair.a) @ f16(x)))
    return out


def check_pool(pool, rng=None) -> None:
    """Layout, accounting and data of every resident adapter."""
    rng = rng or np.random.default_rng(0)
    lay = layout(pool)
    spans = sorted((off, n, name) for name, (_, off, n) in lay.items())
    at = 0
    for off, n, name in spans:
        assert off % ALIGN == 0 and off >= at, f"{name} overlaps the extent before it"
        assert n == SIZE[name]
        at = off + n
    assert at <= pool.budget
    slots = [s for s, _, _ in lay.values()]
    assert len(set(slots)) == len(slots) and all(0 <= s < pool.max_slots for s in slots)
    stats = pool.stats()
    assert stats.bytes_resident == sum(SIZE[n] for n in lay) <= pool.budget
    assert stats.resident == len(lay) and sorted(pool.names) == sorted(lay)
    pinned = [n for n in lay if pool.pins(n) or pool._entries[n].sticky]
    assert stats.pinned == len(pinned) and stats.bytes_pinned == sum(SIZE[n] for n in pinned)
    assert stats.load_bucket_counts[-1] == stats.loads
    assert list(stats.load_bucket_counts) == sorted(stats.load_bucket_counts)
    # Bytes: each extent is its payload, byte for byte.
    for name, (_, off, n) in lay.items():
        np.testing.assert_array_equal(pool.arena[off:off + n], PACKED[name].payload, err_msg=name)
    # Tables: free slots are dead, resident slots read their own adapter.
    for gname, t in pool.tables.items():
        for s in set(range(pool.max_slots)) - set(slots):
            assert not t.ranks[s].any(), f"free slot {s} still live in {gname}"
        for name, (s, _, _) in lay.items():
            lay_g = PACKED[name].groups.get(gname)
            assert list(t.ranks[s]) == (list(lay_g.ranks) if lay_g else [0] * len(GROUPS[gname].parts))
    if not lay:
        return
    names = sorted(lay)
    token_slot = np.array([lay[n][0] for n in names] + [-1], np.int32)
    for gname, g in GROUPS.items():
        t = pool.tables[gname]
        x = rng.standard_normal((len(token_slot), g.n_in)).astype(np.float32)
        for layer in range(CFG.n_layers):
            got, bound = lora_delta_ref(x, token_slot, np.ones(len(token_slot), np.float32),
                                        pool.arena16, pool.arena32, t.a_base[layer],
                                        t.b_base[layer], t.s_base[layer], t.ranks, t.part_col0,
                                        t.part_width, g.n_out, with_bound=True)
            assert not got[-1].any()                                     # -1: no adapter
            for i, name in enumerate(names):
                want = dense_delta(ADAPTERS[name], gname, layer, x[i])
                err = np.abs(got[i] - want)
                assert np.all(err <= bound[i] + 1e-5 * (1 + np.abs(want))), (name, gname, layer)


def snapshot(pool):
    """Everything a refused or failed operation must leave as it was (all but hits, misses and
    load_failures, which the callers check)."""
    lay = layout(pool)
    s = pool.stats()
    return (lay, {n: (pool.pins(n), pool._entries[n].sticky) for n in lay},
            (s.loads, s.evictions, s.compactions, s.bytes_resident, s.load_seconds_sum),
            {g: (t.a_base.copy(), t.b_base.copy(), t.s_base.copy(), t.ranks.copy())
             for g, t in pool.tables.items()},
            {n: pool.arena[off:off + n_].copy() for n, (_, off, n_) in lay.items()},
            list(pool._free_slots))


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[5] == b[5]
    for g in a[3]:
        for x, y in zip(a[3][g], b[3][g]):
            np.testing.assert_array_equal(x, y)
    for n in a[4]:
        np.testing.assert_array_equal(a[4][n], b[4][n])


def first_fit(extents, n: int, budget: int) -> int | None:
    at = 0
    for off, size in sorted(extents):
        if off - at >= n:
            return at
        at = off + size
    return at if budget - at >= n else None


def plan_room(extents: dict, free_slots: int, budget: int, ranking: list[str], n: int,
              may_move: bool):
    """The reference decision: (victims, compacts) or None when no room can be made.

    Evict in policy order until a slot is free and either a hole fits n bytes, or (when moving
    is allowed) enough bytes are free to compact. Without moving, enough free bytes but no hole
    means give up, and giving up changes nothing."""
    ext = dict(extents)
    free = budget - sum(size for _, size in ext.values())
    if free + sum(ext[v][1] for v in ranking) < n or (free_slots == 0 and not ranking):
        return None
    victims = []
    for v in [None, *ranking]:
        if v is not None:
            victims.append(v)
            free += ext.pop(v)[1]
            free_slots += 1
        if free_slots == 0:
            continue
        if first_fit(ext.values(), n, budget) is not None:
            return victims, False
        if free >= n:
            return (victims, True) if may_move else None
    return None


# --- the state machine ------------------------------------------------------------------------------

class PoolMachine(RuleBasedStateMachine):
    POLICY = "lru"

    @initialize()
    def setup(self):
        self.pool = AdapterPool(CFG, BUDGET, max_slots=SLOTS, policy=self.POLICY)
        self.rng = np.random.default_rng(5)
        self.slot = {}                      # resident name -> slot (never changes while resident)
        self.pins = {}                      # name -> pins
        self.sticky = set()
        self.counts = dict(hits=0, misses=0, loads=0, evictions=0, load_failures=0, compactions=0)
        self.lru: list[str] = []            # oldest access first
        self.lfu_count: dict[str, int] = {}
        self.lfu_last: dict[str, int] = {}
        self.tick = 0

    # model helpers

    def model_access(self, name):
        self.counts["hits" if name in self.slot else "misses"] += 1
        if name in self.lru:
            self.lru.remove(name)
        self.lru.append(name)
        self.tick += 1
        self.lfu_count[name] = self.lfu_count.get(name, 0) + 1
        self.lfu_last[name] = self.tick

    def model_forget(self, name):
        if name in self.lru:
            self.lru.remove(name)
        self.lfu_count.pop(name, None)
        self.lfu_last.pop(name, None)

    def ranking(self, protect=()) -> list[str]:
        cand = {n for n in self.slot if not self.pins.get(n) and n not in self.sticky
                and n not in protect}
        if self.POLICY == "lru":
            assert cand <= set(self.lru)
            return [n for n in self.lru if n in cand]
        return sorted(cand, key=lambda n: (self.lfu_count.get(n, 0), self.lfu_last.get(n, 0)))

    def plan(self, name, protect=(), may_move=True):
        lay = layout(self.pool)
        assert set(lay) == set(self.slot)
        extents = {n: (off, size) for n, (_, off, size) in lay.items()}
        free_slots = SLOTS - len(lay)
        return plan_room(extents, free_slots, BUDGET, self.ranking(protect), SIZE[name], may_move)

    def check_load(self, name, before, plan):
        """After a successful load: the planned victims went, the rest stayed put (or slid down)."""
        victims, compacts = plan
        event(f"load: {len(victims)} evicted" + (", compacted" if compacts else ""))
        if len(layout(self.pool)) + 1 - len(victims) == SLOTS:
            event("load: every slot taken")
        lay = layout(self.pool)
        assert set(lay) == set(self.slot) - set(victims) | {name}
        for v in victims:
            del self.slot[v]
        self.counts["evictions"] += len(victims)
        self.counts["loads"] += 1
        kept = {n: before[n] for n in lay if n != name}
        if compacts:
            self.counts["compactions"] += 1
            at = 0
            for n in sorted(kept, key=lambda n: kept[n][1]):
                assert lay[n][1] == at and lay[n][0] == kept[n][0]
                at += SIZE[n]
            assert lay[name][1] == at
        else:
            assert all(lay[n] == kept[n] for n in kept)             # nothing moved
            extents = [(off, size) for _, off, size in kept.values()]
            assert lay[name][1] == first_fit(extents, SIZE[name], BUDGET)
        self.slot[name] = lay[name][0]

    def refused(self, call, exc_type, before_snap):
        event(f"refused: {exc_type.__name__}")
        with pytest.raises(exc_type):
            call()
        assert_same(before_snap, snapshot(self.pool))

    # rules

    @rule(name=st.sampled_from(NAMES))
    def access(self, name):
        hit = name in self.slot
        self.model_access(name)
        assert self.pool.access(name) == hit

    @rule(name=st.sampled_from(NAMES), may_move=st.booleans())
    def acquire(self, name, may_move):
        self.acquire_moving(name, may_move)

    @rule(name=st.sampled_from(NAMES), may_move=st.just(True))
    def acquire_moving(self, name, may_move):
        self.pool.access(name)
        self.model_access(name)
        if name in self.slot:
            assert self.pool.acquire(name, PACKED[name], may_move=may_move) == self.slot[name]
            self.pins[name] = self.pins.get(name, 0) + 1
            return
        plan, before, snap = self.plan(name, may_move=may_move), layout(self.pool), snapshot(self.pool)
        if plan is None:
            self.refused(lambda: self.pool.acquire(name, PACKED[name], may_move=may_move),
                         PoolFullError, snap)
            return
        slot = self.pool.acquire(name, PACKED[name], may_move=may_move)
        self.check_load(name, before, plan)
        assert slot == self.slot[name]
        self.pins[name] = self.pins.get(name, 0) + 1

    @rule(name=st.sampled_from(NAMES))
    def acquire_bad_bytes(self, name):
        if name in self.slot:
            return
        self.pool.access(name)
        self.model_access(name)
        plan, snap = self.plan(name), snapshot(self.pool)
        if plan is None:
            self.refused(lambda: self.pool.acquire(name, FailingRecord(name)), PoolFullError, snap)
            return
        with pytest.raises(AdapterError, match="injected"):
            self.pool.acquire(name, FailingRecord(name))
        victims, _ = plan
        for v in victims:                  # room was made before the bytes turned out bad
            del self.slot[v]
        self.counts["evictions"] += len(victims)
        self.counts["compactions"] += plan[1]
        self.counts["load_failures"] += 1
        assert name not in self.pool and self.pool.pins(name) == 0
        assert set(layout(self.pool)) == set(self.slot)
        if not victims and not plan[1]:    # nothing had to go: exactly as before
            assert_same(snap, snapshot(self.pool))

    @precondition(lambda self: any(getattr(self, "pins", {}).values()))
    @rule(data=st.data())
    def release(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, k in self.pins.items() if k)))
        self.pool.release(name)
        self.pins[name] -= 1

    @rule(name=st.sampled_from(NAMES))
    def release_unpinned(self, name):
        if not self.pins.get(name):
            self.refused(lambda: self.pool.release(name), AdapterError, snapshot(self.pool))

    @rule(name=st.sampled_from(NAMES), protect=st.sets(st.sampled_from(NAMES), max_size=4))
    def prefetch(self, name, protect):
        self.pool.access(name)
        self.model_access(name)
        if name in self.slot:
            assert self.pool.prefetch(name, PACKED[name], protect=protect)
            return
        plan, before, snap = self.plan(name, protect, may_move=False), layout(self.pool), snapshot(self.pool)
        if plan is None:
            assert self.pool.prefetch(name, PACKED[name], protect=protect) is False
            assert_same(snap, snapshot(self.pool))
            return
        assert not plan[1] and not set(plan[0]) & protect
        assert self.pool.prefetch(name, PACKED[name], protect=protect) is True
        self.check_load(name, before, plan)
        assert self.pool.pins(name) == 0

    @rule(name=st.sampled_from(NAMES))
    def evict(self, name):
        if name not in self.slot or self.pins.get(name) or name in self.sticky:
            self.refused(lambda: self.pool.evict(name), AdapterError, snapshot(self.pool))
            return
        self.pool.evict(name)
        del self.slot[name]
        self.counts["evictions"] += 1

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name):
        if name not in self.slot or self.pins.get(name):
            self.refused(lambda: self.pool.remove(name), AdapterError, snapshot(self.pool))
            return
        self.pool.remove(name)
        del self.slot[name]
        self.sticky.discard(name)
        self.model_forget(name)

    @rule(name=st.sampled_from(NAMES))
    def add_sticky(self, name):
        if name in self.slot:
            self.refused(lambda: self.pool.add(name, PACKED[name]), AdapterError, snapshot(self.pool))
            return
        plan, before, snap = self.plan(name), layout(self.pool), snapshot(self.pool)
        if plan is None:
            self.refused(lambda: self.pool.add(name, PACKED[name]), PoolFullError, snap)
            return
        self.pool.add(name, PACKED[name])
        self.check_load(name, before, plan)
        self.sticky.add(name)

    # invariants

    @invariant()
    def pins_slots_and_counters(self):
        if not hasattr(self, "pool"):
            return
        lay = layout(self.pool)
        assert {n: s for n, (s, _, _) in lay.items()} == self.slot       # pinned never evicted/moved slot
        for name in NAMES:
            assert self.pool.pins(name) == self.pins.get(name, 0)
            assert (name in self.pool) == (name in self.slot)
        s = self.pool.stats()
        assert {k: getattr(s, k) for k in self.counts} == self.counts

    @invariant()
    def layout_and_data(self):
        if hasattr(self, "pool"):
            check_pool(self.pool, self.rng)


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


class LRUMachine(PoolMachine):
    POLICY = "lru"


class LFUMachine(PoolMachine):
    POLICY = "lfu"


TestPoolLRU = LRUMachine.TestCase
TestPoolLRU.settings = MACHINE_SETTINGS
TestPoolLFU = LFUMachine.TestCase
TestPoolLFU.settings = MACHINE_SETTINGS


# --- unit tests ------------------------------------------------------------------------------------

def fill(pool, names, pin=()):
    for n in names:
        pool.access(n)
        pool.acquire(n, PACKED[n])
        if n not in pin:
            pool.release(n)


@pytest.mark.parametrize("policy, first, second", [("lru", "a", "c"), ("lfu", "c", "d")])
def test_lru_and_lfu_evict_in_their_own_order(policy, first, second):
    # Five adapters of one size, room for three. Accesses a a a b c b: LRU's oldest is a, LFU's
    # least used is c. Then d comes in (1 access) and e: LRU evicts c (older than b), LFU evicts
    # d (count 1 < b's 2 < a's 3).
    packed = {n: PACKED["r4"] for n in "abcde"}
    pool = AdapterPool(CFG, 3 * SIZE["r4"], max_slots=8, policy=policy)
    for n in "abc":
        pool.acquire(n, packed[n])
        pool.release(n)
    for n in "aaabcb":
        assert pool.access(n)
    assert pool.access("d") is False
    pool.acquire("d", packed["d"])
    pool.release("d")
    assert sorted(pool.names) == sorted(set("abcd") - {first})
    pool.access("e")
    pool.acquire("e", packed["e"])
    assert sorted(pool.names) == sorted(set("abcde") - {first, second})
    s = pool.stats()
    assert (s.evictions, s.loads, s.hits, s.misses) == (2, 5, 6, 2)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_ties_go_to_the_older_access(policy):
    pool = AdapterPool(CFG, 2 * SIZE["r4"], max_slots=8, policy=policy)
    for n in "ab":                                    # one access each, a first
        pool.access(n)
        pool.acquire(n, PACKED["r4"])
        pool.release(n)
    pool.access("c")
    pool.acquire("c", PACKED["r4"])
    assert sorted(pool.names) == ["b", "c"]


def test_lfu_counts_survive_eviction_but_not_removal():
    pool = AdapterPool(CFG, 2 * SIZE["r4"], max_slots=8, policy="lfu")
    for n, k in (("a", 3), ("b", 1)):
        for _ in range(k):
            pool.access(n)
        pool.acquire(n, PACKED["r4"])
        pool.release(n)
    pool.evict("a")                                   # count 3 kept
    pool.access("a")
    pool.acquire("a", PACKED["r4"])
    pool.release("a")
    pool.access("c")                                   # 1 access, newer than b: b goes
    pool.acquire("c", PACKED["r4"])
    pool.release("c")
    assert sorted(pool.names) == ["a", "c"]
    pool.remove("a")                                   # forgotten: a starts again at 0
    pool.access("a")
    pool.acquire("a", PACKED["r4"])
    pool.release("a")
    for _ in range(3):
        pool.access("c")
    pool.access("d")
    pool.acquire("d", PACKED["r4"])
    assert sorted(pool.names) == ["c", "d"]


def test_unknown_policy_and_slotless_pool_are_refused():
    with pytest.raises(AdapterError, match="lfu.*lru"):
        AdapterPool(CFG, BUDGET, policy="fifo")
    with pytest.raises(AdapterError, match="slot"):
        AdapterPool(CFG, BUDGET, max_slots=0)


def test_load_failure_leaves_the_pool_exactly_as_before():
    pool = AdapterPool(CFG, BUDGET, max_slots=SLOTS)
    fill(pool, ["r1", "q2"], pin=["q2"])
    check_pool(pool)
    before = snapshot(pool)
    for _ in range(2):                                 # twice: the slot and extent came back
        with pytest.raises(AdapterError, match="'mlp3'.*injected"):
            pool.acquire("mlp3", FailingRecord("mlp3"))
        assert_same(before, snapshot(pool))
        assert "mlp3" not in pool and pool.pins("mlp3") == 0
    s = pool.stats()
    assert (s.load_failures, s.loads, s.evictions) == (2, 2, 0)
    assert s.load_bucket_counts[-1] == 2 and len(s.recent_load_seconds) == 2
    with pytest.raises(AdapterError, match="'o6'.*injected"):
        pool.prefetch("o6", FailingRecord("o6"))       # prefetch reports bad bytes, too
    assert_same(before, snapshot(pool))
    pool.acquire("mlp3", PACKED["mlp3"])               # the good bytes load where the bad did not
    check_pool(pool)
    assert pool.stats().load_failures == 3


def fragmented_pool(policy="lru"):
    """Four adapters filling the budget exactly; the 2nd and 4th gone: two holes, neither big
    enough for `big`, which fits once the rest slides down (or once the 3rd is evicted too)."""
    order = ["r4", "attn5", "q2", "mlp3"]
    pool = AdapterPool(CFG, sum(SIZE[n] for n in order), max_slots=8, policy=policy)
    fill(pool, order)
    for n in ("attn5", "mlp3"):
        pool.remove(n)
    free = pool.budget - SIZE["r4"] - SIZE["q2"]
    big = "pat"
    assert max(SIZE["attn5"], SIZE["mlp3"]) < SIZE[big] <= free
    return pool, big


def test_compaction_moves_bytes_and_tables_and_keeps_the_data():
    pool, big = fragmented_pool()
    slot_r4, slot_q2 = pool.acquire("r4"), pool.slot("q2")        # r4 pinned: moved only now
    check_pool(pool)
    pool.access(big)
    pool.acquire(big, PACKED[big])
    s = pool.stats()
    assert (s.compactions, s.evictions, s.loads) == (1, 0, 5)
    lay = layout(pool)
    assert lay["r4"] == (slot_r4, 0, SIZE["r4"])                  # slots unchanged, extents packed
    assert lay["q2"] == (slot_q2, SIZE["r4"], SIZE["q2"])
    assert lay[big][1] == SIZE["r4"] + SIZE["q2"]
    check_pool(pool)                                               # bytes and tables followed


def test_no_move_refusal_changes_nothing():
    # r4 (evictable) | hole | q2 (pinned) | hole: enough bytes are free for `big`, in two pieces.
    # Only compaction helps, so acquire(may_move=False) and prefetch refuse, changing nothing.
    pool, big = fragmented_pool()
    pool.acquire("q2")
    before = snapshot(pool)
    with pytest.raises(PoolFullError):
        pool.acquire(big, PACKED[big], may_move=False)
    assert_same(before, snapshot(pool))
    assert pool.prefetch(big, PACKED[big]) is False
    assert_same(before, snapshot(pool))
    assert pool.stats().compactions == 0


def test_no_move_refusal_keeps_evictable_adapters():
    # q2 (pinned) | hole 1600 | o6 (evictable) | mlp3 (pinned) | hole 3648. r4 fits in neither
    # hole; evicting o6 frees enough bytes, still in two pieces. Without moving, the load gives
    # up, and must not have evicted o6 on the way.
    order = ["q2", "r1", "o6", "mlp3", "pat"]
    pool = AdapterPool(CFG, sum(SIZE[n] for n in order), max_slots=8)
    fill(pool, order, pin=["q2", "mlp3"])
    pool.remove("r1")
    pool.remove("pat")
    free = pool.budget - SIZE["q2"] - SIZE["o6"] - SIZE["mlp3"]
    assert max(SIZE["r1"], SIZE["pat"]) < SIZE["r4"] <= free
    before = snapshot(pool)
    assert pool.prefetch("r4", PACKED["r4"]) is False
    assert_same(before, snapshot(pool))
    with pytest.raises(PoolFullError, match="'r4' does not fit in one piece without compacting"):
        pool.acquire("r4", PACKED["r4"], may_move=False)
    assert_same(before, snapshot(pool))
    assert "o6" in pool and pool.stats().evictions == 0
    pool.acquire("r4", PACKED["r4"])                 # moving allowed: o6 stays, the pool compacts
    s = pool.stats()
    assert (s.evictions, s.compactions) == (0, 1) and "o6" in pool
    check_pool(pool)


def test_prefetch_never_evicts_a_protected_name_and_never_compacts():
    pool = AdapterPool(CFG, SIZE["r4"] + SIZE["attn5"], max_slots=8, policy="lru")
    fill(pool, ["r4", "attn5"])                     # r4 is the older: the LRU victim
    before = snapshot(pool)
    assert pool.prefetch("mlp3", PACKED["mlp3"], protect={"r4", "attn5"}) is False
    assert_same(before, snapshot(pool))
    assert pool.prefetch("mlp3", PACKED["mlp3"], protect={"r4"}) is True
    assert sorted(pool.names) == ["mlp3", "r4"] and pool.pins("mlp3") == 0
    check_pool(pool)
    pool2, big = fragmented_pool()
    before = snapshot(pool2)
    assert pool2.prefetch(big, PACKED[big], protect={"q2"}) is False       # would need compaction
    assert_same(before, snapshot(pool2))
    assert pool2.stats().compactions == 0


def test_release_more_than_acquire_raises():
    pool = AdapterPool(CFG, BUDGET, max_slots=SLOTS)
    pool.acquire("r1", PACKED["r1"])
    assert pool.acquire("r1") == pool.slot("r1") and pool.pins("r1") == 2
    pool.release("r1")
    pool.release("r1")
    for name in ("r1", "q2"):
        with pytest.raises(AdapterError, match=f"{name!r} released more often than acquired"):
            pool.release(name)
    assert pool.pins("r1") == 0 and "r1" in pool
    with pytest.raises(AdapterError, match="no source"):
        pool.acquire("q2")
    pool.add("sticky", PACKED["q2"])
    with pytest.raises(AdapterError, match="released more often"):
        pool.release("sticky")                       # sticky is not a pin
    with pytest.raises(AdapterError, match="cannot be evicted"):
        pool.evict("sticky")
    with pytest.raises(CapacityError, match="'huge'.*more than the whole pool"):
        pool.acquire("huge", PACKED["huge"])


def test_pinned_or_sticky_pool_refuses_with_nothing_changed():
    pool = AdapterPool(CFG, BUDGET, max_slots=3)
    pool.add("r4", PACKED["r4"])
    pool.acquire("attn5", PACKED["attn5"])
    pool.acquire("r1", PACKED["r1"])                 # every slot taken, nothing evictable
    before = snapshot(pool)
    with pytest.raises(PoolFullError, match="'q2'"):
        pool.acquire("q2", PACKED["q2"])
    assert_same(before, snapshot(pool))
    pool.release("r1")                               # one evictable: it goes
    pool.access("q2")
    pool.acquire("q2", PACKED["q2"])
    assert sorted(pool.names) == ["attn5", "q2", "r4"] and pool.stats().evictions == 1
    check_pool(pool)


def test_load_latency_histogram_is_cumulative_and_counts_every_load():
    pool = AdapterPool(CFG, BUDGET, max_slots=SLOTS)
    delays = {"r1": 0.0, "q2": 0.003, "mlp3": 0.012, "o6": 0.0}
    for name, delay in delays.items():
        pool.acquire(name, SlowRecord(name, delay))
        pool.release(name)
    with pytest.raises(AdapterError):
        pool.acquire("pat", FailingRecord("pat"))     # failures are not loads
    s = pool.stats()
    assert s.loads == len(delays) and s.load_failures == 1
    counts = s.load_bucket_counts
    assert len(counts) == len(LOAD_BUCKETS_MS) + 1 and counts[-1] == s.loads
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    recent = s.recent_load_seconds
    assert len(recent) == s.loads and s.load_seconds_sum == pytest.approx(sum(recent))
    for bound, c in zip(LOAD_BUCKETS_MS, counts):
        assert c == sum(dt * 1e3 <= bound for dt in recent)
    assert sum(dt >= 0.012 for dt in recent) >= 1 and sum(dt >= 0.003 for dt in recent) >= 2
    assert counts[list(LOAD_BUCKETS_MS).index(2.0)] <= 2          # the 3 and 12 ms loads are above


def test_prefetch_thread_and_acquiring_thread_together():
    """One thread prefetches (slow loads) while another acquires, checks its data and releases."""
    pool = AdapterPool(CFG, BUDGET, max_slots=SLOTS)
    names = [n for n in NAMES if n != "huge"]
    errors: list[BaseException] = []
    stop = threading.Event()
    seen = {"prefetched": 0, "acquired": 0}

    def prefetcher():
        rng = np.random.default_rng(1)
        try:
            while not stop.is_set():
                name = str(rng.choice(names))
                protect = set(rng.choice(names, 2).tolist()) - {name}
                seen["prefetched"] += pool.prefetch(name, SlowRecord(name, 0.002), protect=protect)
        except BaseException as e:                 # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def acquirer():
        rng = np.random.default_rng(2)
        try:
            for _ in range(150):
                name = str(rng.choice(names))
                pool.access(name)
                try:
                    slot = pool.acquire(name, SlowRecord(name, 0.001))
                except PoolFullError:
                    continue
                # While pinned (and only this thread compacts), the slot's bytes are its own.
                off = pool._entries[name].offset
                assert pool.slot(name) == slot
                np.testing.assert_array_equal(pool.arena[off:off + SIZE[name]], PACKED[name].payload)
                pool.release(name)
                seen["acquired"] += 1
        except BaseException as e:                 # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=prefetcher, daemon=True),
               threading.Thread(target=acquirer, daemon=True)]
    for t in threads:
        t.start()
    threads[1].join(timeout=30)
    stop.set()
    threads[0].join(timeout=10)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors[0]
    assert seen["acquired"] >= 50 and seen["prefetched"] >= 1
    check_pool(pool)
    s = pool.stats()
    assert all(pool.pins(n) == 0 for n in names) and s.pinned == 0
    assert s.loads == s.load_bucket_counts[-1] and s.loads - s.evictions == s.resident
