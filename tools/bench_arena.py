"""The adapter arena at scale: 10,000 adapters on disk, a bounded pool in RAM (docs/benchmarks.md).

    tox -e bench     or: python tools/bench_arena.py [--store DIR] [--pool-mb 256] [--threads 2]

The store: 10,000 synthetic rank-8 adapters on q and v of all 30 layers of SmolLM2-135M (the
classic LoRA targets; 0.92 MB each, 9.2 GB in all, so it fits comfortably on disk and in the
page cache), plus 32 rank-8 adapters on all seven projections of all layers (4.9 MB each) for
the cold-fetch measurement. Values are seeded random fp16; the bench only needs real bytes.
The store is built once (resumable: re-running skips what is there) under --store.

Measurements, each in a fresh process:
 1. cold fetch: a rank-8 all-seven-projection adapter from page cache into the pool
    (open, read into the arena, crc32, publish): p50 / p99 of 32 loads.
 2. policy: hit rate of LRU vs LFU on request streams with adapter id = floor(U^(1/alpha) * n),
    alpha = 0.5, 1, 2, through the pool alone (20,000 requests each; hits do not depend on
    the model). Note that with this formula alpha = 1 is uniform over all 10,000 adapters, the
    hardest case for any cache; alpha = 0.5 favours low ids, alpha = 2 high ids.
 3. serving: 16 closed-loop clients send requests (a short prompt, 16 tokens out, greedy,
    EOS ignored) through the engine with its background step thread and prefetcher:
    - base: no adapters (the base-model serving RSS);
    - pool: 10,000 adapters, --pool-mb budget, LRU, alpha = 1 (and 0.5, 2);
    - resident: the same alpha = 1 stream with every adapter it touches loaded before timing
      into a pool large enough to hold them all.
    Reported: aggregate decode tok/s, hit rate, loads, evictions, load latency p50/p99,
    peak RSS and RSS over time.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import peak_rss_mb, run_child, warm_edgelora  # noqa: E402

N_ADAPTERS = 10_000
N_FULL = 32
RANK = 8
REQUESTS = 320
CLIENTS = 16
MAX_TOKENS = 16
TRACE = 20_000
ALPHAS = (0.5, 1.0, 2.0)
PROMPT = "Tenant {i} asks: write one sentence about the sea."


def workload(n_requests: int, n: int, alpha: float, seed: int = 0) -> list[int]:
    u = np.random.default_rng(seed).random(n_requests)
    return np.minimum((u ** (1.0 / alpha) * n).astype(np.int64), n - 1).tolist()


# --- the store ---------------------------------------------------------------------------------

def build_store(root: Path, model: str, n_adapters: int = N_ADAPTERS) -> None:
    from edgelora_np.adapters.packed import PackedAdapter, layout_for
    from edgelora_np.adapters.store import AdapterStore, model_fingerprint
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg = config_from_gguf(open_gguf(model))
    fingerprint = model_fingerprint(model)
    store = AdapterStore(root, create=True)
    store.clean()
    have = set(store.names())
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(8 << 20) * 0.02).astype(np.float16).view(np.uint8)   # 16 MB
    kinds = [(f"qv{i:05d}", {"qkv": (RANK, 0, RANK)}) for i in range(n_adapters)]
    kinds += [(f"full{i:02d}", {"qkv": (RANK,) * 3, "o": (RANK,), "gate_up": (RANK,) * 2,
                                "down": (RANK,)}) for i in range(N_FULL)]
    todo = [(n, r) for n, r in kinds if n not in have]
    t0 = time.perf_counter()
    for k, (name, ranks) in enumerate(todo):
        groups, n_bytes = layout_for(cfg, ranks)
        start = (k * 7919 * 64) % (len(noise) - n_bytes)
        payload = noise[start:start + n_bytes].copy()
        for lay in groups.values():            # scales alpha / r = 2; A and B stay random
            n_s = cfg.n_layers * lay.rows
            payload[lay.s:lay.s + 4 * n_s].view(np.float32)[:] = 2.0
        store.put(name, PackedAdapter(groups, payload), fingerprint=fingerprint, durable=False,
                  card={"description": f"synthetic tenant adapter {name}"}, source="bench_arena")
        if k % 1000 == 999:
            print(f"  store: {k + 1}/{len(todo)} written ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    os.sync()


# --- children ----------------------------------------------------------------------------------

def rss_mb() -> float:
    """This process's resident set size now, in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_fetch(store_dir: str, model: str) -> dict:
    from edgelora_np.adapters.pool import AdapterPool
    from edgelora_np.adapters.store import AdapterStore
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg = config_from_gguf(open_gguf(model))
    store = AdapterStore(store_dir)
    names = [f"full{i:02d}" for i in range(N_FULL)]
    for n in names:                                  # into the page cache
        store.file(n).read_bytes()
    pool = AdapterPool(cfg, 8 << 20, max_slots=4)    # room for one: every load evicts
    times = []
    for n in names * 2:
        t0 = time.perf_counter()
        pool.acquire(n, store.record(n))
        times.append(time.perf_counter() - t0)
        pool.release(n)
    ms = sorted(t * 1e3 for t in times[N_FULL:])      # the second round: pool pages touched
    return {"bytes": store.get(names[0]).nbytes, "p50_ms": statistics.median(ms),
            "p99_ms": ms[int(0.99 * (len(ms) - 1))], "max_ms": ms[-1]}


class _SizeOnly:
    """A record with the right size and layout but no bytes to copy (policy simulation)."""

    def __init__(self, row):
        self.groups, self.nbytes = row.groups, row.nbytes

    def copy_into(self, dst) -> None:
        pass


def child_trace(store_dir: str, model: str, pool_mb: float) -> dict:
    from edgelora_np.adapters.pool import AdapterPool
    from edgelora_np.adapters.store import AdapterStore
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg = config_from_gguf(open_gguf(model))
    record = _SizeOnly(AdapterStore(store_dir).get("qv00000"))
    out = {}
    for alpha in ALPHAS:
        for policy in ("lru", "lfu"):
            pool = AdapterPool(cfg, int(pool_mb * 2**20), max_slots=4096, policy=policy)
            for i in workload(TRACE, N_ADAPTERS, alpha, seed=1):
                name = f"qv{i:05d}"
                pool.access(name)
                pool.acquire(name, record)
                pool.release(name)
            s = pool.stats()
            out[f"{alpha}/{policy}"] = {"hit_rate": s.hit_rate, "evictions": s.evictions,
                                        "resident": s.resident}
    return out


def child_serve(store_dir: str, model: str, threads: int, mode: str, alpha: float,
                pool_mb: float, policy: str, n_adapters: int = N_ADAPTERS,
                n_requests: int = REQUESTS) -> dict:
    import edgelora_np as el

    m = el.load_model(model, n_threads=threads, progress=False)
    ids = workload(n_requests, n_adapters, alpha, seed=2)
    names = [None if mode == "base" else f"qv{i:05d}" for i in ids]
    if mode == "resident":
        distinct = sorted(set(names))
        pool_mb = (len(distinct) + 8) * 0.92
    engine = el.Engine(m, max_batch_tokens=256, max_seqs=CLIENTS, max_adapters=4096,
                       adapter_pool_mb=pool_mb, policy=policy,
                       store=None if mode == "base" else store_dir)
    if mode == "resident":
        for n in distinct:
            engine.pool.acquire(n, engine.store.record(n))
            engine.pool.release(n)
    samples, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, rss_mb()))
            stop.wait(0.1)

    jobs: queue.Queue = queue.Queue()
    for i, n in enumerate(names):
        jobs.put((i, n))
    tokens = []

    def client():
        while True:
            try:
                i, n = jobs.get_nowait()
            except queue.Empty:
                return
            g = engine.submit(PROMPT.format(i=i), adapter=n, max_tokens=MAX_TOKENS,
                              temperature=0.0, ignore_eos=True).run()
            tokens.append(len(g.token_ids))

    engine.start()
    # Warm-up outside the timing: a few requests compile nothing new but fill caches.
    for g in [engine.submit("warm", max_tokens=2, temperature=0.0) for _ in range(2)]:
        g.run()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = engine.adapter_stats()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    stop.set()
    engine.close()
    s = engine.adapter_stats()
    loads = s.recent_load_seconds[len(before.recent_load_seconds):] if mode != "resident" else []
    ms = sorted(x * 1e3 for x in loads)
    pick = np.linspace(0, len(samples) - 1, 6).astype(int) if samples else []
    return {"mode": mode, "alpha": alpha, "policy": policy, "pool_mb": pool_mb,
            "tok_s": sum(tokens) / wall, "wall_s": wall, "requests": len(tokens),
            "hit_rate": (s.hits - before.hits) / max(1, s.hits + s.misses - before.hits - before.misses),
            "loads": s.loads - before.loads, "evictions": s.evictions - before.evictions,
            "load_p50_ms": statistics.median(ms) if ms else None,
            "load_p99_ms": ms[int(0.99 * (len(ms) - 1))] if ms else None,
            "bytes_resident_mb": s.bytes_resident / 2**20, "peak_rss_mb": peak_rss_mb(),
            "rss_over_time": [(round(samples[i][0], 1), round(samples[i][1], 1)) for i in pick]}


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "edgelora_bench_store")
    ap.add_argument("--pool-mb", type=float, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--mode", default="pool")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--adapters", type=int, default=N_ADAPTERS, help="store size (q,v adapters)")
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--build-only", action="store_true", help="build the store and stop")
    args = ap.parse_args()
    if args.model is None:
        from edgelora_np.default_model import resolve_model_path
        args.model = str(resolve_model_path())
    if args.child == "fetch":
        print(json.dumps(child_fetch(str(args.store), args.model)))
        return
    if args.child == "trace":
        print(json.dumps(child_trace(str(args.store), args.model, args.pool_mb)))
        return
    if args.child == "serve":
        print(json.dumps(child_serve(str(args.store), args.model, args.threads, args.mode,
                                     args.alpha, args.pool_mb, args.policy, args.adapters,
                                     args.requests)))
        return

    t0 = time.perf_counter()
    build_store(args.store, args.model, args.adapters)
    print(f"store ready: {args.store} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.build_only:
        return
    warm_edgelora(args.model)
    script = __file__
    common = ["--store", str(args.store), "--model", args.model, "--pool-mb", str(args.pool_mb),
              "--threads", str(args.threads)]
    fetch = run_child(script, "fetch", common)
    print(f"cold fetch: {fetch}", file=sys.stderr)
    trace = run_child(script, "trace", common)
    print(f"policies: {trace}", file=sys.stderr)
    runs = []
    for mode, alpha in (("base", 1.0), ("pool", 1.0), ("resident", 1.0), ("pool", 0.5), ("pool", 2.0)):
        r = run_child(script, "serve", [*common, "--mode", mode, "--alpha", str(alpha)])
        print(f"serve {mode} alpha={alpha}: {r}", file=sys.stderr)
        runs.append(r)
    report(fetch, trace, runs, args.pool_mb)


def report(fetch, trace, runs, pool_mb) -> None:
    print(f"\nCold fetch, rank-8 all-seven-projection adapter ({fetch['bytes'] / 1e6:.2f} MB), page "
          f"cache -> pool: p50 {fetch['p50_ms']:.2f} ms, p99 {fetch['p99_ms']:.2f} ms (target <= 5 ms)\n")
    print(f"Hit rate by policy, pool {pool_mb:.0f} MiB, {TRACE} requests over {N_ADAPTERS} adapters:\n")
    print("| alpha | LRU | LFU |\n| ---: | ---: | ---: |")
    for alpha in ALPHAS:
        lru, lfu = trace[f"{alpha}/lru"]["hit_rate"], trace[f"{alpha}/lfu"]["hit_rate"]
        print(f"| {alpha} | {lru:.1%} | {lfu:.1%} |")
    base = next(r for r in runs if r["mode"] == "base")
    resident = next(r for r in runs if r["mode"] == "resident")
    print("\n| run | alpha | pool MiB | decode tok/s | vs resident | hit rate | loads | evictions | "
          "load p50 / p99 ms | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        lat = (f"{r['load_p50_ms']:.2f} / {r['load_p99_ms']:.2f}" if r["load_p50_ms"] is not None
               else "-")
        print(f"| {r['mode']} | {r['alpha']} | {r['pool_mb']:.0f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / resident['tok_s']:.2f}x | {r['hit_rate']:.1%} | {r['loads']} | "
              f"{r['evictions']} | {lat} | {r['peak_rss_mb']:.1f} |")
    pool1 = next(r for r in runs if r["mode"] == "pool" and r["alpha"] == 1.0)
    limit = (base["peak_rss_mb"] + pool_mb) * 1.10
    print(f"\nPeak RSS with 10,000 adapters (alpha 1): {pool1['peak_rss_mb']:.1f} MB; base serving "
          f"{base['peak_rss_mb']:.1f} MB + pool {pool_mb:.0f} MiB + 10% = {limit:.1f} MB")
    print(f"Throughput with 10,000 adapters vs all resident (alpha 1): "
          f"{pool1['tok_s'] / resident['tok_s']:.2f}x (target >= 0.80x)")
    print(f"RSS over time (s, MB), pool alpha 1: {pool1['rss_over_time']}")


if __name__ == "__main__":
    main()
