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

from edgelora_np.kernels import actquant, attention, elementwise, qmatmul
from edgelora_np.kernels.pack import SUPPORTED, PackedMatrix, matmul, pack_gguf, packed_rows

# Synthetic matrices: [N, K] with K one K-quant super-block, N not a multiple of the tile.
WARM_ROWS = 40
WARM_COLS = 256
WARM_BATCH = 3        # tokens multiplied at once
WARM_PROMPT = 8       # prompt tokens of the model warm-up

# gguf-py quantizes these from floats; for the K-quants it has no quantizer, so we use zero blocks.
_QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q8_0)
_KERNEL_MODULES = (actquant, attention, elementwise, qmatmul)


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
