"""Sixteen-entry table lookups in vector registers: the IQ4 types' levels.

IQ4_NL and IQ4_XS store 4-bit codes standing for 16 fixed levels (ggml's kvalues_iq4nl,
IQ4_NL_VALUES). A loop reading `levels[code]` from memory is a gather, which LLVM vectorizes
only where gathers are cheap (not AMD's x86; AArch64 has none), so the kernels used to compute
each level from its code by a quartic in 16-bit lanes (about 16 instructions per 32 codes).

LLVM has a better answer when asked in the right words. A vector built lane by lane, each lane
extracted from one 16-byte vector (the table) at an index that is itself a lane of one vector
(the codes), is a "variable permute", and the backends select the target's byte shuffle for
it: `vpermb` on x86 with AVX-512 VBMI (Zen 4/5), `pshufb` with SSSE3/AVX2, `tbl` on AArch64
(Cortex-A72 and A76 alike). Numba never writes that shape, so `levels` emits it (an
@intrinsic, as kernels/bytedot.py does): no target intrinsic is named; the IR is the same for
every target. `python tools/probe_dot_products.py` prints what it becomes on Zen 5, the A76
and the A72 ("16-entry lookup"); tests/test_kernels.py reads the shuffle in the compiled
lookup (on x86 in both IQ4 kernels too).

`levels(src, dst, shift)`: dst[t] = IQ4_NL_VALUES[(src[t] >> shift) & 15], for t over the
whole row, src a row of code bytes (uint8), dst a row of int8 (shift 0: the low nibbles, 4: the
high ones). Rows are whole numbers of LANES (tiles are multiples of 16 rows). The levels are
stored as bytes: widened to int16 in the same step, the shuffle and the widening fold into one
per-lane build on AArch64, and `tbl` is lost (x86 keeps `pshufb` either way); the kernels widen
them as they load them. With NUMBA_DISABLE_JIT=1 it is the NumPy lookup.
"""

from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

from edgelora_np.gguf.quants import IQ4_NL_VALUES

LANES = 16                 # codes per lookup: one 128-bit table, one shuffle per 16 on every target
I8, I32 = ir.IntType(8), ir.IntType(32)


def _row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype


def _levels_at(shift: int):
    """An intrinsic (src, dst, at): dst[at:at + LANES] = IQ4_NL_VALUES[(src[at:at + LANES] >>
    shift) & 15]. The shift is a constant of the IR: x86 has no byte shift, and a variable one
    costs three instructions more."""

    @intrinsic
    def levels_at(typingctx, src, dst, at):
        if not (_row(src, types.uint8) and _row(dst, types.int8) and isinstance(at, types.Integer)):
            return None
        codes_t = ir.VectorType(I8, LANES)
        table = ir.Constant(ir.VectorType(I8, 16), [int(v) & 0xFF for v in IQ4_NL_VALUES])

        def codegen(context, builder, signature, args):
            src_a = context.make_array(signature.args[0])(context, builder, args[0])
            dst_a = context.make_array(signature.args[1])(context, builder, args[1])
            codes = builder.load(builder.bitcast(builder.gep(src_a.data, [args[2]]),
                                                 codes_t.as_pointer()), align=1)
            if shift:
                codes = builder.lshr(codes, ir.Constant(codes_t, [shift] * LANES))
            codes = builder.and_(codes, ir.Constant(codes_t, [15] * LANES))
            # Lane by lane from the table at the codes' lanes: the variable-permute shape.
            out = ir.Constant(codes_t, None)
            for lane in range(LANES):
                code = builder.extract_element(codes, ir.Constant(I32, lane))
                out = builder.insert_element(out, builder.extract_element(table, code),
                                             ir.Constant(I32, lane))
            builder.store(out, builder.bitcast(builder.gep(dst_a.data, [args[2]]),
                                               codes_t.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.void(src, dst, at), codegen

    return levels_at


_low_levels_at, _high_levels_at = _levels_at(0), _levels_at(4)


if numba_config.DISABLE_JIT:
    def levels(src, dst, shift):
        """Plain Python: the NumPy lookup."""
        dst[:] = IQ4_NL_VALUES[(src >> shift) & 15]
else:
    @njit(inline="always")
    def levels(src, dst, shift):
        """dst[t] = IQ4_NL_VALUES[(src[t] >> shift) & 15] for every t (len(src) % LANES == 0;
        shift 0 or 4)."""
        if shift:
            for at in range(0, src.shape[0], LANES):
                _high_levels_at(src, dst, at)
        else:
            for at in range(0, src.shape[0], LANES):
                _low_levels_at(src, dst, at)
