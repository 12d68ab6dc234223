"""Software prefetch inside Numba kernels: `prefetch(a)` asks the CPU to start loading the cache
lines of a contiguous array that the kernel will read soon.

The matmul kernels stream their weights from memory once per call, a block at a time, and each
block's integer arithmetic waits for the block's bytes: the hardware prefetchers did not keep
ahead. On the Zen 5 VM, one token against a 71 MB Q8_0 matrix on two threads read 22 GB/s, and
58-63 GB/s once each block prefetched the next block's rows as it consumed its own; Q4_1, 28 ->
49-58 GB/s (docs/benchmarks.md, 2026-12-01). Prefetching the whole next block at once, when a
block starts, gained nothing: a core keeps only a few dozen misses in flight, so the kernels
spread the prefetches, one row of the next block per row of this one.

`llvm.prefetch` is LLVM's target-independent intrinsic: `prefetcht0` on x86-64, `prfm pldl1keep`
on AArch64. A prefetch never faults and changes no result; the line size assumed here (64
bytes) is that of every x86-64 and Cortex-A core we target, and a wrong guess only costs
speed. With NUMBA_DISABLE_JIT=1 it does nothing.
"""

from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64                 # bytes per cache line


@intrinsic
def _prefetch_line(typingctx, a, offset):
    """Prefetch, for reading into all cache levels, the line holding byte `offset` of a's data."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        address = builder.gep(builder.bitcast(data, i8p), [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        # (address, 0 = read, 3 = keep in all levels, 1 = data cache)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(a, types.intp), codegen


if numba_config.DISABLE_JIT:
    def prefetch(a):
        """Plain Python: nothing to prefetch."""
else:
    @njit(inline="always")
    def prefetch(a):
        """Prefetch every cache line of the C-contiguous array `a`."""
        for offset in range(0, a.nbytes, LINE):
            _prefetch_line(a, offset)
