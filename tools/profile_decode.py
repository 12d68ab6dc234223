"""Where a decode step's time goes: cProfile over single-stream decode, grouped by kernel.

    python tools/profile_decode.py [--model PATH] [--tokens 64] [--prompt-tokens 256]
    python tools/profile_decode.py --kernels [Q4_0,Q2_K,...] [--against REV]
    python tools/profile_decode.py --workload [--against REV]
    python tools/profile_decode.py --model PATH --against REV
    python tools/profile_decode.py --lora

Prints the share of wall time of each Numba kernel and of the Python around them, for decode
steps (one token, one sequence) after a prompt of the given length; recorded in
docs/benchmarks.md.

--kernels: each quant type's matmul alone instead, on one thread, a random [2816, 1024] matrix
(tests/tiny_model.py's random_weight) times 1, 16 and 64 tokens, in GMAC/s of process CPU time
(best of 5): how fast each kernel computes, apart from the model and the machine's other load.

--against REV: the matmul kernels (kernels/qmatmul.py, kernels/qmatmul_decoded.py) as they were
at git revision REV, timed alternately with today's in the same process (best of 30 each), with
their ratio and whether the outputs are identical. On a VM whose speed drifts by 10-30% between
runs, this is how a kernel step is measured.

--workload: batched multi-LoRA decode in process, the request mix of the workload benchmark
(48 requests, prompts of 16-128 tokens, 16-64 output tokens, 32 random rank-8 adapters on all
seven projections with Zipf popularity, alpha = 1) submitted at once to an Engine with 16
sequences and 256 tokens per step; output tok/s of each run, then cProfile over one more run.
With --against REV, REV's matmul kernels and today's run the same mix alternately (3 rounds),
and the generated tokens are compared.

--model PATH --against REV (without --kernels or --workload): the whole model's prefill (256
tokens in 128-token forwards) and greedy decode (64 tokens) with REV's matmul kernels and
today's alternately in one process, 5 rounds after a warm-up each, medians and their ratio; the
generated tokens must be the same.

--lora: the LoRA corrections alone of one decode step of 32 sequences with 32 distinct random
rank-8 adapters on all seven projections (bench_lora's), every layer and projection group
(kernels/lora.py's LoraBatch.apply, the gather kernel), in process: ms per step and the adapter
bytes read per second. To compare revisions, run it from each one's worktree alternately.
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
    ap.add_argument("--kernels", nargs="?", const="all", default=None, metavar="TYPES",
                    help="time each quant type's matmul alone (comma-separated GGML type names)")
    ap.add_argument("--against", metavar="REV", default=None,
                    help="with --kernels, --workload or --model: time the matmul kernels of git "
                         "revision REV too")
    ap.add_argument("--workload", action="store_true",
                    help="profile batched multi-LoRA decode under the workload's request mix")
    ap.add_argument("--lora", action="store_true",
                    help="time the LoRA corrections of one 32-sequence decode step")
    args = ap.parse_args()
    if args.lora:
        return lora_step(args.model, args.threads)
    if args.workload:
        return workload(args.model, args.threads, args.against)
    if args.against is not None and args.model is not None and args.kernels is None:
        return model_ab(args.model, args.threads, args.against)
    if args.against is not None:
        return kernel_ab(args.kernels or "all", args.against)
    if args.kernels is not None:
        return kernel_rates(args.kernels)

    import edgelora_np as el

    m = el.load_model(args.model, n_threads=args.threads, progress=False)
    cache = m.llama.new_cache(args.prompt_tokens + args.tokens + 8)
    tok = prefill(m, cache, args.prompt_tokens)
    t0 = time.perf_counter()
    with profiled() as profile:
        decode(m, cache, tok, args.prompt_tokens, args.tokens)
    wall = time.perf_counter() - t0
    rows = []
    for (file, _, func), (_, _, tottime, _, _) in profile.stats.items():
        rows.append((tottime, f"{func} ({file.split('edgelora_np/')[-1]})"))
    rows.sort(reverse=True)
    print(f"{args.tokens} decode steps after {args.prompt_tokens} prompt tokens: "
          f"{args.tokens / wall:.1f} tok/s, {1000 * wall / args.tokens:.2f} ms/token\n")
    print("| function | ms/token | share |")
    print("| --- | ---: | ---: |")
    for tottime, name in rows[:12]:
        print(f"| {name} | {1000 * tottime / args.tokens:.2f} | {100 * tottime / wall:.1f}% |")


def prefill(m, cache, n_prompt: int) -> int:
    """A fixed prompt of n_prompt token ids through the model in 128-token forwards; the
    greedy next token."""
    from edgelora_np.model.batch import Batch

    ids = [(1000 + i) % m.config.vocab_size for i in range(n_prompt)]
    for i in range(0, n_prompt, 128):
        logits = m.llama.forward(Batch.single(ids[i:i + 128], start=i), cache)
    return int(np.argmax(logits[-1]))


def decode(m, cache, tok: int, n: int, steps: int) -> list[int]:
    """`steps` greedy one-token forwards from token `tok` at position n; the tokens made."""
    from edgelora_np.model.batch import Batch

    out = []
    for _ in range(steps):
        logits = m.llama.forward(Batch.single([tok], start=n), cache)
        tok, n = int(np.argmax(logits[-1])), n + 1
        out.append(tok)
    return out


KERNEL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ4_XS")


class profiled:
    """cProfile over a block, on this thread and on the compute thread (model/compute.py),
    where every forward runs; `.stats` (pstats' dict) holds both, less this thread's waits
    for the compute thread. One use per object."""

    def __enter__(self):
        from edgelora_np.model import compute

        self._here, self._there = cProfile.Profile(), cProfile.Profile()
        compute.run(self._there.enable)        # a profiler stays on the thread that enabled it
        self._here.enable()
        return self

    def __exit__(self, *exc):
        from edgelora_np.model import compute

        self._here.disable()
        compute.run(self._there.disable)
        here = pstats.Stats(self._here)
        for key in [k for k in here.stats if k[2] == "<method 'acquire' of '_thread.lock' objects>"]:
            del here.stats[key]
        self.stats = here.add(self._there).stats
        return False


def kernel_rates(types: str, n: int = 2816, k: int = 1024) -> None:
    import sys
    from pathlib import Path

    import numba
    from gguf import GGMLQuantizationType as QT

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_model import random_weight

    from edgelora_np.kernels import pack

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"one thread, W [{n}, {k}], GMAC/s of process CPU time (best of 5)\n")
    print("| type | 1 token | 16 tokens | 64 tokens |")
    print("| --- | ---: | ---: | ---: |")
    for name in KERNEL_TYPES if types == "all" else types.split(","):
        qt = QT[name]
        w = pack.pack_gguf(random_weight(qt, (n, k), rng, 0.05), qt, n, k, 1)
        rates = []
        for b in (1, 16, 64):
            x = rng.standard_normal((b, k)).astype(np.float32)
            pack.matmul(w, x)                                  # compiled before it is timed
            best = float("inf")
            for _ in range(5):
                t0 = time.process_time()
                pack.matmul(w, x)
                best = min(best, time.process_time() - t0)
            rates.append(f"{b * n * k / best / 1e9:.2f}")
        print(f"| {name} | " + " | ".join(rates) + " |", flush=True)


MATMUL_MODULES = ("qmatmul", "qmatmul_decoded")


def kernels_at(rev: str) -> dict:
    """The Numba matmul kernels of kernels/qmatmul*.py at git revision `rev`, compiled from that
    source (uncached) against today's helpers (bits, actquant) but that revision's
    kernels/bytedot.py and qmatmul.py where the kernels import them: name -> dispatcher."""
    import re
    import subprocess
    import sys
    import types as pytypes
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tag = re.sub(r"\W", "_", rev)
    found, loaded = {}, []
    for name in ("bytedot",) + MATMUL_MODULES:     # in import order
        path = f"edgelora_np/kernels/{name}.py"
        try:
            source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, check=True,
                                    capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as e:
            if name == "bytedot":                  # older than the byte pairs
                continue
            raise SystemExit(f"git show {rev}:{path}: {e.stderr.strip()}") from None
        for earlier in loaded:
            source = source.replace(f"edgelora_np.kernels.{earlier} import",
                                    f"edgelora_np.kernels.{earlier}_at_{tag} import")
        module = pytypes.ModuleType(f"edgelora_np.kernels.{name}_at_{tag}")
        sys.modules[module.__name__] = module
        exec(compile(source.replace("cache=True", "cache=False"), f"{rev}:{path}", "exec"),
             module.__dict__)
        loaded.append(name)
        if name in MATMUL_MODULES:
            found.update({k: v for k, v in vars(module).items() if hasattr(v, "py_func")})
    return found


def kernel_switch(rev: str):
    """A context manager factory: kernels_of(variant) runs its body with REV's matmul kernels
    in kernels/pack.py when variant == rev, and with today's otherwise."""
    import contextlib

    from edgelora_np.kernels import pack

    old = {k: v for k, v in kernels_at(rev).items() if hasattr(vars(pack).get(k), "py_func")}

    @contextlib.contextmanager
    def kernels_of(variant):
        today = {name: vars(pack)[name] for name in old}
        if variant == rev:
            vars(pack).update(old)
        try:
            yield
        finally:
            vars(pack).update(today)

    return kernels_of


def kernel_ab(types: str, rev: str, n: int = 2816, k: int = 1024, rounds: int = 30) -> None:
    import sys
    from pathlib import Path

    import numba
    from gguf import GGMLQuantizationType as QT

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_model import random_weight

    from edgelora_np.kernels import pack

    kernels_of = kernel_switch(rev)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"one thread, W [{n}, {k}], GMAC/s of process CPU time, best of {rounds}, {rev}'s "
          "matmul kernels and today's alternating\n")
    print(f"| type | tokens | {rev} | today | today / {rev} | outputs |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name in KERNEL_TYPES if types == "all" else types.split(","):
        qt = QT[name]
        w = pack.pack_gguf(random_weight(qt, (n, k), rng, 0.05), qt, n, k, 1)
        for b in (1, 16, 64):
            x = rng.standard_normal((b, k)).astype(np.float32)
            best, outs = {}, {}
            for r in range(rounds + 1):                        # round 0 compiles
                for variant in (rev, "today"):
                    with kernels_of(variant):
                        t0 = time.process_time()
                        outs[variant] = pack.matmul(w, x)
                        dt = time.process_time() - t0
                    if r:
                        best[variant] = min(best.get(variant, dt), dt)
            diff = float(np.abs(outs[rev] - outs["today"]).max())
            same = "identical" if diff == 0 else f"max diff {diff:.3g}"
            rate = {v: b * n * k / best[v] / 1e9 for v in best}
            print(f"| {name} | {b} | {rate[rev]:.2f} | {rate['today']:.2f} | "
                  f"{best[rev] / best['today']:.2f}x | {same} |", flush=True)


def model_ab(model: str, threads: int | None, rev: str, rounds: int = 5) -> None:
    import statistics

    import edgelora_np as el

    m = el.load_model(model, n_threads=threads, progress=False)
    kernels_of = kernel_switch(rev)
    n_prompt, n_decode = 256, 64

    def once() -> tuple[float, float, list[int]]:
        cache = m.llama.new_cache(n_prompt + n_decode + 8)
        t0 = time.perf_counter()
        tok = prefill(m, cache, n_prompt)
        t1 = time.perf_counter()
        out = decode(m, cache, tok, n_prompt, n_decode)
        return n_prompt / (t1 - t0), n_decode / (time.perf_counter() - t1), out

    runs: dict[str, list] = {rev: [], "today": []}
    tokens = {}
    for r in range(rounds + 1):                        # round 0 compiles and warms up
        for variant in (rev, "today"):
            with kernels_of(variant):
                prefill_rate, decode_rate, tokens[variant] = once()
            if r:
                runs[variant].append((prefill_rate, decode_rate))
    if tokens[rev] != tokens["today"]:
        raise SystemExit(f"{rev}'s kernels and today's generated different tokens")
    med = {v: [statistics.median(x[i] for x in runs[v]) for i in (0, 1)] for v in runs}
    print(f"{model}: medians of {rounds} alternating rounds, the same tokens\n")
    print(f"| | {rev} | today | today / {rev} |")
    print("| --- | ---: | ---: | ---: |")
    for i, what in enumerate(("prefill tok/s", "decode tok/s")):
        print(f"| {what} | {med[rev][i]:.1f} | {med['today'][i]:.1f} | "
              f"{med['today'][i] / med[rev][i]:.2f}x |")


def workload(model: str | None, threads: int | None, rev: str | None, n_adapters: int = 32,
             rounds: int = 3) -> None:
    import contextlib
    import sys
    import tempfile
    from pathlib import Path

    import edgelora_np as el
    from edgelora_np.loadgen.workload import WorkloadSpec, make_workload

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lora import write_adapters

    m = el.load_model(model, n_threads=threads, progress=False)
    engine = el.Engine(m, max_batch_tokens=256, max_seqs=16, background=False,
                       prefix_cache=False)
    with tempfile.TemporaryDirectory() as folder:
        for i, path in enumerate(write_adapters(Path(folder), n_adapters)):
            engine.add_adapter(f"t{i}", path)
    # rate x duration = 48 requests; their arrival times are not used: all are submitted at once.
    spec = WorkloadSpec(rate=48.0, duration=1.0, alpha=1.0, prompt_tokens=(16, 128),
                        output_tokens=(16, 64), seed=0)
    mix = make_workload(spec, n_adapters, range(100, 40000))

    def run(profiler=None):
        gens = [engine.submit(mix.prompt(i), adapter=f"t{mix.target[i]}", temperature=0.0,
                              ignore_eos=True, max_tokens=int(mix.output_len[i]))
                for i in range(len(mix))]
        t0 = time.perf_counter()
        with profiler or contextlib.nullcontext():
            while engine.step():
                pass
        wall = time.perf_counter() - t0
        tokens = [list(g.token_ids) for g in gens]
        return sum(map(len, tokens)) / wall, tokens, wall

    kernels_of = kernel_switch(rev) if rev else (lambda variant: contextlib.nullcontext())
    variants = (rev, "today") if rev else ("today",)
    rates, outputs = {v: [] for v in variants}, {}
    for r in range(rounds + 1):                                 # round 0 compiles
        for variant in variants:
            with kernels_of(variant):
                rate, outputs[variant], _ = run()
            if r:
                rates[variant].append(rate)
    print(f"{len(mix)} requests ({int(mix.prompt_len.sum())} prompt tokens, "
          f"{int(mix.output_len.sum())} output tokens), {n_adapters} adapters, 16 sequences, "
          f"256 tokens per step; output tok/s per round\n")
    for variant in variants:
        print(f"{variant}: " + ", ".join(f"{x:.1f}" for x in rates[variant])
              + f" (median {float(np.median(rates[variant])):.1f})")
    if rev:
        same = outputs[rev] == outputs["today"]
        print(f"generated tokens {'identical' if same else 'DIFFER'} between {rev} and today")
    profiler = profiled()
    _, _, wall = run(profiler)
    rows = sorted(((tottime, func) for (_, _, func), (_, _, tottime, _, _)
                   in profiler.stats.items()), reverse=True)
    print(f"\ncProfile over one more run (today's kernels): {wall:.2f} s\n")
    print("| function | s | share |")
    print("| --- | ---: | ---: |")
    for tottime, func in rows[:12]:
        print(f"| {func} | {tottime:.2f} | {100 * tottime / wall:.1f}% |")


def lora_step(model: str | None, threads: int | None, n_seqs: int = 32, rounds: int = 15) -> None:
    import sys
    import tempfile
    from pathlib import Path

    import edgelora_np as el
    from edgelora_np.adapters.formats import load_adapter
    from edgelora_np.adapters.pool import AdapterPool
    from edgelora_np.kernels.lora import LoraBatch
    from edgelora_np.model import compute

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lora import write_adapters

    m = el.load_model(model, n_threads=threads, progress=False)
    cfg = m.llama.cfg
    pool = AdapterPool(cfg, 512 << 20, max_slots=n_seqs)
    with tempfile.TemporaryDirectory() as folder:
        slots = [pool.add(f"t{i}", load_adapter(path, cfg))
                 for i, path in enumerate(write_adapters(Path(folder), n_seqs))]
    adapter_bytes = pool.stats().bytes_resident
    rng = np.random.default_rng(0)
    io = {name: (rng.standard_normal((n_seqs, g.n_in)).astype(np.float32),
                 np.zeros((n_seqs, g.n_out), np.float32)) for name, g in pool.groups.items()}
    lora = LoraBatch(pool, np.array(slots, np.int32))         # one token per sequence

    def step() -> float:
        t0 = time.perf_counter()
        for layer in range(cfg.n_layers):
            for group, (x, y) in io.items():
                lora.apply(group, layer, x, y)
        return time.perf_counter() - t0

    times = sorted(compute.run(lambda: [step() for _ in range(rounds + 1)][1:]))
    median = times[len(times) // 2]
    print(f"LoRA of one decode step, {n_seqs} sequences with {n_seqs} distinct adapters: "
          f"median {1000 * median:.2f} ms, best {1000 * times[0]:.2f} ms of {rounds}; "
          f"{adapter_bytes / 1e6:.0f} MB of adapters read at {adapter_bytes / median / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
