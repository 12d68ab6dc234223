"""A fleet: HAProxy, configured by `edgelora fleet haproxy`, in front of three `edgelora serve`.

The config is checked by HAProxy itself (`haproxy -c`). The fleet tests run three boards on
loopback ports (one thread each, one shared store of 12 adapters) behind a real HAProxy and
read which board answered from each response's X-Edgelora-Server header, and what each board
did from its own /metrics. HAProxy is required: without it these tests fail, saying how to
install it (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from test_server import DEADLINE, free_port, metrics, sample, wait_healthy, wait_idle

from edgelora_np.cli import main as cli
from edgelora_np.fleet import FleetError, FleetOptions, boards_of, haproxy_config

ROOT = Path(__file__).resolve().parents[1]
LORAS = sorted((ROOT / "tests" / "data" / "lora").glob("*.gguf"))
ADAPTERS = [f"{p.stem}-{k}" for p in LORAS for k in range(4)]      # 12 names, 3 payloads
MAX_SEQS, MAX_QUEUE = 2, 2            # per board: two decode, two wait, the fifth is "too busy"
CHECK_S = 0.5                         # HAProxy's health-check period in these tests
LONG = 900                            # output tokens of a request that keeps a slot busy


def haproxy_binary() -> str:
    """The haproxy executable (2.6 or later), or a test failure that says how to get it."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("HAProxy is not installed; the fleet tests need it. Debian/Ubuntu: "
                    "`apt-get install haproxy` (.ci/run does this in CI)")
    version = subprocess.run([found, "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) < (2, 6):
        pytest.fail(f"{found} is not HAProxy 2.6 or later: {version.splitlines()[:1]}")
    return found


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    return subprocess.run([haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)


# --- the config, without boards ------------------------------------------------------------------

BOARDS = ("192.168.1.21:8080", "192.168.1.22:8080", "[fd00::23]:8080")


@pytest.mark.parametrize("options", [
    FleetOptions(boards=BOARDS),
    FleetOptions(boards=BOARDS, affinity=False),
    FleetOptions(boards=BOARDS[:1], balance_factor=150, stats="127.0.0.1:8404",
                 base_models=("base-a", "base-b"), check_interval_s=0.5, max_body_kb=256),
])
def test_haproxy_accepts_the_config(tmp_path, options):
    done = check_config(tmp_path, haproxy_config(options))
    assert done.returncode == 0, done.stderr
    text = haproxy_config(options)
    assert ("balance hash var(txn.adapter)" in text) == options.affinity
    assert ("balance roundrobin" in text) == (not options.affinity)


def test_haproxy_refuses_a_broken_config(tmp_path):
    """The negative control: `haproxy -c` does fail on a config HAProxy cannot run."""
    text = haproxy_config(FleetOptions(boards=BOARDS)).replace("hash-type consistent",
                                                              "hash-type nonsense")
    assert check_config(tmp_path, text).returncode != 0


def test_board_ids_come_from_addresses_not_their_order():
    ids = {b.address: b.id for b in boards_of(list(BOARDS))}
    assert {b.address: b.id for b in boards_of(list(reversed(BOARDS)))} == ids
    assert len(set(ids.values())) == len(ids)
    a = haproxy_config(FleetOptions(boards=BOARDS))
    b = haproxy_config(FleetOptions(boards=tuple(reversed(BOARDS))))
    assert sorted(a.splitlines()) == sorted(b.splitlines())


@pytest.mark.parametrize("boards, message", [
    ((), "no boards"),
    (("pi-1",), "'pi-1': expected HOST:PORT"),
    (("pi-1:99999",), "'pi-1:99999': expected HOST:PORT"),
    (("pi-1:8080", "pi-1:8080"), "pi-1:8080 is given twice"),
])
def test_bad_boards_are_named(boards, message):
    with pytest.raises(FleetError, match=re.escape(message)):
        haproxy_config(FleetOptions(boards=boards))


def test_cli_prints_the_config_and_refuses_bad_options():
    runner = CliRunner()
    done = runner.invoke(cli, ["fleet", "haproxy", "--board", "10.0.0.1:8080", "--board",
                               "10.0.0.2:8080", "--listen", "127.0.0.1:9000"])
    assert done.exit_code == 0
    assert done.output == haproxy_config(FleetOptions(boards=("10.0.0.1:8080", "10.0.0.2:8080"),
                                                      listen="127.0.0.1:9000"))
    bad = runner.invoke(cli, ["fleet", "haproxy", "--board", "10.0.0.1:8080", "--balance-factor",
                              "90"])
    assert bad.exit_code == 2 and "--balance-factor 90" in bad.output


# --- three boards behind HAProxy -----------------------------------------------------------------

def make_store(store: Path, model: str) -> None:
    """The shared store: each test adapter imported under four names (12 adapters)."""
    from edgelora_np.adapters.store import AdapterStore, model_fingerprint
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg, fp = config_from_gguf(open_gguf(model)), model_fingerprint(model)
    s = AdapterStore(store, create=True)
    for name in ADAPTERS:
        s.import_adapter(LORAS[ADAPTERS.index(name) // 4], cfg, fp, name=name)
    s.close()


class Fleet:
    """Boards (name -> process, url) and HAProxy processes started from generated configs."""

    def __init__(self, root: Path, model: str):
        self.root, self.boards, self.balancers = root, {}, []
        make_store(root / "store", model)
        for i in range(3):
            port, name = free_port(), f"board{i + 1}"
            log = open(root / f"{name}.log", "w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model, "--port",
                 str(port), "--store", str(root / "store"), "--threads", "1", "--ctx", "1024",
                 "--max-seqs", str(MAX_SEQS), "--max-queue", str(MAX_QUEUE), "--name", name],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.boards[name] = (proc, f"http://127.0.0.1:{port}", log)
        for proc, url, _ in self.boards.values():
            wait_healthy(url, proc)

    def addresses(self) -> list[str]:
        return [url.removeprefix("http://") for _, url, _ in self.boards.values()]

    def balancer(self, addresses: list[str]) -> tuple[str, str]:
        """Start HAProxy for `addresses`; returns (its url, its stats url)."""
        port, stats = free_port(), free_port()
        cfg = self.root / f"haproxy{len(self.balancers)}.cfg"
        cfg.write_text(haproxy_config(FleetOptions(
            boards=tuple(addresses), listen=f"127.0.0.1:{port}", stats=f"127.0.0.1:{stats}",
            check_interval_s=CHECK_S)))
        log = open(self.root / f"haproxy{len(self.balancers)}.log", "w")
        proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
        self.balancers.append((proc, log))
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats}"

    def url(self, board: str) -> str:
        return self.boards[board][1]

    def kill(self, board: str) -> None:
        proc = self.boards[board][0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE)

    def close(self) -> None:
        for proc, log in self.balancers:
            proc.terminate()
            proc.wait(DEADLINE)
            log.close()
        for proc, _, log in self.boards.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(DEADLINE)
            log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, default_model_path):
    """Three boards and one balancer. The tests below run in order; the last kills a board."""
    haproxy_binary()
    f = Fleet(tmp_path_factory.mktemp("fleet"), str(default_model_path))
    try:
        url, stats = f.balancer(f.addresses())
        yield f, url, stats
    finally:
        f.close()


def ask(url: str, adapter: str, api: str = "openai", max_tokens: int = 2, **kw) -> httpx.Response:
    """One greedy request naming `adapter`, through `api`; returns the response (status 200)."""
    if api == "openai":
        path, body = "/v1/completions", {"model": adapter, "prompt": "Hello", "max_tokens": max_tokens}
    elif api == "chat":
        path, body = "/v1/chat/completions", {
            "model": adapter, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens}
    else:
        path, body = "/completion", {"adapter": adapter, "prompt": "Hello", "n_predict": max_tokens}
    r = httpx.post(f"{url}{path}", json={**body, "temperature": 0, **kw}, timeout=DEADLINE)
    assert r.status_code == 200, (adapter, r.status_code, r.text[:300])
    return r


def board_of(r: httpx.Response) -> str:
    return r.headers["x-edgelora-server"]


def mapping(url: str) -> dict[str, str]:
    return {a: board_of(ask(url, a)) for a in ADAPTERS}


def pool_loads(f: Fleet) -> dict[str, float]:
    return {b: sample(metrics(f.url(b)), "edgelora_adapter_pool_loads_total") for b in f.boards}


@pytest.mark.slow
def test_each_adapter_goes_to_one_board_in_every_api(fleet):
    f, url, _ = fleet
    loads_before = pool_loads(f)
    home = mapping(url)
    for api in ("openai", "chat", "llamacpp", "openai"):
        assert {a: board_of(ask(url, a, api)) for a in ADAPTERS} == home, api
    assert len(set(home.values())) >= 2                 # 12 adapters did not all hash to one
    # Each board loaded exactly the adapters that hash to it, once (its pool holds them all).
    loads = {b: n - loads_before[b] for b, n in pool_loads(f).items()}
    assert loads == {b: sum(1 for a in ADAPTERS if home[a] == b) for b in f.boards}
    # The base model and "auto" are not hashed: least connections spreads them.
    spread = {board_of(ask(url, m)) for m in ["SmolLM2-135M-Instruct.Q4_1", "auto"] * 3}
    assert len(spread) >= 2


@pytest.mark.slow
def test_the_mapping_is_the_same_from_another_balancer_and_board_order(fleet):
    f, url, _ = fleet
    other, _ = f.balancer(list(reversed(f.addresses())))
    assert mapping(other) == mapping(url)


def hold(url: str, body: dict, release: threading.Event, admitted: threading.Semaphore) -> tuple:
    """Stream one long request and keep it open until `release`; returns (status, board)."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=DEADLINE) as r:
        admitted.release()
        release.wait(DEADLINE)
        return r.status_code, board_of(r)


class Filler:
    """Fills boards with long streamed requests, one at a time (a board admits asynchronously:
    requests arriving together could all count as waiting and overflow early), and holds them
    until closed."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool, self.held = pool, []
        self.release, self.admitted = threading.Event(), threading.Semaphore(0)

    def fill(self, url: str, model: str, board_url: str) -> None:
        body = {"model": model, "prompt": "Tell a story", "max_tokens": LONG, "temperature": 0,
                "ignore_eos": True}
        for i in range(1, MAX_SEQS + MAX_QUEUE + 1):
            self.held.append(self.pool.submit(hold, url, body, self.release, self.admitted))
            assert self.admitted.acquire(timeout=DEADLINE)
            want = (min(i, MAX_SEQS), max(0, i - MAX_SEQS))      # (running, waiting)
            deadline = time.monotonic() + DEADLINE
            while True:
                m = metrics(board_url)
                if (sample(m, "edgelora_num_requests_running"),
                        sample(m, "edgelora_num_requests_waiting")) == want:
                    break
                assert time.monotonic() < deadline, f"{board_url} never reached {want}"
                time.sleep(0.05)

    def close(self) -> list[tuple]:
        self.release.set()
        return [h.result(DEADLINE) for h in self.held]


@pytest.mark.slow
def test_a_full_board_hands_its_overflow_to_another(fleet):
    f, url, _ = fleet
    home = mapping(url)
    adapter = ADAPTERS[0]
    board = home[adapter]
    others = [b for b in f.boards if b != board]
    with ThreadPoolExecutor(3 * (MAX_SEQS + MAX_QUEUE)) as pool:
        filler = Filler(pool)
        try:
            filler.fill(url, adapter, f.url(board))      # through HAProxy: all on its board
            refused = sample(metrics(f.url(board)), "edgelora_requests_total",
                             endpoint="/v1/completions", status="429")
            # The board is full: its next two requests are served elsewhere, not failed.
            overflow = [board_of(ask(url, adapter)) for _ in range(2)]
            assert board not in overflow
            assert sample(metrics(f.url(board)), "edgelora_requests_total",
                          endpoint="/v1/completions", status="429") == refused + 2
            # Every board full: the client gets the 429 (with Retry-After) after the retries.
            for b in others:
                filler.fill(f.url(b), "SmolLM2-135M-Instruct.Q4_1", f.url(b))
            r = httpx.post(f"{url}/v1/completions", json={"model": adapter, "prompt": "Hi",
                                                          "max_tokens": 2}, timeout=DEADLINE)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            # Asked directly, a board says 503 only when the request asks for it (as HAProxy does).
            busy = httpx.post(f"{f.url(board)}/v1/completions", json={"model": adapter,
                              "prompt": "Hi", "max_tokens": 2},
                              headers={"X-Edgelora-Busy-Status": "503"}, timeout=DEADLINE)
            assert busy.status_code == 503 and busy.headers["x-edgelora-busy"] == "429"
        finally:
            held = filler.close()
    n = MAX_SEQS + MAX_QUEUE
    assert held[:n] == [(200, board)] * n                  # the adapter's stayed on its board
    assert [status for status, _ in held] == [200] * len(held)
    for b in f.boards:
        wait_idle(f.url(b))


def board_state(stats: str, board_url: str) -> str:
    """HAProxy's status of a board in backend by_adapter (UP, DOWN, ...), from its stats CSV."""
    name = "board_" + re.sub(r"[^A-Za-z0-9]", "_", board_url.removeprefix("http://"))
    csv = httpx.get(f"{stats}/;csv", timeout=30).text.splitlines()
    header = csv[0].lstrip("# ").split(",")
    for line in csv[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "by_adapter" and row.get("svname") == name:
            return row["status"]
    raise AssertionError(f"{name} is not in HAProxy's stats")


@pytest.mark.slow
def test_a_board_killed_mid_run_moves_only_its_adapters(fleet):
    f, url, stats = fleet
    home = mapping(url)
    victim = max(f.boards, key=lambda b: sum(1 for a in ADAPTERS if home[a] == b))
    jobs = [a for _ in range(3) for a in ADAPTERS]            # 36 requests, 4 at a time
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, url, a, "openai", 16) for a in jobs]
        for i, done in enumerate(as_completed(futures)):
            done.result()                                     # a 200 (asserted in ask)
            if i == 5:
                f.kill(victim)
    deadline = time.monotonic() + DEADLINE
    while board_state(stats, f.url(victim)) != "DOWN":
        assert time.monotonic() < deadline, "HAProxy never marked the killed board down"
        time.sleep(CHECK_S)
    after = mapping(url)
    for a in ADAPTERS:
        if home[a] == victim:
            assert after[a] != victim, a
        else:
            assert after[a] == home[a], f"{a} moved from {home[a]} to {after[a]}"
    assert any(home[a] == victim for a in ADAPTERS)
    assert mapping(url) == after                               # and they stay where they went
