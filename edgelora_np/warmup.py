"""Compiling the Numba kernels before the first request needs them.

Every kernel is `@njit(cache=True)`: its first call in a fresh install compiles it (seconds per
kernel) and stores the machine code beside the module; later processes load it in milliseconds.
Numba compiles one version per signature of argument types, and the weight formats give
different signatures: fp16 or float32 scales, with or without offsets, q8_0/q8_1 or q8_K
activations. So a warm-up multiplies by one tiny synthetic matrix of every supported format
(`warm_kernels`), then runs a real model once through prefill, a decode step and `logits`
(`warm_model`) for the norm, RoPE, SwiGLU and attention kernels.

Each step is a named task; `run_tasks` times it and counts, from Numba's own statistics, how
many signatures it compiled and how many it loaded from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from numba.core.registry import CPUDispatcher

from edgelora_np.kernels import actquant, attention, elementwise, qmatmul, qmatmul_decoded
from edgelora_np.kernels.pack import SUPPORTED, PackedMatrix, matmul, pack_gguf, packed_rows

# Synthetic matrices: [N, K] with K one K-quant super-block, N not a multiple of the tile.
WARM_ROWS = 40
WARM_COLS = 256
WARM_BATCH = 3        # tokens multiplied at once
WARM_PROMPT = 8       # prompt tokens of the model warm-up

# gguf-py quantizes these from floats; for the K and IQ4 types it has no quantizer: zero blocks.
_QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
_KERNEL_MODULES = (actquant, attention, elementwise, qmatmul, qmatmul_decoded)


@dataclass(frozen=True)
class TaskResult:
    name: str
    seconds: float
    compiled: int       # signatures compiled (cache misses)
    loaded: int         # signatures loaded from Numba's on-disk cache


Task = tuple[str, Callable[[], object]]


def synthetic_matrix(qtype: QT, n_rows: int, n_cols: int, n_threads: int,
                     rng: np.random.Generator) -> PackedMatrix:
    """A packed [n_rows, n_cols] matrix of type `qtype`: random weights, or zero K-quant blocks."""
    if qtype in _QUANTIZABLE:
        raw = quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), qtype)
    else:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = np.zeros((n_rows, n_cols // block * block_bytes), np.uint8)
    return pack_gguf(raw, qtype, n_rows, n_cols, n_threads, name=f"warmup {qtype.name}")


def kernel_tasks(n_threads: int | None = None) -> list[Task]:
    """One task per supported weight type: a matmul and an embedding-row lookup."""
    n_threads = n_threads or numba.get_num_threads()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((WARM_BATCH, WARM_COLS)).astype(np.float32)   # [B, K]
    rows = np.array([0, WARM_ROWS - 1])

    def task(qtype: QT) -> Task:
        def run():
            w = synthetic_matrix(qtype, WARM_ROWS, WARM_COLS, n_threads, rng)
            matmul(w, x)                                                   # [B, N]
            packed_rows(w, rows)                                           # [2, K]
        return f"matmul {qtype.name}", run

    return [task(qtype) for qtype in SUPPORTED]


def model_tasks(model) -> list[Task]:
    """Prefill + one decode step, and `logits` on two tokens, of a loaded `api.Model`."""
    prompt = list(range(1, WARM_PROMPT + 1))
    return [
        ("prefill + decode step",
         lambda: model.generate(prompt, max_tokens=2, temperature=0, ignore_eos=True).run()),
        ("logits, 2 tokens", lambda: model.logits(prompt[:2])),
    ]


def run_tasks(tasks: list[Task], on_done: Callable[[TaskResult], None] | None = None
              ) -> list[TaskResult]:
    results = []
    for name, run in tasks:
        hits, misses = _cache_counts()
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        hits2, misses2 = _cache_counts()
        result = TaskResult(name, seconds, compiled=misses2 - misses, loaded=hits2 - hits)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def warm_kernels(n_threads: int | None = None) -> list[TaskResult]:
    """Compile (or load from cache) the matmul kernels of every supported weight type."""
    return run_tasks(kernel_tasks(n_threads))


def warm_model(model) -> list[TaskResult]:
    """Compile (or load) every kernel a forward pass of `model` uses."""
    return run_tasks(model_tasks(model))


def _cache_counts() -> tuple[int, int]:
    """Total (cache hits, cache misses) over all kernels, from Numba's dispatcher statistics."""
    kernels = {id(obj): obj for module in _KERNEL_MODULES for obj in vars(module).values()
               if isinstance(obj, CPUDispatcher)}
    hits = sum(sum(k.stats.cache_hits.values()) for k in kernels.values())
    misses = sum(sum(k.stats.cache_misses.values()) for k in kernels.values())
    return hits, misses


def warm_forward(qtypes, n_threads: int | None = None) -> None:
    """Run every kernel a forward pass uses, with the argument types the real model will pass.

    A tiny random one-layer model per weight type in `qtypes` (each with its own dtype
    signatures: fp16 or float32 scales, q8_0/q8_1/q8_K activations) goes through a prefill
    chunk and a decode step, with and without a LoRA adapter (segment and gather kernels).
    Sizes do not matter to Numba, only types, so this loads exactly the machine code the
    real model needs, in milliseconds once cached.
    """
    from edgelora_np.adapters.pool import AdapterPool
    from edgelora_np.kernels.actquant import SERIAL_ROWS
    from edgelora_np.kernels.lora import LoraBatch
    from edgelora_np.model.batch import Batch
    from edgelora_np.model.config import LlamaConfig
    from edgelora_np.model.llama import Llama
    from edgelora_np.model.weights import LayerWeights, ModelWeights

    n_threads = n_threads or numba.get_num_threads()
    rng = np.random.default_rng(0)
    D = F = WARM_COLS
    cfg = LlamaConfig(n_layers=1, dim=D, n_heads=4, n_kv_heads=2, head_dim=D // 4, ffn_dim=F,
                      vocab_size=WARM_ROWS, context_length=64, rope_base=1e4, rope_dim=D // 4,
                      rope_freq_scale=1.0, rms_eps=1e-5)
    adapter = _TinyAdapter(cfg, rng)
    for qtype in sorted(set(qtypes) & set(SUPPORTED)):
        def mat(rows, cols, qtype=qtype):
            return synthetic_matrix(qtype, rows, cols, n_threads, rng)

        norm = np.ones(D, np.float32)
        layer = LayerWeights(norm, (mat(D + 2 * cfg.kv_dim, D),), mat(D, D), norm,
                             (mat(2 * F, D),), mat(D, F))
        embd = mat(WARM_ROWS, D)
        llama = Llama(cfg, ModelWeights(embd, [layer], norm, embd, None))
        pool = AdapterPool(cfg, 1 << 20, max_slots=1)
        slot = pool.add("warm", adapter)
        for lora_slot in (-1, slot):
            cache = llama.new_cache(64)
            # More rows than SERIAL_ROWS, so that both activation quantizers are loaded.
            n_prefill = SERIAL_ROWS + 1
            prefill = Batch.single(list(range(1, n_prefill + 1)), adapter=lora_slot)
            decode = Batch.single([n_prefill + 1], start=n_prefill, adapter=lora_slot)
            for batch in (prefill, decode):
                lora = LoraBatch(pool, batch.adapters) if lora_slot >= 0 else None
                llama.forward(batch, cache, lora)


class _TinyAdapter:
    """A random rank-2 adapter on all seven projections of a one-layer config."""

    def __init__(self, cfg, rng):
        from types import SimpleNamespace

        from edgelora_np.adapters.packed import projection_groups

        self.pairs = {}
        for group in projection_groups(cfg).values():
            for proj, _, width in group.parts:
                self.pairs[(0, proj)] = SimpleNamespace(
                    a=rng.standard_normal((2, group.n_in)).astype(np.float32),
                    b=rng.standard_normal((width, 2)).astype(np.float32), scale=1.0)


def release_compiler_memory() -> int:
    """Hand the pages of LLVM (Numba's compiler) back to the OS; returns the bytes advised.

    Once every kernel is compiled or loaded, the compiler's ~70 MB of code and data pages sit
    resident but unused. They are clean file-backed pages, so MADV_PAGEOUT drops them at no
    cost; if a new kernel signature ever needs compiling, they are simply read back in.
    Linux only (a no-op elsewhere, or where the kernel refuses).
    """
    import ctypes

    madv_pageout = 21
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in maps:
        fields = line.split()
        if len(fields) >= 6 and "libllvmlite" in fields[5]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(start, end - start, madv_pageout) == 0:
                advised += end - start
    return advised
