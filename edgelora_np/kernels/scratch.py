"""Scratch arrays for the kernels: small, per thread, and starting on a cache line.

The matmul kernels keep their int16 and int32 partial sums, unpacked codes and float
accumulators in scratch rows of T elements, loaded and stored a whole vector at a time. Numba's
`np.empty` aligns an array to 32 bytes, so about half the time a scratch array starts in the
middle of a 64-byte line, and then every 512-bit load and store of it straddles two lines. On
the Zen 5 VM, `matmul_q4` at 16 and 32 tokens ran at 52-54 GMAC/s in a process whose scratch
fell that way and at 71-75 in one whose scratch did not: which one a process got depended on
the allocator's state, and was the largest part of the run-to-run spread of the batched
benchmarks (docs/benchmarks.md). A line is 64 bytes on every x86-64 and Cortex-A core we
target; NEON's 16-byte vectors never straddle one once the row starts aligned.

The tiled matmul kernels give each thread a contiguous run of tiles (`tile_run`) and let it
allocate its scratch once, for all of them: a few KB to a few tens of KB. They used to allocate
one scratch per tile, up front, which for the output projection (96 tiles of 512 rows) was
7.5 MB per call. glibc serves an allocation that large with a fresh `mmap` (unless an earlier
free happened to raise its threshold), so every call faulted in ~1,800 new pages and unmapped
them again: on the Zen 5 VM the one-token output projection took 1.07 ms, and 0.42 ms once the
scratch was per thread (docs/benchmarks.md, 2026-12-01). Small allocations come from memory
malloc already holds.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgelora_np.kernels.prefetch import LINE


@njit(inline="always")
def empty_lines(shape, dtype):
    """np.empty(shape, dtype), C-contiguous, its first element on a 64-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    buf = np.empty(n + LINE, dtype)                  # room to skip up to a line's worth
    skip = ((-buf.ctypes.data) % LINE) // buf.itemsize
    return buf[skip:skip + n].reshape(shape)


@intrinsic
def _n_threads(typingctx):
    """numba.get_num_threads() inside a kernel. Numba's own overload of it calls the threading
    layer through a ctypes pointer, and a function holding one cannot be cached; this calls
    the layer's C function `int get_num_threads(void)` by its symbol, as Numba's parfor
    lowering does (the symbol is registered when the threads are launched)."""
    numba.get_num_threads()                 # launches the threads, registering the symbol

    def codegen(context, builder, signature, args):
        # Declared returning intp, as Numba's parfor code declares it in the same module (one
        # module cannot hold two declarations). The C function returns an int, computed in a
        # 32-bit register, and a 32-bit write clears the upper half on x86-64 and AArch64
        # alike: Numba's own parfor code relies on the same.
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []),
                                            "get_num_threads")
        return builder.call(fn, [])

    return types.intp(), codegen


if numba.config.DISABLE_JIT:
    def thread_parts(n_tiles):
        """Plain Python: the same cut, through Numba's Python API."""
        return min(n_tiles, numba.get_num_threads())
else:
    @njit(inline="always")
    def thread_parts(n_tiles):
        """How many runs of tiles to cut n_tiles into: one per thread, at most one per tile."""
        return min(n_tiles, _n_threads())


@njit(inline="always")
def tile_run(part, n_parts, n_tiles):
    """Tiles first..end-1 of part `part` of n_parts: contiguous runs whose sizes differ by at
    most one, as Numba's own static schedule would cut them."""
    return part * n_tiles // n_parts, (part + 1) * n_tiles // n_parts
