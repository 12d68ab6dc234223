"""The adapter store: thousands of adapters on disk, converted once into the engine's layout.

    STORE/
      index.sqlite      one row per adapter: name, base-model fingerprint, ranks, bytes,
                        checksum, card (description, keywords, example prompts), source;
                        and the router's vectors of each card (table router_vectors)
      data/NAME.ela     one file per adapter: a small header, then the packed payload

A .ela file ("edgelora adapter") is what the pool copies into its arena, nothing to convert:

    bytes 0..7    b"EDGELORA"
          8..11   format version, uint32 little-endian (1)
          12..15  header length h, uint32
          16..    header, h bytes of JSON: name, fingerprint, groups (packed.py layouts),
                  payload_bytes, crc32 of the payload
          then    zero padding to a 64-byte boundary, then the payload (packed.py)

The payload can be memory-mapped or read straight into the pool (`StoredRecord.copy_into` reads
it into the arena with one `readinto` and checks its crc32: about 1 ms per 5 MB).

Writing is crash-safe in the simple way: the file is written under a temporary name, flushed,
renamed into place, and only then is the index row committed. An interrupted import leaves
every adapter already imported readable, plus at most one stray temporary file (removed by
the next import). Importing the same source again is a no-op (the index keeps its sha256), so
a long import can simply be re-run after an interruption.

The base-model fingerprint (`model_fingerprint`) hashes the GGUF header (architecture, shapes,
quant types, tokenizer) and samples of the weights, so an adapter imported for one base model
is refused by an engine serving another, even one with identical shapes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sqlite3
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora_np.adapters.packed import ALIGN, GroupLayout, PackedAdapter, pack
from edgelora_np.errors import AdapterError, StoreWriteError

MAGIC = b"EDGELORA"
VERSION = 1
SUFFIX = ".ela"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CARD_FILE = "card.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    groups TEXT NOT NULL,            -- JSON: packed.py layouts (ranks per part, offsets)
    nbytes INTEGER NOT NULL,         -- payload bytes (what the adapter takes in the pool)
    crc32 INTEGER NOT NULL,
    card TEXT NOT NULL,              -- JSON: description, keywords, example_prompts
    source TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    scale REAL NOT NULL,
    imported REAL NOT NULL
);
-- The router's summary of each card's example prompts (router/index.py). Added after the first
-- stores were written: opening an older store creates it empty, and the router fills it in.
CREATE TABLE IF NOT EXISTS router_vectors (
    name TEXT NOT NULL,              -- an adapter, or the router's own "(base model)" card
    spec TEXT NOT NULL,              -- what was embedded: base model, layers, pooling
    card_sha256 TEXT NOT NULL,       -- of the example prompts embedded: stale when they change
    n INTEGER NOT NULL,              -- how many prompts
    dim INTEGER NOT NULL,            -- D
    moments BLOB NOT NULL,           -- float32 [2, D]: sum and sum of squares of the embeddings
    PRIMARY KEY (name, spec)
);
"""


def model_fingerprint(path: str | os.PathLike, *, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A short identity of a GGUF base model: its first 4 MiB and evenly spaced samples."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        for i in range(samples):
            f.seek(size * (2 * i + 1) // (2 * samples))
            h.update(f.read(sample_bytes))
    return "gguf-sha256:" + h.hexdigest()[:32]


AUTO = "auto"           # not an adapter: a request naming it asks the router to choose


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdapterError(f"bad adapter name {name!r}: use 1-128 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit")
    if name == AUTO:
        raise AdapterError(f"the adapter name {AUTO!r} is reserved: requests use it to let the "
                           "router choose")
    return name


def read_card(source: Path) -> dict:
    """The adapter card next to a PEFT directory's files (card.json), or an empty card."""
    path = source / CARD_FILE if source.is_dir() else source.with_suffix(".card.json")
    card = {"description": "", "keywords": [], "example_prompts": []}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise AdapterError(f"{path}: unreadable adapter card: {e}") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{path}: an adapter card must be a JSON object")
        card.update(data)
    return card


def _source_sha256(source: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredAdapter:
    """One index row."""

    name: str
    fingerprint: str
    groups: dict[str, GroupLayout]
    nbytes: int
    crc32: int
    card: dict
    source: str
    source_sha256: str
    scale: float
    imported: float

    @property
    def ranks(self) -> dict[str, list[int]]:
        return {g: list(lay.ranks) for g, lay in self.groups.items()}

    @property
    def content_fingerprint(self) -> str:
        """The identity of the packed weights: the source's hash, the import scale, and the
        payload's size, layout and checksum (the prefix cache keys KV pages by it)."""
        layout = sorted((g, lay.to_json()) for g, lay in self.groups.items())
        text = repr((self.source_sha256, self.scale, self.nbytes, self.crc32, layout))
        return "ela-sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "ranks": self.ranks,
                "nbytes": self.nbytes, "card": self.card, "source": self.source,
                "scale": self.scale}


class StoredRecord:
    """An adapter's file, checked against its index row; `copy_into` fills a pool extent."""

    def __init__(self, path: Path, row: StoredAdapter, payload_offset: int):
        self.path, self.row, self.payload_offset = path, row, payload_offset
        self.groups, self.nbytes = row.groups, row.nbytes
        self.fingerprint = row.content_fingerprint    # of the content (pool.fingerprint)

    def copy_into(self, dst: np.ndarray) -> None:
        name = self.row.name
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.payload_offset)
                got = f.readinto(memoryview(dst))
        except OSError as e:
            raise AdapterError(f"adapter {name!r}: cannot read {self.path}: {e.strerror}") from None
        if got != self.nbytes:
            raise AdapterError(f"adapter {name!r}: {self.path} is truncated "
                               f"({got} of {self.nbytes} payload bytes)")
        if zlib.crc32(dst) != self.row.crc32:
            raise AdapterError(f"adapter {name!r}: {self.path} is corrupted (checksum mismatch)")

    def array(self) -> np.ndarray:
        """The payload, memory-mapped read-only (inspection; the pool uses copy_into)."""
        return np.memmap(self.path, np.uint8, mode="r", offset=self.payload_offset, shape=(self.nbytes,))


class AdapterStore:
    def __init__(self, root: str | os.PathLike, *, create: bool = False):
        self.root = Path(root)
        self.data = self.root / "data"
        index = self.root / "index.sqlite"
        if not index.is_file():
            if not create:
                raise AdapterError(f"{self.root}: not an adapter store (no index.sqlite); create one "
                                   "with `edgelora adapters import SRC --store DIR`")
            self.data.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(index, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:   # a corrupted schema's text
            raise AdapterError(f"{index}: unreadable store index: {e}") from None
        self.data.mkdir(exist_ok=True)

    def close(self) -> None:
        self._db.close()

    # --- reading ------------------------------------------------------------------------------

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
                raise AdapterError(f"{self.root}/index.sqlite: {e}") from None

    def _row(self, r) -> StoredAdapter:
        """An index row, its JSON columns decoded and every column checked for type."""
        try:
            groups = {g: GroupLayout.from_json(d) for g, d in json.loads(r[2]).items()}
            card = json.loads(r[5])
            row = StoredAdapter(r[0], r[1], groups, int(r[3]), int(r[4]), card, r[6], r[7],
                                float(r[8]), float(r[9]))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                RecursionError) as e:
            raise AdapterError(f"{self.root}/index.sqlite: the row of adapter {r[0]!r} is "
                               f"corrupted ({type(e).__name__}: {e}); re-import the adapter") from None
        if not all(isinstance(x, str) for x in (row.name, row.fingerprint, row.source,
                                                row.source_sha256)) \
                or not isinstance(card, dict) or row.nbytes < 0 or not 0 <= row.crc32 < 1 << 32:
            raise AdapterError(f"{self.root}/index.sqlite: the row of adapter {r[0]!r} is "
                               f"corrupted; re-import the adapter")
        return row

    def names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM adapters ORDER BY name")]

    def fingerprints(self) -> dict[str, str]:
        """name -> base-model fingerprint of every adapter (light: what an engine keeps)."""
        return dict(self._query("SELECT name, fingerprint FROM adapters"))

    def cards(self) -> dict[str, dict]:
        """name -> card of every adapter (lighter than rows(): what a router reads)."""
        out = {}
        for name, card in self._query("SELECT name, card FROM adapters ORDER BY name"):
            try:
                out[name] = json.loads(card)
            except (TypeError, ValueError, RecursionError) as e:
                raise AdapterError(f"{self.root}/index.sqlite: the card of adapter {name!r} is "
                                   f"corrupted: {e}") from None
        return out

    def present(self, names: list[str]) -> set[str]:
        """Which of `names` are in the store now."""
        if not names:
            return set()
        marks = ",".join("?" * len(names))
        return {r[0] for r in self._query(f"SELECT name FROM adapters WHERE name IN ({marks})",
                                          tuple(names))}

    def router_vectors(self, spec: str) -> dict[str, tuple[str, int, int, bytes]]:
        """name -> (card_sha256, n, dim, moments blob) of every vector row made under `spec`."""
        return {r[0]: tuple(r[1:]) for r in self._query(
            "SELECT name, card_sha256, n, dim, moments FROM router_vectors WHERE spec = ?", (spec,))}

    def put_router_vectors(self, name: str, spec: str, card_sha256: str, n: int, dim: int,
                           moments: bytes) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO router_vectors VALUES (?,?,?,?,?,?)",
                                 (name, spec, card_sha256, int(n), int(dim), moments))
            except sqlite3.DatabaseError as e:
                raise AdapterError(f"adapter {name!r}: the store index could not be updated: "
                                   f"{e}") from None

    def rows(self) -> list[StoredAdapter]:
        return [self._row(r) for r in self._query("SELECT * FROM adapters ORDER BY name")]

    def get(self, name: str) -> StoredAdapter:
        rows = self._query("SELECT * FROM adapters WHERE name = ?", (name,))
        if not rows:
            raise AdapterError(f"adapter {name!r} is not in the store {self.root}")
        return self._row(rows[0])

    def __contains__(self, name: str) -> bool:
        return bool(self._query("SELECT 1 FROM adapters WHERE name = ?", (name,)))

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM adapters")[0][0]

    def file(self, name: str) -> Path:
        try:
            return self.data / (check_name(name) + SUFFIX)
        except AdapterError as e:          # a name from a corrupted index, or from a request
            raise AdapterError(f"{self.root}: {e}") from None

    def record(self, name: str, row: StoredAdapter | None = None) -> StoredRecord:
        """Open an adapter's file and check its header against the index row."""
        row = row or self.get(name)
        path = self.file(name)
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                size = os.fstat(f.fileno()).st_size
                if len(head) < 16 or head[:8] != MAGIC:
                    raise AdapterError(f"adapter {name!r}: {path} is not an adapter store file")
                version, h_len = struct.unpack("<II", head[8:16])
                if version != VERSION:
                    raise AdapterError(f"adapter {name!r}: {path} has format version {version}, "
                                       f"this engine reads {VERSION}")
                if 16 + h_len > size:                # checked before reading h_len bytes
                    raise AdapterError(f"adapter {name!r}: {path} is truncated (a {h_len}-byte "
                                       f"header in a {size}-byte file)")
                header = json.loads(f.read(h_len))
        except FileNotFoundError:
            raise AdapterError(f"adapter {name!r}: its file {path} is missing (removed from "
                               "disk?); re-import it or remove it from the store") from None
        except (OSError, ValueError, RecursionError) as e:      # RecursionError: deep nesting
            raise AdapterError(f"adapter {name!r}: unreadable header in {path}: "
                               f"{type(e).__name__}: {e}") from None
        offset = -(-(16 + h_len) // ALIGN) * ALIGN
        want = {"name": row.name, "fingerprint": row.fingerprint, "payload_bytes": row.nbytes,
                "crc32": row.crc32, "groups": {g: lay.to_json() for g, lay in row.groups.items()}}
        if not isinstance(header, dict):
            raise AdapterError(f"adapter {name!r}: unreadable header in {path}: not a JSON object")
        for key, value in want.items():
            if header.get(key) != value:
                raise AdapterError(f"adapter {name!r}: the index disagrees with {path} about "
                                   f"{key!r}; re-import the adapter")
        if size < offset + row.nbytes:
            raise AdapterError(f"adapter {name!r}: {path} is truncated ({size} bytes, expected "
                               f"{offset + row.nbytes})")
        return StoredRecord(path, row, offset)

    def packed(self, name: str) -> PackedAdapter:
        """The whole adapter in memory, checked (tests, inspection)."""
        rec = self.record(name)
        buf = np.empty(rec.nbytes, np.uint8)
        rec.copy_into(buf)
        return PackedAdapter(rec.groups, buf)

    # --- writing ------------------------------------------------------------------------------

    def put(self, name: str, packed: PackedAdapter, *, fingerprint: str, card: dict | None = None,
            source: str = "", source_sha256: str = "", scale: float = 1.0, durable: bool = True) -> None:
        """Write one adapter (replacing any of the same name), file first, then its index row."""
        check_name(name)
        payload = np.ascontiguousarray(packed.payload)
        crc = zlib.crc32(payload)
        groups = {g: lay.to_json() for g, lay in packed.groups.items()}
        header = json.dumps({"name": name, "fingerprint": fingerprint, "groups": groups,
                             "payload_bytes": int(payload.nbytes), "crc32": crc}).encode()
        head = MAGIC + struct.pack("<II", VERSION, len(header)) + header
        head += b"\0" * (-len(head) % ALIGN)
        target = self.file(name)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(memoryview(payload))
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            why = "the disk is full" if full else e.strerror or str(e)
            raise StoreWriteError(f"adapter {name!r}: could not be written to {self.root}: "
                                  f"{why}; the store is unchanged", disk_full=full) from None
        card = {"description": "", "keywords": [], "example_prompts": [], **(card or {})}
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?)",
                                 (name, fingerprint, json.dumps(groups), int(payload.nbytes), crc,
                                  json.dumps(card), source, source_sha256, float(scale), time.time()))
            except sqlite3.DatabaseError as e:     # e.g. "database or disk is full"
                raise StoreWriteError(f"adapter {name!r}: the store index could not be updated: "
                                      f"{e}; the adapter is not in the store",
                                      disk_full=isinstance(e, sqlite3.OperationalError)
                                      and "full" in str(e)) from None

    def import_adapter(self, source: str | os.PathLike, cfg, fingerprint: str, *,
                       name: str | None = None, scale: float = 1.0, card: dict | None = None,
                       force: bool = False, origin: str | None = None) -> str:
        """Convert a PEFT directory or GGUF-LoRA file into the store; returns "imported" or
        "unchanged" (same name, same source bytes, same scale and base: nothing to do).
        `origin`: the source recorded in the index (default: the resolved path; a server
        loading from a private copy records where the copy came from)."""
        from edgelora_np.adapters.formats import load_adapter

        source = Path(source)
        name = check_name(name or (source.name if source.is_dir() else source.stem))
        if not source.exists():
            raise AdapterError(f"adapter {name!r}: source {source} not found")
        if not (source.is_file() or source.is_dir()):      # reading a FIFO or device never ends
            raise AdapterError(f"adapter {name!r}: source {source} is not a regular file or "
                               "directory")
        sha = _source_sha256(source)
        card = {**read_card(source), **(card or {})}
        if not force and name in self:
            old = self.get(name)
            if (old.source_sha256, old.scale, old.fingerprint, old.card) == \
                    (sha, float(scale), fingerprint, card) and self.file(name).is_file():
                return "unchanged"
        adapter = load_adapter(source, cfg, scale=scale, name=name)
        self.put(name, pack(adapter, cfg), fingerprint=fingerprint, card=card,
                 source=origin or str(source.resolve()), source_sha256=sha, scale=scale)
        return "imported"

    def remove(self, name: str) -> None:
        self.get(name)
        with self._lock:
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            self._db.execute("DELETE FROM router_vectors WHERE name = ?", (name,))
        with contextlib.suppress(FileNotFoundError):
            self.file(name).unlink()

    def clean(self) -> int:
        """Remove stray temporary files of interrupted imports; returns how many."""
        stray = list(self.data.glob(".*.tmp"))
        for p in stray:
            with contextlib.suppress(OSError):
                p.unlink()
        return len(stray)


