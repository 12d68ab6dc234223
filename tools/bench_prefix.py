"""Multi-turn chat, a system prompt per tenant: time to first token with and without prompt caching.

    tox -e bench (all benchmarks)    or: python tools/bench_prefix.py [--threads 2] [--skip-llama]

The workload (issue #16): 8 tenants, each with its own adapter (the seeded rank-8 GGUF-LoRA files
of tools/bench_workload.py) and its own system prompt of S tokens. Each tenant runs C
conversations at once (default 1) of 4 turns, closed loop: turn k+1 is sent when turn k's answer
has ended, its prompt being the whole history so far (system prompt, every user message and
every answer, as token ids) plus a new user message of U tokens; the answer is R tokens (EOS
ignored, greedy). Conversation j of a tenant starts j * STAGGER_S seconds after the first.
Before the measured runs, one warm-up turn per tenant with the same system prompt but other user
messages (adapters loaded; the system prompt is what earlier users of the tenant's application
already sent, so a cache may hold it, as it would in service).

Both servers run here with the same GGUF, threads, 8 slots, context per slot and adapters, started
as tools/bench_workload.py starts them (llama-server keeps its default --cache-ram here). The same
workload runs twice on each: every request with `cache_prompt: false`, then with `true`.
Reported per run: TTFT p50 and p90 (send to first token), aggregate output tokens/s (all answers'
tokens over the run's makespan), prompt tokens the server said it reused, and whether every
answer equals the no-cache run's (token ids). The issue's bar: our TTFT p50 with the cache at
least 3x better than without, throughput not worse. JSON: artifacts/bench_prefix/results.json.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_workload import Server, edgelora_server, import_store, llama_server, write_adapters  # noqa: E402
from benchutil import warm_edgelora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench_prefix"
TENANTS = 8
TURNS = 4
SYSTEM_TOKENS = 256     # S
USER_TOKENS = 32        # U
REPLY_TOKENS = 16       # R: S + TURNS * (U + R) = 448 fits the 512 positions of a slot
STAGGER_S = 2.0


@dataclass
class Turn:
    tenant: int
    conversation: int
    turn: int
    prompt_tokens: int
    ttft: float | None = None
    seconds: float | None = None
    tokens: list[int] = field(default_factory=list)
    cached: int | None = None        # what the server says it reused
    error: str | None = None


def tenant_tokens(pool: list[int], seed: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).choice(pool, n).tolist()


async def conversation(client, api, targets, pool, tenant: int, conv: int, extra: dict,
                       turns: list[Turn], args, n_turns: int, salt: int) -> None:
    """One tenant's chat: n_turns requests, each after the previous answer, history resent."""
    await asyncio.sleep(conv * STAGGER_S)
    seed = 1_000_000 * salt                                              # of the user messages
    history = tenant_tokens(pool, 1000 + tenant, args.system)            # the system prompt
    for k in range(n_turns):
        history = history + tenant_tokens(pool, seed + 10_000 * (tenant + 1) + 100 * conv + k,
                                          args.user)
        body = {**api.payload(targets, tenant, history, args.reply), **extra,
                "return_tokens": True}
        t = Turn(tenant, conv, k, len(history))
        turns.append(t)
        await one_turn(client, api, body, t)
        if t.error:
            return
        history = history + t.tokens


async def one_turn(client, api, body: dict, t: Turn) -> None:
    """Stream one answer: its first-token time, its token ids, the server's reuse count."""
    from edgelora_np.loadgen.apis import StreamState

    state, start = StreamState(), time.perf_counter()
    async with client.stream("POST", api.route, json=body) as resp:
        if resp.status_code != 200:
            t.error = f"http_{resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if api.on_event(event, state) and t.ttft is None:
                t.ttft = time.perf_counter() - start
            if not event.get("stop"):
                t.tokens.extend(event.get("tokens") or ())
            else:
                timings = event.get("timings") or {}
                t.cached = timings.get("cache_n", event.get("tokens_cached"))
            if state.error:
                t.error = state.error
                return
    t.seconds = time.perf_counter() - start
    if len(t.tokens) != body["n_predict"]:
        t.error = f"{len(t.tokens)} token ids streamed, {body['n_predict']} asked"


async def run_chat(server: Server, api_name: str, cache: bool, args, n_turns: int = TURNS,
                   salt: int = 0) -> dict:
    from edgelora_np.loadgen import discover, make_client, token_pool
    from edgelora_np.loadgen.apis import api_of

    api = api_of(api_name)
    extra = {"temperature": 0, "cache_prompt": cache}
    async with make_client(server.url, timeout=1200, keepalive=False) as client:
        targets = await discover(client, api, [f"tenant{i}" for i in range(TENANTS)])
        pool = await token_pool(client)
        turns: list[Turn] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(client, api, targets, pool, i, c, extra, turns, args,
                                            n_turns, salt)
                               for i in range(TENANTS) for c in range(args.conversations)))
        makespan = time.perf_counter() - t0
    turns.sort(key=lambda t: (t.tenant, t.conversation, t.turn))
    errors = [t.error for t in turns if t.error]
    ttfts = sorted(t.ttft for t in turns if t.ttft is not None)
    doc = {"server": server.kind, "cache_prompt": cache, "makespan_s": makespan,
           "requests": len(turns), "errors": errors[:5], "n_errors": len(errors),
           "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
           "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
           "output_tok_s": sum(len(t.tokens) for t in turns) / makespan,
           "prompt_tokens": sum(t.prompt_tokens for t in turns),
           "cached_tokens": sum(t.cached or 0 for t in turns),
           "turns": [t.__dict__ for t in turns]}
    print(f"  {server.kind:<12} cache_prompt={str(cache):<5} turns={n_turns}  "
          f"TTFT p50 {doc['ttft_p50_s']:.3f}s  "
          f"p90 {doc['ttft_p90_s']:.3f}s  {doc['output_tok_s']:6.1f} output tok/s  "
          f"reused {doc['cached_tokens']}/{doc['prompt_tokens']} prompt tokens  "
          f"errors {len(errors)}", flush=True)
    return doc


def same_answers(a: dict, b: dict) -> bool:
    return [t["tokens"] for t in a["turns"]] == [t["tokens"] for t in b["turns"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--conversations", type=int, default=1, help="per tenant, at once (C)")
    ap.add_argument("--system", type=int, default=SYSTEM_TOKENS, help="system prompt tokens (S)")
    ap.add_argument("--user", type=int, default=USER_TOKENS, help="tokens per user message (U)")
    ap.add_argument("--reply", type=int, default=REPLY_TOKENS, help="tokens per answer (R)")
    ap.add_argument("--servers", default="edgelora,llama-server",
                    help="which to run, comma-separated (edgelora, llama-server)")
    args = ap.parse_args()

    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(args.model))
    warm_edgelora(model)
    OUT.mkdir(parents=True, exist_ok=True)
    slots = TENANTS * args.conversations
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loras = write_adapters(tmp / "loras", TENANTS)
        import_store(tmp / "store", model, loras)
        wanted = args.servers.split(",")
        servers = []
        if "edgelora" in wanted:
            servers.append(("edgelora", lambda: edgelora_server(
                model, tmp / "store", args.threads, slots, 8811, OUT / "edgelora.log")))
        if "llama-server" in wanted:
            binary = subprocess.run([str(Path(__file__).parent / "build_llama_server.sh")],
                                    check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1]
            servers.append(("llamacpp", lambda: llama_server(
                binary, model, args.threads, slots, loras, 8812, OUT / "llama.log",
                cache_ram=None)))
        for api_name, start in servers:
            server = start()
            if server.failure:
                sys.exit(f"{server.kind} failed to start: {server.failure}")
            try:
                # The warm-up turn (other user messages); then the cache first, so that the
                # no-cache run cannot find any of it in a llama-server slot either way.
                asyncio.run(run_chat(server, api_name, True, args, n_turns=1, salt=1))
                cached = asyncio.run(run_chat(server, api_name, True, args))
                pair = [asyncio.run(run_chat(server, api_name, False, args)), cached]
            finally:
                server.stop()
            pair[1]["same_answers_as_no_cache"] = same_answers(pair[0], pair[1])
            runs += pair
    name = "results.json" if len(servers) == 2 else f"results_{args.servers}.json"
    (OUT / name).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    report(runs, args)


def report(runs: list[dict], args) -> None:
    print(f"\n{TENANTS} tenants x {args.conversations} conversation(s) x {TURNS} turns; "
          f"system prompt {args.system}, user {args.user}, answer {args.reply} tokens\n")
    print("| server | cache_prompt | TTFT p50 | TTFT p90 | output tok/s | prompt tokens reused | "
          "TTFT p50 speed-up | throughput ratio | answers = no-cache |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for kind in ("edgelora", "llama-server"):
        pair = {r["cache_prompt"]: r for r in runs if r["server"] == kind}
        for cache in (False, True):
            r = pair.get(cache)
            if r is None:
                continue
            base = pair[False]
            speed = base["ttft_p50_s"] / r["ttft_p50_s"] if r["ttft_p50_s"] else float("nan")
            ratio = r["output_tok_s"] / base["output_tok_s"]
            same = "-" if not cache else ("yes" if r["same_answers_as_no_cache"] else "no")
            print(f"| {kind} | {str(cache).lower()} | {r['ttft_p50_s']:.3f} s | "
                  f"{r['ttft_p90_s']:.3f} s | {r['output_tok_s']:.1f} | "
                  f"{r['cached_tokens']} / {r['prompt_tokens']} | {speed:.2f}x | {ratio:.2f} | "
                  f"{same} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
