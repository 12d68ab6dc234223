"""Byte dot products for the batched 4-, 5- and 6-bit kernels, where the target has an instruction.

x86 has one: `pmaddubsw` (SSSE3; `vpmaddubsw` on AVX2 and AVX-512BW) multiplies unsigned bytes
by signed bytes and adds each adjacent pair of products into an int16 lane: 64 products per
512-bit instruction, where the int16 multiply-add the kernels otherwise use (`vpmullw`, then
`vpaddw`) takes two instructions for 32. LLVM selects `pmaddubsw` from target-independent IR of
one shape: the even and the odd bytes of two vectors, widened (the weights unsigned, the
activations signed), multiplied, each pair added, clamped to int16 and truncated. Numba never
writes that shape for a loop, so the pair_madd functions emit it (an @intrinsic, as
kernels/prefetch.py and kernels/bits.py do). No x86 intrinsic is named: the IR is the same for
every target, and the SelectionDAG only matches it within one basic block, so each call
loads, multiplies and stores.

On AArch64 LLVM makes about 50 instructions of the same IR per 64 products (NEON has no
pairwise byte multiply-add), against 8 `mla` for the int16 form. Its byte dot product, `sdot`
(Cortex-A76 and later), sums groups of four, and LLVM reaches it only from
`llvm.vector.partial.reduce.add`, whose lanes are unspecified: right for one horizontal sum,
not for 32 tile rows side by side. So the pair form is used only where the
host is x86-64 (PAIR_MADD), and AArch64 keeps the int16 multiply-adds.
`python tools/probe_dot_products.py` prints what each form becomes on Zen 5, Cortex-A76 and
Cortex-A72; tests/test_kernels.py reads the instructions of a compiled kernel.

The layout (kernels/qmatmul.py, _q4_pairs and _pair_sums): a 32-block's 16 code rows unpacked
into byte pairs, lows and highs [8, 2T] uint8: lows[p] holds, for each tile row t, the codes of
elements 2p and 2p+1 at bytes 2t and 2t+1, highs[p] those of elements 16+2p and 17+2p (for
Q6_K's 16-element sub-blocks, p < 4 and 8+2p, 9+2p). A token's activation pairs go to 16 rows
of xs [32, PAIR_ROWS] int16: row p the pair lows[p] multiplies, row 8+p the pair highs[p]
multiplies, each repeated across the row; a second token's to rows 16-31, so that one call
multiplies each weight vector it loads by both. They are stored, not broadcast in registers: LLVM's middle end
turns a broadcast pair into two per-byte broadcasts, and then the backend no longer sees the
shape. (lows and highs are separate allocations: as one [16, 2T] array, the highs eight rows
after the lows, the kernel ran at half the speed on the Zen 5 VM, for reasons of cache
placement we could not see without hardware counters.)
"""

import platform

from llvmlite import ir
from numba import config as numba_config
from numba import types
from numba.extending import intrinsic

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
PAIR_ROWS = 32              # tile rows per pair_madd call: 64 bytes of pairs, 32 int16 sums


def _has_pair_madd() -> bool:
    if numba_config.DISABLE_JIT or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as llvm
    return "ssse3" in llvm.get_host_cpu_features().flatten()


PAIR_MADD = _has_pair_madd()


def _vec(t, n):
    return ir.VectorType(t, n)


def _matrices(*pairs) -> bool:
    """Each (array type, dtype): a C-contiguous 2-D array of that dtype."""
    return all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 2 and a.dtype == dtype
               for a, dtype in pairs)


class _Array:
    """An array argument inside codegen: its first byte and its row stride in bytes."""

    def __init__(self, context, builder, array_type, value):
        a = context.make_array(array_type)(context, builder, value)
        self.base = builder.bitcast(a.data, I8.as_pointer())
        self.row_stride = builder.extract_value(a.strides, 0)


def _at(builder, base, offset, vector_type):
    """A pointer to a vector_type at byte `offset` from `base`."""
    return builder.bitcast(builder.gep(base, [offset]), vector_type.as_pointer())


def _const(value, like):
    return ir.Constant(like.type, value)


@intrinsic
def splat_pair(typingctx, xs, row, xq, token, offset):
    """xs[row, :] = the int16 whose bytes are xq[token, offset] and xq[token, offset + 1]
    (int8 activations); xs's rows are PAIR_ROWS long."""
    if not _matrices((xs, types.int16), (xq, types.int8)):
        return None

    def codegen(context, builder, signature, args):
        xs_a, row, xq_a, token, offset = args
        src = _Array(context, builder, signature.args[2], xq_a)
        dst = _Array(context, builder, signature.args[0], xs_a)
        pair = builder.load(_at(builder, src.base, builder.add(builder.mul(token, src.row_stride), offset),
                                I16), align=1)
        v = builder.insert_element(ir.Constant(_vec(I16, PAIR_ROWS), None), pair, ir.Constant(I32, 0))
        v = builder.shuffle_vector(v, v, ir.Constant(_vec(I32, PAIR_ROWS), [0] * PAIR_ROWS))
        builder.store(v, _at(builder, dst.base, builder.mul(row, _const(2 * PAIR_ROWS, row)), v.type),
                      align=2)
        return context.get_dummy_value()

    return types.void(xs, types.intp, xq, types.intp, types.intp), codegen


def _pair_madd(rows, n_pairs, group, shift=0, tokens=1):
    @intrinsic
    def pair_madd(typingctx, isum, token, t0, pairs, xs, first, accumulate):
        """isum[token, t0 + i] += sum over p < n_pairs of pairs[p, 2(t0+i)] * (the low byte of
        xs[first + p]) + pairs[p, 2(t0+i) + 1] * (its high byte), for i < rows. xs's rows are
        PAIR_ROWS int16 long, a constant, so its loads take fixed offsets. `group` pair sums
        at a time are added in int16, then widened to int32: the caller's codes bound them
        (q4: 8 pairs of at most 2 * 15 * 128 = 3840 in magnitude, 30720 < 2**15; 5-bit
        codes 4 pairs of 7936; 6-bit codes 2 of 16128). With `shift`, the int32 total is
        multiplied by 2**shift before it is added (the high nibbles of a split byte code).
        With `accumulate` False (a constant at the call site), it is stored instead of added:
        no pass zeroing isum first (that pass was 8-16% of the batched kernels). With
        `tokens` = 2, tokens `token` and `token` + 1 in one call, the second's activations in
        xs rows 16 on: each weight vector is loaded once for both."""
        if not _matrices((isum, types.int32), (pairs, types.uint8), (xs, types.int16)):
            return None
        if not isinstance(accumulate, types.Boolean):
            return None

        def codegen(context, builder, signature, args):
            isum_a, token, t0, pairs_a, xs_a, first, accumulate = args
            acc, w_rows, x_rows = (_Array(context, builder, signature.args[i], args[i]) for i in (0, 3, 4))
            x_stride = 2 * PAIR_ROWS
            bytes_, wide = _vec(I8, 2 * rows), _vec(I32, rows)
            even = ir.Constant(_vec(I32, rows), [2 * i for i in range(rows)])
            odd = ir.Constant(_vec(I32, rows), [2 * i + 1 for i in range(rows)])
            low, high = ir.Constant(wide, [-32768] * rows), ir.Constant(wide, [32767] * rows)

            def halves(v, widen):               # even bytes, odd bytes, each widened to int32
                return (widen(builder.shuffle_vector(v, v, even), wide),
                        widen(builder.shuffle_vector(v, v, odd), wide))

            col = builder.mul(t0, _const(2, t0))
            totals, partials = [None] * tokens, [None] * tokens
            for p in range(n_pairs):
                w_at = builder.add(builder.mul(w_rows.row_stride, _const(p, t0)), col)
                w0, w1 = halves(builder.load(_at(builder, w_rows.base, w_at, bytes_), align=1), builder.zext)
                for k in range(tokens):
                    x_at = builder.mul(builder.add(first, _const(16 * k + p, first)), _const(x_stride, first))
                    x_vec = builder.load(_at(builder, x_rows.base, x_at, bytes_), align=1)
                    x0, x1 = halves(x_vec, builder.sext)
                    s = builder.add(builder.mul(w0, x0), builder.mul(w1, x1))
                    s = builder.select(builder.icmp_signed("<", s, low), low, s)      # never clamps;
                    s = builder.select(builder.icmp_signed(">", s, high), high, s)    # part of the shape
                    s = builder.trunc(s, _vec(I16, rows))
                    partials[k] = s if partials[k] is None else builder.add(partials[k], s)
                    if (p + 1) % group == 0 or p == n_pairs - 1:
                        wide_sum = builder.sext(partials[k], wide)
                        totals[k] = wide_sum if totals[k] is None else builder.add(totals[k], wide_sum)
                        partials[k] = None
            for k in range(tokens):
                total = totals[k]
                if shift:
                    total = builder.shl(total, ir.Constant(wide, [shift] * rows))
                row = builder.add(token, _const(k, token))
                dst = _at(builder, acc.base,
                          builder.add(builder.mul(row, acc.row_stride), builder.mul(t0, _const(4, t0))), wide)
                before = builder.select(accumulate, builder.load(dst, align=4), ir.Constant(wide, [0] * rows))
                builder.store(builder.add(before, total), dst, align=4)
            return context.get_dummy_value()

        return types.void(isum, types.intp, types.intp, pairs, xs, types.intp, types.boolean), codegen

    return pair_madd


# Each for PAIR_ROWS tile rows, and its _half for a tile's last 16 when T % 32 == 16.
pair_madd8 = _pair_madd(PAIR_ROWS, 8, 8)                  # q4 codes: 8 pairs, all in int16
pair_madd8_half = _pair_madd(PAIR_ROWS // 2, 8, 8)
pair_madd8_by4 = _pair_madd(PAIR_ROWS, 8, 4)              # 5-bit codes: 8 pairs, 4 at a time
pair_madd8_by4_half = _pair_madd(PAIR_ROWS // 2, 8, 4)
pair_madd4_by2 = _pair_madd(PAIR_ROWS, 4, 2)              # 6-bit codes: 4 pairs, 2 at a time
pair_madd4_by2_half = _pair_madd(PAIR_ROWS // 2, 4, 2)
pair_madd8_2 = _pair_madd(PAIR_ROWS, 8, 8, tokens=2)      # two tokens at once
pair_madd8_half_2 = _pair_madd(PAIR_ROWS // 2, 8, 8, tokens=2)
pair_madd8_by4_2 = _pair_madd(PAIR_ROWS, 8, 4, tokens=2)
pair_madd8_by4_half_2 = _pair_madd(PAIR_ROWS // 2, 8, 4, tokens=2)
pair_madd4_by2_2 = _pair_madd(PAIR_ROWS, 4, 2, tokens=2)
pair_madd4_by2_half_2 = _pair_madd(PAIR_ROWS // 2, 4, 2, tokens=2)
pair_madd8_x16 = _pair_madd(PAIR_ROWS, 8, 8, shift=4)     # the high nibbles of byte codes
pair_madd8_x16_half = _pair_madd(PAIR_ROWS // 2, 8, 8, shift=4)
pair_madd8_x16_2 = _pair_madd(PAIR_ROWS, 8, 8, shift=4, tokens=2)
pair_madd8_x16_half_2 = _pair_madd(PAIR_ROWS // 2, 8, 8, shift=4, tokens=2)
