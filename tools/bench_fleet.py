"""A fleet of three boards behind HAProxy: adapter affinity vs round-robin, same workload.

    tox -e bench    or: python tools/bench_fleet.py [--rate 1] [--warmup 180] [--duration 120]

Three `edgelora serve` boards (one thread each, one shared store of 64 random rank-8 adapters,
each board's pool holding about a third of them) behind HAProxy, configured by `edgelora fleet
haproxy` with affinity (consistent hashing on the adapter) or with `--no-affinity`
(round-robin). Each mode starts fresh boards and runs the same seeded `edgelora bench` workload
through the balancer: Poisson arrivals, Zipf(alpha) adapter popularity, short /completion
requests with `adapter` names, EOS ignored, greedy. A warm-up (another seed) fills the pools
first, so the figures are the steady state, not the cold start every fleet pays once. Each
board's /metrics, read before and after the measured run, gives the adapter loads and the
pool's hits and misses.

Prints the table of docs/benchmarks.md; the JSON of both runs goes to artifacts/bench_fleet/.
All boards and HAProxy share this machine's cores, so absolute numbers are low; the ratio of
adapter loads is the figure that carries to real boards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_workload import Server, import_store, write_adapters  # noqa: E402
from benchutil import wait_healthy, warm_edgelora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench_fleet"
BOARDS = 3
ADAPTERS = 64
POOL_SHARE = 1 / 3               # of the adapters one board's pool holds
PORT0 = 8851                     # boards on PORT0.., HAProxy on PORT0 + 10
SLOTS = 8
CTX = 512
PROMPT_TOKENS = (8, 24)          # short requests: many per second on a shared 2-core machine,
OUTPUT_TOKENS = (4, 12)          # so that each board sees far more requests than its pool holds


def pool_mb(store: Path) -> float:
    """A pool budget that holds POOL_SHARE of the store's adapters (they are all one size)."""
    from edgelora_np.adapters.store import AdapterStore

    s = AdapterStore(store)
    sizes = [row.nbytes for row in s.rows()]
    s.close()
    return math.ceil(ADAPTERS * POOL_SHARE) * max(sizes) / 2**20 * 1.01


def board(model: str, store: Path, port: int, name: str, budget_mb: float, log: Path) -> Server:
    cmd = [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model, "--store",
           str(store), "--port", str(port), "--threads", "1", "--max-seqs", str(SLOTS),
           "--ctx", str(CTX), "--adapter-pool-mb", f"{budget_mb:.2f}", "--max-queue", "100000",
           "--name", name]
    s = Server("edgelora", cmd, port, log)
    if s.failure:
        sys.exit(f"board {name} failed to start: {s.failure} (log: {log})")
    return s


def scrape(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("edgelora_adapter_pool_") and s.name.endswith("_total"):
                out[s.name] = s.value
            if s.name == "edgelora_requests_total" and s.labels.get("status") == "200" and \
                    s.labels.get("endpoint") == "/completion":
                out["completions"] = s.value
    return out


def wait_up(url: str, proc: subprocess.Popen, log: str) -> None:
    """Until HAProxy answers /health (through a board) with 200."""
    failure = wait_healthy(url, proc, 30)
    if failure is not None:
        sys.exit(f"haproxy at {url}: {failure} (log: {log})")


def run_mode(mode: str, args, model: str, store: Path, budget_mb: float) -> dict:
    from edgelora_np.fleet import FleetOptions, haproxy_config
    from edgelora_np.loadgen import WorkloadSpec, run_bench

    ports = [PORT0 + i for i in range(BOARDS)]
    boards = [board(model, store, p, f"board{i + 1}", budget_mb, OUT / f"{mode}_board{i + 1}.log")
              for i, p in enumerate(ports)]
    cfg = OUT / f"{mode}.cfg"
    lb_port = PORT0 + 10
    cfg.write_text(haproxy_config(FleetOptions(
        boards=tuple(f"127.0.0.1:{p}" for p in ports), listen=f"127.0.0.1:{lb_port}",
        affinity=mode == "affinity")))
    log = open(OUT / f"{mode}_haproxy.log", "w")
    lb = subprocess.Popen([args.haproxy, "-db", "-f", str(cfg)], stdout=log,
                          stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{lb_port}"
    try:
        wait_up(url, lb, log.name)
        names = [f"tenant{i}" for i in range(ADAPTERS)]

        def workload(duration: float, seed: int) -> WorkloadSpec:
            return WorkloadSpec(rate=args.rate, duration=duration, alpha=args.alpha, cv=1.0,
                                prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS,
                                seed=seed)

        if args.warmup > 0:        # fill the pools first: the steady state, not the cold start
            run_bench(url, workload(args.warmup, args.seed + 1), api="edgelora", adapters=names,
                      extra={"temperature": 0}, timeout=600)
        before = [scrape(b.url) for b in boards]
        result = run_bench(url, workload(args.duration, args.seed), api="edgelora",
                           adapters=names, extra={"temperature": 0}, timeout=600)
        after = [scrape(b.url) for b in boards]
    finally:
        lb.terminate()
        lb.wait(30)
        log.close()
        for b in boards:
            b.stop()
    delta = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before)]

    def total(key: str) -> float:
        return sum(d.get(key, 0.0) for d in delta)

    s = result.summary
    hits, misses = total("edgelora_adapter_pool_hits_total"), total("edgelora_adapter_pool_misses_total")
    served = [d.get("completions", 0.0) for d in delta]
    row = {"mode": mode, "requests": s["requests"], "succeeded": s["succeeded"],
           "adapter_loads": total("edgelora_adapter_pool_loads_total"),
           "loads_per_1000": 1000 * total("edgelora_adapter_pool_loads_total") / s["requests"],
           "hit_rate": hits / (hits + misses) if hits + misses else None,
           "evictions": total("edgelora_adapter_pool_evictions_total"),
           "ttft_p50": s["ttft_s"]["p50"] if s["ttft_s"] else None,
           "ttft_p99": s["ttft_s"]["p99"] if s["ttft_s"] else None,
           "requests_per_s": s["throughput"]["requests_per_s"],
           "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
           "per_board": served}
    (OUT / f"{mode}.json").write_text(json.dumps({"row": row, "bench": result.to_json()},
                                                 indent=1))
    print(f"  {mode}: {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second offered")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of measured arrivals")
    ap.add_argument("--warmup", type=float, default=180.0,
                    help="seconds of arrivals before measuring (another seed), to fill the pools")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of popularity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="30 s of arrivals (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 30.0, 15.0
    args.haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(args.haproxy, os.X_OK):
        sys.exit("HAProxy is not installed (Debian/Ubuntu: apt-get install haproxy)")

    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(args.model))
    warm_edgelora(model)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import_store(tmp / "store", model, write_adapters(tmp / "loras", ADAPTERS))
        budget = pool_mb(tmp / "store")
        print(f"{BOARDS} boards, {ADAPTERS} adapters, pool {budget:.1f} MB per board "
              f"(~{ADAPTERS * POOL_SHARE:.0f} adapters); rate {args.rate}/s, {args.warmup:g} s "
              f"warm-up then {args.duration:g} s measured, Zipf alpha {args.alpha}", flush=True)
        rows = [run_mode(mode, args, model, tmp / "store", budget)
                for mode in ("round-robin", "affinity")]
    report(rows)


def report(rows: list[dict]) -> None:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print("\n| routing | requests (ok) | adapter loads / 1,000 requests | evictions / 1,000 | "
          "pool hit rate | TTFT p50 | TTFT p99 | req/s | output tok/s | requests per board |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} ({r['succeeded']}) | {r['loads_per_1000']:.0f} | "
              f"{1000 * r['evictions'] / r['requests']:.0f} | "
              f"{f(r['hit_rate'], '.1%')} | {f(r['ttft_p50'], '.2f')} s | "
              f"{f(r['ttft_p99'], '.2f')} s | {f(r['requests_per_s'], '.2f')} | "
              f"{f(r['output_tokens_per_s'], '.1f')} | "
              f"{' / '.join(str(int(n)) for n in r['per_board'])} |")
    rr, aff = rows
    if aff["loads_per_1000"]:
        print(f"\naffinity cuts adapter loads by {rr['loads_per_1000'] / aff['loads_per_1000']:.1f}x")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
