"""Reinterpreting bits inside Numba kernels: fp16 and bf16 stored as uint16.

Numba has no float16 type on the CPU, so half-precision data (GGUF scales, the KV cache) is kept
as raw uint16 bits and widened to float32 inside kernels. `bits_to_f32` is an LLVM bitcast, which
Numba cannot spell itself; the widening then vectorizes like any other integer arithmetic.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic, overload

# 2**112 = 2**(127 - 15): moves an fp16 exponent (bias 15) to the float32 bias (127).
_F16_EXP_REBIAS = np.float32(2.0**112)


# Numba's and LLVM's names of each scalar type a bitcast takes or gives.
_TYPES = {np.uint32: (types.uint32, ir.IntType(32)), np.float32: (types.float32, ir.FloatType()),
          np.uint64: (types.uint64, ir.IntType(64)), np.float64: (types.float64, ir.DoubleType())}


def _bitcast(src, dst):
    """A function from a `src` scalar to the `dst` scalar with the same bits (C: memcpy), for
    kernels: an LLVM bitcast, which Numba cannot spell itself. With NUMBA_DISABLE_JIT=1 the
    kernels run as plain Python and get a NumPy view instead."""
    if numba_config.DISABLE_JIT:
        return lambda value: np.array(value, src).view(dst)[()]

    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _TYPES[dst][1])

        return _TYPES[dst][0](_TYPES[src][0]), codegen

    cast.__name__ = cast.__qualname__ = f"bitcast_{np.dtype(src).name}_{np.dtype(dst).name}"
    return intrinsic(cast)


bits_to_f32 = _bitcast(np.uint32, np.float32)
f32_to_bits = _bitcast(np.float32, np.uint32)
bits_to_f64 = _bitcast(np.uint64, np.float64)
f64_to_bits = _bitcast(np.float64, np.uint64)


@intrinsic
def _fma_f64(typingctx, a, b, c):
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return sig, codegen


def _fma_python(a, b, c):
    """a * b + c rounded once (exact rational arithmetic, then one rounding to float64)."""
    from fractions import Fraction
    return np.float64(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


# A fused multiply-add (one rounding: llvm.fma, an instruction on AArch64 and on x86 with FMA).
fma = _fma_python if numba_config.DISABLE_JIT else _fma_f64


@njit(inline="always")
def f16_to_f32_arith(h):
    """Widen fp16 bits to float32 in integer arithmetic, exact for every finite value,
    subnormals included (the fallback of f16_to_f32, and its reference in the tests).

    Shifting the 15 low bits left by 13 lines the fp16 exponent and mantissa up with float32's;
    multiplying by 2**112 fixes the exponent bias (and turns fp16 subnormals into float32
    normals). Inf/NaN are not handled: scales and cached activations are finite.
    """
    h32 = np.uint32(h)
    magnitude = bits_to_f32((h32 & np.uint32(0x7FFF)) << np.uint32(13)) * _F16_EXP_REBIAS
    return -magnitude if h32 & np.uint32(0x8000) else magnitude


@intrinsic
def f16_to_f32_native(typingctx, h):
    """Widen fp16 bits (the low 16 bits of an integer) to float32 as LLVM's half type: one
    instruction per vector where the CPU converts halves itself (AArch64 fcvtl, x86 F16C
    vcvtph2ps), about five in the integer version. Exact for every value."""
    if not isinstance(h, types.Integer):
        return None
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        v, width = args[0], args[0].type.width
        if width > 16:
            v = builder.trunc(v, ir.IntType(16))
        elif width < 16:
            v = builder.zext(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return sig, codegen


def _converts_halves() -> bool:
    """Whether this CPU widens fp16 in hardware: every AArch64 core; x86 with F16C. Elsewhere
    LLVM would call a runtime helper the JIT may not link."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    import llvmlite.binding as llvm
    return "f16c" in llvm.get_host_cpu_features().flatten()


# fp16 bits -> float32 inside kernels: the CPU's conversion where it has one.
f16_to_f32 = (f16_to_f32_arith if numba_config.DISABLE_JIT or not _converts_halves()
              else f16_to_f32_native)


@njit(inline="always")
def round_to_f16(x):
    """Round a float32 to the nearest fp16 value (ties to even), returned as float32.

    fp16 keeps 10 of float32's 23 mantissa bits: adding 0x0FFF plus the lowest kept bit and
    clearing the 13 dropped bits rounds to nearest even, carries included. Below fp16's normal
    range (2**-14) its step is fixed at 2**-24 instead. Branch-free, so loops over it vectorize.
    Magnitudes past fp16's largest value (65504) are not turned into infinity.
    """
    x = np.float32(x)
    tiny = np.float32(np.rint(x * np.float32(2.0**24))) * np.float32(2.0**-24)
    u = f32_to_bits(x)
    rounded = bits_to_f32(np.uint32((u + np.uint32(0x0FFF) + ((u >> np.uint32(13)) & np.uint32(1)))
                                    & np.uint32(0xFFFFE000)))
    return tiny if abs(x) < np.float32(2.0**-14) else rounded


@njit(inline="always")
def f32_to_f16_bits(x):
    """float32 -> fp16 bits (uint16), rounded to nearest even, as NumPy's astype(float16):
    beyond 65520 (halfway past fp16's largest, 65504) infinity, below 2**-14 a subnormal (the
    value in units of 2**-24, rounded). A NaN becomes a quiet NaN keeping the top bits of its
    payload, as IEEE 754 and the hardware conversions (aarch64 FCVT, x86 F16C) do. NumPy agrees
    except on signaling NaNs: its software conversion, used on x86, leaves them signaling."""
    u = f32_to_bits(np.float32(x))
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):                               # NaN: a quiet NaN
        h = np.uint32(0x7E00) | ((a & np.uint32(0x7FFFFF)) >> np.uint32(13))
    elif a >= np.uint32(0x477FF000):                            # rounds past 65504: infinity
        h = np.uint32(0x7C00)
    elif a >= np.uint32(0x38800000):                            # an fp16 normal
        # Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
        h = (a - np.uint32(0x38000000) + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) \
            >> np.uint32(13)
    else:                                                       # subnormal (1024: the least normal)
        h = np.uint32(np.rint(abs(np.float32(x)) * np.float32(2.0**24)))
    return np.uint16(h | sign)


@njit(inline="always")
def bf16_to_f32(h):
    """bf16 is the top half of a float32."""
    return bits_to_f32(np.uint32(h) << np.uint32(16))


def scale_f32(x):
    """A block scale stored either as float32 or as fp16 bits (uint16), as float32."""
    return np.float32(f16_bits_to_f32_numpy(x)) if isinstance(x, np.uint16) else np.float32(x)


def f16_bits_to_f32_numpy(h):
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(np.float32)


def _scale_from_f16(x):
    return f16_to_f32(x)


def _scale_from_float(x):
    return np.float32(x)


@overload(scale_f32)
def _scale_f32_overload(x):
    if x == types.uint16:
        return _scale_from_f16
    if isinstance(x, types.Float):
        return _scale_from_float
    return None
