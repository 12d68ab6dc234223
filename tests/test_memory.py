"""Memory stays bounded while requests stream through far more adapters than the pool holds.

1,024 distinct adapters (64 KiB each, 64 MiB in all) sit in a store; an engine with a 2 MiB
pool serves one request per adapter, 16 at a time. Run with `pytest --memray` (the tox envs
do: see tox.ini), pytest-memray's `limit_memory` fails the test if the peak of everything
allocated during it (Python objects, NumPy arrays, the pool's and KV cache's mappings) exceeds

    pool budget + KV cache + MARGIN

The model is loaded by a fixture, before the measurement starts. MARGIN covers the engine's
own objects and per-step arrays; an engine that kept every adapter it served (no eviction)
would need the 64 MiB and fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_lora_kernels import random_adapter
from tiny_model import TinySpec, write_tiny_model

import edgelora_np as el
from edgelora_np.adapters.packed import pack
from edgelora_np.adapters.store import AdapterStore
from edgelora_np.model.kv_cache import PAGE_SIZE

N_ADAPTERS = 1024
RANK = 16
POOL_MIB = 2
MAX_SEQS = 16
MARGIN_MIB = 8
SPEC = TinySpec(qtype=QT.F32)
KD = SPEC.n_kv_heads * (SPEC.dim // SPEC.n_heads)
KV_MIB = 2 * SPEC.n_layers * max(SPEC.context, MAX_SEQS * PAGE_SIZE) * KD * 2 / 2**20   # K and V, fp16
LIMIT = f"{POOL_MIB + KV_MIB + MARGIN_MIB:.1f} MB"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    model = el.load_model(write_tiny_model(root / "tiny.gguf", SPEC), progress=False)
    store = AdapterStore(root / "store", create=True)
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(N_ADAPTERS):
        packed = pack(random_adapter(model.config, rng, RANK), model.config)
        store.put(f"t{i:04d}", packed, fingerprint=model.fingerprint, durable=False)
        sizes.append(packed.nbytes)
    return model, root / "store", sum(sizes)


@pytest.mark.limit_memory(LIMIT)
def test_streaming_through_many_adapters_stays_within_pool_kv_and_margin(served):
    model, store_dir, stored_bytes = served
    assert stored_bytes > 4 * (POOL_MIB + KV_MIB + MARGIN_MIB) * 2**20     # the bound means something
    engine = el.Engine(model, max_seqs=MAX_SEQS, max_batch_tokens=64, store=store_dir,
                       adapter_pool_mb=POOL_MIB, max_adapters=64)
    peak_resident = 0
    done = 0
    for start in range(0, N_ADAPTERS, MAX_SEQS):
        gens = [engine.submit([5, 6, 7, 8 + i % 50], adapter=f"t{i:04d}", max_tokens=2,
                              temperature=0.0, ignore_eos=True)
                for i in range(start, min(start + MAX_SEQS, N_ADAPTERS))]
        for g in gens:
            g.run()
            assert g.finish_reason == "length" and len(g.token_ids) == 2
            done += 1
        peak_resident = max(peak_resident, engine.adapter_stats().bytes_resident)
    stats = engine.adapter_stats()
    assert done == N_ADAPTERS
    assert stats.loads >= N_ADAPTERS and stats.evictions >= N_ADAPTERS - 64
    assert peak_resident <= POOL_MIB * 2**20
    assert stats.bytes_pinned == 0
