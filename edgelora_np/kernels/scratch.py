"""Scratch arrays for the kernels that start on a cache line: `empty_lines(shape, dtype)`.

The matmul kernels keep their int16 and int32 partial sums, unpacked codes and float
accumulators in scratch rows of T elements, loaded and stored a whole vector at a time. Numba's
`np.empty` aligns an array to 32 bytes, so about half the time a scratch array starts in the
middle of a 64-byte line, and then every 512-bit load and store of it straddles two lines. On
the Zen 5 VM, `matmul_q4` at 16 and 32 tokens ran at 52-54 GMAC/s in a process whose scratch
fell that way and at 71-75 in one whose scratch did not: which one a process got depended on
the allocator's state, and was the largest part of the run-to-run spread of the batched
benchmarks (docs/benchmarks.md). A line is 64 bytes on every x86-64 and Cortex-A core we
target; NEON's 16-byte vectors never straddle one once the row starts aligned.
"""

import numpy as np
from numba import njit

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
