"""The open-loop run: send each request at its arrival time, stream its answer, time it.

One asyncio task dispatches: it sleeps until request i is due and starts a task for it, never
waiting for earlier answers (a closed-loop client would wait, and hide the server's queue). Each
request task streams its response with httpx and stamps, on one clock (perf_counter, seconds from
the run's start): sent, first output chunk, end. A request ends in exactly one of:

    success         the server marked the end (finish_reason, "stop": true)
    http_<status>   an error status (429: the server shed load; 503; 500 ...)
    stream_error    an error event inside the stream
    timeout         not finished `timeout` seconds after it was sent (a stalled server)
    connect         no connection (refused, unreachable)
    disconnected    the connection closed in the middle of the response
    incomplete      the stream ended without the server marking the end
    bad_stream      an event that is not JSON
    transport       any other HTTP failure (its class in `detail`)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from edgelora_np.errors import BenchError
from edgelora_np.loadgen.apis import Api, StreamState, Targets, api_of, discover, token_pool
from edgelora_np.loadgen.metrics import (
    SLO_TTFT,
    ProcessWatch,
    RequestResult,
    proc_cpu_seconds,
    summarize,
)
from edgelora_np.loadgen.workload import Workload, WorkloadSpec, make_workload

DEFAULT_TIMEOUT = 300.0   # seconds a request may take from sending to its end
RSS_SAMPLE_S = 0.25       # how often the server's resident memory is sampled
DETAIL_CHARS = 200        # of an error's message kept in a result
# Seconds an idle kept-alive connection is reused for: well under the servers' own idle timeouts
# (llama-server's and uvicorn's are 5 s). A request sent on a connection just as the server
# closes it fails as "disconnected" without reaching the server. At httpx's default expiry, also
# 5 s, one of 120 requests at 2 req/s did so (docs/benchmarks.md); scaled down to a 0.2 s server
# timeout, 4 of 300 requests sent after 0.19-0.21 s idle failed with a longer client expiry and
# none with a shorter one.
KEEPALIVE_EXPIRY_S = 2.0


def make_client(url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                keepalive: bool = True) -> httpx.AsyncClient:
    """An HTTP client with no connection limit (an open loop must not queue in the client)
    that ignores proxy variables (a benchmark measures the server, not a proxy).
    keepalive=False: a new connection per request (a closed loop that pauses between requests
    would otherwise reuse connections the server has closed: llama-server's idle timeout is 5 s)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None if keepalive
                                                 else 0,
                                                 keepalive_expiry=KEEPALIVE_EXPIRY_S),
                             trust_env=False)


async def run_workload(client: httpx.AsyncClient, api: Api, workload: Workload, targets: Targets,
                       *, timeout: float = DEFAULT_TIMEOUT, extra: dict | None = None,
                       on_result: Callable[[RequestResult], None] | None = None,
                       watch: ProcessWatch | None = None) -> list[RequestResult]:
    """Send every request of `workload` at its arrival time; one RequestResult each, in order.
    `extra` fields are added to every request body; `on_result` sees each result as it ends."""
    bodies = []
    for i in range(len(workload)):
        body = api.payload(targets, int(workload.target[i]), workload.prompt(i),
                           int(workload.output_len[i]))
        bodies.append({**body, **extra} if extra else body)
    results = []
    for i in range(len(workload)):
        kind, adapter = targets.describe(int(workload.target[i]))
        results.append(RequestResult(index=i, kind=kind, adapter=adapter,
                                     arrival=float(workload.arrival[i]),
                                     prompt_tokens=int(workload.prompt_len[i]),
                                     max_tokens=int(workload.output_len[i])))

    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    async def one(r: RequestResult, body: dict) -> None:
        r.sent = now()
        try:
            await asyncio.wait_for(_stream(client, api, body, r, now), timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            r.error, r.detail = "timeout", f"not finished {timeout:g} s after sending"
        except httpx.ConnectError as e:
            r.error, r.detail = "connect", str(e)[:DETAIL_CHARS]
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            r.error, r.detail = "disconnected", str(e)[:DETAIL_CHARS]
        except httpx.HTTPError as e:
            r.error, r.detail = "transport", f"{type(e).__name__}: {e}"[:DETAIL_CHARS]
        r.finished = now()
        if on_result is not None:
            on_result(r)

    async def sample_memory() -> None:
        while True:
            watch.sample()
            await asyncio.sleep(RSS_SAMPLE_S)

    sampler = asyncio.create_task(sample_memory()) if watch is not None else None
    tasks = []
    try:
        for r, body in zip(results, bodies):
            delay = r.arrival - now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(r, body)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if sampler is not None:
            sampler.cancel()
    return results


async def _stream(client: httpx.AsyncClient, api: Api, body: dict, r: RequestResult,
                  now: Callable[[], float]) -> None:
    """POST one request and read its server-sent events into `r`."""
    state = StreamState()
    async with client.stream("POST", api.route, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            r.error, r.detail = f"http_{resp.status_code}", text[:DETAIL_CHARS]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):          # blank lines, comments (pings), event:
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                r.error, r.detail = "bad_stream", data[:DETAIL_CHARS]
                return
            if api.on_event(event, state) and r.first_token is None:
                r.first_token = now()
            if state.error is not None:
                r.error, r.detail = "stream_error", state.error[:DETAIL_CHARS]
                return
    r.output_tokens = state.output_tokens if state.output_tokens is not None else \
        state.output_chunks
    r.server_prompt_tokens = state.prompt_tokens
    if not state.finished:
        r.error, r.detail = "incomplete", "the stream ended before the server marked its end"


@dataclass
class BenchResult:
    """A run: where, what was asked, every request, the summary and the server's cost."""

    url: str
    api: str
    spec: WorkloadSpec
    targets: Targets
    results: list[RequestResult]
    summary: dict
    server: dict | None            # ProcessWatch.report(), with --server-pid
    started: str                   # ISO time
    timeout: float

    def to_json(self) -> dict:
        from edgelora_np import __version__

        return {
            "tool": f"edgelora bench {__version__}",
            "run": {"url": self.url, "api": self.api, "started": self.started,
                    "timeout_s": self.timeout, "adapters": list(self.targets.adapters),
                    "lora_ids": list(self.targets.lora_ids), "base_model": self.targets.base_model},
            "spec": self.spec.to_json(),
            "summary": self.summary,
            "server": self.server,
            "requests": [r.to_json() for r in self.results],
        }


async def bench(url: str, spec: WorkloadSpec, *, api: str = "edgelora", adapters=None,
                base_model: str | None = None, targets: Targets | None = None,
                prompt_pool=None, server_pid: int | None = None, api_key: str | None = None,
                timeout: float = DEFAULT_TIMEOUT, extra: dict | None = None,
                slo_ttft=SLO_TTFT,
                on_result: Callable[[RequestResult], None] | None = None) -> BenchResult:
    """Run `spec` against the server at `url` (see run_bench)."""
    the_api = api_of(api)
    if api == "llamacpp" and spec.auto_fraction > 0:
        raise BenchError("llama-server has no router: 'auto' requests need --api openai or "
                         "edgelora")
    if not timeout > 0:
        raise BenchError(f"timeout must be > 0 (got {timeout})")
    if server_pid is not None:
        proc_cpu_seconds(server_pid)                 # fail now if there is no such process
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    async with make_client(url, api_key=api_key, timeout=timeout) as client:
        if targets is None:
            targets = await discover(client, the_api, adapters, base_model)
        if prompt_pool is None:
            prompt_pool = await token_pool(client)
        workload = make_workload(spec, len(targets.adapters), prompt_pool)
        watch = ProcessWatch(server_pid) if server_pid is not None else None
        results = await run_workload(client, the_api, workload, targets, timeout=timeout,
                                     extra=extra, on_result=on_result, watch=watch)
    summary = summarize(results, slo_ttft)
    server = None if watch is None else watch.report(summary["output_tokens"],
                                                     summary["makespan_s"])
    return BenchResult(url=url, api=api, spec=spec, targets=targets, results=results,
                       summary=summary, server=server, started=started, timeout=timeout)


def run_bench(url: str, spec: WorkloadSpec, **options) -> BenchResult:
    """Run `spec` against the server at `url`, from a program without an event loop.

    api: "openai", "llamacpp" or "edgelora". adapters: None (all the server lists), n (the first
    n) or names, popularity rank 1 first; or targets: a Targets to skip the listing. prompt_pool:
    token ids to draw prompts from (default: the server's /tokenize of a plain text).
    server_pid: a process on this machine whose CPU time and memory to report. extra: fields
    added to every request body (e.g. {"temperature": 0, "cache_prompt": False}). on_result:
    called with each RequestResult as it ends (in the event loop: keep it short).
    """
    return asyncio.run(bench(url, spec, **options))
