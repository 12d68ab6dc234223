"""The paper's experiment: `edgelora serve` against the real llama-server, under one workload.

    tox -e bench -- (all benchmarks)    or: python tools/bench_workload.py [--threads 2] [--full]

Both servers run on this machine with the same GGUF, threads, slots and context per slot, and
the same n random rank-8 adapters (GGUF-LoRA files, seeded; tools/make_test_adapters.py): all n
passed to llama-server as `--lora` at start (`--lora-init-without-apply`), imported into an
adapter store for `edgelora serve`. Requests come from `edgelora bench` (edgelora_np/loadgen/):
open loop, Gamma arrivals (cv 1), Zipf adapter popularity, token-id prompts of U{Il..Iu} tokens,
U{Ol..Ou} output tokens with EOS ignored, greedy, no prompt cache on either side. Each request
names its adapter (llama-server: `lora: [{id, scale: 1}]`; ours: `adapter: NAME`).

Runs (the default grid takes about 40 minutes; --full is the issue's whole grid, hours):
- single stream: one request alone, 128 greedy tokens on the base model, decode tok/s from its
  streamed pieces (3 alternating rounds, on the first server pair);
- rate sweep at n = 32, alpha = 1, 16 slots: throughput vs offered rate, TTFT SLO attainment
  (rates 0.25-1.5 req/s, set for the 2-core AVX2 VM where both servers saturated near 1 req/s
  with this request mix; on the 2-core AVX-512 VM ours keeps up with 3-4 and llama-server with
  1.5: --rates 1.0,1.5,2.0,2.5,3.0,4.0 there);
- saturation (the top rate, SATURATION_S of arrivals) at n = 8 and 128, and at alpha = 0.5 and 2;
- memory with 1024 adapters (rank 8 on q and v): our server's peak RSS serving them through its
  pool, and what llama-server does with 1024 `--lora` (start time, RSS, or failure);
- the router: a share of the requests say model "auto" (ours only; llama-server has none).
--sweep-only keeps only the rate sweep (n = 32, alpha = 1), each server stopped after the first
rate it cannot keep up with; --slots sets both servers' parallel sequences (default 16).

"Sustainable" is the largest offered rate the server keeps up with (every request done within
the run's duration + 30 s); its throughput is the figure compared. Results: artifacts/bench_workload/
(JSON of every run), plots in docs/ (PNG), the table on stdout for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import nothing_answers, wait_healthy, warm_edgelora  # noqa: E402
from make_test_adapters import ALL_SEVEN, AdapterSpec, L, make_factors, write_gguf_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench_workload"
RANK = 8
SLOTS = 16
CTX_PER_SLOT = 512
PROMPT_TOKENS = (16, 128)
OUTPUT_TOKENS = (16, 64)
DURATION = 60.0
SATURATION_S = 40.0    # arrivals of a saturation run: enough requests to measure a peak
RATES = (0.25, 0.5, 0.75, 1.0, 1.5)
EXTRA = {"temperature": 0, "cache_prompt": False}
POOL_MB = 256
KEEP_UP_S = 30.0       # a run keeps up if every request is done within its duration + this
QV = ("attn_q", "attn_v")
SINGLE_PROMPT = "Once upon a time"
SINGLE_TOKENS = 128
SINGLE_ROUNDS = 3


# --- adapters and servers ---------------------------------------------------------------------

def write_adapters(folder: Path, n: int, projections=ALL_SEVEN, seed0: int = 1000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"tenant{i}.gguf"
        if not path.exists():
            spec = AdapterSpec(rank=RANK, alpha=2.0 * RANK, layers=tuple(range(L)),
                               projections=projections, strength=0.05, seed=seed0 + i)
            write_gguf_lora(path, make_factors(spec), spec.alpha)
        paths.append(path)
    return paths


def import_store(store_dir: Path, model: str, paths: list[Path]) -> None:
    from edgelora_np.adapters.store import AdapterStore, model_fingerprint
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg, fp = config_from_gguf(open_gguf(model)), model_fingerprint(model)
    store = AdapterStore(store_dir, create=True)
    for p in paths:
        store.import_adapter(p, cfg, fp)
    store.close()


class Server:
    """A server process on a loopback port, up once /health answers 200 (env: the process's
    environment, None: this one's)."""

    def __init__(self, kind: str, cmd: list[str], port: int, log: Path,
                 env: dict[str, str] | None = None):
        self.kind, self.url = kind, f"http://127.0.0.1:{port}"
        if (busy := nothing_answers(self.url)) is not None:
            sys.exit(f"{kind}: {busy} (a leftover server?)")
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).parent, env=env)
        self.failure = wait_healthy(self.url, self.proc, 1800)
        self.start_seconds = time.perf_counter() - t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB."""
        vals = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line.split(":")[0]] = int(line.split()[1]) * 1024 / 1e6
        return vals["VmRSS"], vals["VmHWM"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def llama_server(binary: str, model: str, threads: int, slots: int, loras: list[Path],
                 port: int, log: Path, cache_ram: int | None = 0) -> Server:
    """cache_ram: its --cache-ram in MiB (0: the host-memory prompt cache off; None: default)."""
    cmd = [binary, "-m", model, "-t", str(threads), "-np", str(slots),
           "-c", str(slots * CTX_PER_SLOT), "--port", str(port), "--no-webui",
           "--lora-init-without-apply"]
    if cache_ram is not None:
        cmd += ["--cache-ram", str(cache_ram)]
    cmd += ["--lora", ",".join(str(p) for p in loras)]
    return Server("llama-server", cmd, port, log)


def edgelora_server(model: str, store: Path, threads: int, slots: int, port: int,
                    log: Path) -> Server:
    cmd = [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model, "--store",
           str(store), "--port", str(port), "--threads", str(threads), "--max-seqs", str(slots),
           "--ctx", str(CTX_PER_SLOT), "--adapter-pool-mb", str(POOL_MB), "--max-queue", "100000"]
    return Server("edgelora", cmd, port, log)


# --- runs ---------------------------------------------------------------------------------------

def run(server: Server, *, rate: float, n: int, alpha: float, duration: float = DURATION,
        auto: float = 0.0, seed: int = 0) -> dict:
    from edgelora_np.loadgen import WorkloadSpec, run_bench

    spec = WorkloadSpec(rate=rate, duration=duration, alpha=alpha, cv=1.0,
                        prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS,
                        auto_fraction=auto, seed=seed)
    api = "llamacpp" if server.kind == "llama-server" else "edgelora"
    result = run_bench(server.url, spec, api=api, adapters=[f"tenant{i}" for i in range(n)],
                       server_pid=server.pid, extra=EXTRA, timeout=1200)
    s = result.summary
    doc = {"server": server.kind, "rate": rate, "n": n, "alpha": alpha, "auto": auto,
           "duration": duration, "summary": s, "process": result.server,
           "ttfts": sorted(r.ttft for r in result.results if r.ttft is not None),
           "requests": len(result.results)}
    achieved = s["throughput"]["requests_per_s"] or 0.0
    doc["keeps_up"] = s["succeeded"] == s["requests"] and s["makespan_s"] <= duration + KEEP_UP_S
    tok = s["throughput"]["output_tokens_per_s"] or 0.0
    print(f"  {server.kind:<12} n={n:<4} alpha={alpha:<4} rate={rate:<5} auto={auto:<4} "
          f"{tok:7.1f} tok/s  {achieved:5.2f} req/s  TTFT p50 {fmt(s['ttft_s'], 'p50')} "
          f"p99 {fmt(s['ttft_s'], 'p99')}  TTFT<=1s {slo(s, 1.0):.0%}  <=6s {slo(s, 6.0):.0%}"
          f"  errors {s['errors']}", flush=True)
    return doc


def single_stream(server: Server, *, tokens: int = SINGLE_TOKENS) -> float:
    """Decode tok/s of one streamed request alone on the server (base model, greedy, EOS
    ignored): tokens after the first over the time from the first piece to the last.

    llama-server gets every adapter at scale 0 spelled out: a request that names none runs
    with all of them at their load-time scale, 1 even under --lora-init-without-apply (its
    /lora-adapters says so), which with 32 adapters decodes at ~11 tok/s instead of ~80."""
    import httpx

    body = {"prompt": SINGLE_PROMPT, "n_predict": tokens, "ignore_eos": True, "stream": True,
            **EXTRA}
    if server.kind == "llama-server":
        body["lora"] = [{"id": 0, "scale": 0.0}]          # the others default to 0 then
    stamps = []
    with httpx.stream("POST", server.url + "/completion", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("content"):
                stamps.append(time.perf_counter())
    return (tokens - 1) / (stamps[-1] - stamps[0])


def slo(summary: dict, bound: float) -> float:
    """Share of all requests whose first token came within `bound` seconds."""
    return next((x["attained"] or 0.0) for x in summary["slo_ttft"] if x["bound_s"] == bound)


def fmt(stats: dict | None, key: str) -> str:
    return "-" if not stats or stats.get(key) is None else f"{stats[key]:.2f}s"


def sustainable(docs: list[dict]) -> dict | None:
    kept = [d for d in docs if d["keeps_up"]]
    return max(kept, key=lambda d: d["rate"]) if kept else None


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--full", action="store_true", help="the issue's whole grid (hours)")
    ap.add_argument("--duration", type=float, default=DURATION)
    ap.add_argument("--rates", type=lambda s: tuple(float(r) for r in s.split(",")),
                    default=RATES, help="comma-separated offered rates of the sweep (req/s)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--slots", type=int, default=SLOTS,
                    help=f"parallel sequences of both servers (default {SLOTS}; --full runs 16 and 32)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the rate sweep at n = 32, alpha = 1: no saturation, router or "
                         "memory runs, and each server stops at the first rate it cannot keep up with")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plots from artifacts/bench_workload/results.json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((OUT / "results.json").read_text())
        plots(saved["runs"], saved.get("memory"))
        return

    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(args.model))
    warm_edgelora(model)
    binary = subprocess.run([str(Path(__file__).parent / "build_llama_server.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    OUT.mkdir(parents=True, exist_ok=True)
    docs: list[dict] = []
    single: dict[str, list[float]] = {}
    ns = (8, 32, 128, 1024) if args.full else (32,) if args.sweep_only else (8, 32, 128)
    alphas = (0.5, 1.0, 2.0)
    slot_counts = (16, 32) if args.full else (args.slots,)
    overloaded: set[str] = set()      # --sweep-only: servers past the first rate they lost
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loras = write_adapters(tmp / "loras", max(ns))
        import_store(tmp / "store", model, loras)
        for slots in slot_counts:
            for n in ns:
                ours = edgelora_server(model, tmp / "store", args.threads, slots, 8801,
                                       OUT / f"edgelora_{slots}_{n}.log")
                theirs = llama_server(binary, model, args.threads, slots, loras[:n], 8802,
                                      OUT / f"llama_{slots}_{n}.log")
                for server in (ours, theirs):
                    if server.failure:
                        sys.exit(f"{server.kind} failed to start: {server.failure} "
                                 f"(log in {server.log.name})")
                try:
                    if not single:
                        single = single_stream_rounds(theirs, ours)
                    top = args.rates[-1]
                    sweep_alphas = alphas if args.full or (n == 32 and not args.sweep_only) else (1.0,)
                    for alpha in sweep_alphas:
                        full_sweep = args.full or (n == 32 and alpha == 1.0)
                        for rate in (args.rates if full_sweep else (top,)):
                            duration = args.duration if full_sweep else SATURATION_S
                            for server in (theirs, ours):        # alternating, same seed
                                if server.kind in overloaded:
                                    continue
                                doc = run(server, rate=rate, n=n, alpha=alpha,
                                          duration=duration)
                                doc["slots"] = slots
                                docs.append(doc)
                                if args.sweep_only and not doc["keeps_up"]:
                                    overloaded.add(server.kind)
                    if n == 32 and slots == SLOTS and not args.sweep_only:
                        for rate in (args.rates[1], top):
                            doc = run(ours, rate=rate, n=n, alpha=1.0, auto=0.5,
                                      duration=args.duration)
                            doc["slots"] = slots
                            docs.append(doc)
                finally:
                    ours.stop()
                    theirs.stop()
                (OUT / "results.json").write_text(json.dumps({"runs": docs, "single_stream": single},
                                                             indent=1))
        skip_memory = args.skip_memory or args.sweep_only
        memory = None if skip_memory else memory_row(model, binary, args.threads, tmp)
    (OUT / "results.json").write_text(json.dumps({"runs": docs, "single_stream": single,
                                                  "memory": memory}, indent=1))
    report(docs, memory, single)
    plots(docs, memory)


def memory_row(model: str, binary: str, threads: int, tmp: Path) -> dict:
    """1024 rank-8 q,v adapters: our server through its pool vs llama-server with 1024 --lora."""
    n = 1024
    loras = write_adapters(tmp / "qv", n, projections=QV, seed0=5000)
    import_store(tmp / "qv_store", model, loras)
    row = {"n": n}
    base = edgelora_server(model, tmp / "empty_store", threads, SLOTS, 8803,
                           OUT / "edgelora_base.log")
    row["edgelora_base_rss_mb"] = base.rss_mb()[0]
    base.stop()
    ours = edgelora_server(model, tmp / "qv_store", threads, SLOTS, 8804,
                           OUT / "edgelora_1024.log")
    try:
        doc = run(ours, rate=1.0, n=n, alpha=0.5, duration=SATURATION_S)
        row["edgelora"] = {"start_s": ours.start_seconds, "peak_rss_mb": ours.rss_mb()[1],
                           "summary": doc["summary"]}
    finally:
        ours.stop()
    theirs = llama_server(binary, model, threads, SLOTS, loras, 8805, OUT / "llama_1024.log")
    row["llama-server"] = {"start_s": theirs.start_seconds, "failure": theirs.failure}
    if theirs.failure is None:
        try:
            row["llama-server"]["idle_rss_mb"] = theirs.rss_mb()[0]
            doc = run(theirs, rate=0.25, n=n, alpha=0.5, duration=60)
            row["llama-server"]["peak_rss_mb"] = theirs.rss_mb()[1]
            row["llama-server"]["summary"] = doc["summary"]
        finally:
            theirs.stop()
    row["pool_mb"] = POOL_MB
    return row


def single_stream_rounds(theirs: Server, ours: Server) -> dict[str, list[float]]:
    """single_stream on both servers, alternating, SINGLE_ROUNDS rounds."""
    rates: dict[str, list[float]] = {theirs.kind: [], ours.kind: []}
    for _ in range(SINGLE_ROUNDS):
        for server in (theirs, ours):
            rates[server.kind].append(single_stream(server))
            print(f"  {server.kind:<12} single stream {rates[server.kind][-1]:6.1f} tok/s",
                  flush=True)
    return rates


def report(docs: list[dict], memory: dict | None, single: dict[str, list[float]]) -> None:
    if single:
        theirs, ours = (statistics.median(single[k]) for k in ("llama-server", "edgelora"))
        print(f"\nsingle stream, decode tok/s (median of {SINGLE_ROUNDS}): llama-server "
              f"{theirs:.1f}, edgelora {ours:.1f}, {ours / theirs:.2f}x")
    print("\n| n | alpha | slots | server | sustainable rate (req/s) | its output tok/s | "
          "peak output tok/s | TTFT p99 at that rate | TTFT <= 1 s |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    keys = sorted({(d["n"], d["alpha"], d["slots"]) for d in docs if not d["auto"]})
    for n, alpha, slots in keys:
        for kind in ("llama-server", "edgelora"):
            group = [d for d in docs if (d["n"], d["alpha"], d["slots"], d["server"]) ==
                     (n, alpha, slots, kind) and not d["auto"]]
            if not group:
                continue
            best = sustainable(group)
            peak = max((d["summary"]["throughput"]["output_tokens_per_s"] or 0) for d in group)
            if best is None:
                print(f"| {n} | {alpha} | {slots} | {kind} | none of {[d['rate'] for d in group]}"
                      f" | - | {peak:.1f} | - | - |")
                continue
            s = best["summary"]
            print(f"| {n} | {alpha} | {slots} | {kind} | {best['rate']} | "
                  f"{s['throughput']['output_tokens_per_s']:.1f} | {peak:.1f} | "
                  f"{fmt(s['ttft_s'], 'p99')} | {slo(s, 1.0):.0%} |")
    if memory:
        print(f"\nmemory, {memory['n']} adapters: {json.dumps(memory, default=str)[:2000]}")


def cdf_rate(sweep: list[dict]) -> float | None:
    """The rate of the TTFT CDF: the largest llama-server keeps up with (else the lowest)."""
    theirs = [d for d in sweep if d["server"] == "llama-server" and d.get("ttfts") is not None]
    if not theirs:
        return None
    best = sustainable(theirs)
    return best["rate"] if best else min(d["rate"] for d in theirs)


def memory_points(docs: list[dict], memory: dict | None) -> dict[str, list[tuple[int, float]]]:
    """Peak RSS (MB) against the number of adapters n, per server: every run's server process,
    the largest peak per n (all seven projections for n <= 128; rank 8 on q and v for 1024)."""
    points: dict[str, dict[int, float]] = {"llama-server": {}, "edgelora": {}}
    for d in docs:
        rss = (d.get("process") or {}).get("peak_rss_mb")
        if rss:
            points[d["server"]][d["n"]] = max(rss, points[d["server"]].get(d["n"], 0.0))
    if memory:
        ours, theirs = memory.get("edgelora") or {}, memory.get("llama-server") or {}
        if ours.get("peak_rss_mb"):
            points["edgelora"][memory["n"]] = ours["peak_rss_mb"]
        if theirs.get("peak_rss_mb"):
            points["llama-server"][memory["n"]] = theirs["peak_rss_mb"]
    return {kind: sorted(p.items()) for kind, p in points.items()}


def plots(docs: list[dict], memory: dict | None = None) -> None:
    """docs/bench_workload.png: throughput and TTFT <= 1 s attainment against the offered rate
    (n = 32, alpha = 1), the TTFT CDF at one rate, and peak RSS against n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [d for d in docs if d["n"] == 32 and d["alpha"] == 1.0 and not d["auto"]
             and d["slots"] == SLOTS]
    fig, ((a, b), (c, e)) = plt.subplots(2, 2, figsize=(11, 8))
    at = cdf_rate(sweep)
    for kind, style in (("llama-server", "o--"), ("edgelora", "s-")):
        pts = sorted(((d["rate"], d) for d in sweep if d["server"] == kind), key=lambda p: p[0])
        if pts:
            rates = [r for r, _ in pts]
            a.plot(rates, [d["summary"]["throughput"]["output_tokens_per_s"] or 0
                           for _, d in pts], style, label=kind)
            b.plot(rates, [100 * slo(d["summary"], 1.0) for _, d in pts], style, label=kind)
        run = next((d for r, d in pts if r == at and d.get("ttfts") is not None), None)
        if run:
            ttfts = run["ttfts"]
            # Failed requests never reach the curve: it ends below 100% by their share.
            share = [100.0 * (i + 1) / run["requests"] for i in range(len(ttfts))]
            c.step(ttfts, share, where="post", label=f"{kind} ({len(ttfts)}/{run['requests']})",
                   linestyle="--" if kind == "llama-server" else "-")
    for kind, style in (("llama-server", "o--"), ("edgelora", "s-")):
        pts = memory_points(docs, memory)[kind]
        if pts:
            e.plot([n for n, _ in pts], [mb for _, mb in pts], style, label=kind)
    a.set(xlabel="offered rate (req/s)", ylabel="output tok/s", title="throughput, n=32, alpha=1")
    b.set(xlabel="offered rate (req/s)", ylabel="% requests with TTFT <= 1 s",
          title="SLO attainment")
    c.set(xscale="log", xlabel="TTFT (s, from the intended arrival)", ylabel="% of requests",
          title=f"TTFT CDF at {at} req/s" if at is not None else "TTFT CDF (no run)")
    c.axvline(1.0, color="grey", linewidth=0.8)
    e.set(xscale="log", xlabel="adapters n", ylabel="peak RSS (MB)",
          title="memory vs adapters (1024: rank 8 on q, v)")
    for ax in (a, b, c, e):
        ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_workload.png", dpi=100)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
