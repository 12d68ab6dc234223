"""Fuzzing every file the engine reads (issue #17), structure-aware (tests/fuzz_support.py).

Per format, EDGELORA_FUZZ_EXAMPLES cases (500 here, 10,000 in `tox -e fuzz`) mutate a real,
valid file and load it the way the engine does:

    gguf_model   a tiny llama GGUF: open_gguf, config_from_gguf, the tokenizer, load_weights
    gguf_lora    a GGUF-LoRA file: load_adapter, then pack (what an import does)
    peft         a PEFT directory: the safetensors bytes and JSON header, adapter_config.json
    store_file   a .ela file of a store: its bytes and JSON header, optionally the index agreeing
    store_index  index.sqlite: its columns set to hostile values, or its bytes flipped
                 (both store cases then list the store and load every adapter into a pool)

Each case ends in success or an EdgeLoraError naming the file, never another exception, and
allocates at most a few times the file's size (check_case). Below the fuzzers, the regression
tests for the bugs they found, each a fixed case.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct

import pytest
from fuzz_support import (
    FUZZ,
    check_case,
    ela_slots,
    gguf_slots,
    mutate,
    mutations,
    safetensors_slots,
    tree_size,
)
from gguf import GGMLQuantizationType as QT
from hypothesis import event, given
from hypothesis import strategies as st
from test_adapter_formats import CFG, gguf_tensors, hf_pairs, peft_tensors, write_gguf_lora, write_peft
from tiny_model import TinySpec, write_tiny_model

from edgelora_np.adapters.formats import load_adapter
from edgelora_np.adapters.packed import pack
from edgelora_np.adapters.pool import AdapterPool
from edgelora_np.adapters.store import AdapterStore
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.model.config import config_from_gguf
from edgelora_np.model.weights import load_weights
from edgelora_np.tokenizer import Tokenizer

TINY = TinySpec(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab=260, context=64)
FP = "gguf-sha256:" + "cd" * 16

# Peak allocation allowed, as a multiple of the file size (plus fuzz_support.SLACK_BYTES):
# a model's weights are repacked once (about 1x); an adapter is decoded to float32 and packed
# to fp16, a few copies of a payload that is small next to the slack.
FACTORS = {"gguf_model": 2, "gguf_lora": 4, "peft": 4, "store": 2}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The valid originals, and a scratch directory each case writes its mutant into."""
    root = tmp_path_factory.mktemp("fuzz")
    model = write_tiny_model(root / "orig_model.gguf", TINY)
    pairs = hf_pairs(rank=2, layers=(0, 1), projs=("attn_q", "attn_v", "ffn_down"))
    lora = write_gguf_lora(root / "orig_lora.gguf", gguf_tensors(pairs, {"attn_v": QT.F16}))
    peft = write_peft(root / "orig_peft", peft_tensors(pairs), r=2,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    store = AdapterStore(root / "orig_store", create=True)
    store.import_adapter(peft, CFG, FP, name="fz")
    store.close()
    scratch = root / "scratch"
    scratch.mkdir()
    return {"root": root, "model": model, "lora": lora, "peft": peft,
            "store": root / "orig_store", "scratch": scratch}


def _record(outcome: str) -> None:
    event(f"outcome: {outcome}")


# --- GGUF model -----------------------------------------------------------------------------------

def load_model_header(path):
    gf = open_gguf(path)
    cfg = config_from_gguf(gf)
    Tokenizer.from_gguf(gf)
    load_weights(gf, cfg, 1)


@FUZZ
@given(ops=mutations)
def test_fuzz_gguf_model(files, ops):
    buf = files["model"].read_bytes()
    path = files["scratch"] / "fz_model.gguf"
    path.write_bytes(mutate(buf, gguf_slots(buf), ops))
    _record(check_case(lambda: load_model_header(path), names="fz_model.gguf",
                       size=tree_size(path), factor=FACTORS["gguf_model"]))


# --- GGUF-LoRA ------------------------------------------------------------------------------------

def load_and_pack(path):
    pack(load_adapter(path, CFG), CFG)


@FUZZ
@given(ops=mutations)
def test_fuzz_gguf_lora(files, ops):
    buf = files["lora"].read_bytes()
    path = files["scratch"] / "fz_lora.gguf"
    path.write_bytes(mutate(buf, gguf_slots(buf), ops))
    _record(check_case(lambda: load_and_pack(path), names="fz_lora.gguf",
                       size=tree_size(path), factor=FACTORS["gguf_lora"]))


# --- PEFT -----------------------------------------------------------------------------------------

SAFETENSORS_FIELDS = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", "X"]),
    "shape": st.lists(st.sampled_from([0, 1, 2, 3, 32, 64, 128, 2**20, 2**40, 2**63, -1]),
                      max_size=4),
    "data_offsets": st.lists(st.sampled_from([0, 1, 8, 256, 512, 4096, 2**40, 2**64 - 1, -8]),
                             min_size=0, max_size=3),
}
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
               "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "use_dora",
               "modules_to_save", "fan_in_fan_out"]

peft_ops = st.lists(st.one_of(
    st.tuples(st.just("bytes"), mutations),
    st.tuples(st.just("header"), st.integers(0, 99), st.sampled_from(sorted(SAFETENSORS_FIELDS)),
              st.data()),
    st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), json_values),
    st.tuples(st.just("config_drop"), st.sampled_from(CONFIG_KEYS)),
    st.tuples(st.just("config_text"), st.sampled_from(
        ["", "[", "{", "null", "[]", "NaN", "\xff\xfe", "DEEP", '{"r": 1e999}',
         '{"r": 4, "r": 5}'])),
), min_size=1, max_size=3)


def mutate_peft(directory, ops) -> None:
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    for op in ops:
        if op[0] == "bytes":
            buf = weights.read_bytes()
            try:
                layout = safetensors_slots(buf)
            except (ValueError, struct.error):
                continue                      # already mangled: byte mutations only
            weights.write_bytes(mutate(buf, layout, op[1]))
        elif op[0] == "header":
            buf = weights.read_bytes()
            try:
                (n,) = struct.unpack_from("<Q", buf, 0)
                header = json.loads(buf[8:8 + n])
                names = sorted(k for k in header if k != "__metadata__")
            except (ValueError, struct.error):
                continue
            if not names:
                continue
            name = names[op[1] % len(names)]
            header[name][op[2]] = op[3].draw(SAFETENSORS_FIELDS[op[2]])
            text = json.dumps(header).encode()
            weights.write_bytes(struct.pack("<Q", len(text)) + text + buf[8 + n:])
        elif op[0] in ("config", "config_drop"):
            try:
                conf = json.loads(config.read_text())
            except (ValueError, RecursionError):
                continue
            if not isinstance(conf, dict):
                continue
            if op[0] == "config":
                conf[op[1]] = op[2]
            else:
                conf.pop(op[1], None)
            config.write_text(json.dumps(conf))
        else:
            text = "[" * 100_000 if op[1] == "DEEP" else op[1]      # nesting deeper than recursion
            config.write_text(text, encoding="utf-8", errors="surrogateescape")


@FUZZ
@given(ops=peft_ops)
def test_fuzz_peft(files, ops):
    directory = files["scratch"] / "fz_peft"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(files["peft"], directory)
    mutate_peft(directory, ops)
    _record(check_case(lambda: load_and_pack(directory), names="fz_peft",
                       size=tree_size(directory), factor=FACTORS["peft"]))


# --- the store: .ela files and the index ------------------------------------------------------------

ELA_KEYS = ["name", "fingerprint", "groups", "payload_bytes", "crc32"]
GROUP_FIELDS = ["ranks", "layers", "a", "b", "s"]
layout_values = st.one_of(
    st.lists(st.integers(-2, 2**20) | st.sampled_from([2**40, 2**63]), max_size=4),
    st.integers(-2**63, 2**63) | st.sampled_from([0, 64, 2**40, -64]), json_values)

ela_ops = st.lists(st.one_of(
    st.tuples(st.just("ela_bytes"), mutations),
    st.tuples(st.just("ela_header"), st.sampled_from(ELA_KEYS), json_values, st.booleans()),
    st.tuples(st.just("ela_group"), st.sampled_from(["qkv", "o", "gate_up", "down", "zz"]),
              st.sampled_from(GROUP_FIELDS), layout_values, st.booleans()),
), min_size=1, max_size=3)

index_ops = st.lists(st.one_of(
    st.tuples(st.just("index_column"), st.sampled_from(
        ["name", "fingerprint", "groups", "nbytes", "crc32", "card", "source", "scale"]),
        json_values | st.binary(max_size=16) | st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("index_json"), st.sampled_from(["groups", "card"]), json_values),
    st.tuples(st.just("index_bytes"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("index_duplicate")),
), min_size=1, max_size=3)


def _ela_header(path):
    buf = path.read_bytes()
    (h_len,) = struct.unpack_from("<I", buf, 12)
    return buf, json.loads(buf[16:16 + h_len])


def _write_ela(path, buf, header):
    """Rewrite the header in place when it fits the padding, as a consistent file would be."""
    (h_len,) = struct.unpack_from("<I", buf, 12)
    start = -(-(16 + h_len) // 64) * 64
    text = json.dumps(header).encode()
    if 16 + len(text) > start:
        return False
    path.write_bytes(buf[:12] + struct.pack("<I", len(text)) + text
                     + b"\0" * (start - 16 - len(text)) + buf[start:])
    return True


def mutate_store(root, ops) -> None:
    ela, index = root / "data" / "fz.ela", root / "index.sqlite"
    for op in ops:
        kind = op[0]
        if kind == "ela_bytes":
            buf = ela.read_bytes()
            ela.write_bytes(mutate(buf, ela_slots(buf), op[1]))
            continue
        if kind in ("ela_header", "ela_group"):
            try:
                buf, header = _ela_header(ela)
            except (ValueError, struct.error):
                continue
            if not isinstance(header, dict):
                continue
            if kind == "ela_header":
                header[op[1]] = op[2]
            elif isinstance(header.get("groups"), dict):
                group = header["groups"].setdefault(op[1], {})
                if isinstance(group, dict):
                    group[op[2]] = op[3]
            if _write_ela(ela, buf, header) and op[-1]:       # and the index agrees with it
                if kind == "ela_group" or op[1] == "groups":
                    _update(index, "UPDATE adapters SET groups = ?", json.dumps(header["groups"]))
                elif op[1] == "payload_bytes":
                    _update(index, "UPDATE adapters SET nbytes = ?", _sql(header["payload_bytes"]))
            continue
        if kind == "index_bytes":
            buf = bytearray(index.read_bytes())
            buf[op[1] % len(buf)] ^= op[2]
            index.write_bytes(bytes(buf))
            continue
        if kind == "index_column":
            _update(index, f"UPDATE adapters SET {op[1]} = ?", _sql(op[2]))
        elif kind == "index_json":
            _update(index, f"UPDATE adapters SET {op[1]} = ?", json.dumps(op[2]))
        else:
            _update(index, "INSERT INTO adapters SELECT 'fz2', fingerprint, groups, nbytes, crc32, "
                           "card, source, source_sha256, scale, imported FROM adapters")


def _update(index, sql, *args) -> None:
    """One write to the index; a write the schema refuses (NOT NULL) or a database a byte flip
    already broke is skipped: the loader must then cope with what is there."""
    db = sqlite3.connect(index)
    try:
        db.execute(sql, args)
        db.commit()
    except (sqlite3.DatabaseError, UnicodeDecodeError):  # sqlite quotes corrupt schema bytes
        pass
    finally:
        db.close()


def _sql(value):
    """A JSON value as something sqlite stores (a column's type is not enforced)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        return str(value)
    return value


def load_store(root):
    store = AdapterStore(root)
    try:
        store.cards()
        store.rows()
        pool = AdapterPool(CFG, 1 << 20)
        for name in store.names():
            pool.acquire(name, store.record(name))
            pool.release(name)
    finally:
        store.close()


def _store_case(files, ops):
    root = files["scratch"] / "fz_store"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(files["store"], root)
    mutate_store(root, ops)
    _record(check_case(lambda: load_store(root), names="fz_store", size=tree_size(root),
                       factor=FACTORS["store"]))


@FUZZ
@given(ops=ela_ops)
def test_fuzz_store_file(files, ops):
    _store_case(files, ops)


@FUZZ
@given(ops=index_ops)
def test_fuzz_store_index(files, ops):
    _store_case(files, ops)


# --- the originals load, so the fuzzers start from valid files ------------------------------------

def test_originals_are_valid(files):
    load_model_header(files["model"])
    load_and_pack(files["lora"])
    load_and_pack(files["peft"])
    load_store(files["store"])
