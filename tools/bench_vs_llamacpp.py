"""edgelora_np vs llama.cpp on the same GGUF, same thread count, same context, in one run.

    tox -e bench          (or: python tools/bench_vs_llamacpp.py [--model PATH] [--threads 2])

Each engine runs in its own fresh subprocess (so neither's threads or memory disturb the other)
and reports single-stream prefill tok/s (a PROMPT_TOKENS-token prompt, last-position logits
only), decode tok/s (DECODE_TOKENS greedy tokens, one forward per token) and its peak RSS.
Each measurement is repeated and the median kept; the table prints the ratios
edgelora_np / llama.cpp. llama.cpp is driven through llama-cpp-python (a tools-only dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import peak_rss_mb, run_child, warm_edgelora  # noqa: E402

PROMPT_TOKENS = 256
DECODE_TOKENS = 128
REPEATS = 3


def prompt_ids(tokenize) -> list[int]:
    text = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again and again."
                     for i in range(64))
    return tokenize(text)[:PROMPT_TOKENS]


def run_edgelora(model: str, threads: int, n_ctx: int) -> dict:
    import numpy as np

    import edgelora_np as el
    from edgelora_np.api import PREFILL_CHUNK
    from edgelora_np.model.batch import Batch

    m = el.load_model(model, n_threads=threads, n_ctx=n_ctx, progress=False)
    ids = prompt_ids(m.tokenize)
    llama = m.llama

    def once():
        cache = llama.new_cache(n_ctx)
        t0 = time.perf_counter()
        for i in range(0, len(ids), PREFILL_CHUNK):
            logits = llama.forward(Batch.single(ids[i:i + PREFILL_CHUNK], start=i), cache)
        t1 = time.perf_counter()
        tok, n = int(np.argmax(logits[-1])), len(ids)
        for _ in range(DECODE_TOKENS):
            logits = llama.forward(Batch.single([tok], start=n), cache)
            tok, n = int(np.argmax(logits[-1])), n + 1
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), DECODE_TOKENS / (t2 - t1)

    once()                                       # warm-up: loads the cached kernels
    return _summarize([once() for _ in range(REPEATS)])


def run_llamacpp(model: str, threads: int, n_ctx: int) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=False, verbose=False)
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False))

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(DECODE_TOKENS):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), DECODE_TOKENS / (t2 - t1)

    once()
    return _summarize([once() for _ in range(REPEATS)])


def _summarize(runs) -> dict:
    return {"prefill_tok_s": statistics.median(r[0] for r in runs),
            "decode_tok_s": statistics.median(r[1] for r in runs),
            "peak_rss_mb": peak_rss_mb()}


def child(engine: str, model: str, threads: int, n_ctx: int) -> dict:
    return run_child(__file__, engine, ["--model", model, "--threads", str(threads),
                                        "--ctx", str(n_ctx)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--child", choices=["edgelora", "llamacpp"])
    args = ap.parse_args()
    if args.model is None:
        from edgelora_np.default_model import resolve_model_path
        args.model = str(resolve_model_path())
    if args.child:
        run = run_edgelora if args.child == "edgelora" else run_llamacpp
        print(json.dumps(run(args.model, args.threads, args.ctx)))
        return
    warm_edgelora(args.model)
    ours = child("edgelora", args.model, args.threads, args.ctx)
    theirs = child("llamacpp", args.model, args.threads, args.ctx)
    print(f"model {Path(args.model).name}, {args.threads} threads, context {args.ctx}, "
          f"prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens, median of {REPEATS}\n")
    print("| metric | edgelora_np | llama.cpp | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                       ("peak_rss_mb", "peak RSS MB")):
        print(f"| {label} | {ours[key]:.1f} | {theirs[key]:.1f} | {ours[key] / theirs[key]:.2f}x |")


if __name__ == "__main__":
    main()
