"""The continuous-batching engine on the real model: batching changes nothing a request sees."""

import threading

import numpy as np
import pytest
from test_lora_model import smollm_adapters

import edgelora_np as el
from edgelora_np.errors import AdapterError, CapacityError, ContextOverflowError, SamplingError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
           "The sky is", "Water boils at", "My favourite fruit is"]


@pytest.fixture(scope="module")
def adapters(real_model):
    return smollm_adapters(real_model.config, 4)


def alone(model, prompt, max_tokens=10, **kw):
    return model.generate(prompt, temperature=0.0, max_tokens=max_tokens, **kw).run()


def test_batched_greedy_equals_alone_with_chunked_prefill(real_model):
    # A tiny token budget forces prompts to be prefilled in chunks, mixed with decode steps.
    engine = el.Engine(real_model, max_batch_tokens=6, max_seqs=3)
    gens = [engine.submit(p, temperature=0.0, max_tokens=10) for p in PROMPTS]
    for prompt, gen in zip(PROMPTS, gens):
        ref = alone(real_model, prompt)
        assert gen.run().token_ids == ref.token_ids
        assert gen.text == ref.text and gen.finish_reason == "length"
    assert engine.pending == 0
    assert engine.cache.free_tokens == engine.cache.n_pages * 32     # every page returned


def test_each_request_keeps_its_own_adapter(real_model, adapters):
    engine = el.Engine(real_model, max_batch_tokens=64, max_seqs=8)
    for i, a in enumerate(adapters):
        engine.pool.add(f"t{i}", a)
    jobs = [(p, a) for p in PROMPTS for a in (None, "t0", "t1", "t2", "t3")]
    gens = [engine.submit(p, adapter=a, temperature=0.0, max_tokens=8) for p, a in jobs]
    ref_engine = el.Engine(real_model, max_seqs=1)
    for i, a in enumerate(adapters):
        ref_engine.pool.add(f"t{i}", a)
    for (prompt, adapter), gen in zip(jobs, gens):
        ref = ref_engine.submit(prompt, adapter=adapter, temperature=0.0, max_tokens=8).run()
        assert gen.run().token_ids == ref.token_ids, (prompt, adapter)
    # The adapters really act: at least one request differs from the base model's answer.
    differs = [g.token_ids != alone(real_model, p, max_tokens=8).token_ids
               for (p, a), g in zip(jobs, gens) if a is not None]
    assert any(differs)


def test_sampling_is_per_request_and_seeded(real_model):
    engine = el.Engine(real_model, max_seqs=4)
    a = engine.submit("Tell me a story", temperature=1.0, seed=1, max_tokens=12)
    b = engine.submit("Tell me a story", temperature=1.0, seed=1, max_tokens=12)
    c = engine.submit("Tell me a story", temperature=1.0, seed=2, max_tokens=12)
    g = engine.submit("Tell me a story", temperature=0.0, max_tokens=12)
    assert a.run().token_ids == b.run().token_ids
    assert c.run().token_ids != a.token_ids
    assert g.run().token_ids == alone(real_model, "Tell me a story", max_tokens=12).token_ids


def test_stop_strings_cancellation_and_limits(real_model):
    full = alone(real_model, "Count: one, two,", max_tokens=40).text
    words = full.split()
    word = words[len(words) // 2]              # a stop string the greedy text really contains
    engine = el.Engine(real_model, max_seqs=4)
    stop = engine.submit("Count: one, two,", temperature=0.0, max_tokens=40, stop=[word])
    cancelled = engine.submit("Write a long essay about rivers.", temperature=0.0, max_tokens=200)
    short = engine.submit("Hello", temperature=0.0, max_tokens=3)
    pieces = iter(cancelled)
    next(pieces)
    cancelled.cancel()
    list(pieces)          # what the engine thread sent before it saw the flag, then the end
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 200
    assert stop.run().finish_reason == "stop" and stop.stopping_word == word
    assert stop.text == full[:full.index(word)]
    assert short.run().finish_reason == "length" and len(short.token_ids) == 3
    assert engine.pending == 0


def test_bad_requests_are_refused_alone(real_model):
    engine = el.Engine(real_model, max_seqs=4)
    good = engine.submit("The capital of France is", temperature=0.0, max_tokens=6)
    with pytest.raises(AdapterError, match="'nope' is not loaded"):
        engine.submit("x", adapter="nope")
    with pytest.raises(SamplingError, match="top_p"):
        engine.submit("x", top_p=1.5)
    with pytest.raises(ContextOverflowError, match="context"):
        engine.submit(list(range(5, 5 + real_model.n_ctx + 1)))
    with pytest.raises(el.EdgeLoraError, match="outside the vocabulary"):
        engine.submit([1, 2, 10**7])
    assert good.run().text == alone(real_model, "The capital of France is", max_tokens=6).text
    small = el.Engine(real_model, max_seqs=2, kv_tokens=64)
    with pytest.raises(CapacityError, match="KV positions"):
        small.submit("hi", max_tokens=500)


def test_requests_wait_for_kv_room_instead_of_failing(real_model):
    engine = el.Engine(real_model, max_seqs=8, kv_tokens=64, background=False)   # two at a time
    gens = [engine.submit(p, temperature=0.0, max_tokens=20) for p in PROMPTS[:5]]
    engine.step()
    assert engine.stats().running == 2 and engine.pending == 5
    while engine.pending:
        engine.step()
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.run().token_ids == alone(real_model, prompt, max_tokens=20).token_ids


def test_background_thread_serves_concurrent_consumers(real_model, adapters):
    engine = el.Engine(real_model, max_seqs=8)
    engine.pool.add("t0", adapters[0])
    engine.start()
    try:
        results = {}

        def consume(i, prompt):
            gen = engine.submit(prompt, adapter="t0" if i % 2 else None, temperature=0.0,
                                max_tokens=8)
            results[i] = "".join(gen)

        threads = [threading.Thread(target=consume, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == list(range(len(PROMPTS)))
        assert results[0] == alone(real_model, PROMPTS[0], max_tokens=8).text
    finally:
        engine.close()
    assert not engine.running


def test_adapter_in_use_cannot_be_removed(real_model, adapters):
    engine = el.Engine(real_model, max_seqs=2)
    engine.pool.add("t0", adapters[0])
    gen = engine.submit("Hi", adapter="t0", max_tokens=4, temperature=0.0)
    with pytest.raises(AdapterError, match="in use"):
        engine.remove_adapter("t0")
    gen.run()
    engine.remove_adapter("t0")
    assert engine.adapters == []
    np.testing.assert_array_equal(engine.pool.tables["qkv"].ranks, 0)
