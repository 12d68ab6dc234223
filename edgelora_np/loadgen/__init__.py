"""`edgelora bench`: an open-loop load generator for LoRA servers (the paper's workload).

    workload.py  WorkloadSpec -> Workload: seeded arrivals (Gamma gaps), adapter popularity
                 (Zipf, or the paper's law), prompt and output lengths, prompt token ids
    apis.py      openai / llamacpp / edgelora: listing adapters, request bodies, stream events
    runner.py    the open loop (asyncio + httpx, streaming), bench() / run_bench()
    metrics.py   RequestResult, summarize(), the server process's CPU and memory, the summary

From a program (tools/bench_workload.py):

    from edgelora_np.loadgen import WorkloadSpec, run_bench
    result = run_bench("http://127.0.0.1:8080", WorkloadSpec(rate=2, duration=60, alpha=1),
                       api="llamacpp", adapters=32, server_pid=pid)
    result.summary["throughput"]["output_tokens_per_s"], result.to_json()

docs/bench.md describes the workload and every figure.
"""

from edgelora_np.loadgen.apis import APIS, Targets, discover, token_pool
from edgelora_np.loadgen.metrics import SLO_TTFT, RequestResult, format_summary, summarize
from edgelora_np.loadgen.runner import (
    DEFAULT_TIMEOUT,
    BenchResult,
    bench,
    make_client,
    run_bench,
    run_workload,
)
from edgelora_np.loadgen.workload import (
    AUTO,
    BASE,
    Workload,
    WorkloadSpec,
    make_workload,
    paper_probabilities,
    zipf_probabilities,
)

__all__ = ["APIS", "AUTO", "BASE", "DEFAULT_TIMEOUT", "SLO_TTFT", "BenchResult", "RequestResult",
           "Targets", "Workload", "WorkloadSpec", "bench", "discover", "format_summary",
           "make_client", "make_workload", "paper_probabilities", "run_bench", "run_workload",
           "summarize", "token_pool", "zipf_probabilities"]
