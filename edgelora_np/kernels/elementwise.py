"""Row-wise operations of the Llama block: RMSNorm, RoPE, SwiGLU. A NumPy reference and a
Numba kernel for each, written to round like ggml (sums of squares in float64, float32 else).
"""

from decimal import Context

import numpy as np
from numba import njit

from edgelora_np.kernels.bits import bits_to_f64, f32_to_f16_bits, f64_to_bits, fma

# --- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w   (ggml_rms_norm followed by ggml_mul) ---------

def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    sq = (x * x).astype(np.float64).sum(-1, keepdims=True)               # [B, 1] float64
    mean = (sq / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))             # [B, 1] float32
    return (x * scale) * w


@njit(cache=True)
def rmsnorm(x, w, eps, out):
    B, D = x.shape
    for b in range(B):
        sq = 0.0                                                          # float64, as ggml
        for i in range(D):
            v = x[b, i]
            sq += np.float64(v * v)
        mean = np.float32(sq / D)
        scale = np.float32(1.0) / np.float32(np.sqrt(mean + np.float32(eps)))
        for i in range(D):
            out[b, i] = (x[b, i] * scale) * w[i]


# --- RoPE, "normal" mode: rotate adjacent pairs (x[2i], x[2i+1]) by pos * theta_i -------------
# The GGUF converter permuted llama's q/k rows so that HF's rotate-half layout becomes adjacent
# pairs (llama.cpp's LLM_ARCH_LLAMA uses rope mode 0). theta_i = base^(-2i/rope_dim), computed as
# ggml_rope_cache_init does: start from pos and multiply by base^(-2/rope_dim) once per pair,
# in float32, so that our angles round like ggml's.

def rope_tables(n_pos: int, rope_dim: int, base: float, freq_scale: float,
                freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [n_pos, rope_dim/2] float32."""
    theta_scale = np.float32(base) ** np.float32(-2.0 / rope_dim)
    theta = np.arange(n_pos, dtype=np.float32)                           # [P]
    cols = []
    for i in range(rope_dim // 2):
        t = theta if freq_factors is None else theta / np.float32(freq_factors[i])
        cols.append(np.float32(freq_scale) * t)
        theta = theta * theta_scale
    angles = np.stack(cols, axis=1)                                      # [P, rope_dim/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_ref(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, heads, HD] -> rotated copy."""
    y = x.copy()
    n = cos.shape[1]
    c = cos[positions][:, None, :]                                       # [B, 1, n]
    s = sin[positions][:, None, :]
    x0, x1 = x[..., 0:2 * n:2], x[..., 1:2 * n:2]                          # [B, heads, n]
    y[..., 0:2 * n:2] = x0 * c - x1 * s
    y[..., 1:2 * n:2] = x0 * s + x1 * c
    return y


@njit(cache=True)
def rope_store(qkv, n_heads, n_kv_heads, positions, cos, sin, k_cache, v_cache, slot_page,
               slot_off, q):
    """A block's queries, keys and values, from its fused projection qkv [B, (H + 2 KVH) HD]:
    the queries rotated into q [B, H, HD]; the keys rotated and the values, as fp16 bits, into
    each token's cache slot, k_cache/v_cache[slot_page[b], :, slot_off[b]] (one layer's
    [pages, KVH, PS, HD]). What `rope` twice, two copies and two fp16 casts and scatters did, in
    one call (a dozen fewer dispatches per layer), with the same rounding."""
    B = qkv.shape[0]
    HD = q.shape[2]
    n = cos.shape[1]
    k0 = n_heads * HD
    v0 = k0 + n_kv_heads * HD
    for b in range(B):
        p = positions[b]
        for h in range(n_heads):
            src = h * HD
            for i in range(n):
                c, s = cos[p, i], sin[p, i]
                x0, x1 = qkv[b, src + 2 * i], qkv[b, src + 2 * i + 1]
                q[b, h, 2 * i] = x0 * c - x1 * s
                q[b, h, 2 * i + 1] = x0 * s + x1 * c
            for i in range(2 * n, HD):
                q[b, h, i] = qkv[b, src + i]
        for h in range(n_kv_heads):
            k = k_cache[slot_page[b], h, slot_off[b]]
            src = k0 + h * HD
            for i in range(n):
                c, s = cos[p, i], sin[p, i]
                x0, x1 = qkv[b, src + 2 * i], qkv[b, src + 2 * i + 1]
                k[2 * i] = f32_to_f16_bits(x0 * c - x1 * s)
                k[2 * i + 1] = f32_to_f16_bits(x0 * s + x1 * c)
            for i in range(2 * n, HD):
                k[i] = f32_to_f16_bits(qkv[b, src + i])
            v = v_cache[slot_page[b], h, slot_off[b]]
            src = v0 + h * HD
            for i in range(HD):
                v[i] = f32_to_f16_bits(qkv[b, src + i])


# --- SwiGLU: silu(gate) * up ------------------------------------------------------------------

def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gate / (np.float32(1.0) + np.exp(-gate)) * up


# e**x in float32 computed as glibc's expf computes it (the ARM optimized-routines algorithm):
# in float64, x / ln 2 = (k + r) / 32, 2**(k/32) from a table, a cubic in r, one rounding to
# float32 at the end. EXPF_TABLE[i] holds the bits of 2**(i/32) less i << 47, so that adding
# k << 47 also puts 2**(k // 32) into the exponent.
_EXPF_N = 32
_EXACT = Context(prec=40)       # 2**(i/32) to 40 digits, then rounded once to float64
EXPF_TABLE = np.array([np.float64(float(_EXACT.power(2, _EXACT.divide(i, _EXPF_N)))).view(np.uint64)
                       - np.uint64((i << 52) // _EXPF_N) for i in range(_EXPF_N)], np.uint64)
_EXPF_C0 = float.fromhex("0x1.c6af84b912394p-5") / _EXPF_N**3
_EXPF_C1 = float.fromhex("0x1.ebfce50fac4f3p-3") / _EXPF_N**2
_EXPF_C2 = float.fromhex("0x1.62e42ff0c52d6p-1") / _EXPF_N
_EXPF_INV_LN2_N = float.fromhex("0x1.71547652b82fep+0") * _EXPF_N
_EXPF_SHIFT = float.fromhex("0x1.8p+52")          # adding it rounds to an integer, kept in bits


@njit(inline="always", fastmath={"contract"})
def expf(x):
    """e**x for a float32 x with the bits of glibc's expf where that uses FMA (AArch64, and x86
    with FMA; checked equal on 30 million arguments), but branch-free, so a loop of it
    vectorizes where a call to libm does not. Beyond float32's range: inf, or 0."""
    xd = min(max(np.float64(x), -104.0), 89.0)
    kd = fma(_EXPF_INV_LN2_N, xd, _EXPF_SHIFT)
    ki = f64_to_bits(kd)
    kd -= _EXPF_SHIFT
    r = fma(_EXPF_INV_LN2_N, xd, -kd)
    s = bits_to_f64(EXPF_TABLE[ki % np.uint64(_EXPF_N)] + (ki << np.uint64(47)))
    z = _EXPF_C0 * r + _EXPF_C1
    y = _EXPF_C2 * r + 1.0
    y = z * (r * r) + y
    return np.float32(y * s)


@njit(cache=True, fastmath={"contract", "arcp"}, error_model="numpy")
def swiglu(gate_up, n_ffn, out):
    """gate_up [B, 2F] (gate | up) -> out [B, F], silu(g) * u = g / (1 + e**-g) * u.

    The exponential is `expf` (libm's bits), so the loop vectorizes with the results it had
    when it called libm: that call, and Numba's default check of every division for a zero
    divisor (error_model "python"), kept it scalar, and SwiGLU took 5% of a batched step."""
    B = gate_up.shape[0]
    for b in range(B):
        gate, up, row = gate_up[b, :n_ffn], gate_up[b, n_ffn:], out[b]
        for i in range(n_ffn):
            g = gate[i]
            row[i] = g / (np.float32(1.0) + expf(-g)) * up[i]
