"""What HTTP costs: `edgelora serve` vs the in-process Engine, same work, same run.

    tox -e bench -- (runs all benchmarks)    or: python tools/bench_server.py [--threads 2]

Work: 16 concurrent streaming requests, each with its own adapter (16 distinct seeded random
rank-8 GGUF-LoRA adapters on all seven projections, imported into one store), greedy,
MAX_TOKENS tokens each with EOS ignored.

- in-process: a fresh process loads the model, starts an Engine on the store, and 16 threads
  each submit one request and time every text piece they receive;
- over HTTP: `edgelora serve` on a loopback port (a subprocess), and a client process running 16
  concurrent streaming POST /completion (llama.cpp's route: its chunks carry their token ids)
  with httpx (asyncio), timing every SSE chunk.

Reported (medians of ROUNDS alternating rounds):
- aggregate decode throughput: tokens generated / wall time from the 16th first token to
  the last token (the window in which all 16 decode), and end to end (first submit to last token);
- per-token latency: the median gap between consecutive pieces of one stream (a piece is the
  text one step makes ready, almost always one token); HTTP's added latency is its median minus
  the in-process median;
- idle RSS: the server after start-up (model loaded, engine started, one warm-up request) vs the
  in-process process at the same point.
The client shares the machine's cores with the server (as a client on the board would not):
its SSE parsing is counted against HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import write_adapters  # noqa: E402
from benchutil import current_rss_mb, nothing_answers, run_child, wait_healthy, warm_edgelora  # noqa: E402

CLIENTS = 16
MAX_TOKENS = 96
ROUNDS = 3
PROMPT = "Tenant {i} asks: write a short story about a lighthouse keeper and the sea."


def build_store(root: Path, model: str) -> Path:
    """16 random adapters imported into a store under root."""
    from edgelora_np.adapters.store import AdapterStore, model_fingerprint
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    cfg = config_from_gguf(open_gguf(model))
    store = AdapterStore(root / "store", create=True)
    for path in write_adapters(root, CLIENTS):
        store.import_adapter(path, cfg, model_fingerprint(model))
    return root / "store"


def rates(streams: list[list[tuple[float, int]]], t_start: float) -> dict:
    """Throughput and gaps from each stream's pieces: (arrival time, tokens in the piece)."""
    firsts = [s[0][0] for s in streams]
    last = max(s[-1][0] for s in streams)
    all_decoding = max(firsts)
    tokens_in_window = sum(n for s in streams for t, n in s if t > all_decoding)
    gaps = [b[0] - a[0] for s in streams for a, b in zip(s, s[1:])]
    return {"decode_tok_s": tokens_in_window / (last - all_decoding),
            "e2e_tok_s": sum(n for s in streams for _, n in s) / (last - t_start),
            "gap_p50_ms": statistics.median(gaps) * 1e3,
            "ttft_p50_ms": statistics.median(f - t_start for f in firsts) * 1e3}


# --- in-process ---------------------------------------------------------------------------------

def child_inproc(model: str, store: str, threads: int) -> dict:
    import edgelora_np as el

    m = el.load_model(model, n_threads=threads, progress=False)
    engine = el.Engine(m, store=store, max_seqs=CLIENTS, max_batch_tokens=256,
                       kv_tokens=CLIENTS * m.n_ctx)
    engine.submit([0], max_tokens=1, temperature=0.0).run()       # as the server's start-up
    idle_rss = current_rss_mb()
    out = []
    for _ in range(ROUNDS):
        streams: list[list[tuple[float, int]]] = [[] for _ in range(CLIENTS)]
        t0 = time.perf_counter()

        def client(i, streams=streams):
            gen = engine.submit(PROMPT.format(i=i), adapter=f"tenant{i}", max_tokens=MAX_TOKENS,
                                temperature=0.0, ignore_eos=True)
            for delta in gen.deltas():
                streams[i].append((time.perf_counter(), len(delta.token_ids)))

        workers = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out.append(rates(streams, t0))
    engine.close()
    return {"idle_rss_mb": idle_rss, "rounds": out}


# --- over HTTP ----------------------------------------------------------------------------------

def child_client(url: str) -> dict:
    import httpx

    async def one(http, i, streams):
        body = {"adapter": f"tenant{i}", "prompt": PROMPT.format(i=i), "n_predict": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True}
        async with http.stream("POST", f"{url}/completion", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk["tokens"]:
                        streams[i].append((time.perf_counter(), len(chunk["tokens"])))

    async def round_():
        streams: list[list[tuple[float, int]]] = [[] for _ in range(CLIENTS)]
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(http, i, streams) for i in range(CLIENTS)))
        return rates(streams, t0)

    return asyncio.run(round_())


def serve(model: str, store: str, threads: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgelora_np.cli", "serve", "--model", model, "--store", store,
           "--port", str(port), "--threads", str(threads), "--max-seqs", str(CLIENTS)]
    if (busy := nothing_answers(f"http://127.0.0.1:{port}")) is not None:
        sys.exit(f"edgelora serve: {busy} (a leftover server?)")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    failure = wait_healthy(f"http://127.0.0.1:{port}", proc, 300)
    if failure is not None:
        proc.kill()
        sys.exit(f"edgelora serve {failure}:\n{proc.stderr.read()[-3000:]}")
    return proc


def rss_of(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS")


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", choices=["inproc", "client"])
    ap.add_argument("--store", default=None)
    ap.add_argument("--url", default=None)
    args = ap.parse_args()
    if args.child == "inproc":
        print(json.dumps(child_inproc(args.model, args.store, args.threads)))
        return
    if args.child == "client":
        print(json.dumps(child_client(args.url)))
        return

    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(args.model))
    warm_edgelora(model)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(build_store(Path(tmp), model))
        inproc = run_child(__file__, "inproc", ["--model", model, "--store", store,
                                                "--threads", str(args.threads)])
        server = serve(model, store, args.threads, args.port)
        try:
            idle_server = rss_of(server.pid)
            http = [run_child(__file__, "client", ["--url", f"http://127.0.0.1:{args.port}"])
                    for _ in range(ROUNDS)]
        finally:
            server.terminate()
            server.wait(60)
    report(inproc, http, idle_server, args.threads)


def report(inproc: dict, http: list[dict], idle_server: float, threads: int) -> None:
    def med(rounds, key):
        return statistics.median(r[key] for r in rounds)

    rows = [("aggregate decode tok/s (all 16 decoding)", "decode_tok_s", "{:.1f}"),
            ("aggregate tok/s, end to end", "e2e_tok_s", "{:.1f}"),
            ("per-token gap p50 (ms)", "gap_p50_ms", "{:.2f}"),
            ("time to first token p50 (ms)", "ttft_p50_ms", "{:.0f}")]
    print(f"\n{CLIENTS} streaming clients, {CLIENTS} distinct rank-8 adapters, {MAX_TOKENS} tokens "
          f"each, {threads} threads, median of {ROUNDS} rounds\n")
    print("| | in-process Engine | edgelora serve (HTTP) | HTTP / in-process |")
    print("| --- | ---: | ---: | ---: |")
    for label, key, fmt in rows:
        a, b = med(inproc["rounds"], key), med(http, key)
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
    added = med(http, "gap_p50_ms") - med(inproc["rounds"], "gap_p50_ms")
    print(f"\nper-token latency added by HTTP (p50 gap difference): {added:+.2f} ms")
    print(f"idle RSS: in-process {inproc['idle_rss_mb']:.1f} MB, server {idle_server:.1f} MB "
          f"({idle_server - inproc['idle_rss_mb']:+.1f} MB)")
    print("targets: decode >= 0.9x, added latency <= 1 ms, idle RSS <= in-process + 50 MB")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
