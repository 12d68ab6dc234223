"""What a run measured: one RequestResult per request, their summary, the server process's cost.

Times are seconds from the run's start, which is request 0's intended arrival. The generator is
open loop: request i is due at `arrival` whatever happened before, so a request sent late (the
client was busy) or queued by the server counts against the server:

    latency = finished - arrival        TTFT = first_token - arrival
    lag     = sent - arrival            (the client's own lateness; should be ~0)

Only requests that succeeded have a latency and a TTFT. Throughput is over the makespan (start
to the last request's end, success or not). SLO attainment at a TTFT bound b is the fraction of
*all* requests that succeeded with TTFT <= b (a failed request misses every bound), as the paper.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from edgelora_np.errors import BenchError

MB = 1e6
KIB = 1024
SLO_TTFT = (1.0, 6.0)   # seconds: the paper's two TTFT bounds
LAG_WARN_S = 0.05       # a p99 send lag above this: the load generator could not keep up


@dataclass
class RequestResult:
    """One request: what was asked, when it moved, how it ended."""

    index: int
    kind: str                        # "adapter", "base" or "auto"
    adapter: str | None              # the adapter's name (None for base and auto)
    arrival: float                   # intended send time
    prompt_tokens: int               # sent
    max_tokens: int                  # asked (EOS ignored: the server should produce all)
    sent: float | None = None        # handed to the HTTP client
    first_token: float | None = None  # the first chunk carrying output
    finished: float | None = None    # the stream's end, or the failure
    output_tokens: int = 0           # as the server reports them (else chunks with output)
    server_prompt_tokens: int | None = None  # as the server reports them
    error: str | None = None         # None: success; else a kind, see runner.py
    detail: str = ""                 # the error's message, shortened

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float | None:
        return self.finished - self.arrival if self.ok else None

    @property
    def ttft(self) -> float | None:
        return self.first_token - self.arrival if self.ok and self.first_token is not None else None

    def to_json(self) -> dict:
        return asdict(self)


def _stats(values: list[float]) -> dict:
    """mean, p50, p99 (NumPy's linear percentiles), or None each when there is no value."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], slo_ttft=SLO_TTFT) -> dict:
    """The run's figures (see the module docstring for the definitions)."""
    ok = [r for r in results if r.ok]
    ends = [r.finished for r in results if r.finished is not None]
    makespan = max(ends) if ends else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    lags = [r.sent - r.arrival for r in results if r.sent is not None]

    def per_second(x: float) -> float | None:
        return x / makespan if makespan > 0 else None

    return {
        "requests": len(results),
        "succeeded": len(ok),
        "errors": dict(sorted(errors.items())),
        "makespan_s": makespan,
        "throughput": {"requests_per_s": per_second(len(ok)),
                       "output_tokens_per_s": per_second(out_tokens)},
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "latency_s": _stats([r.latency for r in ok]),
        "ttft_s": _stats(ttfts),
        "slo_ttft": [{"bound_s": b, "attained": sum(t <= b for t in ttfts) / len(results)
                      if results else None} for b in slo_ttft],
        "send_lag_s": {"p99": float(np.percentile(lags, 99)) if lags else None,
                       "max": max(lags) if lags else None},
        # EOS is ignored, so a success with fewer tokens than asked means the server did not
        # honour ignore_eos or max_tokens; a prompt count that differs, that it re-tokenized.
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),
        "prompt_length_mismatches": sum(r.server_prompt_tokens is not None and
                                        r.server_prompt_tokens != r.prompt_tokens for r in ok),
    }


# --- the server process (Linux /proc) -------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far: /proc/PID/stat fields
    14 and 15 (utime, stime), in clock ticks. The command name (field 2) may hold spaces and
    parentheses, so fields are counted after its last ')'."""
    text = _read_proc(pid, "stat")
    fields = text[text.rindex(")") + 2:].split()     # fields[0] is field 3 (state)
    utime, stime = int(fields[14 - 3]), int(fields[15 - 3])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def proc_memory_mb(pid: int) -> dict:
    """{"rss": VmRSS, "hwm": VmHWM (peak RSS since the process started)} in MB."""
    values = {}
    for line in _read_proc(pid, "status").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key[2:].lower()] = int(rest.split()[0]) * KIB / MB    # "1234 kB"
    return values


def _read_proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except OSError:
        raise BenchError(f"cannot read /proc/{pid}/{name}: no such process on this machine "
                         "(--server-pid)") from None


class ProcessWatch:
    """A server process's CPU time from its creation to report(), and its memory (sampled by
    the runner). The process must be the server itself (not a wrapper shell): its threads'
    time is counted, not its children's."""

    def __init__(self, pid: int):
        self.pid = pid
        self.cpu0 = proc_cpu_seconds(pid)
        self.max_rss = proc_memory_mb(pid).get("rss", 0.0)
        self.exited = False

    def sample(self) -> None:
        try:
            self.max_rss = max(self.max_rss, proc_memory_mb(self.pid).get("rss", 0.0))
        except BenchError:
            self.exited = True

    def report(self, output_tokens: int, wall_seconds: float) -> dict:
        out = {"pid": self.pid}
        self.sample()                  # before VmHWM, so that the sampled max is <= it
        try:
            cpu = proc_cpu_seconds(self.pid) - self.cpu0
            hwm = proc_memory_mb(self.pid).get("hwm")
        except BenchError:
            return {**out, "exited": True}
        return {**out, "exited": self.exited, "cpu_seconds": cpu,
                "cpu_seconds_per_output_token": cpu / output_tokens if output_tokens else None,
                "cores_busy": cpu / wall_seconds if wall_seconds > 0 else None,
                "peak_rss_mb": hwm, "max_sampled_rss_mb": self.max_rss}


# --- the one-screen summary ---------------------------------------------------------------------

def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_summary(doc: dict) -> str:
    """A few lines for a person, from a result document (BenchResult.to_json())."""
    spec, s, run = doc["spec"], doc["summary"], doc["run"]
    lat, ttft, tp = s["latency_s"], s["ttft_s"], s["throughput"]
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    lines = [
        f"server     {run['url']} ({run['api']} API), {len(run['adapters'])} adapters, "
        f"{spec['popularity']} alpha={spec['alpha']:g}",
        f"workload   {spec['rate']:g} req/s (cv {spec['cv']:g}) for {spec['duration']:g} s, "
        f"prompt {spec['prompt_tokens'][0]}..{spec['prompt_tokens'][1]}, output "
        f"{spec['output_tokens'][0]}..{spec['output_tokens'][1]} tokens, base "
        f"{spec['base_fraction']:g}, auto {spec['auto_fraction']:g}, seed {spec['seed']}",
        f"requests   {s['requests']} sent, {s['succeeded']} succeeded; errors: {errors}",
        f"throughput {_f(tp['requests_per_s'])} req/s, {_f(tp['output_tokens_per_s'], '.1f')} "
        f"output tok/s over {s['makespan_s']:.1f} s",
        f"latency    mean {_s(lat['mean'])}  p50 {_s(lat['p50'])}  p99 {_s(lat['p99'])}  "
        "(from intended arrival)",
        f"TTFT       mean {_s(ttft['mean'])}  p50 {_s(ttft['p50'])}  p99 {_s(ttft['p99'])}",
        "SLO        " + "  ".join(f"TTFT <= {x['bound_s']:g} s: {100 * x['attained']:.1f}%"
                                  for x in s["slo_ttft"]),
    ]
    server = doc.get("server")
    if server is not None:
        if server["exited"]:
            lines.append(f"process    pid {server['pid']} exited during the run")
        else:
            lines.append(f"process    pid {server['pid']}: {server['cpu_seconds']:.1f} CPU s = "
                         f"{_f(server['cpu_seconds_per_output_token'], '.4f')} CPU s/output token "
                         f"({_f(server['cores_busy'])} cores busy), peak RSS "
                         f"{_f(server['peak_rss_mb'], '.0f')} MB")
    warnings = []
    if s["send_lag_s"]["p99"] is not None and s["send_lag_s"]["p99"] > LAG_WARN_S:
        warnings.append(f"the client sent late (p99 lag {s['send_lag_s']['p99']:.3f} s): "
                        "it is itself a bottleneck")
    if s["short_outputs"]:
        warnings.append(f"{s['short_outputs']} requests got fewer tokens than asked "
                        "(ignore_eos / max_tokens not honoured?)")
    if s["prompt_length_mismatches"]:
        warnings.append(f"{s['prompt_length_mismatches']} prompts were counted differently by "
                        "the server")
    lines += [f"warning    {w}" for w in warnings]
    return "\n".join(lines)

