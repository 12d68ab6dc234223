"""Faults while serving (issue #17): damaged adapter files, a locked or corrupted store index, a
full disk during an import, an exception in an engine step, SIGTERM with requests in flight.

Each fault is made for real where the machine allows it: files are deleted, truncated and
overwritten under the running server, another sqlite connection holds the index's write lock,
the import's temporary file is a symlink to /dev/full (the kernel's ENOSPC), SIGTERM is sent to
an `edgelora serve` process. Only the engine fault is injected (a forward that raises once).
The contract, checked for each: the requests the fault touches get a clear error naming it,
every other request completes (its greedy tokens equal to the same request on a healthy
server), and afterwards nothing is running, pinned or holding KV pages.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_server import DEADLINE, InProcessServer, free_port, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LORAS = sorted((ROOT / "tests" / "data" / "lora").glob("*.gguf"))
VICTIMS = ("deleted", "truncated", "corrupted")
HEALTHY = tuple(f"{p.stem}-ok" for p in LORAS)
PROMPT = "The quick brown fox"


def make_store(store: Path, model) -> None:
    """Every test adapter under a healthy name, and three victims whose files the tests damage."""
    from edgelora_np.adapters.store import AdapterStore

    s = AdapterStore(store, create=True)
    for name, path in [*zip(HEALTHY, LORAS), *((v, LORAS[0]) for v in VICTIMS)]:
        s.import_adapter(path, model.config, model.fingerprint, name=name)
    s.close()


def complete(url: str, model: str | None, n: int = 6, **kw) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/completions", json=body, timeout=DEADLINE)


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:300]
    return r.json()["choices"][0]["text"]


class Bystanders:
    """Requests on healthy adapters and the base model, sent over and over from two threads
    while a fault happens; `stop()` returns every response's status and text."""

    def __init__(self, url: str):
        self.url, self.results, self._stop = url, [], threading.Event()
        self.pool = ThreadPoolExecutor(2)
        self.futures = [self.pool.submit(self._loop, i) for i in range(2)]

    def _loop(self, i: int) -> None:
        names = [None, *HEALTHY]
        k = i
        while not self._stop.is_set():
            name = names[k % len(names)]
            r = complete(self.url, name)
            self.results.append((name, r.status_code, r.text))
            k += 1

    def stop(self) -> list[tuple]:
        self._stop.set()
        for f in self.futures:
            f.result(DEADLINE)
        self.pool.shutdown()
        return self.results


def assert_clean(service) -> None:
    """Nothing running or waiting, no KV page held, no adapter pinned."""
    engine = service.engine
    deadline = time.monotonic() + DEADLINE
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    stats, pool = engine.stats(), engine.pool.stats()
    assert (stats.waiting, stats.running, stats.kv_pages_used) == (0, 0, 0)
    assert pool.pinned == 0 and pool.bytes_pinned == 0


@pytest.fixture
def faulty(real_model, tmp_path):
    """A server in this process on a fresh store; yields (server, store dir, reference texts)."""
    make_store(tmp_path / "store", real_model)
    s = InProcessServer(real_model, tmp_path, adapters_dir=None, max_seqs=4,
                        allow_adapter_dirs=(str(tmp_path / "incoming"),))
    try:
        reference = {name: text_of(complete(s.url, name)) for name in (None, *HEALTHY)}
        yield s, tmp_path / "store", reference
    finally:
        s.close()


def check_bystanders(results: list[tuple], reference: dict) -> None:
    assert results, "no request ran during the fault"
    for name, status, text in results:
        assert status == 200, (name, status, text[:300])
    import json
    for name, _, text in results:
        assert json.loads(text)["choices"][0]["text"] == reference[name], name


def test_adapter_files_damaged_under_the_server(faulty):
    s, store, reference = faulty
    data = store / "data"
    crowd = Bystanders(s.url)
    (data / "deleted.ela").unlink()
    with open(data / "truncated.ela", "r+b") as f:
        f.truncate(os.path.getsize(data / "truncated.ela") // 2)
    raw = bytearray((data / "corrupted.ela").read_bytes())
    for i in range(len(raw) - 4096, len(raw), 7):          # payload bytes, header intact
        raw[i] ^= 0x5A
    (data / "corrupted.ela").write_bytes(bytes(raw))
    expected = {"deleted": "is missing", "truncated": "truncated", "corrupted": "checksum"}
    for victim, words in expected.items():
        for stream in (False, True):
            r = complete(s.url, victim, stream=stream)
            if stream:                                     # the error arrives as an event
                assert r.status_code == 200 and words in r.text and victim in r.text, r.text
            else:
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert error["code"] == "adapter_unavailable"
                assert victim in error["message"] and words in error["message"]
    check_bystanders(crowd.stop(), reference)
    assert_clean(s.service)
    # Put back (re-imported), the adapter serves again: no error was remembered for good.
    from edgelora_np.adapters.store import AdapterStore

    fixed = AdapterStore(store)
    fixed.import_adapter(LORAS[0], s.service.model.config, s.service.model.fingerprint,
                         name="deleted", force=True)
    fixed.close()
    assert text_of(complete(s.url, "deleted")) == reference[HEALTHY[0]]


def test_a_resident_adapter_outlives_its_file(faulty):
    """Once loaded, an adapter is served from RAM: deleting its file breaks nothing."""
    s, store, reference = faulty
    (store / "data" / f"{HEALTHY[1]}.ela").unlink()
    assert text_of(complete(s.url, HEALTHY[1])) == reference[HEALTHY[1]]
    assert_clean(s.service)


def test_a_locked_index_fails_only_the_import(faulty, tmp_path):
    """Another process holding the index's write lock: reads go on (WAL), an import waits for
    sqlite's busy timeout and fails with 503, and succeeds once the lock is gone."""
    s, store, reference = faulty
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(LORAS[1], incoming / "fresh.gguf")
    lock = sqlite3.connect(store / "index.sqlite", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    crowd = Bystanders(s.url)
    try:
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", timeout=DEADLINE,
                       json={"lora_name": "fresh", "lora_path": str(incoming / "fresh.gguf")})
        assert r.status_code == 503, r.text
        assert "database is locked" in r.json()["error"]["message"]
        assert "fresh" not in [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]]
        # a new adapter the index does list still loads: reading needs no lock
        assert text_of(complete(s.url, "corrupted")) == reference[HEALTHY[0]]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    check_bystanders(crowd.stop(), reference)
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", timeout=DEADLINE,
                   json={"lora_name": "fresh", "lora_path": str(incoming / "fresh.gguf")})
    assert r.status_code == 200, r.text
    assert text_of(complete(s.url, "fresh")) == reference[HEALTHY[1]]
    assert_clean(s.service)


def test_a_corrupted_index_fails_only_what_needs_it(faulty):
    s, store, reference = faulty
    crowd = Bystanders(s.url)
    # The database, its write-ahead log and the log's shared index, all overwritten: with the
    # shared index intact, sqlite would go on answering from its page cache.
    for part in store.glob("index.sqlite*"):
        with open(part, "r+b") as f:
            f.write(os.urandom(part.stat().st_size))
    for victim in VICTIMS:                                 # not resident: the index is read
        r = complete(s.url, victim)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_unavailable"
        assert "index.sqlite: file is not a database" in error["message"], error
    check_bystanders(crowd.stop(), reference)             # resident adapters and the base
    assert_clean(s.service)


def test_a_full_disk_during_an_import(faulty, tmp_path):
    """The import's temporary file is a symlink to /dev/full: the kernel's ENOSPC. 507, the
    store unchanged, no file left behind; with room again the same import works."""
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is missing: this test needs Linux")
    s, store, reference = faulty
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(LORAS[2], incoming / "big.gguf")
    before = sorted(p.name for p in (store / "data").iterdir())
    tmp = store / "data" / f".big.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")
    crowd = Bystanders(s.url)
    body = {"lora_name": "big", "lora_path": str(incoming / "big.gguf")}
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", json=body, timeout=DEADLINE)
    assert r.status_code == 507, r.text
    assert r.json()["error"]["message"] == (f"adapter 'big': could not be written to {store}: "
                                            "the disk is full; the store is unchanged")
    assert sorted(p.name for p in (store / "data").iterdir()) == before
    assert "big" not in s.service.store
    check_bystanders(crowd.stop(), reference)
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", json=body, timeout=DEADLINE)
    assert r.status_code == 200, r.text
    assert text_of(complete(s.url, "big")) == reference[HEALTHY[2]]
    assert_clean(s.service)


def test_an_engine_step_that_raises_fails_only_its_batch(faulty, monkeypatch):
    s, _, reference = faulty
    llama = s.service.engine.model.llama
    forward, calls = llama.forward, []

    def failing_once(batch, cache, lora):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("injected forward fault")
        return forward(batch, cache, lora)

    monkeypatch.setattr(llama, "forward", failing_once)
    r = complete(s.url, HEALTHY[0])
    assert r.status_code == 500 and "injected forward fault" in r.json()["error"]["message"]
    monkeypatch.setattr(llama, "forward", forward)
    assert httpx.get(f"{s.url}/health").status_code == 200
    crowd = Bystanders(s.url)
    time.sleep(1.0)
    check_bystanders(crowd.stop(), reference)
    assert_clean(s.service)


# --- SIGTERM: drain, then exit 0 -----------------------------------------------------------------

def start_server(tmp_path: Path, model_path: str, *args: str):
    port, log = free_port(), open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model_path, "--port",
         str(port), "--store", str(tmp_path / "store"), "--threads", "1", "--max-seqs", "2",
         *args], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url, log


def stream_until_first_token(url: str, n: int, pool: ThreadPoolExecutor):
    """A streamed greedy request of n tokens: (started event, future of (status, chunks))."""
    started = threading.Event()

    def run():
        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=DEADLINE) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()
            started.set()
            return r.status_code, lines

    return started, pool.submit(run)


def wait_draining(url: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while httpx.get(f"{url}/health", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.02)


def test_sigterm_drains_then_exits_0(real_model, tmp_path):
    import json

    make_store(tmp_path / "store", real_model)
    proc, url, log = start_server(tmp_path, str(real_model.path), "--drain-timeout", "120")
    try:
        with ThreadPoolExecutor(3) as pool:
            flights = [stream_until_first_token(url, 40, pool) for _ in range(2)]
            for started, _ in flights:
                assert started.wait(DEADLINE)
            queued = pool.submit(complete, url, HEALTHY[0], 40)      # behind the two slots
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            wait_draining(url)
            refused = complete(url, None)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
            for _, future in flights:
                status, lines = future.result(DEADLINE)
                assert status == 200 and lines[-1] == "[DONE]"
                chunks = [json.loads(x) for x in lines[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            done = queued.result(DEADLINE)
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 40
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_sigterm_past_the_drain_timeout_fails_what_is_left(real_model, tmp_path):
    make_store(tmp_path / "store", real_model)
    proc, url, log = start_server(tmp_path, str(real_model.path), "--drain-timeout", "1")
    try:
        with ThreadPoolExecutor(2) as pool:
            endless = pool.submit(complete, url, None, 1500)
            deadline = time.monotonic() + DEADLINE
            while "edgelora_num_requests_running 1.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            r = endless.result(DEADLINE)
        assert r.status_code == 503
        assert "did not finish within its --drain-timeout of 1 s" in r.json()["error"]["message"]
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
