"""Where a decode step's time goes: cProfile over single-stream decode, grouped by kernel.

    python tools/profile_decode.py [--model PATH] [--tokens 64] [--prompt-tokens 256]

Prints the share of wall time of each Numba kernel and of the Python around them, for decode
steps (one token, one sequence) after a prompt of the given length; recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import edgelora_np as el
    from edgelora_np.model.batch import Batch

    m = el.load_model(args.model, n_threads=args.threads, progress=False)
    llama = m.llama
    cache = llama.new_cache(args.prompt_tokens + args.tokens + 8)
    ids = (list(range(1000, 1000 + args.prompt_tokens)))
    for i in range(0, len(ids), 128):
        logits = llama.forward(Batch.single(ids[i:i + 128], start=i), cache)
    n = len(ids)
    tok = int(np.argmax(logits[-1]))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(args.tokens):
        logits = llama.forward(Batch.single([tok], start=n), cache)
        tok, n = int(np.argmax(logits[-1])), n + 1
    profiler.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler).stats
    rows = []
    for (file, _, func), (_, _, tottime, _, _) in stats.items():
        rows.append((tottime, f"{func} ({file.split('edgelora_np/')[-1]})"))
    rows.sort(reverse=True)
    print(f"{args.tokens} decode steps after {args.prompt_tokens} prompt tokens: "
          f"{args.tokens / wall:.1f} tok/s, {1000 * wall / args.tokens:.2f} ms/token\n")
    print("| function | ms/token | share |")
    print("| --- | ---: | ---: |")
    for tottime, name in rows[:12]:
        print(f"| {name} | {1000 * tottime / args.tokens:.2f} | {100 * tottime / wall:.1f}% |")


if __name__ == "__main__":
    main()
