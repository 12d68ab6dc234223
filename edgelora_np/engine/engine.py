"""Continuous batching: many requests, each with its own adapter and sampling, one forward per step.

    engine = el.Engine(model, max_batch_tokens=256, max_seqs=16)
    engine.add_adapter("sql", "path/to/peft_dir_or.gguf")
    gen = engine.submit("prompt", adapter="sql", max_tokens=64, temperature=0.0)
    for piece in gen: ...        # streams while other requests share the same steps

Each `step` builds one flat batch: the next token of every decoding sequence, then chunks of
waiting prompts up to the token budget (chunked prefill). One forward runs it; each sequence
that produced logits samples, streams its new text, and retires on EOS, max tokens, a stop
string, the context limit or cancellation, freeing its KV pages.

Requests are checked when submitted (adapter known, parameters valid, prompt fits), so a bad
request is refused alone and never reaches a batch. Admission reserves KV room for the whole
request (prompt + max_tokens), so a running sequence never runs out of cache.

Adapters come from two places. `add_adapter(name, path)` loads a PEFT directory or GGUF-LoRA
file into the pool for good (it has no other copy). With `store=DIR` (adapters/store.py), every
adapter of the store can be requested by name; the pool (adapters/pool.py) keeps the hot ones
within `adapter_pool_mb`, loading on demand and evicting unpinned ones. A sequence pins its
adapter from admission to retirement. A request whose adapter cannot be made resident because
the pool is full of pinned adapters waits in the queue; while it waits, requests behind it may
run only with adapters already pinned, so the pins drain and it gets its turn.

Steps run on a background thread once `start()` is called (the server does this); otherwise
iterating a Generation drives the steps itself, which keeps tests and scripts single-threaded.
With the background thread, a second one prefetches: it loads the adapters of queued requests
into the pool ahead of their turn, and admission never reads the disk while sequences are
decoding (it admits requests whose adapters are resident, and leaves the rest to the
prefetcher). Without it, admission loads adapters itself.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgelora_np.adapters.pool import AdapterPool, LoraBatch, PoolFullError, PoolStats
from edgelora_np.errors import AdapterError, CapacityError, ContextOverflowError, EdgeLoraError
from edgelora_np.model.batch import Batch
from edgelora_np.model.kv_cache import PAGE_SIZE
from edgelora_np.sampling import Sampler, SamplingParams, StopMatcher
from edgelora_np.tokenizer import StreamDecoder

_DONE = object()


@dataclass(eq=False)
class Generation:
    """One request's stream. Iterate for text pieces; afterwards the fields describe it all."""

    prompt_tokens: int
    adapter: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None   # "stop", "length", "context", "cancelled" or "error"
    error: BaseException | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _engine: Engine | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[str]:
        while True:
            if self._events.empty() and self._engine is not None and not self._engine.running:
                self._engine.step()
                continue
            event = self._events.get()
            if event is _DONE:
                if self.error is not None:
                    raise self.error
                return
            self.text += event
            yield event

    def run(self) -> Generation:
        """Consume the whole stream (for callers that do not stream)."""
        for _ in self:
            pass
        return self

    def cancel(self) -> None:
        """Stop generating; the sequence is retired at the next step."""
        self._cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt: np.ndarray               # [n] int32
    adapter: str | None              # its adapter's name; None = base model
    params: SamplingParams
    gen: Generation
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    budget: int                      # KV positions it may use: prompt + max new tokens
    reserved: int = 0                # KV positions promised to it at admission (whole pages)
    n_cached: int = 0                # positions already in the KV cache
    next_token: int | None = None    # sampled, not yet fed back
    slot: int = -1                   # adapter slot in the pool, pinned while running
    started: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, model, *, max_batch_tokens: int = 256, max_seqs: int = 16,
                 kv_tokens: int | None = None, max_adapters: int = 64,
                 adapter_pool_mb: float = 256, store=None, policy: str = "lru",
                 prefetch: bool = True):
        if max_batch_tokens < 1 or max_seqs < 1:
            raise EdgeLoraError("max_batch_tokens and max_seqs must be at least 1")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.cache = model.llama.new_cache(kv_tokens or max(model.n_ctx, max_seqs * PAGE_SIZE),
                                           max_seq_len=model.n_ctx)
        self.pool = AdapterPool(model.config, int(adapter_pool_mb * 2**20), max_slots=max_adapters,
                                policy=policy)
        self.store = None
        self._catalog: dict[str, str] = {}       # store adapters: name -> base fingerprint
        self._load_errors: dict[str, AdapterError] = {}
        self._adapter_users: dict[str, int] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._reserved = 0                       # KV positions promised to admitted sequences
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        self._prefetch = prefetch
        self._prefetcher: threading.Thread | None = None
        self._prefetch_wake = threading.Event()
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
            self._catalog = rows

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name` (a store adapter stays in the store)."""
        with self._lock:
            if self._adapter_users.get(name, 0):
                raise AdapterError(f"adapter {name!r} is in use by "
                                   f"{self._adapter_users[name]} running request(s)")
            if name not in self._catalog and name not in self.pool:
                raise AdapterError(f"adapter {name!r} is not loaded")
            self._catalog.pop(name, None)
            if name in self.pool:
                self.pool.remove(name)

    @property
    def adapters(self) -> list[str]:
        return sorted(set(self._catalog) | set(self.pool.names))

    def adapter_stats(self) -> PoolStats:
        """The pool's counters: hits, misses, loads, evictions, bytes resident/pinned, latency."""
        return self.pool.stats()

    def _check_adapter(self, name: str) -> None:
        if name in self.pool and name not in self._catalog:
            return
        fingerprint = self._catalog.get(name)
        if fingerprint is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        if fingerprint != self.model.fingerprint:
            raise AdapterError(f"adapter {name!r} was imported for another base model "
                               f"({fingerprint}); this engine serves {self.model.fingerprint}")

    def _record(self, name: str):
        return self.store.record(name)

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompt, *, adapter: str | None = None, chat: bool = False,
               **sampling) -> Generation:
        """Queue a request (text, chat message(s) with chat=True, or token ids)."""
        params = SamplingParams(**sampling)
        ids = self.model.prompt_ids(prompt, chat=chat)
        if len(ids) >= self.model.n_ctx:
            raise ContextOverflowError(f"prompt of {len(ids)} tokens leaves no room in the "
                                       f"context of {self.model.n_ctx} positions")
        budget = min(len(ids) + params.max_tokens, self.model.n_ctx)
        if budget > self.cache.n_pages * PAGE_SIZE:
            raise CapacityError(f"request needs {budget} KV positions, the cache holds "
                                f"{self.cache.n_pages * PAGE_SIZE}")
        with self._lock:
            if adapter is not None:
                self._check_adapter(adapter)
                self.pool.access(adapter)
            gen = Generation(prompt_tokens=len(ids), adapter=adapter, _engine=self)
            sampler = Sampler(params)
            sampler.accept_many(ids.tolist())
            seq = _Sequence(next(self._ids), ids, adapter, params, gen, sampler,
                            StreamDecoder(self.model.tokenizer), StopMatcher(params.stop), budget)
            if adapter is not None:
                self._adapter_users[adapter] = self._adapter_users.get(adapter, 0) + 1
            self._waiting.append(seq)
        self._wake.set()
        self._prefetch_wake.set()
        return gen

    @property
    def pending(self) -> int:
        """Requests not finished yet (waiting or running)."""
        return len(self._waiting) + len(self._running)

    # --- the step ----------------------------------------------------------------------------

    def step(self) -> int:
        """Run one batch; returns how many tokens it processed (0 when idle)."""
        with self._lock:
            self._retire_cancelled()
            self._admit()
            if not self._running:
                return 0
            rows, plan = self._plan()
            batch = Batch(*(np.array(c, np.int32) for c in zip(*rows)),
                          logit_rows=np.array([r for r, _ in plan], np.int32))
            lora = LoraBatch(self.pool, batch.adapters) if (batch.adapters >= 0).any() else None
            t0 = time.perf_counter()
            try:
                logits = self.model.llama.forward(batch, self.cache, lora)
            except Exception as e:              # fail this batch's requests, keep serving
                for seq in list(self._running):
                    self._finish(seq, "error", EdgeLoraError(f"forward failed: {e}"))
                return len(rows)
            elapsed = time.perf_counter() - t0
            for seq in self._running:
                seq.n_cached = self.cache.length(seq.seq_id)
            for i, (_, seq) in enumerate(plan):
                self._emit(seq, logits[i], elapsed)
            return len(rows)

    def _plan(self):
        """The batch rows (token, seq id, position, slot) and which rows need logits."""
        rows, plan = [], []
        decoding = [s for s in self._running if s.next_token is not None]
        decoding.sort(key=lambda s: s.slot)              # same adapter side by side
        for seq in decoding:
            plan.append((len(rows), seq))
            rows.append((seq.next_token, seq.seq_id, seq.n_cached, seq.slot))
        budget = self.max_batch_tokens - len(rows)
        for seq in self._running:
            left = len(seq.prompt) - seq.n_cached
            if seq.next_token is not None or left <= 0 or budget <= 0:
                continue
            n = min(left, budget)
            for pos in range(seq.n_cached, seq.n_cached + n):
                rows.append((int(seq.prompt[pos]), seq.seq_id, pos, seq.slot))
            if n == left:
                plan.append((len(rows) - 1, seq))
            budget -= n
        return rows, plan

    def _emit(self, seq: _Sequence, logits: np.ndarray, elapsed: float) -> None:
        gen = seq.gen
        if seq.next_token is None:
            gen.prefill_seconds = time.perf_counter() - seq.started
        else:
            gen.decode_seconds += elapsed
        try:
            token = seq.sampler.sample(logits)
        except EdgeLoraError as e:
            return self._finish(seq, "error", e)
        stop_ids = () if seq.params.ignore_eos else self.model.tokenizer.stop_ids
        if token in stop_ids:
            return self._finish(seq, "stop")
        seq.sampler.accept(token)
        gen.token_ids.append(token)
        text, hit = seq.stops.push(seq.decoder.push(token))
        if text:
            gen._events.put(text)
        if hit:
            return self._finish(seq, "stop")
        if len(gen.token_ids) >= seq.params.max_tokens:
            return self._finish(seq, "length")
        if seq.n_cached >= seq.budget:
            return self._finish(seq, "context")
        seq.next_token = token

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        gen = seq.gen
        if not seq.stops.stopped and reason != "error":
            tail, hit = seq.stops.push(seq.decoder.flush())
            if not hit:
                tail += seq.stops.flush()
            if seq.stops.stopped:
                reason = "stop"
            if tail:
                gen._events.put(tail)
        gen.finish_reason, gen.error = reason, error
        self._release(seq)
        gen._events.put(_DONE)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.cache.release(seq.seq_id)
            self._reserved -= seq.reserved
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot >= 0:
            self.pool.release(seq.adapter)
            seq.slot = -1
        if seq.adapter is not None:
            self._adapter_users[seq.adapter] -= 1

    def _retire_cancelled(self) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.gen._cancelled]:
            gen = seq.gen
            gen.finish_reason = "cancelled"
            self._release(seq)
            gen._events.put(_DONE)

    def _admit(self) -> None:
        """Move waiting requests into the batch, in order, while KV room and slots last.

        A request needs its adapter pinned in the pool first. If it is not resident: with the
        prefetcher running and sequences decoding, it waits for the prefetcher (no step stalls
        on disk); otherwise admission loads it here. If the pool cannot make room (all pinned),
        the request waits, and requests behind it are admitted only with adapters that are
        already pinned, so the pinned set can only shrink until it fits."""
        capacity = self.cache.n_pages * PAGE_SIZE
        pool_blocked = False
        for seq in list(self._waiting):
            if len(self._running) >= self.max_seqs:
                break
            need = -(-seq.budget // PAGE_SIZE) * PAGE_SIZE
            if self._reserved + need > capacity:
                break
            name = seq.adapter
            if name is not None:
                error = self._load_errors.pop(name, None)
                if error is not None:
                    self._finish(seq, "error", error)
                    continue
                if name in self.pool:
                    if pool_blocked and not self.pool.pins(name):
                        continue
                    seq.slot = self.pool.acquire(name)
                elif pool_blocked or (self._running and self._prefetcher is not None):
                    self._prefetch_wake.set()
                    continue
                else:
                    try:
                        seq.slot = self.pool.acquire(name, self._record(name))
                    except PoolFullError as e:
                        if not self._running:       # nothing will unpin: it can never fit
                            self._finish(seq, "error", e)
                            continue
                        pool_blocked = True
                        continue
                    except AdapterError as e:
                        self._finish(seq, "error", e)
                        continue
            self._waiting.remove(seq)
            self._reserved += need
            seq.reserved = need
            self._running.append(seq)

    def _prefetch_loop(self) -> None:
        """Load the adapters of queued requests, in queue order, before admission needs them."""
        while not self._stop_thread:
            self._prefetch_wake.wait(0.05)
            self._prefetch_wake.clear()
            with self._lock:
                wanted = list(dict.fromkeys(s.adapter for s in self._waiting if s.adapter))
            wanted = wanted[:2 * self.max_seqs]
            for i, name in enumerate(wanted):
                if self._stop_thread or name in self.pool or name in self._load_errors \
                        or name not in self._catalog:
                    continue
                try:
                    loaded = self.pool.prefetch(name, self._record(name), protect=wanted[:i])
                except AdapterError as e:          # bad or vanished file: fail its requests
                    self._load_errors[name] = e
                    loaded = True
                if not loaded:
                    break                           # full: later names would not fit either
                self._wake.set()

    # --- background thread -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run steps on a background thread whenever there is work."""
        if self.running:
            return
        self._stop_thread = False
        self._thread = threading.Thread(target=self._loop, name="edgelora-engine", daemon=True)
        if self._prefetch and self.store is not None:
            self._prefetcher = threading.Thread(target=self._prefetch_loop,
                                                name="edgelora-prefetch", daemon=True)
            self._prefetcher.start()
        self._thread.start()

    def close(self) -> None:
        self._stop_thread = True
        self._wake.set()
        self._prefetch_wake.set()
        for t in (self._thread, self._prefetcher):
            if t is not None:
                t.join()
        self._thread = self._prefetcher = None

    def _loop(self) -> None:
        while not self._stop_thread:
            if self.step() == 0:
                self._wake.wait(0.05)
                self._wake.clear()
