"""The LoRA path computes, on whole models.

- On a tiny F32 model, on-the-fly LoRA equals the adapter merged into dense weights
  (model/reference.py, float64, no engine kernels).
- On the real model, a sequence's logits inside a mixed batch (8+ sequences, all different
  adapters and ranks, different lengths) equal its logits run alone.
- An adapter moves the logits; at scale 0 the logits equal the base model's bit for bit.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_lora_kernels import random_adapter
from tiny_model import TinySpec, write_tiny_model

import edgelora_np as el
from edgelora_np.adapters.pool import AdapterPool
from edgelora_np.kernels.lora import LoraBatch
from edgelora_np.model.batch import Batch
from edgelora_np.model.reference import reference_logits

# fp16 KV cache and fp16 LoRA rounding (x before A, t before B, as llama.cpp) make an F32 model
# agree with float64 to ~1e-3 of the logit scale on average, a few 1e-3 at worst.
F32_TOLERANCE = 1e-3


def merged_deltas(adapter) -> dict[str, np.ndarray]:
    """The adapter as dense weight deltas, with the bank's fp16 storage rounding applied."""
    def f16(a):
        return a.astype(np.float16).astype(np.float64)

    return {f"blk.{layer}.{proj}.weight": pair.scale * f16(pair.b) @ f16(pair.a)
            for (layer, proj), pair in adapter.pairs.items()}


def logits_with(model, ids, bank, slot):
    batch = Batch.single(ids, adapter=slot, all_logits=True)
    return model.llama.forward(batch, model.llama.new_cache(len(ids)), LoraBatch(bank, batch.adapters))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    write_tiny_model(path, TinySpec(qtype=QT.F32))
    return path, el.load_model(path, progress=False)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_on_the_fly_lora_equals_merged_dense_weights(tiny, rank):
    path, model = tiny
    rng = np.random.default_rng(rank)
    adapter = random_adapter(model.config, rng, rank)
    for pair in adapter.pairs.values():            # moderate strength: visible, not chaotic
        pair.a *= 0.5
    bank = AdapterPool(model.config, 1 << 30, max_slots=2)
    slot = bank.add("a", adapter)
    ids = rng.integers(3, model.config.vocab_size, 24)
    ours = logits_with(model, ids, bank, slot)
    merged = reference_logits(path, ids, merged_deltas(adapter))
    base = reference_logits(path, ids)
    assert np.abs(merged - base).mean() > 20 * F32_TOLERANCE       # the adapter matters
    scale = np.abs(merged).max()
    diff = np.abs(ours - merged)
    assert diff.mean() <= F32_TOLERANCE * scale and diff.max() <= 8 * F32_TOLERANCE * scale
    top2 = np.sort(merged, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 16 * F32_TOLERANCE * scale
    assert clear.sum() >= len(ids) // 4
    np.testing.assert_array_equal(ours.argmax(-1)[clear], merged.argmax(-1)[clear])


def smollm_adapters(cfg, n):
    rng = np.random.default_rng(2024)
    ranks = [1, 2, 4, 8, 16, 32, 64, 8, 3][:n]
    adapters = [random_adapter(cfg, rng, r) for r in ranks]
    for ad, r in zip(adapters, ranks):
        for pair in ad.pairs.values():
            pair.a *= 0.06 / np.sqrt(r)
            pair.b *= 0.06
    return adapters


@pytest.mark.slow
def test_mixed_batch_equals_each_sequence_alone(real_model):
    cfg = real_model.config
    adapters = smollm_adapters(cfg, 9)
    bank = AdapterPool(cfg, 1 << 30, max_slots=16)
    slots = [bank.add(f"t{i}", a) for i, a in enumerate(adapters)]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 20000, n).astype(np.int32) for n in (5, 9, 1, 13, 7, 3, 11, 6, 4)]
    alone = [logits_with(real_model, p, bank, s) for p, s in zip(prompts, slots)]

    # Everything in one batch: each sequence's prompt, rows interleaved out of order.
    rows = [(tok, seq, pos, slots[seq]) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
    order = rng.permutation(len(rows))
    tokens, seqs, pos, ad = (np.array(c, np.int32) for c in zip(*(rows[i] for i in order)))
    batch = Batch(tokens, seqs, pos, ad, np.arange(len(rows), dtype=np.int32))
    cache = real_model.llama.new_cache(2 * 32 * len(prompts))
    mixed = real_model.llama.forward(batch, cache, LoraBatch(bank, batch.adapters))
    for seq, p in enumerate(prompts):
        for position in range(len(p)):
            row = np.flatnonzero((seqs == seq) & (pos == position))[0]
            np.testing.assert_allclose(mixed[row], alone[seq][position], atol=1e-4, rtol=0)

    # Then a decode step: one token per sequence, every adapter different, in one batch.
    nxt = np.array([int(a[-1].argmax()) for a in alone], np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)
    step = Batch(nxt, np.arange(len(prompts), dtype=np.int32), lens, np.array(slots, np.int32),
                 np.arange(len(prompts), dtype=np.int32))
    decoded = real_model.llama.forward(step, cache, LoraBatch(bank, step.adapters))
    for seq, p in enumerate(prompts):
        single = np.concatenate([p, nxt[seq:seq + 1]])
        np.testing.assert_allclose(decoded[seq], logits_with(real_model, single, bank, slots[seq])[-1],
                                   atol=1e-4, rtol=0)


@pytest.mark.slow
def test_adapter_moves_logits_and_scale_zero_is_base(real_model):
    cfg = real_model.config
    adapter = smollm_adapters(cfg, 4)[3]
    for pair in adapter.pairs.values():
        pair.b *= 30.0
    zero = SimpleNamespace(pairs={k: SimpleNamespace(a=p.a, b=p.b, scale=0.0)
                                  for k, p in adapter.pairs.items()})
    bank = AdapterPool(cfg, 1 << 30, max_slots=4)
    on, off = bank.add("on", adapter), bank.add("zero", zero)
    ids = real_model.tokenize("The quick brown fox jumps over the lazy dog because")
    base = real_model.logits(ids)
    moved = logits_with(real_model, ids, bank, on)
    assert np.abs(moved - base).mean() > 0.5     # well above 8-bit rounding noise (~0.2)
    np.testing.assert_array_equal(logits_with(real_model, ids, bank, off), base)
