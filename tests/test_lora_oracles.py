"""Adapters in files, served by our engine, against the two oracles users trust.

- A PEFT adapter made by the real `peft` library on this base model, against
  transformers + peft (tools/make_peft_golden.py): top-1 equal wherever the reference's top-1
  leads by >= 0.5 logit, and the logit change the adapter causes correlates with theirs.
  This is the test that catches a missing q/k row permutation: a negative control below shows
  the same checks failing when the permutation is undone.
- GGUF-LoRA adapters against llama.cpp with the same adapter (tools/make_lora_golden.py): the
  base-model bounds of tests/test_fidelity.py, and the change correlates >= 0.9.
The references differ from us by quantization: transformers dequantizes the Q4_1 weights and
keeps activations in float; llama.cpp rounds like we do but in another summation order.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgelora_np.adapters.formats import load_adapter, permute_qk_rows
from edgelora_np.adapters.pool import AdapterPool
from edgelora_np.kernels.lora import LoraBatch
from edgelora_np.model.batch import Batch

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "lora"
CLEAR_MARGIN = 0.5


def load_golden(name):
    g = np.load(DATA / name)
    return g, json.loads(str(g["meta_json"]))


def change_correlation(ours, ours_base, theirs, theirs_base):
    a = (ours - ours_base).ravel()
    b = (theirs - theirs_base).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def logits_with_adapter(model, ids, adapter):
    bank = AdapterPool(model.config, 1 << 30, max_slots=1)
    slot = bank.add("a", adapter)
    batch = Batch.single(ids, adapter=slot, all_logits=True)
    return model.llama.forward(batch, model.llama.new_cache(len(ids)), LoraBatch(bank, batch.adapters))


def unpermuted(adapter, cfg):
    """The adapter as a loader that forgot the q/k row permutation would produce it."""
    def inverse(b, n_head):         # undoes reshape(H, 2, m).swapaxes(1, 2) of the converter
        return b.reshape(n_head, b.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)

    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
    return SimpleNamespace(pairs={
        key: SimpleNamespace(a=p.a, b=inverse(p.b, heads[key[1]]) if key[1] in heads else p.b,
                             scale=p.scale)
        for key, p in adapter.pairs.items()})


def test_inverse_permutation_is_an_inverse():
    b = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    back = unpermuted(SimpleNamespace(pairs={(0, "attn_q"): SimpleNamespace(
        a=None, b=permute_qk_rows(b, 2), scale=1.0)}), SimpleNamespace(n_heads=2, n_kv_heads=1))
    np.testing.assert_array_equal(back.pairs[(0, "attn_q")].b, b)


@pytest.fixture(scope="module")
def peft_case(real_model):
    golden, meta = load_golden("golden_lora_peft.npz")
    adapter = load_adapter(DATA / "peft_strong", real_model.config)
    return golden, meta, adapter


def peft_scores(model, golden, meta, adapter):
    """Per prompt: (clear-position top-1 agreement, change correlation)."""
    out = {}
    for name in meta["prompts"]:
        ids = golden[f"{name}/tokens"]
        ours = logits_with_adapter(model, ids, adapter)
        ours_base = model.logits(ids)
        top = golden[f"peft_strong/{name}/top_logits"]
        clear = top[:, 0] - top[:, 1] >= CLEAR_MARGIN
        agree = ours.argmax(-1)[clear] == golden[f"peft_strong/{name}/top_ids"][clear, 0]
        sample = golden["sample_ids"]
        corr = change_correlation(ours[:, sample], ours_base[:, sample],
                                  golden[f"peft_strong/{name}/sample_logits"],
                                  golden[f"base/{name}/sample_logits"])
        out[name] = (agree, corr)
    return out


def test_peft_adapter_matches_transformers_peft(real_model, peft_case):
    golden, meta, adapter = peft_case
    scores = peft_scores(real_model, golden, meta, adapter)
    for name, (agree, corr) in scores.items():
        assert agree.size > 0 and agree.all(), f"{name}: top-1 differs at a clear position"
        assert corr >= 0.93, f"{name}: change correlation {corr:.3f}"
    assert np.mean([c for _, c in scores.values()]) >= 0.95


def test_missing_qk_permutation_would_be_caught(real_model, peft_case):
    golden, meta, adapter = peft_case
    broken = unpermuted(adapter, real_model.config)
    scores = peft_scores(real_model, golden, meta, broken)
    failed = [n for n, (agree, corr) in scores.items() if not agree.all() or corr < 0.93]
    assert failed or np.mean([c for _, c in scores.values()]) < 0.95


LLAMACPP_CASES = ["strong_a", "strong_a_half", "strong_b", "peft_strong"]
# The base model's bounds (tests/test_fidelity.py), with no exception per case. strong_b once
# measured 2.086 (chat, position 7): attention's fp16 rounding of q and of the probabilities was
# folded away under fastmath (see test_kernels.test_round_to_f16_matches_numpy_including_ties);
# with it restored, strong_b's max is 1.29.
MAX_DIFF = 2.0


@pytest.fixture(scope="module")
def llamacpp_compared(real_model):
    """Per case and prompt: (ours, ours_base, theirs, theirs_base) at sample ids + top ids."""
    golden, meta = load_golden("golden_lora_llamacpp.npz")
    out = {}
    for case in LLAMACPP_CASES:
        spec = meta["cases"][case]
        adapter = load_adapter(DATA / spec["adapter"], real_model.config, scale=spec["scale"])
        for name in meta["prompts"]:
            ids = golden[f"{name}/tokens"]
            ours = logits_with_adapter(real_model, ids, adapter)
            base = real_model.logits(ids)
            top = golden[f"{case}/{name}/top_ids"]
            out[case, name] = dict(
                ours=ours[:, golden["sample_ids"]], ours_base=base[:, golden["sample_ids"]],
                theirs=golden[f"{case}/{name}/sample_logits"],
                theirs_base=golden[f"base/{name}/sample_logits"],
                ours_top=np.take_along_axis(ours, top, axis=1),
                theirs_top=golden[f"{case}/{name}/top_logits"],
                ours_top1=ours.argmax(-1), top_ids=top)
    return out


@pytest.mark.parametrize("case", LLAMACPP_CASES)
def test_gguf_lora_matches_llama_cpp(llamacpp_compared, case):
    runs = [v for (c, _), v in llamacpp_compared.items() if c == case]
    diffs = np.concatenate([np.abs(r["ours"] - r["theirs"]).ravel() for r in runs]
                           + [np.abs(r["ours_top"] - r["theirs_top"]).ravel() for r in runs])
    assert diffs.mean() <= 0.3, f"mean |logit difference| {diffs.mean():.3f}"
    assert diffs.max() <= MAX_DIFF, f"max |logit difference| {diffs.max():.3f}"
    for r in runs:
        clear = r["theirs_top"][:, 0] - r["theirs_top"][:, 1] >= CLEAR_MARGIN
        np.testing.assert_array_equal(r["ours_top1"][clear], r["top_ids"][clear, 0])
    corr = change_correlation(np.concatenate([r["ours"] for r in runs]),
                              np.concatenate([r["ours_base"] for r in runs]),
                              np.concatenate([r["theirs"] for r in runs]),
                              np.concatenate([r["theirs_base"] for r in runs]))
    assert corr >= 0.9, f"the change the adapter causes correlates {corr:.3f} with llama.cpp's"
