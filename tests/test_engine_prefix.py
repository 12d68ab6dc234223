"""The prefix cache in the engine, on the real model: reuse changes nothing a request sees.

Every test runs the same requests on an engine with the cache and one without, and compares the
greedy tokens and the logits of every sampled position (<= 1e-5), while `cached_tokens` shows
the reuse really happened (or, across adapters, scales and reloaded weights, that it did not).
"""

import numpy as np
import pytest
from test_lora_model import smollm_adapters

import edgelora_np as el
from edgelora_np.model.kv_cache import PAGE_SIZE

pytestmark = pytest.mark.slow

N_NEW = 6             # tokens generated per request
TOL = 1e-5


@pytest.fixture(scope="module")
def adapters(real_model):
    return smollm_adapters(real_model.config, 3)


def ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 20000, n).tolist()


def recording(engine) -> dict:
    """Record the logits each request samples from: {Generation: [logits, ...]}."""
    seen, emit = {}, engine._emit

    def record(seq, logits):
        seen.setdefault(seq.gen, []).append(logits.copy())
        emit(seq, logits)

    engine._emit = record
    return seen


def submit(engine, job):
    prompt, adapter, scale = job
    return engine.submit(prompt, adapter=adapter, adapter_scale=scale, temperature=0.0,
                         max_tokens=N_NEW, ignore_eos=True)


def assert_same(gen, ref, seen, ref_seen):
    assert gen.token_ids == ref.token_ids
    assert len(seen[gen]) == len(ref_seen[ref]) == N_NEW
    for a, b in zip(seen[gen], ref_seen[ref]):
        assert np.abs(a - b).max() <= TOL


def one_by_one(engine, jobs):
    seen = recording(engine)
    gens = [submit(engine, job).run() for job in jobs]
    return gens, seen


def test_cache_equals_no_cache_at_and_inside_page_boundaries(real_model):
    base = ids(1, 2 * PAGE_SIZE)                          # exactly two pages
    jobs = [(base, None, 1.0),                            # computes pages 0, 1
            (base + ids(2, 5), None, 1.0),                # prefix ends at the page boundary
            (base[:40] + ids(3, 20), None, 1.0),          # diverges inside page 1
            (base, None, 1.0),                            # identical: the last token still runs
            (base[:PAGE_SIZE + 1], None, 1.0),            # one token past a cached page
            (ids(4, 30), None, 1.0)]                      # shorter than a page: nothing to map
    cached = el.Engine(real_model, max_seqs=4)
    plain = el.Engine(real_model, max_seqs=4, prefix_cache=False)
    gens, seen = one_by_one(cached, jobs)
    refs, ref_seen = one_by_one(plain, jobs)
    for gen, ref in zip(gens, refs):
        assert_same(gen, ref, seen, ref_seen)
    assert [g.cached_tokens for g in gens] == [0, 64, 32, 32, 32, 0]
    assert all(r.cached_tokens == 0 for r in refs)
    assert cached.stats().prefix_hit_tokens == 160
    # Every page is back: none held, the keyed ones idle (room for new tokens all the same).
    assert cached.cache.held_pages == 0 and cached.stats().kv_pages_cached > 0
    assert cached.cache.free_tokens == cached.cache.n_pages * PAGE_SIZE
    # cache_prompt=False: neither reuses nor feeds the cache.
    off = cached.submit(base, temperature=0.0, max_tokens=N_NEW, ignore_eos=True,
                        cache_prompt=False).run()
    assert off.cached_tokens == 0 and off.token_ids == refs[0].token_ids


def test_concurrent_sequences_share_pages(real_model):
    first = ids(5, 80)                                    # two full pages and a partial one
    later = [first[:70] + ids(6, 9), first + ids(7, 3), first[:64] + ids(8, 40)]
    refs = {}
    for cache_on in (True, False):
        engine = el.Engine(real_model, max_seqs=4, max_batch_tokens=24, background=False,
                           prefix_cache=cache_on)
        seen = recording(engine)
        gens = [submit(engine, (first, None, 1.0))]
        while gens[0].first_token is None:                # chunked prefill of the first prompt
            engine.step()
        gens += [submit(engine, (p, None, 1.0)) for p in later]
        shared = 0
        while engine.pending:
            engine.step()
            shared = max(shared, int(engine.cache._refs.max()))
        refs[cache_on] = (gens, seen, shared)
        assert engine.cache.held_pages == 0
    (gens, seen, shared), (ref_gens, ref_seen, ref_shared) = refs[True], refs[False]
    assert shared == 4 and ref_shared == 1                # page 0 held by all four at once
    assert [g.cached_tokens for g in gens] == [0, 64, 64, 64]
    for gen, ref in zip(gens, ref_gens):
        assert_same(gen, ref, seen, ref_seen)


def test_reuse_needs_the_same_adapter_content_and_scale(real_model, adapters):
    prompt = ids(9, 70)
    cached = el.Engine(real_model, max_seqs=2)
    plain = el.Engine(real_model, max_seqs=2, prefix_cache=False)
    for engine in (cached, plain):
        engine.pool.add("t0", adapters[0])
        engine.pool.add("t1", adapters[1])
        engine.pool.add("other", adapters[2])            # plain's name for the new weights
    jobs = [((prompt, None, 1.0), 0),
            ((prompt, "t0", 1.0), 0),                     # base pages are not t0's
            ((prompt, "t0", 1.0), 64),                    # t0's own: hit
            ((prompt, "t0", 0.5), 0),                     # another scale
            ((prompt, "t1", 1.0), 0)]                     # another adapter
    seen, ref_seen = recording(cached), recording(plain)
    for job, expect in jobs:
        gen, ref = submit(cached, job).run(), submit(plain, job).run()
        assert gen.cached_tokens == expect, job[1:]
        assert_same(gen, ref, seen, ref_seen)
    # Same name, new weights: never a hit; the output is the new weights' alone.
    cached.remove_adapter("t0")
    cached.pool.add("t0", adapters[2])
    gen = submit(cached, (prompt, "t0", 1.0)).run()
    ref = submit(plain, (prompt, "other", 1.0)).run()
    assert gen.cached_tokens == 0
    assert_same(gen, ref, seen, ref_seen)
    # The old weights again under that name: their pages are still cached, and hit.
    cached.remove_adapter("t0")
    cached.pool.add("t0", adapters[0])
    gen = submit(cached, (prompt, "t0", 1.0)).run()
    ref = submit(plain, (prompt, "t0", 1.0)).run()
    assert gen.cached_tokens == 64
    assert_same(gen, ref, seen, ref_seen)


def test_eviction_under_pressure_keeps_outputs_exact(real_model, adapters):
    # Room for five pages; a request takes three (two get keyed). The second p1 hits; p2 then
    # needs the oldest idle pages (p0's), and so on.
    prompts = [ids(10 + i, 70) for i in (0, 1, 1, 2, 0, 2, 1)]
    cached = el.Engine(real_model, max_seqs=1, kv_tokens=5 * PAGE_SIZE)
    plain = el.Engine(real_model, max_seqs=1, kv_tokens=5 * PAGE_SIZE, prefix_cache=False)
    seen, ref_seen = recording(cached), recording(plain)
    gens = [submit(cached, (p, None, 1.0)) for p in prompts]
    refs = [submit(plain, (p, None, 1.0)) for p in prompts]
    for gen, ref in zip(gens, refs):
        gen.run(), ref.run()
        assert_same(gen, ref, seen, ref_seen)
    stats = cached.stats()
    assert gens[2].cached_tokens == 64 and gens[5].cached_tokens == 64
    assert stats.prefix_evictions > 0
    assert cached.cache.held_pages == 0
