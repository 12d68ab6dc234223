"""LoRA adapter files: PEFT directories and GGUF-LoRA, built here for a tiny llama config."""

from __future__ import annotations

import json
import math
import struct

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import save_file
from tiny_model import TinySpec, write_tiny_model

from edgelora_np.adapters.formats import (
    PEFT_MODULES,
    _pattern_value,
    base_shape,
    load_adapter,
    permute_qk_rows,
)
from edgelora_np.errors import AdapterError, EdgeLoraError
from edgelora_np.model.config import LlamaConfig
from edgelora_np.model.weights import PROJECTIONS

# D 64, H 4, KVH 2, HD 16, F 128, 2 layers: the tiny_model.py default spec.
CFG = LlamaConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                  vocab_size=300, context_length=128, rope_base=10000.0, rope_dim=16,
                  rope_freq_scale=1.0, rms_eps=1e-5)
HF_MODULE = {proj: module for module, proj in PEFT_MODULES.items()}   # attn_q -> self_attn.q_proj
HF_NAME = {proj: module.split(".")[1] for proj, module in HF_MODULE.items()}   # attn_q -> q_proj


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out as the converter has it (the oracle)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def peft_key(layer: int, proj: str, half: str, prefix: str = "base_model.model.", infix: str = "") -> str:
    return f"{prefix}model.layers.{layer}.{HF_MODULE[proj]}.lora_{half}{infix}.weight"


def hf_pairs(rank: int = 4, layers=(0, 1), projs=PROJECTIONS, seed: int = 0,
             ranks: dict | None = None) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, proj) -> (A [R, in], B [out, R]) random float32, Hugging Face row order."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        for proj in projs:
            r = (ranks or {}).get((layer, proj), rank)
            n_out, n_in = base_shape(CFG, proj)
            a = rng.standard_normal((r, n_in)).astype(np.float32)
            b = rng.standard_normal((n_out, r)).astype(np.float32)
            out[(layer, proj)] = (a, b)
    return out


def peft_tensors(pairs, **key_kw) -> dict[str, np.ndarray]:
    tensors = {}
    for (layer, proj), (a, b) in pairs.items():
        tensors[peft_key(layer, proj, "A", **key_kw)] = a
        tensors[peft_key(layer, proj, "B", **key_kw)] = b
    return tensors


def write_peft(directory, tensors: dict[str, np.ndarray], **config):
    directory.mkdir(parents=True, exist_ok=True)
    conf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "target_modules": sorted(HF_NAME.values()), "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "fan_in_fan_out": False, "layers_to_transform": None}
    conf.update(config)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(conf))
    return directory


def gguf_tensors(pairs, qtypes: dict[str, QT] | None = None) -> dict[str, tuple[np.ndarray, QT]]:
    """The GGUF-LoRA the converter would write from HF pairs: q/k B rows permuted, GGUF names."""
    out = {}
    for (layer, proj), (a, b) in pairs.items():
        if proj == "attn_q":
            b = converter_permute(b, CFG.n_heads)
        elif proj == "attn_k":
            b = converter_permute(b, CFG.n_kv_heads)
        qtype = (qtypes or {}).get(proj, QT.F32)
        out[f"blk.{layer}.{proj}.weight.lora_a"] = (a, qtype)
        out[f"blk.{layer}.{proj}.weight.lora_b"] = (b, qtype)
    return out


def write_gguf_lora(path, tensors: dict[str, tuple[np.ndarray, QT]], *, alpha: float | None = 8.0,
                    arch: str = "llama", general_type: str = "adapter", adapter_type: str = "lora",
                    truncate_bytes: int = 0):
    w = gguf.GGUFWriter(path, arch)
    w.add_type(general_type)
    w.add_string("adapter.type", adapter_type)
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for name, (x, qtype) in tensors.items():
        if qtype == QT.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif qtype == QT.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_bytes:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - truncate_bytes)
    return path


def expected_b(proj: str, b: np.ndarray) -> np.ndarray:
    if proj == "attn_q":
        return converter_permute(b, CFG.n_heads)
    if proj == "attn_k":
        return converter_permute(b, CFG.n_kv_heads)
    return b


def refused(match: str, path, **kw) -> str:
    """Load and expect an AdapterError matching `match`; returns the message."""
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(path, CFG, **kw)
    assert isinstance(info.value, EdgeLoraError)
    return str(info.value)


# --- the q/k row permutation ------------------------------------------------------------------


def test_permute_matches_converter_and_commutes_with_the_delta():
    rng = np.random.default_rng(1)
    for n_head, rows in ((CFG.n_heads, CFG.q_dim), (CFG.n_kv_heads, CFG.kv_dim)):
        w = rng.standard_normal((rows, CFG.dim)).astype(np.float32)     # HF-layout base weight
        a = rng.standard_normal((3, CFG.dim)).astype(np.float32)
        b = rng.standard_normal((rows, 3)).astype(np.float32)
        np.testing.assert_array_equal(permute_qk_rows(w, n_head), converter_permute(w, n_head))
        # P(W + B @ A) == P(W) + P(B) @ A: permuting B's rows is enough, A stays as it is.
        np.testing.assert_allclose(converter_permute(w + b @ a, n_head),
                                   converter_permute(w, n_head) + permute_qk_rows(b, n_head) @ a,
                                   rtol=1e-5, atol=1e-5)


def test_permute_turns_rotate_half_rope_into_adjacent_pair_rope():
    """The direction check: RoPE on HF rows (pairs i, i + HD/2) then permuting equals permuting
    then RoPE on GGUF rows (pairs 2i, 2i+1), head by head."""
    HD, n_head, pos = CFG.head_dim, CFG.n_heads, 7
    theta = pos * CFG.rope_base ** (-np.arange(HD // 2) * 2 / HD)              # [HD/2]
    cos, sin = np.cos(theta), np.sin(theta)
    q = np.random.default_rng(2).standard_normal((n_head, HD))                # [H, HD], HF order

    x1, x2 = q[:, :HD // 2], q[:, HD // 2:]
    hf_roped = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)

    g = permute_qk_rows(q.reshape(-1), n_head).reshape(n_head, HD)          # GGUF order
    even, odd = g[:, 0::2], g[:, 1::2]
    gguf_roped = np.empty_like(g)
    gguf_roped[:, 0::2], gguf_roped[:, 1::2] = even * cos - odd * sin, odd * cos + even * sin

    np.testing.assert_allclose(permute_qk_rows(hf_roped.reshape(-1), n_head), gguf_roped.reshape(-1),
                               atol=1e-12)


# --- PEFT: ranks, scales, layout ------------------------------------------------------------


def test_peft_pairs_scale_and_qk_permutation(tmp_path):
    pairs = hf_pairs(rank=4)
    d = write_peft(tmp_path / "my-adapter", peft_tensors(pairs), r=4, lora_alpha=8)
    ad = load_adapter(d, CFG, scale=0.5)
    assert (ad.name, ad.format, ad.path) == ("my-adapter", "peft", d)
    assert set(ad.pairs) == set(pairs)
    assert ad.targets == PROJECTIONS and ad.layers == (0, 1)
    assert ad.ranks == {p: {4} for p in PROJECTIONS} and ad.max_rank == 4
    assert ad.nbytes == sum(a.nbytes + b.nbytes for a, b in pairs.values())
    for key, (a, b) in pairs.items():
        pair = ad.pairs[key]
        assert pair.scale == pytest.approx(8 / 4 * 0.5)
        assert pair.a.dtype == np.float32 and pair.b.dtype == np.float32
        assert pair.a.flags.c_contiguous and not pair.a.flags.writeable and not pair.b.flags.writeable
        np.testing.assert_array_equal(pair.a, a)
        np.testing.assert_array_equal(pair.b, expected_b(key[1], b))
    # q and k really were reordered (and v was not): the test would be vacuous otherwise.
    assert not np.array_equal(ad.pairs[(0, "attn_q")].b, pairs[(0, "attn_q")][1])
    assert not np.array_equal(ad.pairs[(0, "attn_k")].b, pairs[(0, "attn_k")][1])


def test_peft_rslora_scale(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(rank=4, projs=("attn_v",))),
                   r=4, lora_alpha=16, use_rslora=True, target_modules=["v_proj"])
    ad = load_adapter(d, CFG, scale=2.0)
    assert [p.scale for p in ad.pairs.values()] == pytest.approx([16 / math.sqrt(4) * 2.0] * 2)


def test_peft_rank_and_alpha_patterns(tmp_path):
    ranks = {(layer, "attn_q"): 8 for layer in (0, 1)} | {(1, "attn_v"): 2}
    pairs = hf_pairs(rank=4, projs=("attn_q", "attn_v", "ffn_down"), ranks=ranks)
    d = write_peft(tmp_path / "a", peft_tensors(pairs), r=4, lora_alpha=8,
                   target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2},
                   alpha_pattern={"down_proj": 32, "model.layers.1.self_attn.v_proj": 1})
    ad = load_adapter(d, CFG)
    assert ad.ranks == {"attn_q": {8}, "attn_v": {2, 4}, "ffn_down": {4}} and ad.max_rank == 8
    assert ad.pairs[(0, "attn_q")].scale == pytest.approx(8 / 8)
    assert ad.pairs[(0, "attn_v")].scale == pytest.approx(8 / 4)
    assert ad.pairs[(1, "attn_v")].scale == pytest.approx(1 / 2)
    assert ad.pairs[(1, "ffn_down")].scale == pytest.approx(32 / 4)


def test_peft_pattern_lookup_follows_peft_get_pattern_key():
    """Keys are regexes anchored as (.*\\.)?key$ -- at a dot boundary -- and the first match wins."""
    assert _pattern_value({"0.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 4) == 2
    assert _pattern_value({"0.self_attn.q_proj": 2}, "model.layers.10.self_attn.q_proj", 4) == 4
    assert _pattern_value({"q_proj": 2}, "model.layers.0.self_attn.xq_proj", 4) == 4
    assert _pattern_value({r"layers\.[01]\..*": 16, "q_proj": 2}, "model.layers.1.self_attn.q_proj", 4) == 16
    assert _pattern_value({}, "model.layers.1.self_attn.q_proj", 4) == 4


def test_peft_layer_qualified_rank_pattern(tmp_path):
    ranks = {(0, "attn_q"): 2}
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(rank=4, projs=("attn_q",), ranks=ranks)),
                   r=4, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"0.self_attn.q_proj": 2})
    ad = load_adapter(d, CFG)
    assert ad.pairs[(0, "attn_q")].rank == 2 and ad.pairs[(1, "attn_q")].rank == 4
    assert ad.pairs[(0, "attn_q")].scale == pytest.approx(2.0)


def test_peft_rank_disagreeing_with_config_is_refused(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(rank=4)), r=8, lora_alpha=16)
    msg = refused("rank 4", d)
    assert "lora_A.weight" in msg and "rank 8" in msg


@pytest.mark.parametrize("key_kw", [{"prefix": ""}, {"infix": ".default"}])
def test_peft_key_variants(tmp_path, key_kw):
    pairs = hf_pairs(rank=4, projs=("attn_k", "ffn_up"))
    d = write_peft(tmp_path / "a", peft_tensors(pairs, **key_kw), target_modules=["k_proj", "up_proj"])
    ad = load_adapter(d, CFG)
    assert set(ad.pairs) == set(pairs)
    np.testing.assert_array_equal(ad.pairs[(1, "attn_k")].b,
                                  converter_permute(pairs[(1, "attn_k")][1], CFG.n_kv_heads))


def test_peft_bf16_and_f16_tensors(tmp_path):
    """NumPy has no bfloat16: BF16 files are decoded from raw bytes. save_file cannot write BF16
    from NumPy, so the file is built by hand (8-byte header length, JSON header, data)."""
    pairs = hf_pairs(rank=4, projs=("attn_v",), layers=(0,))
    (a, b), = pairs.values()
    a_bf16 = (a.view(np.uint32) >> 16).astype(np.uint16)         # truncation: exact in BF16
    b_f16 = b.astype(np.float16)
    blobs = {peft_key(0, "attn_v", "A"): ("BF16", a_bf16), peft_key(0, "attn_v", "B"): ("F16", b_f16)}
    header, data = {}, b""
    for name, (dtype, x) in blobs.items():
        header[name] = {"dtype": dtype, "shape": list(x.shape),
                        "data_offsets": [len(data), len(data) + x.nbytes]}
        data += x.tobytes()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4,
                                                       "target_modules": ["v_proj"]}))
    pair = load_adapter(d, CFG).pairs[(0, "attn_v")]
    np.testing.assert_array_equal(pair.a, (a_bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(pair.b, b_f16.astype(np.float32))


# --- PEFT: config cross-checks ---------------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.(q_proj|v_proj)", "all-linear",
                                     ["self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                      "model.layers.1.self_attn.v_proj"]])
def test_peft_target_modules_accepted(tmp_path, targets):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(projs=("attn_q", "attn_v"))),
                   target_modules=targets)
    assert load_adapter(d, CFG).targets == ("attn_q", "attn_v")


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.(q_proj|v_proj)",
                                     ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]])
def test_peft_tensor_outside_target_modules_is_refused(tmp_path, targets):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(projs=("attn_q", "attn_k"))),
                   target_modules=targets)
    msg = refused("target_modules", d)
    assert "adapter_config.json" in msg and "self_attn.k_proj.lora_A.weight" in msg


def test_peft_exclude_modules(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(projs=("attn_q",))),
                   target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"])
    msg = refused("exclude_modules", d)
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" in msg


@pytest.mark.parametrize("layers", [1, [1]])
def test_peft_layers_to_transform(tmp_path, layers):
    ok = write_peft(tmp_path / "ok", peft_tensors(hf_pairs(layers=(1,))), layers_to_transform=layers)
    assert load_adapter(ok, CFG).layers == (1,)
    bad = write_peft(tmp_path / "bad", peft_tensors(hf_pairs(layers=(0, 1))), layers_to_transform=layers)
    msg = refused("layers_to_transform", bad)
    assert "model.layers.0." in msg


def test_peft_fan_in_fan_out_is_ignored_for_linear_layers(tmp_path):
    """PEFT resets fan_in_fan_out to False for nn.Linear; lora_A/B keep their [r, in]/[out, r]."""
    pairs = hf_pairs(projs=("ffn_down",))
    d = write_peft(tmp_path / "a", peft_tensors(pairs), fan_in_fan_out=True)
    np.testing.assert_array_equal(load_adapter(d, CFG).pairs[(0, "ffn_down")].a, pairs[(0, "ffn_down")][0])


# --- PEFT: refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, match", [
    ("use_dora", True, "DoRA .* not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("peft_type", "IA3", "only LORA"),
    ("trainable_token_indices", [5], "trainable_token_indices"),
    ("rank_pattern", {"q_proj[": 2}, "not a valid regular expression"),
    ("alpha_pattern", {"q_proj": "big"}, "must be a number"),
])
def test_peft_config_refusals(tmp_path, option, value, match):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs()), **{option: value})
    assert "adapter_config.json" in refused(match, d)


@pytest.mark.parametrize("key, match", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embed_tokens"),
    ("base_model.model.lm_head.lora_A.weight", "lm_head"),
    ("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", "unknown module"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "not a LoRA weight"),
    ("base_model.model.model.layers.0.input_layernorm.weight", "not a LoRA weight"),
])
def test_peft_unsupported_tensors(tmp_path, key, match):
    tensors = peft_tensors(hf_pairs()) | {key: np.ones((4, 64), np.float32)}
    d = write_peft(tmp_path / "a", tensors)
    msg = refused(match, d)
    assert "adapter_model.safetensors" in msg and key in msg


@pytest.mark.parametrize("half", ["A", "B"])
def test_peft_missing_half(tmp_path, half):
    tensors = peft_tensors(hf_pairs())
    del tensors[peft_key(1, "ffn_gate", half)]
    msg = refused(f"no lora_{half} partner", write_peft(tmp_path / "a", tensors))
    assert "model.layers.1.mlp.gate_proj" in msg


@pytest.mark.parametrize("half, value", [("A", np.nan), ("B", np.inf)])
def test_peft_non_finite(tmp_path, half, value):
    tensors = peft_tensors(hf_pairs())
    tensors[peft_key(0, "attn_output", half)][1, 2] = value
    msg = refused("NaN or Inf", write_peft(tmp_path / "a", tensors))
    assert peft_key(0, "attn_output", half) in msg


def test_peft_shape_mismatch_names_expected_and_actual(tmp_path):
    tensors = peft_tensors(hf_pairs(projs=("attn_k",)))
    tensors[peft_key(0, "attn_k", "B")] = np.ones((64, 4), np.float32)     # a q-sized B: no GQA
    msg = refused("another base model", write_peft(tmp_path / "a", tensors))
    assert peft_key(0, "attn_k", "B") in msg and "(64, 4)" in msg and "(32, 4)" in msg


def test_peft_layer_beyond_the_model(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs(layers=(0, 5))))
    assert "model.layers.5." in refused("layer 5 does not exist", d)


def test_peft_rank_zero(tmp_path):
    tensors = {peft_key(0, "attn_v", "A"): np.zeros((0, 64), np.float32),
               peft_key(0, "attn_v", "B"): np.zeros((32, 0), np.float32)}
    assert peft_key(0, "attn_v", "A") in refused("rank 0", write_peft(tmp_path / "a", tensors, r=0))


def test_peft_integer_tensor(tmp_path):
    tensors = peft_tensors(hf_pairs(projs=("attn_v",)))
    tensors[peft_key(0, "attn_v", "A")] = np.ones((4, 64), np.int32)
    assert peft_key(0, "attn_v", "A") in refused("stored as I32", write_peft(tmp_path / "a", tensors))


def test_peft_pickle_is_refused(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert "adapter_model.bin" in refused("pickle", d)
    assert "adapter_model.bin" in refused("pickle", d / "adapter_model.bin")


def test_peft_truncated_safetensors(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs()))
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert str(f) in refused("not a readable safetensors file", d)


def test_peft_broken_config(tmp_path):
    d = write_peft(tmp_path / "a", peft_tensors(hf_pairs()))
    (d / "adapter_config.json").write_text("{not json")
    assert str(d / "adapter_config.json") in refused("cannot read the adapter config", d)
    (d / "adapter_config.json").unlink()
    refused("adapter_config.json is missing", d)


def test_missing_path_and_non_adapter_file(tmp_path):
    refused("adapter not found", tmp_path / "nope")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    refused("not an adapter", other)
    with pytest.raises(AdapterError, match="finite"):
        load_adapter(other, CFG, scale=float("nan"))


# --- GGUF-LoRA -----------------------------------------------------------------------------------


def test_gguf_lora_equals_peft_without_double_permutation(tmp_path):
    pairs = hf_pairs(rank=4)
    peft = load_adapter(write_peft(tmp_path / "p", peft_tensors(pairs), r=4, lora_alpha=8), CFG,
                        scale=0.75)
    g = load_adapter(write_gguf_lora(tmp_path / "g.gguf", gguf_tensors(pairs), alpha=8.0), CFG,
                     scale=0.75)
    assert (g.format, g.name) == ("gguf", "g")
    assert set(g.pairs) == set(peft.pairs)
    for key, pair in peft.pairs.items():
        np.testing.assert_array_equal(g.pairs[key].a, pair.a)
        np.testing.assert_array_equal(g.pairs[key].b, pair.b)
        assert g.pairs[key].scale == pytest.approx(pair.scale) == pytest.approx(8 / 4 * 0.75)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0])
def test_gguf_lora_tensor_types(tmp_path, qtype):
    """Rank 32 so that lora_b rows hold whole Q8_0 blocks; values are the type's exact decode."""
    pairs = hf_pairs(rank=32, projs=("attn_q", "ffn_down"), layers=(1,))
    path = write_gguf_lora(tmp_path / "g.gguf", gguf_tensors(pairs, {p: qtype for p in PROJECTIONS}))
    ad = load_adapter(path, CFG)
    for (layer, proj), (a, b) in pairs.items():
        for got, want in ((ad.pairs[(layer, proj)].a, a), (ad.pairs[(layer, proj)].b, expected_b(proj, b))):
            if qtype == QT.F16:
                decoded = want.astype(np.float16).astype(np.float32)
            else:
                decoded = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
            np.testing.assert_array_equal(got, decoded)
            assert not np.array_equal(got, np.zeros_like(got))


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_gguf_lora_without_alpha_uses_the_user_scale(tmp_path, alpha):
    path = write_gguf_lora(tmp_path / "g.gguf", gguf_tensors(hf_pairs(projs=("attn_v",))), alpha=alpha)
    assert [p.scale for p in load_adapter(path, CFG, scale=0.3).pairs.values()] == pytest.approx([0.3] * 2)


def test_gguf_lora_metadata_refusals(tmp_path):
    t = gguf_tensors(hf_pairs(projs=("attn_v",)))
    msg = refused("architecture 'qwen2', base model is 'llama'",
                  write_gguf_lora(tmp_path / "q.gguf", t, arch="qwen2"))
    assert "q.gguf" in msg
    refused("adapter.type is 'control_vector'",
            write_gguf_lora(tmp_path / "c.gguf", t, adapter_type="control_vector"))
    model = write_tiny_model(tmp_path / "m.gguf", TinySpec())
    assert "m.gguf" in refused("general.type is None, expected 'adapter'", model)


@pytest.mark.parametrize("name, shape, match", [
    ("token_embd.weight.lora_a", (4, 64), "token embedding"),
    ("output.weight.lora_b", (300, 4), "output"),
    ("blk.0.attn_norm.weight", (64,), "norm"),
    ("blk.0.attn_qkv.weight.lora_a", (4, 64), "not a LoRA weight"),
    ("blk.0.attn_q.weight", (64, 64), "not a LoRA weight"),
])
def test_gguf_lora_unsupported_tensors(tmp_path, name, shape, match):
    t = gguf_tensors(hf_pairs(projs=("attn_v",))) | {name: (np.ones(shape, np.float32), QT.F32)}
    assert name in refused(match, write_gguf_lora(tmp_path / "g.gguf", t))


def test_gguf_lora_pair_refusals(tmp_path):
    base = gguf_tensors(hf_pairs(projs=("attn_k",)))
    a_name, b_name = "blk.1.attn_k.weight.lora_a", "blk.1.attn_k.weight.lora_b"

    t = dict(base)
    del t[b_name]
    assert a_name in refused("no lora_b partner", write_gguf_lora(tmp_path / "1.gguf", t))

    t = base | {b_name: (np.ones((64, 4), np.float32), QT.F32)}
    msg = refused("another base model", write_gguf_lora(tmp_path / "2.gguf", t))
    assert b_name in msg and "(64, 4)" in msg and "(32, 4)" in msg

    # A stored un-transposed (the old finetune layout): [in, R] instead of [R, in].
    t = base | {a_name: (np.ones((64, 4), np.float32), QT.F32)}
    assert a_name in refused("expected", write_gguf_lora(tmp_path / "3.gguf", t))

    bad = base[a_name][0].copy()
    bad[0, 0] = np.nan
    t = base | {a_name: (bad, QT.F32)}
    assert a_name in refused("NaN or Inf", write_gguf_lora(tmp_path / "4.gguf", t))

    t = {"blk.7.attn_v.weight.lora_a": (np.ones((4, 64), np.float32), QT.F32),
         "blk.7.attn_v.weight.lora_b": (np.ones((32, 4), np.float32), QT.F32)}
    assert "blk.7" in refused("layer 7 does not exist", write_gguf_lora(tmp_path / "5.gguf", t))


def test_gguf_lora_truncated(tmp_path):
    path = write_gguf_lora(tmp_path / "g.gguf", gguf_tensors(hf_pairs()), truncate_bytes=100)
    assert "g.gguf" in refused("truncated", path)
