"""The adapter store (adapters/store.py) and an engine serving from it.

- Round trips: put / import (PEFT directory with card.json, GGUF-LoRA file) / record / packed
  give back exactly the packed payload (adapters/packed.py) of the source; the index row holds
  name, fingerprint, ranks, bytes and card; list and remove.
- Imports are idempotent ("unchanged"), forced re-imports redo the work, and an import loop
  interrupted half-way can be re-run: the done ones are "unchanged", the rest imported.
- Faults (truncated file, flipped payload byte, header/index disagreement, missing file, full
  disk during a write, bad names, a directory that is no store) each raise an AdapterError
  naming the adapter, and leave the rest of the store readable.
- An Engine with store= (tiny random GGUF model, tests/tiny_model.py): a corrupted adapter fails
  only its own request; an adapter imported for another base model is refused at submit; with a
  pool that holds only two adapters, six adapters' requests all finish with the tokens each gets
  alone, evicting on the way, never above the budget, and every pin is released (also for
  cancelled and failed requests).
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time

import numpy as np
import pytest
from test_adapter_formats import CFG as TINY_CFG
from test_adapter_formats import (
    gguf_tensors,
    hf_pairs,
    peft_tensors,
    write_gguf_lora,
    write_peft,
)
from test_lora_kernels import odd_config, random_adapter
from tiny_model import TinySpec, write_tiny_model

import edgelora_np as el
import edgelora_np.adapters.store as store_mod
from edgelora_np.adapters.formats import load_adapter
from edgelora_np.adapters.packed import pack
from edgelora_np.adapters.store import AdapterStore, model_fingerprint
from edgelora_np.errors import AdapterError
from edgelora_np.model.kv_cache import PAGE_SIZE

CFG = odd_config(dim=20, kv_dim=6, ffn=28, layers=2)
FP = "gguf-sha256:" + "ab" * 16


def small_packed(seed: int, rank: int, **kw):
    return pack(random_adapter(CFG, np.random.default_rng(seed), rank, **kw), CFG)


@pytest.fixture
def store(tmp_path):
    """A store holding three small adapters of different ranks and targets."""
    s = AdapterStore(tmp_path / "store", create=True)
    s.packs = {"a1": small_packed(1, 1), "b3": small_packed(2, 3, projs={"attn_q", "ffn_down"}),
               "c5": small_packed(3, 5, layers=[1])}
    for i, (name, p) in enumerate(s.packs.items()):
        s.put(name, p, fingerprint=FP, card={"description": f"adapter {i}"}, durable=False)
    yield s
    s.close()


def stray_tmp(s: AdapterStore) -> list:
    return sorted(s.data.glob(".*.tmp"))


def intact(s: AdapterStore, packs: dict) -> None:
    """Every adapter of `packs` reads back byte for byte (through a fresh handle, too)."""
    fresh = AdapterStore(s.root)
    try:
        for handle in (s, fresh):
            for name, p in packs.items():
                got = handle.packed(name)
                np.testing.assert_array_equal(got.payload, p.payload, err_msg=name)
                assert got.groups == p.groups
    finally:
        fresh.close()


# --- round trips and the index -----------------------------------------------------------------

def test_put_record_round_trip_and_index(store):
    intact(store, store.packs)
    assert store.names() == ["a1", "b3", "c5"] and len(store) == 3 and "b3" in store
    assert "zz" not in store
    for name, p in store.packs.items():
        row = store.get(name)
        assert (row.name, row.fingerprint, row.nbytes) == (name, FP, p.nbytes)
        assert row.ranks == p.ranks() and row.groups == p.groups
        assert row.card == {"description": f"adapter {list(store.packs).index(name)}",
                            "keywords": [], "example_prompts": []}
        rec = store.record(name)
        assert rec.nbytes == p.nbytes and rec.payload_offset % 64 == 0
        np.testing.assert_array_equal(np.asarray(rec.array()), p.payload)
        dst = np.zeros(p.nbytes + 64, np.uint8)
        rec.copy_into(dst[64:])                     # into an extent of a bigger arena
        np.testing.assert_array_equal(dst[64:], p.payload)
        assert not dst[:64].any()
    assert store.get("b3").ranks == {"qkv": [3, 0, 0], "down": [3]}
    assert store.get("c5").ranks == {g: [5] * len(r) for g, r in store.get("a1").ranks.items()}
    assert [r.name for r in store.rows()] == store.names()
    assert store.rows()[0].to_json()["ranks"] == store.get("a1").ranks
    # Replacing an adapter replaces both the file and the row.
    new = small_packed(9, 2)
    store.put("b3", new, fingerprint=FP, durable=False)
    intact(store, {**store.packs, "b3": new})
    assert store.get("b3").nbytes == new.nbytes and store.get("b3").card["description"] == ""


def test_remove_and_list(store):
    path = store.file("b3")
    store.remove("b3")
    assert store.names() == ["a1", "c5"] and not path.exists()
    with pytest.raises(AdapterError, match="'b3' is not in the store"):
        store.get("b3")
    with pytest.raises(AdapterError, match="'b3' is not in the store"):
        store.record("b3")
    with pytest.raises(AdapterError, match="'b3' is not in the store"):
        store.remove("b3")
    intact(store, {n: store.packs[n] for n in ("a1", "c5")})


def tiny_peft(directory, seed: int, rank: int = 4, card: dict | None = None, **config):
    """A PEFT adapter for the tiny model's shapes (tests/tiny_model.py default spec)."""
    d = write_peft(directory, peft_tensors(hf_pairs(rank=rank, seed=seed)), r=rank,
                   lora_alpha=2 * rank, **config)
    if card is not None:
        (d / "card.json").write_text(json.dumps(card))
    return d


def test_import_peft_and_gguf_lora(tmp_path):
    s = AdapterStore(tmp_path / "store", create=True)
    card = {"description": "answers in SQL", "keywords": ["sql", "database"],
            "example_prompts": ["list all users", "count orders by day"]}
    peft = tiny_peft(tmp_path / "sql-helper", seed=1, rank=4, card=card)
    pairs = hf_pairs(rank=2, seed=2)
    gg = write_gguf_lora(tmp_path / "poet.gguf", gguf_tensors(pairs), alpha=4.0)
    (tmp_path / "poet.card.json").write_text(json.dumps({"keywords": ["poems"]}))

    assert s.import_adapter(peft, TINY_CFG, FP, scale=0.5) == "imported"
    assert s.import_adapter(gg, TINY_CFG, FP, card={"description": "rhymes"}) == "imported"
    assert s.names() == ["poet", "sql-helper"]                      # dir name and file stem

    row = s.get("sql-helper")
    assert row.card == card and row.fingerprint == FP and row.scale == 0.5
    assert row.source == str(peft.resolve())
    assert row.ranks == {"qkv": [4, 4, 4], "o": [4], "gate_up": [4, 4], "down": [4]}
    assert s.get("poet").card == {"description": "rhymes", "keywords": ["poems"], "example_prompts": []}
    assert s.get("poet").ranks == {g: [2] * len(r) for g, r in row.ranks.items()}
    # What comes back is what packing the loaded source gives (formats.py is the reference).
    for name, src, scale in (("sql-helper", peft, 0.5), ("poet", gg, 1.0)):
        want = pack(load_adapter(src, TINY_CFG, scale=scale), TINY_CFG)
        got = s.packed(name)
        assert got.groups == want.groups and s.get(name).nbytes == want.nbytes
        np.testing.assert_array_equal(got.payload, want.payload)
    # and A rows / scales are the file's, fp16-rounded (o_proj: no q/k row permutation).
    a, _, sc = s.packed("sql-helper").sections(TINY_CFG, "o")
    a_file, _ = hf_pairs(rank=4, seed=1)[(1, "attn_output")]
    np.testing.assert_array_equal(a[1].view(np.float16), a_file.astype(np.float16))
    np.testing.assert_array_equal(sc, np.float32(2 * 4 / 4 * 0.5))
    s.close()


def test_import_is_idempotent_and_force_redoes_it(tmp_path):
    s = AdapterStore(tmp_path / "store", create=True)
    src = tiny_peft(tmp_path / "ad", seed=3)
    assert s.import_adapter(src, TINY_CFG, FP) == "imported"
    first = s.get("ad")
    assert s.import_adapter(src, TINY_CFG, FP) == "unchanged"
    assert s.get("ad").imported == first.imported                      # nothing rewritten
    time.sleep(0.01)
    assert s.import_adapter(src, TINY_CFG, FP, force=True) == "imported"
    assert s.get("ad").imported > first.imported
    # Anything that changes the result is a re-import: scale, base model, source bytes, lost file.
    assert s.import_adapter(src, TINY_CFG, FP, scale=2.0) == "imported"
    assert s.import_adapter(src, TINY_CFG, FP, scale=2.0) == "unchanged"
    assert s.import_adapter(src, TINY_CFG, "gguf-sha256:other", scale=2.0) == "imported"
    tiny_peft(src, seed=4)                                              # new weights, same dir
    assert s.import_adapter(src, TINY_CFG, "gguf-sha256:other", scale=2.0) == "imported"
    s.file("ad").unlink()
    assert s.import_adapter(src, TINY_CFG, "gguf-sha256:other", scale=2.0) == "imported"
    want = pack(load_adapter(src, TINY_CFG, scale=2.0), TINY_CFG)
    np.testing.assert_array_equal(s.packed("ad").payload, want.payload)
    assert len(s) == 1 and not stray_tmp(s)
    s.close()


def test_interrupted_import_loop_can_be_rerun(tmp_path, monkeypatch):
    s = AdapterStore(tmp_path / "store", create=True)
    sources = [tiny_peft(tmp_path / "src" / f"ad{i}", seed=10 + i, rank=1 + i) for i in range(5)]
    real_put, calls = AdapterStore.put, []

    def put_then_die(self, name, *args, **kw):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt                                     # ^C half-way through
        return real_put(self, name, *args, **kw)

    monkeypatch.setattr(AdapterStore, "put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        for src in sources:
            s.import_adapter(src, TINY_CFG, FP)
    monkeypatch.undo()
    assert s.names() == ["ad0", "ad1"]
    assert [s.import_adapter(src, TINY_CFG, FP) for src in sources] == \
        ["unchanged", "unchanged", "imported", "imported", "imported"]
    for i, src in enumerate(sources):
        np.testing.assert_array_equal(s.packed(f"ad{i}").payload,
                                      pack(load_adapter(src, TINY_CFG), TINY_CFG).payload)
    s.close()


def test_kill_between_file_and_rename_leaves_one_stray_tmp(store, monkeypatch):
    # The process dies inside put after writing the temporary file: the old adapters are intact,
    # the new one is absent, and clean() (run by `edgelora adapters import`) removes the debris.
    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        store.put("d7", small_packed(7, 7), fingerprint=FP, durable=False)
    monkeypatch.undo()
    assert len(stray_tmp(store)) == 1 and "d7" not in store
    reopened = AdapterStore(store.root)
    assert reopened.names() == ["a1", "b3", "c5"]
    intact(reopened, store.packs)
    assert reopened.clean() == 1 and not stray_tmp(store)
    reopened.close()


# --- faults --------------------------------------------------------------------------------------

def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_truncated_file(store):
    rec = store.record("b3")
    path = store.file("b3")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(AdapterError, match=r"'b3'.*b3\.ela is truncated"):
        store.record("b3")
    with pytest.raises(AdapterError, match=r"'b3'.*is truncated \(\d+ of \d+ payload bytes\)"):
        rec.copy_into(np.zeros(rec.nbytes, np.uint8))              # cut after it was opened
    with open(path, "r+b") as f:
        f.truncate(10)                                              # inside the fixed header
    with pytest.raises(AdapterError, match="'b3'.*not an adapter store file"):
        store.record("b3")
    intact(store, {n: store.packs[n] for n in ("a1", "c5")})


def test_corrupted_payload_byte_fails_the_checksum(store):
    rec = store.record("c5")
    flip_byte(store.file("c5"), rec.payload_offset + rec.nbytes // 2)
    rec = store.record("c5")                                        # the header still agrees
    with pytest.raises(AdapterError, match=r"'c5'.*c5\.ela is corrupted \(checksum mismatch\)"):
        rec.copy_into(np.zeros(rec.nbytes, np.uint8))
    with pytest.raises(AdapterError, match="'c5'.*corrupted"):
        store.packed("c5")
    intact(store, {n: store.packs[n] for n in ("a1", "b3")})


def test_corrupted_header(store):
    path = store.file("a1")
    data = bytearray(path.read_bytes())
    data[8] = 2                                                     # format version 2
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="'a1'.*format version 2, this engine reads 1"):
        store.record("a1")
    data[8] = 1
    data[16] = ord("[")                                             # JSON header broken
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="'a1'.*unreadable header"):
        store.record("a1")
    path.write_bytes(b"NOTMAGIC" + bytes(data[8:]))
    with pytest.raises(AdapterError, match="'a1'.*not an adapter store file"):
        store.record("a1")


def test_files_swapped_between_adapters(store):
    a, c = store.file("a1"), store.file("c5")
    tmp = a.with_name("swap")
    a.rename(tmp)
    c.rename(a)
    tmp.rename(c)
    for name in ("a1", "c5"):
        with pytest.raises(AdapterError, match=f"'{name}'.*the index disagrees with .* about 'name'"):
            store.record(name)
    intact(store, {"b3": store.packs["b3"]})


@pytest.mark.parametrize("column, value, key", [
    ("crc32", 12345, "crc32"),
    ("nbytes", 64, "payload_bytes"),
    ("fingerprint", "gguf-sha256:other", "fingerprint"),
    ("groups", json.dumps({"o": {"ranks": [1], "layers": [0], "a": 0, "b": 64, "s": 128}}), "groups"),
])
def test_index_row_edited_behind_the_stores_back(store, column, value, key):
    db = sqlite3.connect(store.root / "index.sqlite")
    with db:
        db.execute(f"UPDATE adapters SET {column} = ? WHERE name = 'b3'", (value,))
    db.close()
    with pytest.raises(AdapterError, match=f"'b3'.*the index disagrees with .*b3.ela about '{key}'"):
        store.record("b3")
    intact(store, {n: store.packs[n] for n in ("a1", "c5")})


def test_file_removed_from_disk(store):
    store.file("a1").unlink()
    assert "a1" in store                                            # the row is still there
    with pytest.raises(AdapterError, match=r"'a1'.*a1\.ela is missing"):
        store.record("a1")
    store.remove("a1")                                              # and can be removed
    assert store.names() == ["b3", "c5"]


class FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("name, room", [("new", 100), ("new", 1000), ("b3", 200)])
def test_full_disk_during_put(store, monkeypatch, name, room):
    def full_open(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return FullDisk(f, room) if "w" in mode else f

    monkeypatch.setattr(store_mod, "open", full_open, raising=False)
    with pytest.raises(AdapterError, match=f"adapter '{name}': could not be written .*the disk is full"):
        store.put(name, small_packed(8, 6), fingerprint=FP)
    monkeypatch.undo()
    assert not stray_tmp(store)
    assert store.names() == ["a1", "b3", "c5"]
    intact(store, store.packs)                                      # b3: still the old version


@pytest.mark.parametrize("bad", ["", ".hidden", "../escape", "a/b", "with space", "x" * 129, "é", None])
def test_bad_names(store, tmp_path, bad):
    with pytest.raises(AdapterError, match="bad adapter name"):
        store.put(bad, store.packs["a1"], fingerprint=FP)
    with pytest.raises(AdapterError, match="bad adapter name"):
        store.file(bad)
    if bad:
        with pytest.raises(AdapterError, match="bad adapter name"):
            store.import_adapter(tmp_path, TINY_CFG, FP, name=bad)
    assert store.names() == ["a1", "b3", "c5"] and not stray_tmp(store)
    assert sorted(p.name for p in store.data.iterdir()) == ["a1.ela", "b3.ela", "c5.ela"]


def test_not_a_store(tmp_path):
    with pytest.raises(AdapterError, match="not an adapter store.*no index.sqlite"):
        AdapterStore(tmp_path)
    with pytest.raises(AdapterError, match="not an adapter store"):
        AdapterStore(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "data").exists()
    (tmp_path / "index.sqlite").write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(AdapterError, match="unreadable store index"):
        AdapterStore(tmp_path)
    with pytest.raises(AdapterError, match="source .*missing.* not found"):
        AdapterStore(tmp_path / "s", create=True).import_adapter(tmp_path / "missing", TINY_CFG, FP)


def test_model_fingerprint_tells_models_apart(tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf", TinySpec(seed=1))
    b = write_tiny_model(tmp_path / "b.gguf", TinySpec(seed=2))        # same shapes, other weights
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(a) and fa.startswith("gguf-sha256:") and fa != model_fingerprint(b)


# --- an engine serving from the store ---------------------------------------------------------------

PROMPTS = [[5, 17, 42, 99], [7, 8, 9], [250, 3, 31, 64, 64, 12], [120, 121], [44, 45, 46, 47, 48],
           [200, 100, 50]]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and a store of six adapters for it, ranks 6-8 (three do not fit in two)."""
    root = tmp_path_factory.mktemp("tiny")
    path = write_tiny_model(root / "tiny.gguf", TinySpec(seed=3))
    model = el.load_model(path, progress=False)
    cfg, rng = model.config, np.random.default_rng(42)
    store = AdapterStore(root / "store", create=True)
    packs = {}
    for i, rank in enumerate([6, 7, 8, 6, 7, 8]):
        adapter = random_adapter(cfg, rng, rank)
        for pair in adapter.pairs.values():
            pair.a *= 0.5
        packs[f"t{i}"] = pack(adapter, cfg)
        store.put(f"t{i}", packs[f"t{i}"], fingerprint=model.fingerprint, durable=False)
    ref = el.Engine(model, store=store, max_seqs=1)
    alone = {(name, i): ref.submit(p, adapter=name, temperature=0.0, max_tokens=MAX_TOKENS,
                                   ignore_eos=True).run().token_ids
             for name in packs for i, p in enumerate(PROMPTS)}
    base = [model.generate(p, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True).run().token_ids
            for p in PROMPTS]
    # The adapters act: each one changes some answer, and they differ from each other.
    assert all(any(alone[(n, i)] != base[i] for i in range(len(PROMPTS))) for n in packs)
    assert len({tuple(alone[(n, 0)]) for n in packs}) > 1
    return model, store, packs, alone


def copy_store(src: AdapterStore, dst) -> AdapterStore:
    """A copy of a store (so a test can corrupt its own)."""
    s = AdapterStore(dst, create=True)
    for name in src.names():
        row = src.get(name)
        s.put(name, src.packed(name), fingerprint=row.fingerprint, card=row.card, durable=False)
    return s


def drive(engine, budget=None, max_steps=500):
    """Step until every request is done; returns the largest bytes_resident and pinned seen."""
    peak_bytes = peak_pinned = 0
    for _ in range(max_steps):
        if not engine.pending:
            break
        engine.step()
        s = engine.adapter_stats()
        peak_bytes, peak_pinned = max(peak_bytes, s.bytes_resident), max(peak_pinned, s.pinned)
        if budget is not None:
            assert s.bytes_resident <= budget
    assert not engine.pending, "requests still pending"
    return peak_bytes, peak_pinned


def test_corrupted_adapter_fails_only_its_request(tiny, tmp_path):
    model, clean, packs, alone = tiny
    store = copy_store(clean, tmp_path / "store")
    engine = el.Engine(model, store=store, max_seqs=8, background=False)
    rec = store.record("t2")
    flip_byte(store.file("t2"), rec.payload_offset + 7)
    jobs = [(name, i) for i in range(2) for name in ("t0", "t1", "t2", "t3")]
    gens = [engine.submit(PROMPTS[i], adapter=name, temperature=0.0, max_tokens=MAX_TOKENS,
                          ignore_eos=True) for name, i in jobs]
    drive(engine)
    for (name, i), gen in zip(jobs, gens):
        if name == "t2":
            assert gen.finish_reason == "error" and isinstance(gen.error, AdapterError)
            assert "'t2'" in str(gen.error) and "checksum" in str(gen.error)
            with pytest.raises(AdapterError, match="'t2'"):
                gen.run()
        else:
            assert gen.run().token_ids == alone[(name, i)], (name, i)
            assert gen.finish_reason == "length"
    s = engine.adapter_stats()
    assert "t2" not in engine.pool and s.load_failures >= 1 and s.pinned == 0
    assert all(engine.pool.pins(n) == 0 for n in packs)
    # A repaired file is served again (nothing about the failure sticks).
    store.put("t2", packs["t2"], fingerprint=model.fingerprint, durable=False)
    gen = engine.submit(PROMPTS[0], adapter="t2", temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    drive(engine)
    assert gen.run().token_ids == alone[("t2", 0)]


def test_adapter_for_another_base_model_is_refused_at_submit(tiny, tmp_path):
    model, clean, packs, _ = tiny
    store = copy_store(clean, tmp_path / "store")
    store.put("alien", packs["t0"], fingerprint="gguf-sha256:" + "0" * 32, durable=False)
    engine = el.Engine(model, store=store)
    with pytest.raises(AdapterError, match="'alien' was imported for another base model"):
        engine.submit(PROMPTS[0], adapter="alien", max_tokens=2)
    with pytest.raises(AdapterError, match="'nope' is not loaded"):
        engine.submit(PROMPTS[0], adapter="nope", max_tokens=2)
    assert engine.pending == 0 and engine.adapter_stats().loads == 0
    assert engine.submit(PROMPTS[0], adapter="t0", max_tokens=2, temperature=0.0).run().finish_reason


def test_small_pool_serves_six_adapters_with_evictions(tiny, tmp_path, monkeypatch):
    model, clean, packs, alone = tiny
    sizes = sorted(p.nbytes for p in packs.values())
    budget_bytes = 2 * sizes[-1] + 64                     # any two fit, no three do
    assert sum(sizes[:3]) > budget_bytes
    engine = el.Engine(model, store=clean, max_seqs=8, adapter_pool_mb=budget_bytes / 2**20,
                       policy="lfu", background=False)
    budget = engine.pool.budget
    assert budget < sum(sizes[:3])
    names = list(packs)
    jobs = [(names[(i + k) % 6], i) for k in range(2) for i in range(len(PROMPTS))]
    gens = [engine.submit(PROMPTS[i], adapter=name, temperature=0.0, max_tokens=MAX_TOKENS,
                          ignore_eos=True) for name, i in jobs]
    peak_bytes, peak_pinned = drive(engine, budget)
    for (name, i), gen in zip(jobs, gens):
        assert gen.run().token_ids == alone[(name, i)], (name, i)
    s = engine.adapter_stats()
    assert s.evictions > 0 and s.loads >= len(names) and peak_bytes <= budget
    assert peak_pinned == 2                                # two adapters' requests ran together
    assert s.pinned == 0 and all(engine.pool.pins(n) == 0 for n in names)

    # A cancelled request and one whose forward fails release their pins too.
    cancelled = engine.submit(PROMPTS[0], adapter="t0", temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.step()
    engine.step()
    assert engine.pool.pins("t0") == 1
    cancelled.cancel()
    engine.step()
    assert cancelled.finish_reason == "cancelled" and engine.pool.pins("t0") == 0
    waiting = [engine.submit(PROMPTS[1], adapter=n, max_tokens=40) for n in ("t1", "t2", "t3")]
    waiting[2].cancel()                                    # cancelled before it ever ran
    real_forward = model.llama.forward

    def broken_forward(*args, **kw):
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(model.llama, "forward", broken_forward)
    engine.step()
    monkeypatch.setattr(model.llama, "forward", real_forward)
    assert [g.finish_reason for g in waiting] == ["error", "error", "cancelled"]
    assert "injected forward failure" in str(waiting[0].error)
    assert engine.pending == 0 and engine.adapter_stats().pinned == 0
    assert all(engine.pool.pins(n) == 0 for n in names)
    assert engine.cache.free_tokens == engine.cache.n_pages * PAGE_SIZE


def test_background_engine_with_prefetcher_and_a_corrupted_adapter(tiny, tmp_path):
    model, clean, packs, alone = tiny
    store = copy_store(clean, tmp_path / "store")
    sizes = sorted(p.nbytes for p in packs.values())
    engine = el.Engine(model, store=store, max_seqs=6, adapter_pool_mb=(2 * sizes[-1] + 64) / 2**20)
    rec = store.record("t4")
    flip_byte(store.file("t4"), rec.payload_offset + rec.nbytes - 1)
    engine.start()
    try:
        jobs = [(n, i) for i, n in enumerate(packs)]
        gens = [engine.submit(PROMPTS[i], adapter=n, temperature=0.0, max_tokens=MAX_TOKENS,
                              ignore_eos=True) for n, i in jobs]
        deadline = time.monotonic() + 60
        while not all(g.done for g in gens) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(g.done for g in gens), "the engine did not finish in 60 s"
    finally:
        engine.close()
    for (name, i), gen in zip(jobs, gens):
        if name == "t4":
            assert gen.finish_reason == "error" and "'t4'" in str(gen.error)
        else:
            assert gen.finish_reason == "length" and gen.token_ids == alone[(name, i)], name
    s = engine.adapter_stats()
    assert s.bytes_resident <= engine.pool.budget and s.evictions > 0 and s.pinned == 0
    assert all(engine.pool.pins(n) == 0 for n in packs)
