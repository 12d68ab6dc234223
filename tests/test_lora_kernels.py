"""Batched multi-LoRA kernels (kernels/lora.py) against their NumPy reference, through the pool.

Sweeps what breaks such kernels: batch size, rank 1..64, odd widths, one vs many adapters,
adapters of different ranks side by side, adapters that skip projections or layers, tokens with
no adapter (-1), and segment/gather splits of the same batch.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from edgelora_np.adapters.packed import pack, projection_groups
from edgelora_np.adapters.pool import AdapterPool
from edgelora_np.errors import AdapterError, CapacityError
from edgelora_np.kernels.lora import (
    LoraBatch,
    lora_bgmv,
    lora_delta_ref,
    lora_sgmv,
    segments,
)
from edgelora_np.model.config import LlamaConfig


def odd_config(dim=67, kv_dim=23, ffn=101, layers=2) -> LlamaConfig:
    # Widths no SIMD lane count divides; the kernels must not care.
    return LlamaConfig(n_layers=layers, dim=dim, n_heads=1, n_kv_heads=1, head_dim=kv_dim,
                       ffn_dim=ffn, vocab_size=10, context_length=64, rope_base=1e4,
                       rope_dim=2, rope_freq_scale=1.0, rms_eps=1e-5)


def dims(cfg):
    return {"attn_q": (cfg.dim, cfg.dim), "attn_k": (cfg.kv_dim, cfg.dim),
            "attn_v": (cfg.kv_dim, cfg.dim), "attn_output": (cfg.dim, cfg.dim),
            "ffn_gate": (cfg.ffn_dim, cfg.dim), "ffn_up": (cfg.ffn_dim, cfg.dim),
            "ffn_down": (cfg.dim, cfg.ffn_dim)}


def random_adapter(cfg, rng, rank, projs=None, layers=None, rank_of=None):
    pairs = {}
    for layer in (range(cfg.n_layers) if layers is None else layers):
        for proj, (n_out, n_in) in dims(cfg).items():
            if projs is not None and proj not in projs:
                continue
            r = rank if rank_of is None else rank_of(layer, proj)
            pairs[(layer, proj)] = SimpleNamespace(
                a=rng.standard_normal((r, n_in)).astype(np.float32) * 0.3,
                b=rng.standard_normal((n_out, r)).astype(np.float32) * 0.3,
                scale=float(rng.uniform(0.1, 2.0)))
    return SimpleNamespace(pairs=pairs)


def kernel_args(pool, group, layer):
    t = pool.tables[group]
    return (pool.arena16, pool.arena32, t.a_base[layer], t.b_base[layer], t.s_base[layer], t.ranks,
            t.part_col0, t.part_width)


def check_group(bank, group, layer, x, token_slot, token_scale=None):
    cfg = bank.cfg
    y0 = np.random.default_rng(1).standard_normal((len(x), projection_groups(cfg)[group].n_out))
    y = y0.astype(np.float32)
    LoraBatch(bank, token_slot, token_scale).apply(group, layer, x, y)
    ones = np.ones(len(x), np.float32)
    delta, bound = lora_delta_ref(x, token_slot, ones if token_scale is None else token_scale,
                                  *kernel_args(bank, group, layer), y.shape[1], with_bound=True)
    ref = y0.astype(np.float32) + delta
    assert np.all(np.abs(y - ref) <= bound + 1e-5 * (1 + np.abs(ref))), np.abs(y - ref).max()
    return y


@pytest.mark.parametrize("rank", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("n_tokens", [1, 3, 17, 40])
def test_every_group_matches_reference(rank, n_tokens):
    cfg = odd_config()
    rng = np.random.default_rng(rank * 100 + n_tokens)
    bank = AdapterPool(cfg, 64 << 20, max_slots=4)
    bank.add("a", random_adapter(cfg, rng, rank))
    bank.add("b", random_adapter(cfg, rng, max(1, rank // 2) + 1))
    token_slot = rng.integers(-1, 2, n_tokens).astype(np.int32)
    for group, g in projection_groups(cfg).items():
        x = rng.standard_normal((n_tokens, g.n_in)).astype(np.float32)
        for layer in range(cfg.n_layers):
            check_group(bank, group, layer, x, token_slot)


def test_many_adapters_of_different_ranks_side_by_side():
    cfg = odd_config()
    rng = np.random.default_rng(7)
    bank = AdapterPool(cfg, 64 << 20, max_slots=8)
    ranks = [1, 64, 3, 8, 32, 5]
    sizes = []
    for i, r in enumerate(ranks):
        adapter = random_adapter(cfg, rng, r)
        sizes.append(pack(adapter, cfg).nbytes)
        bank.add(f"a{i}", adapter)
    # No padding to the largest rank: q|k|v holds 3 rows per rank unit of each adapter, and
    # the pool holds exactly the packed bytes (sections are 64-byte aligned, nothing more).
    assert bank.tables["qkv"].ranks.sum() == 3 * sum(ranks)
    assert bank.stats().bytes_resident == sum(sizes)
    x = rng.standard_normal((30, cfg.dim)).astype(np.float32)
    # Runs of equal slots (segments) and singletons (gathered) in one batch.
    token_slot = np.array([0] * 5 + [1] * 4 + [-1] * 3 + [2, 3, 4, 5, 0, -1, 5] + [4] * 11,
                          np.int32)
    check_group(bank, "qkv", 1, x, token_slot)


def test_partial_adapters_rank_patterns_and_skipped_layers():
    cfg = odd_config(layers=3)
    rng = np.random.default_rng(3)
    bank = AdapterPool(cfg, 64 << 20, max_slots=4)
    bank.add("q_only", random_adapter(cfg, rng, 4, projs={"attn_q"}))
    bank.add("layer1", random_adapter(cfg, rng, 6, layers=[1]))
    bank.add("pattern", random_adapter(cfg, rng, 0, rank_of=lambda layer, p: 1 + layer + len(p) % 3))
    for group, g in projection_groups(cfg).items():
        x = rng.standard_normal((9, g.n_in)).astype(np.float32)
        token_slot = np.array([0, 0, 1, 2, 2, 2, -1, 1, 0], np.int32)
        for layer in range(cfg.n_layers):
            y = check_group(bank, group, layer, x, token_slot)
            if group != "qkv":
                # q_only touches nothing outside q|k|v.
                base = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
                np.testing.assert_array_equal(y[:2], base[:2])


def test_tokens_without_adapter_and_empty_bank_are_untouched():
    cfg = odd_config()
    rng = np.random.default_rng(5)
    bank = AdapterPool(cfg, 64 << 20, max_slots=2)
    x = rng.standard_normal((4, cfg.dim)).astype(np.float32)
    y = rng.standard_normal((4, projection_groups(cfg)["qkv"].n_out)).astype(np.float32)
    before = y.copy()
    LoraBatch(bank, np.array([-1, -1, -1, -1], np.int32)).apply("qkv", 0, x, y)
    np.testing.assert_array_equal(y, before)
    bank.add("a", random_adapter(cfg, rng, 3))
    LoraBatch(bank, np.array([-1, -1, -1, -1], np.int32)).apply("qkv", 0, x, y)
    np.testing.assert_array_equal(y, before)


def test_segment_and_gather_kernels_agree_bit_for_bit():
    """A token's correction does not depend on which kernel computed it."""
    cfg = odd_config()
    rng = np.random.default_rng(11)
    bank = AdapterPool(cfg, 64 << 20, max_slots=3)
    for i, r in enumerate([2, 9, 16]):
        bank.add(f"a{i}", random_adapter(cfg, rng, r))
    args = kernel_args(bank, "gate_up", 0)
    x = rng.standard_normal((37, cfg.dim)).astype(np.float32)
    token_slot = np.array([0] * 20 + [2] * 17, np.int32)
    scale = rng.uniform(-1.0, 2.0, 37).astype(np.float32)
    y_gather = np.zeros((37, projection_groups(cfg)["gate_up"].n_out), np.float32)
    lora_bgmv(x, y_gather, token_slot, scale, *args)
    y_seg = np.zeros_like(y_gather)
    begin, end, slot = segments(token_slot)
    lora_sgmv(x, y_seg, begin, end, slot, scale, *args)
    np.testing.assert_array_equal(y_seg, y_gather)


def test_per_token_scale_scales_each_tokens_correction():
    """Requests sharing an adapter at different strengths (llama-server's lora scale) in one
    batch, in segments and gathered: each token's correction is its own multiple."""
    cfg = odd_config()
    rng = np.random.default_rng(13)
    bank = AdapterPool(cfg, 64 << 20, max_slots=2)
    bank.add("a", random_adapter(cfg, rng, 8))
    bank.add("b", random_adapter(cfg, rng, 3))
    token_slot = np.array([0] * 6 + [1, 0, -1, 0] + [0] * 5, np.int32)
    token_scale = np.array([0.5] * 6 + [2.0, 1.0, 3.0, 0.25] + [-1.0] * 5, np.float32)
    x = rng.standard_normal((len(token_slot), cfg.dim)).astype(np.float32)
    scaled = check_group(bank, "qkv", 1, x, token_slot, token_scale)
    plain = check_group(bank, "qkv", 1, x, token_slot)
    y0 = np.random.default_rng(1).standard_normal(plain.shape).astype(np.float32)
    # Scale 0.5 halves the correction, -1 flips it (to fp32 rounding of the sum into y).
    np.testing.assert_allclose(scaled[:6] - y0[:6], 0.5 * (plain[:6] - y0[:6]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scaled[10:] - y0[10:], -(plain[10:] - y0[10:]), rtol=1e-4, atol=1e-4)
    assert np.abs(plain[:6] - y0[:6]).max() > 0.1


def test_segments_of_slots():
    begin, end, slot = segments(np.array([3, 3, -1, 0, 0, 0, 3], np.int32))
    assert begin.tolist() == [0, 2, 3, 6] and end.tolist() == [2, 3, 6, 7]
    assert slot.tolist() == [3, -1, 0, 3]
    assert [len(a) for a in segments(np.zeros(0, np.int32))] == [0, 0, 0]


def test_pool_slots_capacity_and_removal():
    cfg = odd_config()
    rng = np.random.default_rng(2)
    bank = AdapterPool(cfg, 64 << 20, max_slots=2)
    assert bank.add("a", random_adapter(cfg, rng, 2)) == 0
    assert bank.add("b", random_adapter(cfg, rng, 5)) == 1
    with pytest.raises(CapacityError, match="does not fit"):       # both slots hold sticky adapters
        bank.add("c", random_adapter(cfg, rng, 1))
    with pytest.raises(AdapterError, match="already loaded"):
        bank.add("a", random_adapter(cfg, rng, 1))
    ranks_b = bank.tables["qkv"].ranks[1].copy()
    bank.remove("a")
    assert bank.names == ["b"] and bank.tables["qkv"].ranks[0].sum() == 0
    np.testing.assert_array_equal(bank.tables["qkv"].ranks[1], ranks_b)
    assert bank.add("c", random_adapter(cfg, rng, 1)) == 0       # the freed slot is reused
    with pytest.raises(AdapterError, match="'zzz' is not resident"):
        bank.slot("zzz")
