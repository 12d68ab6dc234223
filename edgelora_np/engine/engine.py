"""Continuous batching: many requests, each with its own adapter and sampling, one forward per step.

    engine = el.Engine(model, max_batch_tokens=256, max_seqs=16)
    engine.add_adapter("sql", "path/to/peft_dir_or.gguf")
    gen = engine.submit("prompt", adapter="sql", max_tokens=64, temperature=0.0)
    for piece in gen: ...        # streams while other requests share the same steps

One execution model. The engine thread owns the batch, the KV cache and the pins: it runs the
steps. A Generation (the handle `submit` returns) only consumes what the engine thread sends
it, from a thread (iterate it, `wait()`) or from an event loop (`async for d in gen.stream()`).
`submit` starts the engine thread. `Engine(..., background=False)` has no thread: the caller
runs `step()` itself (deterministic tests and timing loops).

Each step builds one flat batch: the next token of every decoding sequence, then chunks of
waiting prompts up to the token budget (chunked prefill). One forward runs it; each sequence
that produced logits samples, streams its new text, and retires on EOS, max tokens, a stop
string, the context limit or cancellation, freeing its KV pages and its adapter pin.

Locking: the engine lock guards the queue, the running set and the counters, and is never held
during a forward, so `submit`, `add_adapter`, stats and the prefetcher never wait for one.
Only the engine thread changes the running set, the KV cache and pins; other threads append
to the queue and set cancel flags. The pool moves no bytes while a forward reads it
(`AdapterPool.reading`).

Every request ends in exactly one of: finished ("stop", "length", "context"), "cancelled" or
"error". If the engine thread dies (anything raised outside the forward, or the prefetcher
dying), every waiting and running request fails with an EngineError, `failure` is set (the
server's /health turns 503), and `submit` refuses new work. `close()` cancels what is pending.
A forward that raises fails only the requests in that batch; the engine keeps serving.

Requests are checked when submitted (adapter known, parameters valid, prompt fits, queue not
full), so a bad request is refused alone and never reaches a batch. Admission reserves KV room
for the whole request (prompt + max_tokens), so a running sequence never runs out of cache.

The prefix cache (model/prefix_cache.py, on unless `prefix_cache=False`, or per request with
`cache_prompt=False`): once a page of a sequence is full and computed, it is keyed by the
adapter's identity (content fingerprint and scale, or the base model) and the tokens up to it.
At admission a request maps the longest run of cached pages of its prompt (all but the last
prompt token: that one must run to give logits) and prefills only the rest. Admission counts
a shared page once: a request needs room only for the pages it does not map, and mapping an
idle cached page takes it out of the room left for others.

Adapters come from two places. `add_adapter(name, path)` loads a PEFT directory or GGUF-LoRA
file into the pool for good (it has no other copy). With `store=DIR` (adapters/store.py), every
adapter of the store can be requested by name; the pool (adapters/pool.py) keeps the hot ones
within `adapter_pool_mb`, loading on demand and evicting unpinned ones. A sequence pins its
adapter from admission to retirement. A request whose adapter cannot be made resident because
the pool is full of pinned adapters waits in the queue; while it waits, requests behind it may
run only with adapters already pinned, so the pins drain and it gets its turn. A second thread
prefetches: it loads the adapters of queued requests ahead of their turn, so admission never
reads the disk while sequences are decoding.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from edgelora_np.adapters.pool import AdapterPool, PoolFullError, PoolStats
from edgelora_np.adapters.store import AUTO
from edgelora_np.engine.generation import Delta, Generation
from edgelora_np.errors import (
    AdapterError,
    CapacityError,
    ContextOverflowError,
    EdgeLoraError,
    EngineError,
    QueueFullError,
    SamplingError,
)
from edgelora_np.kernels.lora import LoraBatch
from edgelora_np.model.batch import Batch
from edgelora_np.model.kv_cache import PAGE_SIZE
from edgelora_np.model.prefix_cache import adapter_identity, page_keys
from edgelora_np.sampling import Sampler, SamplingParams, StopMatcher
from edgelora_np.tokenizer import StreamDecoder

log = logging.getLogger(__name__)

IDLE_WAIT = 0.25       # seconds the idle engine thread sleeps unless woken (submit, cancel, load)


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt: np.ndarray               # [n] int32
    adapter: str | None              # its adapter's name; None = base model
    scale: float                     # the request's LoRA scale
    params: SamplingParams
    gen: Generation
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    budget: int                      # KV positions it may use: prompt + max new tokens
    cache_prompt: bool = True        # may use and feed the prefix cache
    n_cached: int = 0                # positions already in the KV cache
    identity: bytes = b""            # what computes its KV (prefix_cache.adapter_identity)
    keys: list[bytes] = field(default_factory=list)   # prefix keys of its first full pages
    next_token: int | None = None    # sampled, not yet fed back
    slot: int = -1                   # adapter slot in the pool, pinned while running
    unsent: list[int] = field(default_factory=list)   # tokens not yet part of a Delta


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics: queue, batch, KV cache and per-adapter demand."""

    waiting: int
    running: int
    kv_pages_used: int                    # held by sequences (a shared page counts once)
    kv_pages_free: int                    # free or idle cached (evicted when needed)
    kv_pages_cached: int                  # idle cached pages: kept for prefix hits
    prefix_hit_tokens: int                # prompt positions served from the prefix cache
    prefix_evictions: int                 # cached pages evicted for new content
    running_adapters: tuple[str, ...]     # distinct adapters of running requests
    waiting_adapters: tuple[str, ...]     # ... of waiting ones
    max_adapters: int


class Engine:
    def __init__(self, model, *, max_batch_tokens: int = 256, max_seqs: int = 16,
                 kv_tokens: int | None = None, max_adapters: int = 64,
                 adapter_pool_mb: float = 256, store=None, policy: str = "lru",
                 prefetch: bool = True, background: bool = True, max_queue: int | None = None,
                 prefix_cache: bool = True):
        if max_batch_tokens < 1 or max_seqs < 1:
            raise EdgeLoraError("max_batch_tokens and max_seqs must be at least 1")
        if max_queue is not None and max_queue < 0:
            raise EdgeLoraError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.max_queue = max_queue
        self.background = background
        self.prefix_cache = prefix_cache         # reuse KV pages across requests (per request too)
        self.cache = model.llama.new_cache(kv_tokens or max(model.n_ctx, max_seqs * PAGE_SIZE),
                                           max_seq_len=model.n_ctx)
        self.pool = AdapterPool(model.config, int(adapter_pool_mb * 2**20), max_slots=max_adapters,
                                policy=policy)
        self.store = None
        self.failure: EngineError | None = None  # set once the engine thread has died
        self._catalog: dict[str, str] = {}       # store adapters: name -> base fingerprint
        self._load_errors: dict[str, AdapterError] = {}
        self._adapter_users: dict[str, int] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._prefetch = prefetch
        self._prefetcher: threading.Thread | None = None
        self._prefetch_wake = threading.Event()
        self._fatal: BaseException | None = None  # a helper thread's death, for the engine thread
        self._router = None
        self._router_lock = threading.Lock()
        if store is not None:
            self.open_store(store)

    # --- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, path, *, scale: float = 1.0) -> None:
        """Load a PEFT directory or GGUF-LoRA file into the pool, resident until removed."""
        from edgelora_np.adapters.formats import load_adapter
        from edgelora_np.adapters.packed import pack

        adapter = load_adapter(path, self.model.config, scale=scale, name=name)
        with self._lock:
            if name in self._catalog:
                raise AdapterError(f"an adapter named {name!r} is already in the store")
        self.pool.add(name, pack(adapter, self.model.config))

    def open_store(self, store) -> None:
        """Serve the adapters of an adapter store (a directory or an AdapterStore) by name."""
        from edgelora_np.adapters.store import AdapterStore

        self.store = store if isinstance(store, AdapterStore) else AdapterStore(store)
        self.refresh_store()

    def refresh_store(self) -> None:
        """Re-read the store's index (after adapters were imported or removed)."""
        rows = self.store.fingerprints()
        with self._lock:
            clash = sorted(set(rows) & set(self.pool.names) - set(self._catalog))
            if clash:
                raise AdapterError(f"store adapter(s) {clash} clash with adapters added by path")
            for name in set(self._catalog) - set(rows):
                self._forget(name)
            self._catalog = rows
        if self._router is not None:
            self._router.refresh()

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name` (a store adapter stays in the store)."""
        with self._lock:
            if self._adapter_users.get(name, 0):
                raise AdapterError(f"adapter {name!r} is in use by "
                                   f"{self._adapter_users[name]} request(s)")
            if name not in self._catalog and not self.pool.sticky(name):
                raise AdapterError(f"adapter {name!r} is not loaded")
            self._catalog.pop(name, None)
            self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop a no longer served adapter from the pool (unless a request still uses it)."""
        if name in self.pool and not self._adapter_users.get(name, 0):
            self.pool.remove(name)
        self._load_errors.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        """Every adapter this engine serves: the store's and those added by path."""
        with self._lock:
            return sorted(set(self._catalog) | {n for n in self.pool.names if self.pool.sticky(n)})

    def adapter_stats(self) -> PoolStats:
        """The pool's counters: hits, misses, loads, evictions, bytes resident/pinned, latency."""
        return self.pool.stats()

    def check_adapter(self, name: str) -> None:
        """Raise AdapterError unless `name` can be served by this engine."""
        if name not in self._catalog and self.pool.sticky(name):
            return
        fingerprint = self._catalog.get(name)
        if fingerprint is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        if fingerprint != self.model.fingerprint:
            raise AdapterError(f"adapter {name!r} was imported for another base model "
                               f"({fingerprint}); this engine serves {self.model.fingerprint}")

    def _source(self, name: str):
        """Where a missing adapter loads from: its store record (read only when needed)."""
        if name not in self._catalog:
            return None                  # added by path: sticky, resident until removed
        return lambda: self.store.record(name)

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompt, *, adapter: str | None = None, adapter_scale: float = 1.0,
               chat: bool = False, allowed: Callable[[str], bool] | None = None,
               cache_prompt: bool = True, **sampling) -> Generation:
        """Queue a request (text, chat message(s) with chat=True, or token ids).

        `adapter="auto"` lets the router choose among the adapters `allowed` accepts (default:
        all), or the base model; the Generation's `route` says what it chose and why.
        `adapter_scale` multiplies this request's LoRA correction (1 = as imported).
        `cache_prompt=False` keeps this request out of the prefix cache (no reuse, no sharing)."""
        params = SamplingParams(**sampling)
        if not np.isfinite(adapter_scale):
            raise SamplingError(f"adapter_scale must be finite, got {adapter_scale!r}")
        ids = self.model.prompt_ids(prompt, chat=chat)
        route = None
        if adapter == AUTO:
            route = self.router.route(self._route_text(prompt, ids),
                                      resident=set(self.pool.names), allowed=allowed)
            adapter = route.adapter
        if len(ids) >= self.model.n_ctx:
            raise ContextOverflowError(f"prompt of {len(ids)} tokens leaves no room in the "
                                       f"context of {self.model.n_ctx} positions",
                                       n_prompt_tokens=len(ids), n_ctx=self.model.n_ctx)
        budget = min(len(ids) + params.max_tokens, self.model.n_ctx)
        if budget > self.cache.n_pages * PAGE_SIZE:
            raise CapacityError(f"request needs {budget} KV positions, the cache holds "
                                f"{self.cache.n_pages * PAGE_SIZE}")
        sampler = Sampler(params)
        sampler.accept_many(ids.tolist())
        with self._lock:
            if self.failure is not None:
                raise self.failure
            if self._closed:
                raise EngineError("the engine is closed")
            # A slot freed since the last step counts as room: its request is not waiting
            # behind anyone, so a client at max_seqs + max_queue in flight is never refused.
            # A cancelled request takes no room either: the next step retires it before it
            # admits anyone (a client that gives up and asks again is not over its bound).
            waiting = sum(not s.gen._cancelled for s in self._waiting)
            running = sum(not s.gen._cancelled for s in self._running)
            queued = waiting - max(0, self.max_seqs - running)
            if self.max_queue is not None and queued >= self.max_queue:
                raise QueueFullError(f"{queued} requests are already waiting "
                                     f"(the queue holds {self.max_queue}); retry later")
            if adapter is not None:
                self.check_adapter(adapter)
                self.pool.access(adapter)
                self._adapter_users[adapter] = self._adapter_users.get(adapter, 0) + 1
            gen = Generation(prompt_tokens=len(ids), adapter=adapter,
                             adapter_scale=float(adapter_scale), route=route, _engine=self)
            self._waiting.append(_Sequence(
                next(self._ids), ids, adapter, float(adapter_scale), params, gen, sampler,
                StreamDecoder(self.model.tokenizer), StopMatcher(params.stop), budget,
                cache_prompt=bool(cache_prompt) and self.prefix_cache))
        self._wake.set()
        self._prefetch_wake.set()
        if self.background:
            self.start()
        return gen

    # --- the router ------------------------------------------------------------------------

    @property
    def router(self):
        """The router over the store's adapters (router/), built on first use."""
        with self._router_lock:
            if self._router is None:
                if self.store is None:
                    raise AdapterError("adapter 'auto' needs an adapter store whose adapters "
                                       "have cards (the router chooses among them)")
                from edgelora_np.router import Router

                self._router = Router.from_store(self.store, self.model)
            return self._router

    def _route_text(self, prompt, ids: np.ndarray) -> str:
        """What the router reads: the text, the last user message, or the ids' text."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
            return users[-1] if users else ""
        return self.model.detokenize(ids)

    @property
    def pending(self) -> int:
        """Requests not finished yet (waiting or running)."""
        with self._lock:
            return len(self._waiting) + len(self._running)

    def stats(self) -> EngineStats:
        with self._lock:
            prefix = self.cache.prefix
            return EngineStats(
                waiting=len(self._waiting), running=len(self._running),
                kv_pages_used=self.cache.held_pages, kv_pages_free=self.cache.free_pages,
                kv_pages_cached=prefix.n_idle, prefix_hit_tokens=prefix.hit_tokens,
                prefix_evictions=prefix.evictions,
                running_adapters=tuple(sorted({s.adapter for s in self._running if s.adapter})),
                waiting_adapters=tuple(sorted({s.adapter for s in self._waiting if s.adapter})),
                max_adapters=self.pool.max_slots)

    # --- the step ----------------------------------------------------------------------------

    def step(self) -> int:
        """Run one batch by hand (background=False); returns the tokens it processed (0: idle)."""
        if self.background:
            raise EngineError("this engine runs its own steps on its thread "
                              "(create it with background=False to step it by hand)")
        return self._step()

    def _step(self) -> int:
        with self._lock:
            self._retire_cancelled()
            self._admit()
            if not self._running:
                return 0
        batch, plan = self._plan()
        lora = None
        if (batch.adapters >= 0).any():
            lora = LoraBatch(self.pool, batch.adapters, batch.lora_scales)
        try:
            with self.pool.reading():
                logits = self.model.llama.forward(batch, self.cache, lora)
        except Exception as e:              # fail this batch's requests, keep serving
            log.exception("forward failed; failing the %d requests of its batch", len(self._running))
            for seq in list(self._running):
                self._finish(seq, "error", EdgeLoraError(f"forward failed: {e}"))
            return len(batch)
        for seq in self._running:
            seq.n_cached = self.cache.length(seq.seq_id)
            if seq.cache_prompt:
                self._share(seq)
        for i, seq in enumerate(plan):
            self._emit(seq, logits[i])
        return len(batch)

    def _plan(self) -> tuple[Batch, list[_Sequence]]:
        """The batch (decode tokens, then prefill chunks) and the sequences needing logits."""
        rows, logit_rows, plan = [], [], []
        decoding = [s for s in self._running if s.next_token is not None]
        decoding.sort(key=lambda s: s.slot)              # same adapter side by side
        for seq in decoding:
            logit_rows.append(len(rows))
            plan.append(seq)
            rows.append((seq.next_token, seq.seq_id, seq.n_cached, seq.slot, seq.scale))
        budget = self.max_batch_tokens - len(rows)
        for seq in self._running:
            left = len(seq.prompt) - seq.n_cached
            if seq.next_token is not None or left <= 0 or budget <= 0:
                continue
            n = min(left, budget)
            for pos in range(seq.n_cached, seq.n_cached + n):
                rows.append((int(seq.prompt[pos]), seq.seq_id, pos, seq.slot, seq.scale))
            if n == left:
                logit_rows.append(len(rows) - 1)
                plan.append(seq)
            budget -= n
        tokens, seq_ids, positions, slots, scales = zip(*rows)
        batch = Batch(np.array(tokens, np.int32), np.array(seq_ids, np.int32),
                      np.array(positions, np.int32), np.array(slots, np.int32),
                      np.array(logit_rows, np.int32), np.array(scales, np.float32))
        return batch, plan

    def _emit(self, seq: _Sequence, logits: np.ndarray) -> None:
        gen = seq.gen
        if gen.first_token is None:
            gen.first_token = time.perf_counter()
        try:
            token = seq.sampler.sample(logits)
        except EdgeLoraError as e:
            return self._finish(seq, "error", e)
        stop_ids = () if seq.params.ignore_eos else self.model.tokenizer.stop_ids
        if token in stop_ids:
            return self._finish(seq, "stop")
        seq.sampler.accept(token)
        gen.token_ids.append(token)
        seq.unsent.append(token)
        text, hit = seq.stops.push(seq.decoder.push(token))
        self._send(seq, text)
        if hit:
            return self._finish(seq, "stop")
        if len(gen.token_ids) >= seq.params.max_tokens:
            return self._finish(seq, "length")
        if seq.n_cached >= seq.budget:
            return self._finish(seq, "context")
        seq.next_token = token

    def _send(self, seq: _Sequence, text: str) -> None:
        """Stream text that is ready, with the tokens generated since the last Delta."""
        if text:
            seq.gen.text += text
            seq.gen._push(Delta(text, tuple(seq.unsent)))
            seq.unsent.clear()

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        """End a request: flush held-back text, free its KV pages and pin, tell its consumer."""
        try:
            if reason not in ("error", "cancelled") and not seq.stops.stopped:
                tail, hit = seq.stops.push(seq.decoder.flush())
                if not hit:
                    tail += seq.stops.flush()
                if seq.stops.stopped:
                    reason = "stop"
                self._send(seq, tail)
        finally:
            with self._lock:
                try:
                    self._release(seq)
                finally:
                    seq.gen.stopping_word = seq.stops.matched
                    seq.gen._end(reason, error)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.cache.release(seq.seq_id)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot >= 0:
            seq.slot = -1
            self.pool.release(seq.adapter)
        if seq.adapter is not None:
            self._adapter_users[seq.adapter] -= 1

    def _retire_cancelled(self) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.gen._cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into the batch, in order, while KV room and batch places last.

        A request needs its adapter pinned first (`_pin_adapter`). When the pool cannot make
        room because every resident adapter is pinned, the request waits, and requests behind
        it are admitted only with adapters that are already pinned, so the pinned set can only
        shrink until it fits.

        KV room: the pages running sequences will still allocate, plus this request's pages
        not mapped from the prefix cache, must fit in the free and idle pages (less the idle
        pages it maps). The hit is looked up before pinning (none if the adapter is not
        resident), and again once pinned, when the adapter's identity cannot change."""
        cache = self.cache
        owed = sum(cache.pages_needed(s.seq_id, s.budget) for s in self._running)
        pool_blocked = False
        for seq in list(self._waiting):
            if len(self._running) >= self.max_seqs:
                break
            if not self._fits(seq, self._lookup(seq, pinned=False), owed):
                break
            if seq.adapter is not None:
                state = self._pin_adapter(seq, pool_blocked)
                pool_blocked = pool_blocked or state == "blocked"
                if state != "pinned":
                    continue
            hit = self._lookup(seq)
            if not self._fits(seq, hit, owed):   # the adapter changed while it was unpinned
                if seq.slot >= 0:
                    seq.slot = -1
                    self.pool.release(seq.adapter)
                break
            self._waiting.remove(seq)
            if hit:
                cache.map_prefix(seq.seq_id, hit)
                seq.n_cached = len(hit) * PAGE_SIZE
                seq.gen.cached_tokens = seq.n_cached
            owed += cache.pages_needed(seq.seq_id, seq.budget)
            seq.gen.admitted = time.perf_counter()
            self._running.append(seq)

    def _fits(self, seq: _Sequence, hit: list[int], owed: int) -> bool:
        """Room for `seq` after the `owed` pages of running sequences, mapping `hit`."""
        need = -(-seq.budget // PAGE_SIZE) - len(hit)
        idle_taken = sum(self.cache.prefix.is_idle(p) for p in hit)
        return owed + need <= self.cache.free_pages - idle_taken

    def _lookup(self, seq: _Sequence, pinned: bool = True) -> list[int]:
        """The cached pages of the longest prefix of the prompt (but its last token).
        Before its adapter is pinned (`pinned=False`), nothing if that is not resident."""
        if not seq.cache_prompt:
            return []
        fingerprint = None
        if seq.adapter is not None:
            fingerprint = self.pool.resident_fingerprint(seq.adapter)
            if fingerprint is None:
                if pinned:
                    raise EngineError(f"adapter {seq.adapter!r} is pinned but not resident")
                return []
        seq.identity = adapter_identity(fingerprint, seq.scale)
        n_full = (len(seq.prompt) - 1) // PAGE_SIZE
        keys = page_keys(seq.identity, seq.prompt, n_full)
        hit = self.cache.prefix.lookup(keys)
        seq.keys = keys[:len(hit)]
        return hit

    def _share(self, seq: _Sequence) -> None:
        """Key the pages of `seq` that became full and computed (prompt or generated tokens)."""
        n_full = seq.n_cached // PAGE_SIZE
        if n_full <= len(seq.keys):
            return
        tokens = np.concatenate([seq.prompt, np.asarray(seq.gen.token_ids, np.int32)])
        first = len(seq.keys)
        new = page_keys(seq.identity, tokens[:n_full * PAGE_SIZE], n_full - first,
                        seq.keys[-1] if seq.keys else None, first)
        for i, key in enumerate(new, first):
            self.cache.share(seq.seq_id, i, key)
        seq.keys.extend(new)

    def _pin_adapter(self, seq: _Sequence, pool_blocked: bool) -> str:
        """Pin a waiting request's adapter. Returns "pinned"; "wait" (not now); "blocked" (the
        pool is full of pinned adapters); or "failed" (the request was ended with the error).

        With the prefetcher running and sequences decoding, a missing adapter is left to the
        prefetcher (no step stalls on disk); otherwise it is loaded here."""
        name = seq.adapter
        error = self._load_errors.pop(name, None)
        if error is not None:
            self._finish(seq, "error", error)
            return "failed"
        resident = name in self.pool
        if resident and pool_blocked and not self.pool.pins(name):
            return "wait"
        if not resident and (pool_blocked or (self._running and self._prefetcher is not None)):
            self._prefetch_wake.set()
            return "wait"
        try:
            seq.slot = self.pool.acquire(name, self._source(name))
        except PoolFullError as e:
            if self._running:
                return "blocked"
            self._finish(seq, "error", e)      # nothing will unpin: it can never fit
            return "failed"
        except AdapterError as e:
            self._finish(seq, "error", e)
            return "failed"
        return "pinned"

    def _prefetch_loop(self) -> None:
        """Load the adapters of queued requests, in queue order, before admission needs them."""
        try:
            while not self._closed:
                self._prefetch_wake.wait(IDLE_WAIT)
                self._prefetch_wake.clear()
                self._prefetch_once()
        except BaseException as e:       # noqa: BLE001 - handed to the engine thread, which fails
            self._fatal = e
            self._wake.set()

    def _prefetch_once(self) -> None:
        with self._lock:
            wanted = list(dict.fromkeys(s.adapter for s in self._waiting if s.adapter))
            wanted = [n for n in wanted[:2 * self.max_seqs]
                      if n in self._catalog and n not in self._load_errors]
        for i, name in enumerate(wanted):
            if self._closed or name in self.pool:
                continue
            try:
                loaded = self.pool.prefetch(name, self.store.record(name), protect=wanted[:i])
            except AdapterError as e:          # bad or vanished file: fail its requests
                self._load_errors[name] = e
                loaded = True
            if not loaded:
                break                           # full: later names would not fit either
            self._wake.set()

    # --- the engine thread -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """The engine thread is stepping: started, not failed (its thread may still be exiting)."""
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread (and the prefetcher, with a store); `submit` does this."""
        with self._lock:
            if self._thread is not None or self._closed or self.failure is not None:
                return
            if not self.background:
                raise EngineError("this engine is stepped by hand (background=False)")
            self._thread = threading.Thread(target=self._loop, name="edgelora-engine", daemon=True)
            if self._prefetch and self.store is not None:
                self._prefetcher = threading.Thread(target=self._prefetch_loop,
                                                    name="edgelora-prefetch", daemon=True)
                self._prefetcher.start()
            self._thread.start()

    def close(self, error: EngineError | None = None) -> None:
        """Stop the threads and end every request still waiting or running: cancelled, or
        failed with `error` (what a server shutting down tells their clients)."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._prefetch_wake.set()
        for t in (self._thread, self._prefetcher):
            if t is not None and t is not threading.current_thread():
                t.join()
        with self._lock:
            self._end_all("cancelled" if error is None else "error", error)

    def _loop(self) -> None:
        # Numba's thread count is per calling thread: the model's must be set on this one.
        numba.set_num_threads(self.model.n_threads)
        try:
            while not self._closed:
                if self._fatal is not None:
                    raise EngineError("the adapter prefetch thread died") from self._fatal
                if self._step() == 0:
                    self._wake.wait(IDLE_WAIT)
                    self._wake.clear()
        except BaseException as e:       # noqa: BLE001 - every request is failed, never dropped
            self._fail(e)

    def _fail(self, cause: BaseException) -> None:
        log.error("the engine thread died; failing every request", exc_info=cause)
        error = EngineError(f"the engine failed ({type(cause).__name__}: {cause}); "
                            "restart the server")
        with self._lock:
            self.failure = error
            self._end_all("error", error)

    def _end_all(self, reason: str, error: BaseException | None) -> None:
        """End every waiting and running request; each one ends even if releasing one fails."""
        for seq in [*self._waiting, *self._running]:
            try:
                self._finish(seq, reason, error)
            except Exception:                  # noqa: BLE001 - its consumer was told; go on
                log.exception("releasing request %d failed", seq.seq_id)
