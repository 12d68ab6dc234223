"""Soak (issue #17): 32 clients against a real `edgelora serve` for minutes, then check that no
request was lost or hung and nothing leaked.

    tox -e soak (600 s)    or: python tools/soak.py [--duration 600] [--threads 1]

(from a source tree, PYTHONPATH=$PWD: the server runs the edgelora_np this script imports).

The server: `edgelora serve` in a subprocess on a loopback port, with
- a store of 1,000 random rank-8 adapters on attn_v (about 0.37 MB each packed, so the store is
  a few hundred MB; cached in ~/.cache/edgelora_np/soak-store-*, written once) and the shipped
  task adapters (models/adapters: their cards give model "auto" something to route to);
- an adapter pool of POOL_MB (a few dozen small adapters): with Zipf popularity over 1,000 it
  evicts on most misses;
- MAX_SEQS sequences and a queue of MAX_QUEUE: MAX_SEQS + MAX_QUEUE = the clients, so the
  clients alone fit and a burst does not (its accepted requests then crowd some clients out).

The workload (asyncio, one httpx client): each of CLIENTS loops for --duration seconds over
requests drawn at random (one seeded generator per client): /v1/completions,
/v1/chat/completions or llama.cpp's /completion; streamed or not; an adapter by Zipf popularity,
the base model or "auto"; 4-24 tokens. Some are cut short on purpose: a stream closed after a
few events (disconnect), a request abandoned after a random fraction of a second, mostly before
its first byte (cancel). Every BURST_EVERY_S seconds BURST requests arrive at once.

Each request ends in one of OUTCOMES. The run passes when nothing is lost or hung, nothing is a
5xx, and once the server is idle again: KV pages used 0, adapter bytes pinned 0, threads <=
baseline + THREAD_SLACK, RSS <= baseline x (1 + RSS_DRIFT).

The baseline is what the server holds after a warm-up, settled the same way as at the end
(`settle`): first MAX_SEQS requests as long as a sequence may be, which write every page of the
KV cache once (`fill_kv`: its pages are lazily mapped zeros, RSS only once written), then
WARMUP_S of the same workload, which churns the pool and gives the allocator its arenas and
anyio its worker threads. The baseline is a server that has served. A server that has only
loaded "grows" by the ~94 MB of KV cache the workload writes for the first time over its
first minute or two, which is not a leak (the first trial runs, without fill_kv, showed it).

Results: a table on stdout, artifacts/soak/results.json, the server log artifacts/soak/server.log.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_workload import Server, import_store, write_adapters  # noqa: E402
from benchutil import warm_edgelora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "soak"
TASKS = ROOT / "models" / "adapters"

N_ADAPTERS = 1000
PROJECTIONS = ("attn_v",)      # the smallest adapter that still changes every layer's output
STORE_VERSION = 1              # bump when the store's adapters change
CLIENTS = 32
MAX_SEQS = 8
MAX_QUEUE = CLIENTS - MAX_SEQS
POOL_MB = 12.0
CTX = 512                      # per sequence
MAX_TOKENS = (4, 24)
ZIPF_ALPHA = 1.0
P_BASE, P_AUTO = 0.05, 0.10    # shares of requests naming the base model, "auto"
P_STREAM = 0.5
P_DISCONNECT = 0.2             # of streamed requests: closed after 1-3 events
P_CANCEL = 0.1                 # of the others (not bursts): abandoned after CANCEL_S
CANCEL_S = (0.02, 1.0)
BURST, BURST_EVERY_S = 48, 15.0
RETRY_AFTER_S = 1.0            # a refused client waits what the server's Retry-After says
HUNG_S = 120.0                 # no answer by then: hung (never a speed bound)
WARMUP_S = 30.0
IDLE_S = 120.0                 # the server must be idle this soon after the clients stop
ANYIO_IDLE_S = 10.0            # anyio retires a worker thread idle this long, at the next call
RSS_DRIFT = 0.05
THREAD_SLACK = 1               # at rest: 6 Python threads (main, engine, compute, prefetch, tqdm
                               # monitor, one anyio worker) and 1 or 2 native ones; py-spy lists
                               # the same 6 whether /proc counts one more or not, which varied
                               # between settles
METRICS_EVERY_S = 5.0
APIS = ("completions", "chat", "llamacpp")
OUTCOMES = ("complete", "error", "refused", "disconnected", "cancelled", "lost", "hung")


# --- the store and the server -------------------------------------------------------------------

def prepare_store(model: str, n: int = N_ADAPTERS) -> Path:
    """A store of n random adapters (tenant0..) and the task adapters, for this model; reused
    between runs (the directory is complete once its DONE file exists)."""
    from edgelora_np.adapters.store import AdapterStore, model_fingerprint
    from edgelora_np.default_model import cache_dir
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    fp = model_fingerprint(model)
    digest = fp.rsplit(":", 1)[-1][:12]                    # "gguf-sha256:<hex>"
    store = cache_dir() / f"soak-store-{n}-{'-'.join(PROJECTIONS)}-v{STORE_VERSION}-{digest}"
    if (store / "DONE").exists():
        return store
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:          # the sources: not needed once imported
        paths = write_adapters(Path(tmp), n, projections=PROJECTIONS)
        import_store(store, model, paths)
    cfg = config_from_gguf(open_gguf(model))
    s = AdapterStore(store)
    for task in sorted(p for p in TASKS.iterdir() if (p / "card.json").is_file()):
        s.import_adapter(task, cfg, fp)
    s.close()
    (store / "DONE").write_text(f"{n} adapters written and imported in "
                                f"{time.perf_counter() - t0:.1f} s\n")
    return store


def child_env() -> dict[str, str]:
    """The environment of the server: it imports the edgelora_np this process imports (a
    worktree's, under PYTHONPATH, rather than an editable install's)."""
    import edgelora_np

    package_root = str(Path(edgelora_np.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


def start_server(model: str, store: Path, port: int, threads: int, log: Path) -> Server:
    cmd = [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model, "--store",
           str(store), "--port", str(port), "--threads", str(threads), "--max-seqs",
           str(MAX_SEQS), "--max-queue", str(MAX_QUEUE), "--ctx", str(CTX),
           "--adapter-pool-mb", str(POOL_MB)]
    server = Server("edgelora", cmd, port, log, env=child_env())
    if server.failure:
        server.stop()
        raise RuntimeError(f"the server failed to start: {server.failure} (log: {log})")
    return server


def proc_status(pid: int) -> dict[str, float]:
    """The server's RSS (MB; anonymous and file-backed apart) and thread count, from /proc."""
    keys = {"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[keys[key]] = int(value.split()[0]) * 1024 / 1e6
            elif key == "Threads":
                out["threads"] = int(value)
    return out


def scrape(url: str) -> dict[str, float]:
    """/metrics: name -> value of every unlabelled sample (counters as name_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if not s.labels}


def settle(server: Server) -> dict:
    """Wait until nothing runs or waits, let anyio's worker threads idle past their limit, and
    make one call that takes exactly one of them (GET /health: a sync route, no dependencies),
    which retires the others; then the server's state (/proc first, then /metrics)."""
    deadline = time.monotonic() + IDLE_S
    while True:
        m = scrape(server.url)
        if m["edgelora_num_requests_running"] == 0 and m["edgelora_num_requests_waiting"] == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server is not idle {IDLE_S:.0f} s after the clients stopped")
        time.sleep(0.2)
    time.sleep(ANYIO_IDLE_S + 1)
    httpx.get(f"{server.url}/health", timeout=30).raise_for_status()
    time.sleep(1)
    state = proc_status(server.pid)
    m = scrape(server.url)
    return {**state, "kv_pages_used": m["edgelora_kv_cache_pages_used"],
            "pool_bytes_pinned": m["edgelora_adapter_pool_bytes_pinned"],
            "pool_evictions": m["edgelora_adapter_pool_evictions_total"],
            "pool_loads": m["edgelora_adapter_pool_loads_total"]}


# --- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shot:
    """One request to make."""

    api: str                        # one of APIS
    model: str                      # an adapter, the base model's id, or "auto"
    prompt: str
    max_tokens: int
    stream: bool
    disconnect_after: int = 0       # close the stream after this many events (0: never)
    cancel_after: float = 0.0       # abandon the request after this many seconds (0: never)
    burst: bool = False


@dataclass
class Record:
    """How a request ended."""

    shot: Shot
    outcome: str                    # one of OUTCOMES
    seconds: float
    status: int = 0
    routed: str = ""                # what served an "auto" request (X-Edgelora-Route)
    detail: str = ""


def request_of(shot: Shot, base: str) -> tuple[str, dict]:
    """(path, JSON body)."""
    sampling = {"temperature": 0.7, "seed": 1}
    if shot.api == "llamacpp":
        adapter = None if shot.model == base else shot.model
        return "/completion", {"prompt": shot.prompt, "n_predict": shot.max_tokens,
                               "stream": shot.stream, "adapter": adapter, **sampling}
    body = {"model": shot.model, "max_tokens": shot.max_tokens, "stream": shot.stream,
            **sampling}
    if shot.api == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                               "content": shot.prompt}]}
    return "/v1/completions", {**body, "prompt": shot.prompt}


def is_error_body(doc) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("error"), dict)
            and isinstance(doc["error"].get("message"), str))


def judge_answer(shot: Shot, status: int, content: bytes) -> tuple[str, str]:
    """(outcome, detail) of a whole (not streamed) response."""
    try:
        doc = json.loads(content)
    except ValueError:
        return "lost", f"{status}, not JSON: {content[:200]!r}"
    if status != 200:
        if not is_error_body(doc):
            return "lost", f"{status} without an error message: {content[:200]!r}"
        return ("refused" if status == 429 else "error"), f"{status} {doc['error']['message']}"
    if shot.api == "llamacpp":
        ok = doc.get("stop") is True and isinstance(doc.get("content"), str)
    else:
        choice = (doc.get("choices") or [{}])[0]
        text = choice.get("message", {}).get("content") if shot.api == "chat" else \
            choice.get("text")
        ok = (isinstance(text, str) and choice.get("finish_reason") in ("stop", "length")
              and isinstance(doc.get("usage", {}).get("completion_tokens"), int))
    return ("complete", "") if ok else ("lost", f"incomplete answer: {content[:300]!r}")


def judge_event(shot: Shot, data: str) -> str:
    """One event of a stream: "more", "finish" (the chunk with an OpenAI finish_reason), "end"
    (the last event due: [DONE], or llama.cpp's "stop": true), "error" or "bad"."""
    if shot.api != "llamacpp" and data == "[DONE]":
        return "end"
    try:
        doc = json.loads(data)
    except ValueError:
        return "bad"
    if is_error_body(doc):
        return "error"
    if shot.api == "llamacpp":
        return "end" if doc.get("stop") is True else "more"
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
        return "bad"
    finish = doc["choices"][0].get("finish_reason") if doc["choices"] else None
    return "finish" if finish in ("stop", "length") else "more"


async def send(client: httpx.AsyncClient, url: str, base: str, shot: Shot) -> tuple:
    """(outcome, status, route header, detail) of one request."""
    path, body = request_of(shot, base)
    if not shot.stream:
        r = await client.post(url + path, json=body)
        outcome, detail = judge_answer(shot, r.status_code, r.content)
        return outcome, r.status_code, r.headers.get("x-edgelora-route", ""), detail
    async with client.stream("POST", url + path, json=body) as r:
        route = r.headers.get("x-edgelora-route", "")
        if r.status_code != 200:
            outcome, detail = judge_answer(shot, r.status_code, await r.aread())
            return outcome, r.status_code, route, detail
        events, finished, ended = 0, shot.api == "llamacpp", False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue                        # blank separators, ": ping" comments
            if ended:
                return "lost", 200, route, f"an event after the end: {line[:200]}"
            events += 1
            if shot.disconnect_after and events >= shot.disconnect_after:
                return "disconnected", 200, route, f"after {events} events"
            verdict = judge_event(shot, line[6:])
            if verdict == "bad":
                return "lost", 200, route, f"malformed event: {line[:200]}"
            if verdict == "error":
                return "error", 200, route, line[6:300]
            finished = finished or verdict == "finish"
            ended = verdict == "end"
        if not (ended and finished):
            return "lost", 200, route, f"the stream stopped after {events} events"
        return "complete", 200, route, ""


async def fire(client: httpx.AsyncClient, url: str, base: str, shot: Shot) -> Record:
    t0 = time.perf_counter()
    limit = shot.cancel_after or HUNG_S
    try:
        outcome, status, route, detail = await asyncio.wait_for(
            send(client, url, base, shot), limit)
    except asyncio.TimeoutError:
        outcome, status, route, detail = \
            ("cancelled" if shot.cancel_after else "hung"), 0, "", f"after {limit:.2f} s"
    except httpx.HTTPError as e:            # transport or protocol: not our doing
        outcome, status, route, detail = "lost", 0, "", f"{type(e).__name__}: {e}"
    return Record(shot, outcome, time.perf_counter() - t0, status, route.split(";")[0], detail)


@dataclass
class Workload:
    """What the clients draw from."""

    base: str                                   # the base model's id
    adapters: list[str]                         # by popularity rank
    prompts: list[str]
    weights: list[float] = field(init=False)    # Zipf: cumulative, over adapters

    def __post_init__(self):
        total, cum = 0.0, []
        for rank in range(len(self.adapters)):
            total += 1.0 / (rank + 1) ** ZIPF_ALPHA
            cum.append(total)
        self.weights = cum

    def draw(self, rng: random.Random, *, burst: bool = False) -> Shot:
        u = rng.random()
        if burst:
            model = rng.choices(self.adapters, cum_weights=self.weights)[0]
        elif u < P_AUTO:
            model = "auto"
        elif u < P_AUTO + P_BASE:
            model = self.base
        else:
            model = rng.choices(self.adapters, cum_weights=self.weights)[0]
        stream = not burst and rng.random() < P_STREAM
        disconnect = rng.randint(1, 3) if stream and rng.random() < P_DISCONNECT else 0
        cancel = rng.uniform(*CANCEL_S) if not burst and not disconnect and \
            rng.random() < P_CANCEL else 0.0
        return Shot(api=rng.choice(APIS), model=model, prompt=rng.choice(self.prompts),
                    max_tokens=rng.randint(*MAX_TOKENS), stream=stream,
                    disconnect_after=disconnect, cancel_after=cancel, burst=burst)


def task_prompts() -> list[str]:
    """The task adapters' example prompts: real text, and what "auto" can route."""
    prompts = []
    for card in sorted(TASKS.glob("*/card.json")):
        prompts += json.loads(card.read_text())["example_prompts"]
    return prompts


async def load(server: Server, work: Workload, seconds: float, seed: int,
               samples: list[dict] | None = None) -> list[Record]:
    """CLIENTS clients and a burst every BURST_EVERY_S for `seconds`; every request's Record
    (the run waits for the last ones to end, each within HUNG_S)."""
    url, records = server.url, []
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS + BURST + 8, max_keepalive_connections=CLIENTS)

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def clients(i: int):
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                record = await fire(client, url, work.base, work.draw(rng))
                records.append(record)
                if record.outcome == "refused":
                    await asyncio.sleep(RETRY_AFTER_S)

        async def bursts():
            rng = random.Random(seed * 1000 + CLIENTS)
            fired = []
            while time.monotonic() + BURST_EVERY_S < end:
                await asyncio.sleep(BURST_EVERY_S)
                fired += [asyncio.ensure_future(fire(client, url, work.base,
                                                     work.draw(rng, burst=True)))
                          for _ in range(BURST)]
            records.extend(await asyncio.gather(*fired))

        async def watch():
            t0 = time.monotonic()
            while samples is not None and time.monotonic() < end:
                m = await asyncio.to_thread(scrape, url)
                samples.append({"t": round(time.monotonic() - t0, 1), **proc_status(server.pid),
                                "running": m["edgelora_num_requests_running"],
                                "waiting": m["edgelora_num_requests_waiting"],
                                "kv_pages_used": m["edgelora_kv_cache_pages_used"],
                                "pool_evictions": m["edgelora_adapter_pool_evictions_total"]})
                await asyncio.sleep(METRICS_EVERY_S)

        await asyncio.gather(*(clients(i) for i in range(CLIENTS)), bursts(), watch())
    return records


async def fill_kv(url: str) -> None:
    """Write every page of the KV cache once: MAX_SEQS requests at once, each as long as a
    sequence may be (distinct random token ids, so that the prefix cache shares no page)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(CTX - 8)] for _ in range(MAX_SEQS)]
    async with httpx.AsyncClient(timeout=None) as client:
        async def one(prompt: list[int]):
            r = await client.post(f"{url}/v1/completions", json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()

        await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), HUNG_S)


# --- the run ------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summarize(records: list[Record], base: str) -> dict:
    counts = {o: sum(r.outcome == o for r in records) for o in OUTCOMES}
    done = [r.seconds for r in records if r.outcome == "complete"]
    auto = [r for r in records if r.shot.model == "auto" and r.outcome == "complete"]
    statuses: dict[str, int] = {}
    for r in records:
        if r.status:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "requests": len(records), "outcomes": counts, "statuses": statuses,
        "burst_requests": sum(r.shot.burst for r in records),
        "burst_refused": sum(r.shot.burst and r.outcome == "refused" for r in records),
        "by_api": {a: sum(r.shot.api == a and r.outcome == "complete" for r in records)
                   for a in APIS},
        "streamed_complete": sum(r.shot.stream and r.outcome == "complete" for r in records),
        "auto_complete": len(auto),
        "auto_routed_to_adapter": sum(r.routed not in ("", base) for r in auto),
        "latency_s": {"p50": percentile(done, 50), "p99": percentile(done, 99),
                      "max": max(done, default=None)},
        "examples": {o: [r.detail for r in records if r.outcome == o][:5]
                     for o in ("error", "lost", "hung")},
    }


def checks(summary: dict, baseline: dict, after: dict, evictions: float) -> dict[str, bool]:
    o = summary["outcomes"]
    return {
        "0 lost": o["lost"] == 0,
        "0 hung": o["hung"] == 0,
        "no 5xx": not any(s.startswith("5") for s in summary["statuses"]),
        "KV pages used 0": after["kv_pages_used"] == 0,
        "adapter bytes pinned 0": after["pool_bytes_pinned"] == 0,
        f"threads <= baseline + {THREAD_SLACK}": after["threads"] <= baseline["threads"] + THREAD_SLACK,
        f"RSS <= baseline + {RSS_DRIFT:.0%}": after["rss_mb"] <= baseline["rss_mb"] * (1 + RSS_DRIFT),
        "pool evicted during the run": evictions > 0,
    }


def soak(duration: float, *, threads: int = 1, warmup: float = WARMUP_S, seed: int = 0,
         model: str | None = None, n_adapters: int = N_ADAPTERS, port: int = 8890,
         out: Path = OUT) -> dict:
    """The whole soak; returns the results document (also written to out/results.json)."""
    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(model, progress=False))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = prepare_store(model, n_adapters)
    store_s = time.perf_counter() - t0
    warm_edgelora(model, env=child_env())
    load_avg_start = os.getloadavg()
    server = start_server(model, store, port, threads, out / "server.log")
    try:
        base = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        work = Workload(base, [f"tenant{i}" for i in range(n_adapters)], task_prompts())
        warm_samples: list[dict] = []
        asyncio.run(fill_kv(server.url))
        warm = asyncio.run(load(server, work, warmup, seed + 1, warm_samples))
        baseline = settle(server)
        samples: list[dict] = []
        t_run = time.perf_counter()
        records = asyncio.run(load(server, work, duration, seed, samples))
        run_s = time.perf_counter() - t_run
        after = settle(server)
    finally:
        server.stop()
    summary = summarize(records, base)
    evictions = after["pool_evictions"] - baseline["pool_evictions"]
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "duration_s": duration, "run_s": run_s,
        "warmup_s": warmup, "warmup_requests": len(warm), "threads": threads, "seed": seed,
        "store_adapters": n_adapters, "store_prepare_s": store_s,
        "server": {"max_seqs": MAX_SEQS, "max_queue": MAX_QUEUE, "pool_mb": POOL_MB,
                   "ctx": CTX, "clients": CLIENTS, "burst": BURST,
                   "burst_every_s": BURST_EVERY_S},
        "load_average_start": load_avg_start, "load_average_end": os.getloadavg(),
        "summary": summary, "baseline": baseline, "after": after,
        "pool_evictions_in_run": evictions,
        "pool_loads_in_run": after["pool_loads"] - baseline["pool_loads"],
        "rss_drift": after["rss_mb"] / baseline["rss_mb"] - 1,
        "checks": checks(summary, baseline, after, evictions), "samples": samples,
        "warmup_samples": warm_samples,
        "records": [{**asdict(r.shot), **{k: v for k, v in asdict(r).items() if k != "shot"}}
                    for r in records],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def report(doc: dict) -> None:
    s, b, a = doc["summary"], doc["baseline"], doc["after"]
    lat = s["latency_s"]
    print(f"\nsoak {doc['run_s']:.0f} s ({doc['date']}), {doc['server']['clients']} clients, "
          f"store of {doc['store_adapters']}, warm-up {doc['warmup_requests']} requests; "
          f"load average {doc['load_average_start'][0]:.2f} -> {doc['load_average_end'][0]:.2f}")
    print("| outcome | requests |\n| --- | ---: |")
    for o in OUTCOMES:
        print(f"| {o} | {s['outcomes'][o]:,} |")
    print(f"| all | {s['requests']:,} |")
    print(f"\nstatuses {s['statuses']}; bursts: {s['burst_refused']} of {s['burst_requests']} "
          f"refused; complete by API {s['by_api']}, streamed {s['streamed_complete']}; "
          f"auto complete {s['auto_complete']} ({s['auto_routed_to_adapter']} to an adapter)")
    if lat["p50"] is not None:
        print(f"latency of complete requests: p50 {lat['p50']:.2f} s, p99 {lat['p99']:.2f} s, "
              f"max {lat['max']:.2f} s")
    print(f"pool: {doc['pool_loads_in_run']:.0f} loads, {doc['pool_evictions_in_run']:.0f} "
          f"evictions in the run")
    print(f"RSS {b['rss_mb']:.1f} MB -> {a['rss_mb']:.1f} MB ({doc['rss_drift']:+.1%}); threads "
          f"{b['threads']} -> {a['threads']}; KV pages used {a['kv_pages_used']:.0f}, adapter "
          f"bytes pinned {a['pool_bytes_pinned']:.0f}")
    for o, examples in s["examples"].items():
        for e in examples:
            print(f"  {o}: {e}")
    for name, ok in doc["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds before the baseline")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads")
    ap.add_argument("--adapters", type=int, default=N_ADAPTERS, help="adapters in the store")
    ap.add_argument("--port", type=int, default=8890)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    doc = soak(args.duration, threads=args.threads, warmup=args.warmup, seed=args.seed,
               model=args.model, n_adapters=args.adapters, port=args.port)
    report(doc)
    sys.exit(0 if all(doc["checks"].values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
