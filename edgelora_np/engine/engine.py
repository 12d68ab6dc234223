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

Steps run on a background thread once `start()` is called (the server does this); otherwise
iterating a Generation drives the steps itself, which keeps tests and scripts single-threaded.
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

from edgelora_np.adapters.bank import LoraBank, LoraBatch
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
    slot: int                        # adapter slot, -1 = base model
    params: SamplingParams
    gen: Generation
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    budget: int                      # KV positions it may use: prompt + max new tokens
    reserved: int = 0                # KV positions promised to it at admission (whole pages)
    n_cached: int = 0                # positions already in the KV cache
    next_token: int | None = None    # sampled, not yet fed back
    started: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, model, *, max_batch_tokens: int = 256, max_seqs: int = 16,
                 kv_tokens: int | None = None, max_adapters: int = 64):
        if max_batch_tokens < 1 or max_seqs < 1:
            raise EdgeLoraError("max_batch_tokens and max_seqs must be at least 1")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.cache = model.llama.new_cache(kv_tokens or max(model.n_ctx, max_seqs * PAGE_SIZE),
                                           max_seq_len=model.n_ctx)
        self.bank = LoraBank(model.config, max_adapters)
        self._adapter_users: dict[str, int] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._reserved = 0                       # KV positions promised to admitted sequences
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_thread = False

    # --- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, path, *, scale: float = 1.0) -> None:
        """Load a PEFT directory or GGUF-LoRA file and make it resident under `name`."""
        from edgelora_np.adapters.formats import load_adapter

        adapter = load_adapter(path, self.model.config, scale=scale, name=name)
        with self._lock:
            self.bank.add(name, adapter)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if self._adapter_users.get(name, 0):
                raise AdapterError(f"adapter {name!r} is in use by "
                                   f"{self._adapter_users[name]} running request(s)")
            self.bank.remove(name)

    @property
    def adapters(self) -> list[str]:
        return self.bank.names

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
            slot = -1 if adapter is None else self.bank.slot(adapter)
            gen = Generation(prompt_tokens=len(ids), adapter=adapter, _engine=self)
            sampler = Sampler(params)
            sampler.accept_many(ids.tolist())
            seq = _Sequence(next(self._ids), ids, slot, params, gen, sampler,
                            StreamDecoder(self.model.tokenizer), StopMatcher(params.stop), budget)
            if adapter is not None:
                self._adapter_users[adapter] = self._adapter_users.get(adapter, 0) + 1
            self._waiting.append(seq)
        self._wake.set()
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
            lora = LoraBatch(self.bank, batch.adapters) if self.bank.names else None
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
        name = seq.gen.adapter
        if name is not None:
            self._adapter_users[name] -= 1

    def _retire_cancelled(self) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.gen._cancelled]:
            gen = seq.gen
            gen.finish_reason = "cancelled"
            self._release(seq)
            gen._events.put(_DONE)

    def _admit(self) -> None:
        capacity = self.cache.n_pages * PAGE_SIZE
        while self._waiting and len(self._running) < self.max_seqs:
            seq = self._waiting[0]
            need = -(-seq.budget // PAGE_SIZE) * PAGE_SIZE
            if self._reserved + need > capacity:
                break
            self._waiting.popleft()
            self._reserved += need
            seq.reserved = need
            self._running.append(seq)

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
        self._thread.start()

    def close(self) -> None:
        self._stop_thread = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop_thread:
            if self.step() == 0:
                self._wake.wait(0.05)
                self._wake.clear()
