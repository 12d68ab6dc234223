"""`edgelora bench`: the workload generator's distributions, and the measurements against a fake
server with known timings.

The generator tests draw large seeded samples and compare them with the formulas, with bounds
of about five standard errors (they hold for the fixed seeds, and would for nearly every other).
The metric tests run a small Starlette app under uvicorn in a thread on a loopback port: it
streams each API's exact event format with controlled delays, records what it received, and can
fail, drop, stall or serialize requests. Timings are asserted as the fake implies: never below
what the server's sleeps force, and above it by at most SLACK of scheduling jitter. No model.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgelora_np.cli import main
from edgelora_np.errors import BenchError
from edgelora_np.loadgen import (
    AUTO,
    BASE,
    RequestResult,
    Targets,
    WorkloadSpec,
    format_summary,
    make_workload,
    paper_probabilities,
    run_bench,
    summarize,
    zipf_probabilities,
)
from edgelora_np.loadgen import metrics as metrics_module
from edgelora_np.loadgen.workload import gamma_gaps, paper_indices

POOL = list(range(1000, 1040))      # the fake server's /tokenize answer
ADAPTERS = ["a0", "a1", "a2", "a3"]
LORA_IDS = [0, 1, 2, 3]
SLACK = 0.5                         # seconds of scheduling jitter allowed above a fake's timing
EPS = 0.005                         # clock granularity allowed below it


def chi2_bound(df: int, z: float = 5.0) -> float:
    """The chi-square value exceeded with probability ~ that of a z-sigma normal deviate
    (Wilson-Hilferty: (X/df)^(1/3) is nearly normal with mean 1 - 2/(9df), var 2/(9df))."""
    v = 2.0 / (9 * df)
    return df * (1 - v + z * np.sqrt(v)) ** 3


def chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------------------------
# The workload

@pytest.mark.parametrize("rate, cv", [(5.0, 1.0), (40.0, 0.5), (2.0, 3.0)])
def test_gaps_have_mean_1_over_rate_and_the_asked_cv(rate, cv):
    n = 50_000
    w = make_workload(WorkloadSpec(rate=rate, duration=n / rate, cv=cv, seed=7), 4, POOL)
    gaps = np.diff(w.arrival)                                   # [N-1]
    assert w.arrival[0] == 0 and len(w) == n and (gaps >= 0).all()
    mean, sd = 1 / rate, cv / rate
    assert abs(gaps.mean() - mean) < 5 * sd / np.sqrt(n)
    # Gamma(k): the sample variance's relative standard error is sqrt((2 + 6/k) / n), and the
    # standard deviation's about half of it.
    k = 1 / cv**2
    rel_se = 0.5 * np.sqrt((2 + 6 / k) / n)
    assert abs(gaps.std() / gaps.mean() / cv - 1) < 5 * rel_se + 5 / np.sqrt(n)


def test_cv_0_is_a_constant_rate():
    gaps = gamma_gaps(np.random.default_rng(0), 100, rate=4.0, cv=0.0)
    assert (gaps == 0.25).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_zipf_frequencies_follow_rank_to_the_minus_alpha(alpha):
    n_adapters, n = 16, 40_000
    w = make_workload(WorkloadSpec(rate=n, duration=1, alpha=alpha, seed=3), n_adapters, POOL)
    counts = np.bincount(w.target, minlength=n_adapters)
    p = zipf_probabilities(n_adapters, alpha)
    ranks = np.arange(1, n_adapters + 1)
    assert np.allclose(p, ranks**-alpha / (ranks**-alpha).sum())
    assert chi2(counts, p) < chi2_bound(n_adapters - 1)
    if alpha > 0:   # negative control: the same test rejects the uniform law
        assert chi2(counts, np.full(n_adapters, 1 / n_adapters)) > 10 * chi2_bound(n_adapters - 1)


def test_the_papers_law_is_uniform_at_alpha_1_and_not_a_power_law():
    n_adapters, n = 32, 40_000
    assert np.allclose(paper_probabilities(n_adapters, 1.0), 1 / n_adapters)
    rng = np.random.default_rng(5)
    for alpha in (0.5, 1.0, 2.0):
        counts = np.bincount(paper_indices(rng, n_adapters, alpha, n), minlength=n_adapters)
        assert chi2(counts, paper_probabilities(n_adapters, alpha)) < chi2_bound(n_adapters - 1)
    # alpha > 1 favours the *last* indices, linearly at 2: p(i) = (2i + 1) / n^2.
    assert np.allclose(paper_probabilities(n_adapters, 2.0),
                       (2 * np.arange(n_adapters) + 1) / n_adapters**2)
    # The contrast docs/bench.md states: at alpha = 1 the top adapter gets 1/H(32) ~ 25% under
    # Zipf's law, 1/32 ~ 3% under the paper's.
    assert zipf_probabilities(32, 1.0)[0] == pytest.approx(0.2464, abs=1e-4)
    w = make_workload(WorkloadSpec(rate=n, duration=1, alpha=1.0, popularity="paper", seed=1),
                      n_adapters, POOL)
    counts = np.bincount(w.target, minlength=n_adapters)
    assert chi2(counts, np.full(n_adapters, 1 / n_adapters)) < chi2_bound(n_adapters - 1)


def test_lengths_cover_their_ranges_uniformly_and_prompts_come_from_the_pool():
    n = 20_000
    w = make_workload(WorkloadSpec(rate=n, duration=1, prompt_tokens=(3, 9),
                                   output_tokens=(5, 5), seed=2), 4, POOL)
    counts = np.bincount(w.prompt_len - 3)
    assert len(counts) == 7 and chi2(counts, np.full(7, 1 / 7)) < chi2_bound(6)
    assert (w.output_len == 5).all()
    assert len(w.prompt_ids) == w.prompt_len.sum()
    assert set(np.unique(w.prompt_ids)) == set(POOL)
    assert [len(w.prompt(i)) for i in range(20)] == w.prompt_len[:20].tolist()


def test_fractions_of_base_and_auto_requests():
    n = 40_000
    w = make_workload(WorkloadSpec(rate=n, duration=1, base_fraction=0.2, auto_fraction=0.1,
                                   seed=4), 8, POOL)
    for value, p in ((BASE, 0.2), (AUTO, 0.1)):
        share = (w.target == value).mean()
        assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert w.target.max() < 8
    everything_base = make_workload(WorkloadSpec(rate=10, duration=1, base_fraction=1), 0, POOL)
    assert (everything_base.target == BASE).all()


def test_a_seed_reproduces_the_workload_and_each_aspect_has_its_own_stream():
    spec = WorkloadSpec(rate=50, duration=10, alpha=1.0, base_fraction=0.1, seed=11)
    a, b = make_workload(spec, 8, POOL), make_workload(spec, 8, POOL)
    for name in ("arrival", "target", "prompt_len", "output_len", "prompt_ids", "starts"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    other_seed = make_workload(WorkloadSpec(rate=50, duration=10, seed=12), 8, POOL)
    assert not np.array_equal(a.arrival, other_seed.arrival)
    # Sweeping n and alpha changes who is asked for, not when or how much.
    swept = make_workload(WorkloadSpec(rate=50, duration=10, alpha=2.0, base_fraction=0.1,
                                       seed=11), 32, POOL)
    assert np.array_equal(a.arrival, swept.arrival)
    assert np.array_equal(a.prompt_ids, swept.prompt_ids)
    assert np.array_equal(a.target == BASE, swept.target == BASE)
    assert not np.array_equal(a.target, swept.target)


@pytest.mark.parametrize("fields, needle", [
    ({"rate": 0}, "rate"),
    ({"rate": 0.1, "duration": 1}, "no request"),
    ({"cv": -1}, "cv"),
    ({"prompt_tokens": (9, 3)}, "prompt_tokens"),
    ({"output_tokens": (0, 3)}, "output_tokens"),
    ({"base_fraction": 0.7, "auto_fraction": 0.5}, "more than 1"),
    ({"popularity": "pareto"}, "zipf, paper"),
    ({"popularity": "paper", "alpha": 0}, "alpha > 0"),
])
def test_bad_specs_name_the_problem(fields, needle):
    with pytest.raises(BenchError, match=needle):
        WorkloadSpec(**{"rate": 1, "duration": 10, **fields})


def test_no_adapters_to_draw_from_is_an_error():
    with pytest.raises(BenchError, match="no adapters"):
        make_workload(WorkloadSpec(rate=1, duration=10), 0, POOL)


# ----------------------------------------------------------------------------------------------
# Summaries, by hand

def result(i, arrival, first, finished, n_out=4, error=None, sent=None):
    return RequestResult(index=i, kind="adapter", adapter="a0", arrival=arrival, prompt_tokens=8,
                         max_tokens=4, sent=arrival if sent is None else sent, first_token=first,
                         finished=finished, output_tokens=n_out, server_prompt_tokens=8,
                         error=error)


def test_summarize_by_hand():
    rs = [result(0, 0.0, 0.5, 1.0), result(1, 1.0, 1.5, 3.0), result(2, 2.0, 9.0, 10.0, n_out=3),
          result(3, 3.0, None, 4.0, n_out=0, error="http_429", sent=3.2)]
    s = summarize(rs, slo_ttft=(1.0, 6.0))
    assert s["requests"] == 4 and s["succeeded"] == 3 and s["errors"] == {"http_429": 1}
    assert s["makespan_s"] == 10.0
    assert s["throughput"] == {"requests_per_s": 0.3, "output_tokens_per_s": 1.1}
    assert s["latency_s"]["mean"] == pytest.approx((1 + 2 + 8) / 3)
    assert s["latency_s"]["p50"] == 2.0
    assert s["ttft_s"]["p50"] == 0.5 and s["ttft_s"]["p99"] == pytest.approx(0.5 + 0.98 * 6.5)
    # Failed requests miss every bound: 2 of 4 within 1 s, 2 of 4 within 6 s.
    assert [x["attained"] for x in s["slo_ttft"]] == [0.5, 0.5]
    assert s["send_lag_s"]["max"] == pytest.approx(0.2)
    assert s["short_outputs"] == 1 and s["prompt_length_mismatches"] == 0


def test_summarize_with_nothing_succeeded():
    s = summarize([result(0, 0.0, None, 1.0, error="connect")])
    assert s["latency_s"]["p99"] is None and s["throughput"]["requests_per_s"] == 0.0
    assert [x["attained"] for x in s["slo_ttft"]] == [0.0, 0.0]


def test_proc_readers_on_this_process():
    cpu = metrics_module.proc_cpu_seconds(os.getpid())
    times = os.times()
    assert abs(cpu - (times.user + times.system)) < 0.05
    mem = metrics_module.proc_memory_mb(os.getpid())
    assert 0 < mem["rss"] <= mem["hwm"]
    with pytest.raises(BenchError, match="no such process"):
        metrics_module.proc_cpu_seconds(2**22 + 1)          # above Linux's pid_max


def test_proc_stat_with_a_command_name_holding_parentheses(monkeypatch):
    fields = ["S"] + ["0"] * 10 + ["300", "200"] + ["0"] * 30   # fields 3.., utime=14, stime=15
    line = "42 (a (b) c) " + " ".join(fields)
    monkeypatch.setattr(metrics_module, "_read_proc", lambda pid, name: line)
    assert metrics_module.proc_cpu_seconds(42) == 500 / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------
# A fake server with known timings

class FakeServer:
    """llama-server's and OpenAI's streaming routes with controlled timings and failures."""

    def __init__(self):
        self.app = Starlette(routes=[
            Route("/v1/models", self.models), Route("/lora-adapters", self.lora_adapters),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/completion", self.generate, methods=["POST"])])
        self.configure()

    def configure(self, *, ttft=0.0, gap=0.0, ttft_of=None, fail=None, ending="stop",
                  serial=False, counts=True):
        """ttft: seconds before the first token (ttft_of: per adapter name), gap: between
        tokens; fail: {n-th request received: status}; ending: stop, error (an error event),
        truncated (no end marker), drop (connection closed), hang (stall); serial: one request
        at a time; counts: the final events carry token counts (usage, tokens_predicted)."""
        self.ttft, self.gap, self.ttft_of, self.counts = ttft, gap, ttft_of or {}, counts
        self.fail, self.ending, self.serial = fail or {}, ending, serial
        self.lock = asyncio.Lock()
        self.received: list[tuple[str, dict, dict]] = []

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": "base-model", "object": "model", "parent": None},
            *({"id": name, "object": "model", "parent": "base-model"} for name in ADAPTERS)]})

    async def lora_adapters(self, request):        # llama-server's rows: no name, a path
        return JSONResponse([{"id": i, "path": f"/models/{name}.gguf", "scale": 0.0}
                             for i, name in zip(LORA_IDS, ADAPTERS)])

    async def tokenize(self, request):
        body = await request.json()
        assert body["content"]
        return JSONResponse({"tokens": POOL})

    def adapter_of(self, body: dict) -> str | None:
        if "model" in body:
            return body["model"]
        on = [c["id"] for c in body.get("lora", ()) if c["scale"] != 0]
        return ADAPTERS[LORA_IDS.index(on[0])] if on else body.get("adapter")

    async def generate(self, request):
        body = await request.json()
        self.received.append((request.url.path, body, dict(request.headers)))
        status = self.fail.get(len(self.received) - 1)
        if status is not None:
            return JSONResponse({"error": {"message": "nope", "code": status}}, status_code=status)
        openai = request.url.path == "/v1/completions"
        n = body["max_tokens" if openai else "n_predict"]
        ttft = self.ttft_of.get(self.adapter_of(body), self.ttft)
        events = self.openai_events if openai else self.llamacpp_events
        return StreamingResponse(self.paced(events(n, len(body["prompt"])), ttft),
                                 media_type="text/event-stream")

    async def paced(self, events, ttft):
        """Send `: ping`, wait ttft, then one event per token `gap` apart; then the ending."""
        async with self.lock if self.serial else _nothing():
            yield b": ping\n\n"
            await asyncio.sleep(ttft)
            for k, (kind, event) in enumerate(events):
                if kind == "token" and k > 0:
                    await asyncio.sleep(self.gap)
                if kind == "end" and self.ending != "stop":
                    if self.ending == "error":
                        yield sse({"error": {"message": "engine failed", "code": 503}})
                    elif self.ending == "drop":
                        raise ConnectionAbortedError("the fake drops the connection")
                    elif self.ending == "hang":
                        await asyncio.sleep(3600)
                    return
                if not self.counts and kind in ("usage", "end"):
                    event = {k: v for k, v in event.items()
                             if k not in ("usage", "tokens_predicted", "tokens_evaluated")}
                yield event if isinstance(event, bytes) else sse(event)

    @staticmethod
    def openai_events(n, n_prompt):
        for k in range(n):
            yield "token", {"id": "cmpl-1", "object": "text_completion", "created": 0,
                            "model": "m", "choices": [{"index": 0, "text": f" t{k}",
                                                       "logprobs": None, "finish_reason": None}]}
        yield "end", {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                      "choices": [{"index": 0, "text": "", "logprobs": None,
                                   "finish_reason": "length"}]}
        yield "usage", {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                        "choices": [], "usage": {"prompt_tokens": n_prompt,
                                                 "completion_tokens": n,
                                                 "total_tokens": n_prompt + n}}
        yield "done", b"data: [DONE]\n\n"

    @staticmethod
    def llamacpp_events(n, n_prompt):
        for k in range(n):
            yield "token", {"index": 0, "content": f" t{k}", "tokens": [500 + k], "stop": False,
                            "id_slot": -1, "tokens_predicted": k + 1,
                            "tokens_evaluated": n_prompt}
        yield "end", {"index": 0, "content": "", "tokens": [], "id_slot": -1, "stop": True,
                      "model": "m", "tokens_predicted": n, "tokens_evaluated": n_prompt,
                      "stop_type": "limit", "timings": {}}


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


class _nothing:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def fake():
    server_app = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(server_app.app, log_level="critical", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    server_app.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield server_app
    server.should_exit = True
    thread.join(5)
    sock.close()


def steady(n: int, gap: float, **fields) -> WorkloadSpec:
    """n requests `gap` seconds apart (cv = 0)."""
    return WorkloadSpec(rate=1 / gap, duration=n * gap, cv=0.0, **fields)


# ----------------------------------------------------------------------------------------------
# Measurements against it

@pytest.mark.parametrize("api", ["openai", "llamacpp", "edgelora"])
def test_ttft_latency_and_throughput_match_the_fake_timings(fake, api):
    ttft, gap = 0.1, 0.04
    fake.configure(ttft=ttft, gap=gap)
    spec = steady(6, 0.05, prompt_tokens=(3, 12), output_tokens=(6, 10), seed=1)
    res = run_bench(fake.url, spec, api=api, timeout=10)
    s = res.summary
    assert s["succeeded"] == 6 and s["errors"] == {}
    ends = []
    for r in res.results:
        assert r.ok and r.output_tokens == r.max_tokens and r.server_prompt_tokens == r.prompt_tokens
        assert r.sent - r.arrival < SLACK
        assert ttft - EPS <= r.ttft <= ttft + SLACK
        decode = (r.max_tokens - 1) * gap
        assert ttft + decode - EPS <= r.latency <= ttft + decode + SLACK
        assert r.latency - r.ttft >= decode - EPS
        ends.append(r.arrival + ttft + decode)
    tokens = sum(r.max_tokens for r in res.results)
    assert s["output_tokens"] == tokens
    assert max(ends) - EPS <= s["makespan_s"] <= max(ends) + SLACK
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(tokens / s["makespan_s"])
    assert s["throughput"]["requests_per_s"] == pytest.approx(6 / s["makespan_s"])
    assert [x["attained"] for x in s["slo_ttft"]] == [1.0, 1.0]


def test_slo_attainment_at_known_ttfts(fake):
    # a0 is the most popular; it answers in 0.02 s, every other adapter in 0.25 s.
    fake.configure(ttft_of={"a0": 0.02}, ttft=0.25)
    spec = steady(12, 0.02, alpha=1.0, output_tokens=(1, 2), seed=3)
    res = run_bench(fake.url, spec, api="edgelora", slo_ttft=(0.1, 1.0), timeout=10)
    fast = sum(r.adapter == "a0" for r in res.results)
    assert 0 < fast < 12
    for r in res.results:
        expected = 0.02 if r.adapter == "a0" else 0.25
        assert expected - EPS <= r.ttft <= expected + SLACK
    # a slow answer under 0.1 s is impossible, a fast one over it is jitter beyond 0.08 s.
    attained = [x["attained"] for x in res.summary["slo_ttft"]]
    assert attained[0] <= fast / 12 and attained[1] == 1.0


def test_open_loop_requests_queue_at_a_serial_server(fake):
    """A server that serves one request at a time, 0.15 s each, gets one every 0.05 s: request i
    ends at 0.15 (i + 1) and its latency grows by 0.1 s per request. A closed-loop client would
    have waited and seen 0.15 s every time."""
    service = 0.15
    fake.configure(ttft=service, serial=True)
    res = run_bench(fake.url, steady(5, 0.05, output_tokens=(1, 1), seed=0), api="llamacpp",
                    timeout=10)
    end = 0.0
    for i, r in enumerate(res.results):
        end = max(r.sent, end) + service           # when the serial server can have finished
        assert r.latency >= end - r.arrival - EPS >= service * (i + 1) - 0.05 * i - EPS
        assert r.latency <= end - r.arrival + SLACK


def test_a_late_send_counts_against_the_server(fake):
    """The first result's callback blocks the client's event loop for 0.3 s, so the requests due
    meanwhile leave late: their latency and TTFT still run from the intended arrival."""
    fake.configure(ttft=0.02)
    blocked = []

    def block_once(r):
        if not blocked:
            blocked.append(r.index)
            time.sleep(0.3)

    res = run_bench(fake.url, steady(6, 0.1, output_tokens=(1, 1), seed=0), api="edgelora",
                    on_result=block_once, timeout=10)
    late = [r for r in res.results if r.sent - r.arrival >= 0.15]
    assert late                         # due while the loop was blocked, sent when it woke
    for r in res.results:
        assert r.ttft >= (r.sent - r.arrival) + 0.02 - EPS and r.latency >= r.ttft
    assert res.summary["send_lag_s"]["max"] >= 0.15
    assert "sent late" in format_summary(res.to_json())


@pytest.mark.parametrize("api", ["openai", "llamacpp", "edgelora"])
def test_request_bodies_are_what_the_servers_expect(fake, api):
    fake.configure()
    spec = steady(30, 0.005, alpha=0.5, base_fraction=0.2,
                  auto_fraction=0.0 if api == "llamacpp" else 0.2, prompt_tokens=(2, 5),
                  output_tokens=(3, 4), seed=9)
    # The targets in another order than listed: rank 1 is a2 (lora id 2).
    res = run_bench(fake.url, spec, api=api, adapters=["a2", "a0", "a3"], api_key="sk-test",
                    extra={"temperature": 0}, timeout=10)
    assert res.summary["succeeded"] == 30
    assert res.targets.adapters == ("a2", "a0", "a3")
    w = make_workload(spec, 3, POOL)
    bodies = {tuple(b["prompt"]): (path, b, h) for path, b, h in fake.received}
    assert len(bodies) == 30
    kinds = set()
    for i in range(30):
        path, body, headers = bodies[tuple(w.prompt(i))]
        assert headers["authorization"] == "Bearer sk-test"
        target, n, prompt = int(w.target[i]), int(w.output_len[i]), w.prompt(i)
        name = {BASE: None, AUTO: "auto"}[target] if target < 0 else res.targets.adapters[target]
        kinds.add(res.results[i].kind)
        assert res.results[i].adapter == (name if target >= 0 else None)
        if api == "openai":
            expected = {"model": name or "base-model", "prompt": prompt, "max_tokens": n,
                        "stream": True, "stream_options": {"include_usage": True},
                        "ignore_eos": True}
        elif api == "llamacpp":
            lora = ([{"id": [2, 0, 3][target], "scale": 1.0}] if target >= 0 else
                    [{"id": j, "scale": 0.0} for j in LORA_IDS])
            expected = {"prompt": prompt, "n_predict": n, "stream": True, "ignore_eos": True,
                        "lora": lora}
        else:
            expected = {"prompt": prompt, "n_predict": n, "stream": True, "ignore_eos": True,
                        **({"adapter": name} if name else {})}
        assert path == ("/v1/completions" if api == "openai" else "/completion")
        assert body == {**expected, "temperature": 0}
    assert kinds == ({"adapter", "base"} if api == "llamacpp" else {"adapter", "base", "auto"})


def test_adapter_selection_and_discovery(fake):
    fake.configure()
    spec = steady(4, 0.005, output_tokens=(1, 1))
    assert run_bench(fake.url, spec, api="openai").targets == Targets(
        adapters=tuple(ADAPTERS), base_model="base-model")
    two = run_bench(fake.url, spec, api="llamacpp", adapters=2).targets
    assert two.adapters == ("a0", "a1") and two.lora_ids == (0, 1)
    assert two.all_lora_ids == tuple(LORA_IDS)
    by_path = run_bench(fake.url, spec, api="llamacpp", adapters=["/models/a3.gguf"]).targets
    assert by_path.lora_ids == (3,)
    with pytest.raises(BenchError, match="'nope' is not listed"):
        run_bench(fake.url, spec, api="edgelora", adapters=["a1", "nope"])
    with pytest.raises(BenchError, match="9 adapters asked, the server lists 4"):
        run_bench(fake.url, spec, api="edgelora", adapters=9)
    with pytest.raises(BenchError, match="no router"):
        run_bench(fake.url, steady(4, 0.005, auto_fraction=0.5), api="llamacpp")


@pytest.mark.parametrize("api", ["openai", "llamacpp"])
def test_without_the_servers_counts_output_events_are_counted(fake, api):
    fake.configure(counts=False)
    res = run_bench(fake.url, steady(4, 0.01, output_tokens=(2, 9)), api=api, timeout=10)
    assert all(r.ok and r.output_tokens == r.max_tokens and r.server_prompt_tokens is None
               for r in res.results)


def test_error_statuses_are_counted_and_miss_the_slo(fake):
    fake.configure(fail={1: 429, 4: 429, 5: 500})
    res = run_bench(fake.url, steady(8, 0.03, output_tokens=(2, 3)), api="openai", timeout=10)
    s = res.summary
    assert s["errors"] == {"http_429": 2, "http_500": 1} and s["succeeded"] == 5
    assert [x["attained"] for x in s["slo_ttft"]] == [5 / 8, 5 / 8]
    failed = [r for r in res.results if not r.ok]
    assert all(r.ttft is None and r.latency is None and "nope" in r.detail for r in failed)


@pytest.mark.parametrize("ending, kind", [("error", "stream_error"), ("truncated", "incomplete"),
                                          ("drop", "disconnected")])
def test_broken_streams_are_errors_and_end_at_once(fake, ending, kind):
    fake.configure(ending=ending)
    res = run_bench(fake.url, steady(3, 0.02, output_tokens=(2, 2)), api="llamacpp", timeout=30)
    assert res.summary["errors"] == {kind: 3}
    assert all(r.finished - r.sent < 5 for r in res.results)      # not the 30 s timeout


def test_a_stalled_stream_times_out(fake):
    fake.configure(ending="hang")
    timeout = 0.5
    res = run_bench(fake.url, steady(3, 0.02, output_tokens=(2, 2)), api="openai",
                    timeout=timeout)
    assert res.summary["errors"] == {"timeout": 3}
    for r in res.results:
        assert timeout - EPS <= r.finished - r.sent <= timeout + SLACK


def test_no_server_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed again: nothing listens there
    targets = Targets(adapters=("a0",))
    res = run_bench(f"http://127.0.0.1:{port}", steady(3, 0.01), api="edgelora",
                    targets=targets, prompt_pool=POOL, timeout=5)
    assert res.summary["errors"] == {"connect": 3}
    with pytest.raises(BenchError, match="GET .*/lora-adapters failed"):
        run_bench(f"http://127.0.0.1:{port}", steady(3, 0.01), api="edgelora", timeout=5)


def test_server_process_cpu_and_memory(fake):
    fake.configure(gap=0.001)            # the fake runs in this process: its pid is ours
    res = run_bench(fake.url, steady(4, 0.02, output_tokens=(50, 50)), api="edgelora",
                    server_pid=os.getpid(), timeout=10)
    server = res.server
    assert server["pid"] == os.getpid() and not server["exited"]
    assert server["cpu_seconds"] > 0
    assert server["cpu_seconds_per_output_token"] == pytest.approx(server["cpu_seconds"] / 200)
    assert 0 < server["max_sampled_rss_mb"] <= server["peak_rss_mb"]
    assert "CPU s/output token" in format_summary(res.to_json())


# ----------------------------------------------------------------------------------------------
# The command

def run_cli(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_cli_writes_the_json_and_prints_the_summary(fake, tmp_path):
    fake.configure(ttft=0.01)
    out = tmp_path / "run.json"
    result = run_cli(fake.url, "--api", "llamacpp", "--rate", 50, "--duration", 0.1, "--cv", 0,
                     "--adapters", 2, "--output-tokens", 3, "--prompt-tokens", "4:6",
                     "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["summary"]["succeeded"] == 5 and doc["run"]["adapters"] == ["a0", "a1"]
    assert doc["spec"]["output_tokens"] == [3, 3] and len(doc["requests"]) == 5
    assert all(r["output_tokens"] == 3 and 4 <= r["prompt_tokens"] <= 6 for r in doc["requests"])
    assert "5 sent, 5 succeeded" in result.stdout and "TTFT <= 1 s: 100.0%" in result.stdout


def test_cli_json_to_stdout(fake):
    fake.configure()
    result = run_cli(fake.url, "--rate", 50, "--duration", 0.1, "--token-ids", "7:9",
                     "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["summary"]["succeeded"] == 5
    assert {t for path, body, _ in fake.received for t in body["prompt"]} <= {7, 8, 9}


def test_cli_leaves_no_json_file_after_a_failed_run(fake, tmp_path):
    out = tmp_path / "run.json"
    result = run_cli(fake.url, "--duration", 1, "--adapters", "zz", "--json", out)
    assert result.exit_code == 2 and not out.exists()
    result = run_cli(fake.url, "--duration", 1, "--json", tmp_path / "no" / "run.json")
    assert result.exit_code == 2 and "cannot write" in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["--prompt-tokens", "9:3"], "LOW <= HIGH"),
    (["--rate", 0], "--rate"),
    (["--api", "llamacpp", "--auto-fraction", 0.5], "no router"),
    (["--adapters", "a1,zz"], "'zz' is not listed"),
    (["--extra", "{nope"], "--extra"),
    (["--server-pid", 2**22 + 1], "no such process"),
])
def test_cli_user_errors_are_one_line(fake, args, needle):
    result = run_cli(fake.url, "--duration", 1, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
