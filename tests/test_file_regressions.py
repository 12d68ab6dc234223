"""Regression tests for the file-parsing bugs the fuzzers (tests/test_fuzz_files.py) and the
review for issue #17 found, one fixed case each. Before the fix, each raised something other
than an EdgeLoraError naming the file, allocated gigabytes, or let NaN/Inf reach the kernels.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_adapter_formats import CFG, gguf_tensors, hf_pairs, peft_tensors, write_gguf_lora, write_peft
from tiny_model import TinySpec, write_tiny_model

from edgelora_np.adapters.formats import load_adapter
from edgelora_np.adapters.packed import pack
from edgelora_np.adapters.pool import AdapterPool
from edgelora_np.adapters.store import AdapterStore
from edgelora_np.errors import AdapterError, EdgeLoraError, GGUFFormatError, TokenizerError
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.model.config import config_from_gguf
from edgelora_np.tokenizer import Tokenizer

FP = "gguf-sha256:" + "cd" * 16
MiB = 1 << 20


# --- raw GGUF bytes, written by hand so any field can be anything --------------------------------

def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def gguf_file(path, kvs: bytes = b"", n_kv: int = 0, tensors=(), data: bytes = b"",
              alignment: int = 32):
    """kvs: raw key/value bytes; tensors: (name, dims, type, offset)."""
    body = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), n_kv) + kvs
    for name, dims, qtype, offset in tensors:
        body += gguf_string(name.encode()) + struct.pack("<I", len(dims))
        body += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, offset)
    body += b"\0" * (-len(body) % alignment)
    path.write_bytes(body + data)
    return path


def peak_of(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refused(exc, match, fn):
    """fn raises `exc` whose message contains `match`, allocating under 4 MiB on the way."""
    caught = []

    def run():
        with pytest.raises(exc) as e:
            fn()
        caught.append(str(e.value))
    assert peak_of(run) < 4 * MiB
    assert match in caught[0], caught[0]
    return caught[0]


# --- GGUF header and tensor table ----------------------------------------------------------------

@pytest.mark.parametrize("dims", [[2**62, 4], [2**40, 2**40], [2**64 - 1, 2]], ids=str)
def test_tensor_size_overflow_names_the_file(tmp_path, dims):
    # Was: the element count overflowed int64 and the error gave a negative byte count, without
    # the file's name.
    path = gguf_file(tmp_path / "big.gguf", tensors=[("t", dims, QT.F32, 0)], data=b"\0" * 64)
    refused(GGUFFormatError, "big.gguf", lambda: open_gguf(path))


@pytest.mark.parametrize("field", ["string", "array", "keys", "tensors"])
def test_huge_counts_are_checked_against_the_file_size(tmp_path, field):
    # A 2^60-byte string, 2^40 array items, 2^40 keys or tensors in a file of a few bytes.
    if field == "string":
        path = gguf_file(tmp_path / "h.gguf", struct.pack("<Q", 2**60) + b"k", n_kv=1)
    elif field == "array":
        kv = gguf_string(b"a") + struct.pack("<IIQ", 9, 8, 2**40)     # array of strings
        path = gguf_file(tmp_path / "h.gguf", kv, n_kv=1)
    else:
        path = tmp_path / "h.gguf"
        counts = (2**40, 0) if field == "tensors" else (0, 2**40)
        path.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, *counts) + b"\0" * 64)
    refused(GGUFFormatError, "h.gguf", lambda: open_gguf(path))


def test_deeply_nested_arrays_are_refused(tmp_path):
    # Was: RecursionError (arrays of arrays nested 10,000 deep).
    kv = gguf_string(b"deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10_000
    kv += struct.pack("<IQ", 4, 0)
    path = gguf_file(tmp_path / "deep.gguf", kv, n_kv=1)
    refused(GGUFFormatError, "deep.gguf", lambda: open_gguf(path))


def test_bad_alignment_duplicates_overlaps_and_misaligned_offsets(tmp_path):
    data = b"\0" * 256
    align0 = gguf_string(b"general.alignment") + struct.pack("<II", 4, 0)
    path = gguf_file(tmp_path / "a0.gguf", align0, n_kv=1)               # was ZeroDivisionError
    refused(GGUFFormatError, "alignment", lambda: open_gguf(path))
    cases = {
        "dup": [("t", [4], QT.F32, 0), ("t", [4], QT.F32, 32)],
        "overlap": [("t", [16], QT.F32, 0), ("u", [16], QT.F32, 32)],
        "misaligned": [("t", [4], QT.F32, 3)],
        "dims": [("t", [1] * 5, QT.F32, 0)],
    }
    for name, tensors in cases.items():
        path = gguf_file(tmp_path / f"{name}.gguf", tensors=tensors, data=data)
        refused(GGUFFormatError, f"{name}.gguf", lambda path=path: open_gguf(path))


def test_duplicate_metadata_keys_are_refused(tmp_path):
    kv = (gguf_string(b"k") + struct.pack("<II", 4, 1)) * 2
    path = gguf_file(tmp_path / "dupkey.gguf", kv, n_kv=2)
    refused(GGUFFormatError, "appears twice", lambda: open_gguf(path))


@pytest.mark.parametrize("key, value", [
    ("llama.embedding_length", "gpt2"), ("llama.attention.head_count", 0),
    ("llama.attention.head_count", -4), ("llama.block_count", 2.5), ("llama.block_count", True),
    ("llama.context_length", 2**40), ("llama.feed_forward_length", [64]),
    ("llama.attention.layer_norm_rms_epsilon", float("nan")), ("llama.rope.freq_base", "x"),
])
def test_config_metadata_of_the_wrong_type(tmp_path, key, value):
    # Was: ValueError (int("gpt2")), ZeroDivisionError (head_count 0), TypeError, or a
    # silently truncated float / a NaN epsilon accepted.
    gf = open_gguf(write_tiny_model(tmp_path / "m.gguf", TinySpec()))
    gf.fields[key] = value
    with pytest.raises(GGUFFormatError, match=rf"m\.gguf.*{key}"):
        config_from_gguf(gf)


def test_tokenizer_errors_name_the_file(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec())
    gf = open_gguf(path)
    gf.fields.pop("tokenizer.ggml.model")
    with pytest.raises(TokenizerError, match=r"m\.gguf"):
        Tokenizer.from_gguf(gf)


# --- adapters: configs, alphas, payloads -----------------------------------------------------------

PAIRS = hf_pairs(rank=2, layers=(0,), projs=("attn_q", "attn_v"))
CONF = {"r": 2, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("key, value", [
    ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("r", float("inf")),
    ("r", 2.5), ("r", -2), ("target_modules", [1, 2]), ("rank_pattern", [1]),
    ("alpha_pattern", {"q_proj": "x"}), ("layers_to_transform", 1.5),
    ("layers_to_transform", [True]), ("exclude_modules", {"a": 1}),
])
def test_peft_config_values_of_the_wrong_type(tmp_path, key, value):
    # Was: a NaN scale accepted (NaN logits), OverflowError, TypeError, AttributeError.
    d = write_peft(tmp_path / "cfg", peft_tensors(PAIRS), **{**CONF, key: value})
    refused(AdapterError, "adapter_config.json", lambda: load_adapter(d, CFG))


def test_peft_config_nested_too_deep(tmp_path):
    d = write_peft(tmp_path / "deep", peft_tensors(PAIRS), **CONF)
    (d / "adapter_config.json").write_text("[" * 100_000)            # was RecursionError
    refused(AdapterError, "adapter_config.json", lambda: load_adapter(d, CFG))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_gguf_lora_alpha_must_be_finite(tmp_path, alpha):
    path = write_gguf_lora(tmp_path / "l.gguf", gguf_tensors(PAIRS), alpha=alpha)
    refused(AdapterError, "adapter.lora.alpha", lambda: load_adapter(path, CFG))


def test_weights_beyond_fp16_are_refused_at_import(tmp_path):
    # Was: a finite float32 weight of 1e6 packed to fp16 Inf: every logit NaN after import.
    pairs = {k: (a.copy(), b) for k, (a, b) in PAIRS.items()}
    pairs[(0, "attn_v")][0][0, 0] = 1e6
    d = write_peft(tmp_path / "big", peft_tensors(pairs), **CONF)
    adapter = load_adapter(d, CFG)
    refused(AdapterError, "fp16", lambda: pack(adapter, CFG))
    store = AdapterStore(tmp_path / "store", create=True)
    with pytest.raises(AdapterError, match="fp16"):
        store.import_adapter(d, CFG, FP)
    assert store.names() == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_inf_payloads_are_refused_at_import(tmp_path, value):
    pairs = {k: (a.copy(), b.copy()) for k, (a, b) in PAIRS.items()}
    pairs[(0, "attn_q")][1][3, 1] = value
    store = AdapterStore(tmp_path / "store", create=True)
    peft = write_peft(tmp_path / "p", peft_tensors(pairs), **CONF)
    lora = write_gguf_lora(tmp_path / "g.gguf", gguf_tensors(pairs))
    for src in (peft, lora):
        with pytest.raises(AdapterError, match="NaN or Inf"):
            store.import_adapter(src, CFG, FP)
    assert store.names() == []


# --- the store ------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = AdapterStore(tmp_path / "store", create=True)
    s.import_adapter(write_peft(tmp_path / "ok", peft_tensors(PAIRS), **CONF), CFG, FP, name="ok")
    yield s
    s.close()


def test_store_header_length_is_checked_before_reading(store):
    # Was: f.read(h_len) with h_len = 2^32 - 1 asked for 4 GiB for a file of a few KiB.
    path = store.file("ok")
    buf = bytearray(path.read_bytes())
    buf[12:16] = struct.pack("<I", 2**32 - 1)
    path.write_bytes(bytes(buf))
    refused(AdapterError, "ok.ela", lambda: store.record("ok"))


@pytest.mark.parametrize("column, value", [("groups", "not json"), ("groups", "[1]"),
                                           ("groups", '{"qkv": {"ranks": 1}}'), ("nbytes", -1),
                                           ("card", "{"), ("crc32", "x"), ("name", "")])
def test_corrupted_index_rows_name_the_index(store, column, value):
    # Was: JSONDecodeError, KeyError, TypeError, ValueError, or an error without the store's path.
    db = sqlite3.connect(store.root / "index.sqlite")
    db.execute(f"UPDATE adapters SET {column} = ?", (value,))
    db.commit()
    db.close()

    def load_all():
        store.cards()
        for name in store.names():
            store.record(name)
    with pytest.raises(AdapterError, match=str(store.root)):
        load_all()


def test_pool_refuses_a_layout_its_model_does_not_give(store):
    # Was: a .ela header and index row agreeing on section offsets past the payload were
    # published to the kernels' tables as they were: out-of-bounds reads in the LoRA kernels.
    path = store.file("ok")
    buf = path.read_bytes()
    (h_len,) = struct.unpack_from("<I", buf, 12)
    header = json.loads(buf[16:16 + h_len])
    header["groups"]["qkv"]["b"] += 1 << 20
    text = json.dumps(header).encode()
    start = -(-(16 + h_len) // 64) * 64
    assert 16 + len(text) <= start
    path.write_bytes(buf[:12] + struct.pack("<I", len(text)) + text
                     + b"\0" * (start - 16 - len(text)) + buf[start:])
    db = sqlite3.connect(store.root / "index.sqlite")
    db.execute("UPDATE adapters SET groups = ?", (json.dumps(header["groups"]),))
    db.commit()
    db.close()
    record = store.record("ok")                   # file and index agree with each other
    pool = AdapterPool(CFG, 4 * MiB)
    with pytest.raises(AdapterError, match="ok.ela"):
        pool.acquire("ok", record)
    assert pool.names == []


def test_index_schema_that_is_not_utf8(tmp_path):
    # Was: UnicodeDecodeError. sqlite reports the malformed schema with its bytes in the message,
    # which Python's sqlite3 decodes as UTF-8 (found by the store-index fuzzer).
    AdapterStore(tmp_path / "s", create=True).close()
    index = tmp_path / "s" / "index.sqlite"
    buf = index.read_bytes()
    at = buf.find(b"CREATE TABLE adapters (")
    index.write_bytes(buf[:at + 22] + b"\xcb" + buf[at + 23:])
    with pytest.raises(AdapterError, match="index.sqlite"):
        AdapterStore(tmp_path / "s").names()


@pytest.mark.parametrize("qtype", [QT.I32, QT.I8], ids=["I32", "I8"])
def test_unsupported_tensor_types_name_the_file(tmp_path, qtype):
    # Was: UnsupportedQuantError "tensor 'output_norm.weight' is stored as I32" without the file
    # (the GGUF-model fuzzer set a tensor's type field to another type of the same size).
    from edgelora_np.model.weights import load_weights

    path = write_tiny_model(tmp_path / "typed.gguf", TinySpec(),
                            tensor_types={"blk.0.attn_q.weight": qtype})
    gf = open_gguf(path)
    with pytest.raises(EdgeLoraError, match=r"typed\.gguf"):
        load_weights(gf, config_from_gguf(gf), 1)
    buf = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = buf.rfind(name) + len(name)                  # its tensor info: n_dims, dims, type
    (n_dims,) = struct.unpack_from("<I", buf, at)
    struct.pack_into("<I", buf, at + 4 + 8 * n_dims, int(qtype))
    (tmp_path / "norm.gguf").write_bytes(bytes(buf))
    gf = open_gguf(tmp_path / "norm.gguf")
    with pytest.raises(EdgeLoraError, match=r"norm\.gguf"):
        load_weights(gf, config_from_gguf(gf), 1)
