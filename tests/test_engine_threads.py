"""The engine's execution model, on the tiny random model (fast; runs in the nojit env too).

- Every request ends in exactly one of finished / cancelled / failed, and its KV pages and
  adapter pin come back: after a failure outside the forward (the engine thread dies), after
  the prefetcher dies, after close(), after cancel().
- Nothing waits on a forward: submit, stats and add_adapter return while a forward is blocked.
- Every forward runs on the one compute thread, whichever thread calls it, so that Numba's
  OpenMP pools do not multiply (model/compute.py), and with its caller's thread count.
- The engine thread runs with the model's thread count; handles only consume (text complete
  without iterating, async stream equals the sync result); a hand-stepped engine's handle
  refuses to block forever; a full queue refuses with QueueFullError.
- A request's own LoRA scale: 0 gives the base model's tokens, 2 gives exactly the tokens of the
  same adapter imported at twice its scale.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading

import numba
import numpy as np
import pytest
from test_lora_kernels import random_adapter
from tiny_model import TinySpec, write_tiny_model

import edgelora_np as el
from edgelora_np.adapters.packed import pack
from edgelora_np.adapters.store import AdapterStore
from edgelora_np.errors import EngineError, QueueFullError
from edgelora_np.model import compute
from edgelora_np.model.batch import Batch
from edgelora_np.model.kv_cache import PAGE_SIZE

PROMPTS = [[5, 17, 42, 99], [7, 8, 9], [250, 3, 31, 64, 64, 12], [120, 121]]
TIMEOUT = 60          # seconds: a deadlock detector, not a speed bound


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = el.load_model(write_tiny_model(root / "tiny.gguf", TinySpec(seed=3)), progress=False,
                          n_threads=1)
    rng = np.random.default_rng(7)
    adapters = []
    for rank in (4, 6):
        adapter = random_adapter(model.config, rng, rank)
        for pair in adapter.pairs.values():
            pair.a *= 0.5
        adapters.append(adapter)
    return model, adapters


def engine_with(model, adapters, **kw):
    engine = el.Engine(model, **kw)
    for i, a in enumerate(adapters):
        engine.pool.add(f"a{i}", a)
    return engine


def assert_all_returned(engine):
    """No request pending, every KV page free, no adapter pinned."""
    assert engine.pending == 0
    assert engine.cache.free_tokens == engine.cache.n_pages * PAGE_SIZE
    assert all(engine.pool.pins(name) == 0 for name in engine.pool.names)


def long_request(engine, prompt, adapter=None):
    return engine.submit(prompt, adapter=adapter, temperature=0.0, max_tokens=200,
                         ignore_eos=True)


def wait_all(gens):
    for g in gens:
        assert g.wait(TIMEOUT), "a request never ended"


def test_engine_thread_failure_fails_every_request(tiny, monkeypatch):
    model, adapters = tiny
    engine = engine_with(model, adapters, max_seqs=1)
    gens = [long_request(engine, p, a) for p, a in zip(PROMPTS, ["a0", None, "a1", None])]
    for _ in gens[0].deltas():            # the first is decoding, the others wait
        break

    def broken_plan():
        raise RuntimeError("injected planning failure")

    monkeypatch.setattr(engine, "_plan", broken_plan)
    wait_all(gens)
    assert [g.finish_reason for g in gens] == ["error"] * 4
    assert all(isinstance(g.error, EngineError) and "injected planning failure" in str(g.error)
               for g in gens)
    with pytest.raises(EngineError, match="injected planning failure"):
        list(gens[1])
    assert isinstance(engine.failure, EngineError) and not engine.running
    with pytest.raises(EngineError, match="engine failed"):
        engine.submit(PROMPTS[0], max_tokens=2)
    assert_all_returned(engine)


def test_prefetcher_death_fails_the_engine(tiny, tmp_path, monkeypatch):
    model, adapters = tiny
    store = AdapterStore(tmp_path / "store", create=True)
    store.put("s0", pack(adapters[0], model.config), fingerprint=model.fingerprint, durable=False)
    engine = el.Engine(model, store=store, max_seqs=2)

    def broken_prefetch():
        raise OSError("injected prefetch failure")

    monkeypatch.setattr(engine, "_prefetch_once", broken_prefetch)
    gen = long_request(engine, PROMPTS[0], "s0")
    wait_all([gen])
    assert gen.finish_reason == "error" and "prefetch" in str(gen.error)
    assert engine.failure is not None and not engine.running
    assert_all_returned(engine)


def test_close_cancels_waiting_and_running(tiny):
    model, adapters = tiny
    engine = engine_with(model, adapters, max_seqs=2)
    gens = [long_request(engine, p, a) for p, a in zip(PROMPTS, ["a0", "a1", "a0", None])]
    for _ in gens[0].deltas():
        break
    engine.close()
    assert [g.finish_reason for g in gens] == ["cancelled"] * 4
    assert all(g.done and g.wait(0) for g in gens)
    assert not engine.running
    with pytest.raises(EngineError, match="closed"):
        engine.submit(PROMPTS[0], max_tokens=2)
    assert_all_returned(engine)


def test_cancel_releases_pages_and_pins(tiny):
    model, adapters = tiny
    engine = engine_with(model, adapters, max_seqs=4)
    gens = [long_request(engine, p, "a1") for p in PROMPTS]
    for _ in gens[0].deltas():
        break
    for g in gens:
        g.cancel()
    wait_all(gens)
    assert {g.finish_reason for g in gens} <= {"cancelled"}
    assert_all_returned(engine)
    engine.close()


def test_nothing_waits_for_a_forward(tiny, monkeypatch):
    """While a forward is stuck, submit, stats, pending and add_adapter still return."""
    model, adapters = tiny
    engine = engine_with(model, adapters[:1], max_seqs=4)
    inside, release = threading.Event(), threading.Event()
    real_forward = model.llama.forward

    def slow_forward(*args, **kw):
        inside.set()
        release.wait(TIMEOUT)
        return real_forward(*args, **kw)

    monkeypatch.setattr(model.llama, "forward", slow_forward)
    first = long_request(engine, PROMPTS[0])
    assert inside.wait(TIMEOUT)
    results = {}

    def other_thread():
        results["gen"] = engine.submit(PROMPTS[1], temperature=0.0, max_tokens=3)
        results["stats"] = engine.stats()
        results["pending"] = engine.pending
        engine.pool.add("late", adapters[1])
        results["added"] = "late" in engine.adapters

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(TIMEOUT)
    stuck = t.is_alive()
    release.set()
    assert not stuck, "a call waited for the forward"
    assert results["pending"] == 2 and results["stats"].running == 1 and results["added"]
    first.cancel()
    assert results["gen"].run().finish_reason == "length"
    engine.close()


def test_engine_thread_uses_the_models_thread_count(tiny, monkeypatch):
    model, _ = tiny
    assert model.n_threads == 1
    if numba.config.NUMBA_NUM_THREADS > 1:
        numba.set_num_threads(2)              # this thread differs; the engine's must not
    seen = []
    real_forward = model.llama._forward

    def recording_forward(*args, **kw):
        seen.append(numba.get_num_threads())
        return real_forward(*args, **kw)

    monkeypatch.setattr(model.llama, "_forward", recording_forward)
    engine = el.Engine(model)
    engine.submit(PROMPTS[0], temperature=0.0, max_tokens=3).run()
    engine.close()
    numba.set_num_threads(1)
    assert seen and set(seen) == {1}


def native_threads() -> set[int]:
    """This process's thread ids that are not Python threads (OpenMP's workers among them)."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(tid) for tid in os.listdir("/proc/self/task")} - python


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_forwards_from_many_threads_share_one_compute_thread(tiny, monkeypatch):
    """libgomp keeps a worker pool per thread that starts a parallel region, for that thread's
    life; with more pooled threads than cores, every region waits for its workers to wake.
    Forwards from several live threads must therefore all run on one thread, and the later
    callers must bring no new native threads."""
    model, _ = tiny
    ran_on, errors = [], []
    real_forward = model.llama._forward

    def recording_forward(*args, **kw):
        ran_on.append(threading.current_thread().name)
        return real_forward(*args, **kw)

    monkeypatch.setattr(model.llama, "_forward", recording_forward)
    release = threading.Event()

    def caller(ready):
        try:
            numba.set_num_threads(2)                 # a pool of one worker, if this thread had one
            model.logits(PROMPTS[0])
        except BaseException as e:                   # noqa: BLE001 - reported below
            errors.append(e)
        ready.set()
        release.wait(TIMEOUT)                        # stays alive: so would its pool

    threads, seen = [], []
    try:
        for _ in range(3):
            ready = threading.Event()
            threads.append(threading.Thread(target=caller, args=(ready,)))
            threads[-1].start()
            assert ready.wait(TIMEOUT)
            seen.append(native_threads())
    finally:
        release.set()
        for t in threads:
            t.join(TIMEOUT)
    assert not errors, errors
    assert len(set(ran_on)) == 1 and ran_on[0].startswith(compute.THREAD_NAME), ran_on
    assert not (seen[1] | seen[2]) - seen[0], seen


def test_a_forwards_error_is_raised_in_its_caller(tiny):
    model, _ = tiny
    V = model.config.vocab_size
    with pytest.raises(el.EdgeLoraError, match=f"token id {V + 5} is outside"):
        model.llama.forward(Batch.single([1, V + 5]), model.llama.new_cache(8))
    assert model.logits(PROMPTS[1]).shape == (len(PROMPTS[1]), V)       # and it still serves


def test_handles_only_consume(tiny):
    model, adapters = tiny
    engine = engine_with(model, adapters)
    ref = engine.submit(PROMPTS[2], adapter="a0", temperature=0.0, max_tokens=12).run()
    # Not iterated at all: the text is complete once done.
    quiet = engine.submit(PROMPTS[2], adapter="a0", temperature=0.0, max_tokens=12)
    assert quiet.wait(TIMEOUT)
    assert quiet.token_ids == ref.token_ids and quiet.text == ref.text
    assert quiet.text == model.detokenize(quiet.token_ids) and quiet.text
    # An asyncio consumer: the deltas add up to the same text and tokens.

    async def consume():
        gen = engine.submit(PROMPTS[2], adapter="a0", temperature=0.0, max_tokens=12)
        return gen, [d async for d in gen.stream()]

    gen, deltas = asyncio.run(consume())
    assert "".join(d.text for d in deltas) == ref.text
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert gen.finish_reason == "length" and gen.first_token <= gen.finished
    engine.close()


def test_hand_stepped_engine_never_blocks_a_consumer(tiny):
    model, _ = tiny
    engine = el.Engine(model, background=False)
    gen = engine.submit(PROMPTS[0], temperature=0.0, max_tokens=3)
    with pytest.raises(EngineError, match="engine.step"):
        gen.run()
    while engine.pending:
        engine.step()
    assert gen.run().finish_reason == "length" and len(gen.token_ids) == 3


def test_full_queue_refuses(tiny):
    """max_seqs=1, max_queue=2: three in flight, the fourth refused; a finished request's slot
    is room at once, before the next step admits anyone."""
    model, _ = tiny
    engine = el.Engine(model, background=False, max_seqs=1, max_queue=2)
    kw = dict(max_tokens=2, temperature=0.0, ignore_eos=True)
    queued = [engine.submit(PROMPTS[0], **kw) for _ in range(3)]    # one for the slot, two wait
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.submit(PROMPTS[0], **kw)
    engine.step()                                     # admits one: two still wait
    assert engine.stats().running == 1 and engine.stats().waiting == 2
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.submit(PROMPTS[0], **kw)
    while queued[0].finish_reason is None:
        engine.step()
    assert engine.stats().running == 0 and engine.stats().waiting == 2
    queued.append(engine.submit(PROMPTS[0], **kw))    # the freed slot is room
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.submit(PROMPTS[0], **kw)
    while engine.pending:
        engine.step()
    assert all(g.finish_reason == "length" for g in queued)


def test_cancelled_requests_take_no_queue_room(tiny):
    """max_seqs=1, max_queue=1, both taken; a client cancels one and asks again before the next
    step: its new request is room for it (the soak's clients got 429s here, tools/soak.py)."""
    model, _ = tiny
    engine = el.Engine(model, background=False, max_seqs=1, max_queue=1)
    kw = dict(max_tokens=2, temperature=0.0, ignore_eos=True)
    running = engine.submit(PROMPTS[0], **kw)
    engine.step()
    waiting = engine.submit(PROMPTS[0], **kw)
    with pytest.raises(QueueFullError, match="1 requests are already waiting"):
        engine.submit(PROMPTS[0], **kw)
    waiting.cancel()
    again = engine.submit(PROMPTS[0], **kw)           # in the cancelled one's place
    with pytest.raises(QueueFullError, match="1 requests are already waiting"):
        engine.submit(PROMPTS[0], **kw)
    running.cancel()
    replaced = engine.submit(PROMPTS[0], **kw)        # the running one's slot
    while engine.pending:
        engine.step()
    assert (running.finish_reason, waiting.finish_reason) == ("cancelled", "cancelled")
    assert again.finish_reason == replaced.finish_reason == "length"
    assert engine.stats().kv_pages_used == 0


def test_request_scale(tiny):
    model, adapters = tiny
    doubled = copy.deepcopy(adapters[0])
    for pair in doubled.pairs.values():
        pair.scale *= 2.0
    engine = engine_with(model, [adapters[0], doubled])
    jobs = [(p, a, s) for p in PROMPTS for a, s in
            ((None, 1.0), ("a0", 0.0), ("a0", 1.0), ("a0", 2.0), ("a1", 1.0))]
    gens = [engine.submit(p, adapter=a, adapter_scale=s, temperature=0.0, max_tokens=8,
                          ignore_eos=True) for p, a, s in jobs]
    out = {(tuple(p), a, s): g.run().token_ids for (p, a, s), g in zip(jobs, gens)}
    for p in PROMPTS:
        p = tuple(p)
        assert out[(p, "a0", 0.0)] == out[(p, None, 1.0)]          # scale 0: the base model
        assert out[(p, "a0", 2.0)] == out[(p, "a1", 1.0)]          # = imported at 2x
    assert any(out[(tuple(p), "a0", 1.0)] != out[(tuple(p), "a0", 2.0)] for p in PROMPTS)
    assert any(out[(tuple(p), "a0", 1.0)] != out[(tuple(p), None, 1.0)] for p in PROMPTS)
    engine.close()
