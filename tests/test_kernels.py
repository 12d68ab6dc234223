"""Every Numba kernel against its NumPy reference, on random inputs swept over the sizes that
break kernels: rows that are not a multiple of the tile alignment, batches on both sides of
TOKEN_CHUNK, one and two threads (which changes the tiling), pages crossed mid-sequence.

Shapes are kept small so the whole file also runs with NUMBA_DISABLE_JIT=1 (kernels as plain
Python) in well under a minute. With the JIT, the first run compiles every kernel signature
(about 15 s, see the report in the PR); `cache=True` makes later runs load them from disk.
"""

import ctypes
import ctypes.util
from unittest import mock

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import config as numba_config
from numba import njit
from tiny_model import K_TYPES, RANDOM_TYPES, random_k_blocks

from edgelora_np.errors import ContextOverflowError, UnsupportedQuantError
from edgelora_np.kernels import actquant, attention, bits, elementwise, lookup, pack, qmatmul_decoded
from edgelora_np.kernels.qmatmul import TOKEN_CHUNK
from edgelora_np.kernels.scratch import empty_lines, tile_run
from edgelora_np.model.config import LlamaConfig
from edgelora_np.model.kv_cache import PAGE_SIZE, PagedKVCache

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS]
quick = settings(max_examples=25, deadline=None)


def block_size(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def raw_tensor(qtype: QT, rows: int, cols: int, rng: np.random.Generator,
               std: float | None = 0.05) -> np.ndarray:
    """A weight [rows, cols] as GGUF stores it. gguf-py quantizes the legacy and float types;
    K-quant blocks are random (std None: fp16 scales of any finite magnitude)."""
    if qtype in RANDOM_TYPES:
        n = cols // block_size(qtype)
        return random_k_blocks(qtype, rows * n, rng, std).reshape(rows, -1)
    x = (rng.standard_normal((rows, cols)) * (std or 1.0)).astype(np.float32)
    if qtype == QT.F32:
        return x
    return gguf.quants.quantize(x, qtype)       # float16 array for F16, uint8 bytes otherwise


def packed(qtype: QT, rows: int, cols: int, seed: int, n_threads: int = 2) -> pack.PackedMatrix:
    rng = np.random.default_rng([int(qtype), rows, cols, seed])
    return pack.pack_gguf(raw_tensor(qtype, rows, cols, rng), qtype, rows, cols, n_threads)


def cols_for(qtype: QT) -> int:
    return 256 if qtype in K_TYPES else 96            # whole blocks; 96 = three 32-blocks


# --- pack_gguf: repacking loses nothing ---------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 17, 100, 576])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_pack_round_trips_bit_exact(qtype, rows, n_threads):
    cols = 2 * cols_for(qtype)
    rng = np.random.default_rng([int(qtype), rows, n_threads])
    raw = raw_tensor(qtype, rows, cols, rng, std=None if qtype in RANDOM_TYPES else 1.0)
    w = pack.pack_gguf(raw, qtype, rows, cols, n_threads)
    assert (w.n_rows, w.n_cols) == (rows, cols)
    assert w.qs.shape[-1] % pack.TILE_ALIGN == 0
    ours = pack.dequantize_packed(w)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(rows, cols)
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    # Bit-exact, except the sign of zero: Q4_0 decodes as d*q + (-8d), which gives +0.0 where
    # ggml's d*(q - 8) gives -0.0 for a negative d; the two are equal in every product.
    assert np.array_equal(ours, ref)
    nonzero = ref != 0
    assert np.array_equal(ours.view(np.uint32)[nonzero], ref.view(np.uint32)[nonzero])


def test_pack_reads_flat_bytes_as_the_reader_maps_them():
    rng = np.random.default_rng(1)
    raw = raw_tensor(QT.Q4_K, 5, 512, rng)
    from_rows = pack.pack_gguf(raw, QT.Q4_K, 5, 512, 1)
    from_flat = pack.pack_gguf(raw.reshape(-1), QT.Q4_K, 5, 512, 1)
    assert np.array_equal(pack.dequantize_packed(from_rows), pack.dequantize_packed(from_flat))


def test_pack_rejects_unsupported_type_by_name():
    raw = np.zeros((2, 66), np.uint8)                                    # one IQ2_XXS block per row
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS"):
        pack.pack_gguf(raw, QT.IQ2_XXS, 2, 256, 1, name="blk.0.ffn_up.weight")


@pytest.mark.parametrize("n_rows, n_threads", [(1, 1), (17, 2), (576, 1), (576, 2), (49152, 2)])
def test_choose_tile(n_rows, n_threads):
    tile = pack.choose_tile(n_rows, n_threads)
    n_tiles = -(-n_rows // tile)
    assert tile % pack.TILE_ALIGN == 0
    assert tile <= pack.MAX_TILE
    assert (n_tiles - 1) * tile < n_rows <= n_tiles * tile                # no empty tile


# --- matmul against matmul_ref ------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, TOKEN_CHUNK, TOKEN_CHUNK + 1, 40])
def test_matmul_matches_reference(qtype, batch):
    w = packed(qtype, 20, 256, seed=batch)
    x = np.random.default_rng(batch).standard_normal((batch, 256)).astype(np.float32)
    ours = pack.matmul(w, x)
    ref = pack.matmul_ref(w, x)
    assert ours.shape == (batch, 20) and ours.dtype == np.float32
    # Same integer block sums and the same activation quantization; only the float32
    # accumulation over 256 / 32 blocks (or 256 products) differs from the float64 one.
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL, QT.Q2_K, QT.Q3_K,
                                   QT.Q6_K, QT.IQ4_XS, QT.F16], ids=lambda t: t.name)
def test_matmul_same_result_for_any_tiling(qtype):
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    one = pack.matmul(packed(qtype, 100, 256, seed=0, n_threads=1), x)
    two = pack.matmul(packed(qtype, 100, 256, seed=0, n_threads=2), x)
    assert np.array_equal(one, two)


def test_matmul_writes_into_out():
    w = packed(QT.Q8_0, 20, 96, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32)
    out = np.full((2, 20), np.nan, np.float32)
    assert pack.matmul(w, x, out) is out
    assert np.array_equal(out, pack.matmul(w, x))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_is_batch_invariant(qtype):
    """A token's output does not depend on the batch around it: bit-exact."""
    w = packed(qtype, 20, 256, seed=7)
    x = np.random.default_rng(7).standard_normal((40, 256)).astype(np.float32)
    full = pack.matmul(w, x)
    for b in (0, 15, 16, 17, 39):                          # both sides of TOKEN_CHUNK
        assert np.array_equal(pack.matmul(w, x[b:b + 1]), full[b:b + 1]), b
    assert np.array_equal(pack.matmul(w, x[17:40]), full[17:40])


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, TOKEN_CHUNK + 1])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_q4_integer_sums_at_the_extremes(qtype, batch, sign):
    """Every code 15 against activations quantized to +-127: the largest integer block sums
    (32 * 15 * 127 = 60960, beyond int16), which the kernel sums partly in int16."""
    n_rows, cols = 20, 256
    block = np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8)
    block[:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)      # d = 1 (Q4_1: m = 0)
    block[-16:] = 0xFF                                                    # codes 15, 15
    raw = np.tile(block, (n_rows, cols // 32))
    w = pack.pack_gguf(raw, qtype, n_rows, cols, 2)
    x = np.full((batch, cols), sign, np.float32)
    ours = pack.matmul(w, x)
    expected = sign * cols * (15 if qtype == QT.Q4_1 else 7)            # Q4_0: w = q - 8
    assert np.allclose(ours, pack.matmul_ref(w, x), rtol=1e-6, atol=0)
    assert np.allclose(ours, expected, rtol=1e-3, atol=0)     # activation scales are fp16


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q2_K, QT.Q3_K,
                                   QT.IQ4_NL, QT.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("rows, tile", [(10, 16), (40, 48), (64, 64), (100, 112)])
def test_batched_pair_sums_over_tile_widths(qtype, rows, tile):
    """The batched block sums of the 2- to 6-bit codes and the IQ4 levels (on x86,
    kernels/bytedot.py's byte pairs, taken 32 tile rows at a time and 16 for a tile's last
    rows) against the reference, on one thread's tiles of 16, 48, 64 and 112 rows: the 16-row
    tail alone, after whole 32s, and none."""
    w = packed(qtype, rows, 256, seed=rows, n_threads=1)
    assert w.qs.shape[-1] == tile
    x = np.random.default_rng(rows).standard_normal((TOKEN_CHUNK + 3, 256)).astype(np.float32)
    ours = pack.matmul(w, x)
    ref = pack.matmul_ref(w, x)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def _kernel_assembly(kernel: str) -> str:
    """The assembly of a fresh (uncached, so readable) compile of a q4 or q8 matmul kernel."""
    from edgelora_np.kernels import qmatmul

    fresh = njit(parallel=True)(getattr(qmatmul, kernel).py_func)
    rows, cols, batch = 32, 64, 3
    rng = np.random.default_rng(0)
    qtype = QT.Q4_1 if kernel == "matmul_q4" else QT.Q8_0
    raw = rng.integers(0, 256, (rows, cols // 32 * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    w = pack.pack_gguf(raw, qtype, rows, cols, 1)
    xq, xd, xs = actquant.quantize_activations(rng.standard_normal((batch, cols), np.float32),
                                               w.act)
    m = w.m if w.m is not None else np.zeros((1, 0, 1), np.uint16)
    fresh(w.qs, w.d, m, xq, xd, xs, np.zeros((batch, rows), np.float32))
    return "".join(fresh.inspect_asm().values())


def _decoded_kernel_assembly(qtype, tokens: int = 3) -> str:
    """The assembly of a fresh compile of the kernels/qmatmul_decoded.py kernel for qtype, run
    by pack.matmul on a batch of `tokens`."""
    kernel = "matmul_b32_decoded" if qtype in (QT.Q5_0, QT.Q5_1, QT.IQ4_NL) else "matmul_k_decoded"
    fresh = njit(parallel=True)(getattr(qmatmul_decoded, kernel).py_func)
    w = packed(qtype, 32, 256, seed=0, n_threads=1)
    x = np.random.default_rng(0).standard_normal((tokens, 256)).astype(np.float32)
    with mock.patch.object(pack, kernel, fresh):
        pack.matmul(w, x)
    return "".join(fresh.inspect_asm().values())


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="reads the compiled kernels' assembly")
@pytest.mark.parametrize("kernel", ["matmul_q4", "matmul_q8"])
def test_integer_products_are_taken_in_16_bit_lanes(kernel):
    """The q4 and q8 kernels' integer products compile to 16-bit vector multiplies on both
    targets: AVX2 `vpmullw`; AArch64 NEON into .8h lanes (q4: `mul`/`mla`; q8: the widening
    `smull`/`smlal` from int8). A 32-bit multiply has half the lanes; one crept in unnoticed
    once (a q8 pair sum added straight into int32)."""
    import platform
    import re

    import llvmlite.binding as llvm

    machine = platform.machine()
    if machine == "x86_64" and not llvm.get_host_cpu_features().flatten().count("+avx2"):
        pytest.skip("x86 without AVX2: no 16-bit lanes to check for")
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"no expectation written down for {machine}")
    asm = _kernel_assembly(kernel)
    if machine == "aarch64":
        found = sorted(set(re.findall(r"\b([su]?ml[as]l?2?|[su]?mull2?|mul)\s+v\d+\.(\w+)", asm)))
        assert any(lanes == "8h" for _, lanes in found), f"vector multiplies: {found}"
    else:
        found = sorted(set(re.findall(r"\b(vpmul\w+|vpmadd\w+)\b", asm)))
        assert "vpmullw" in found, f"vector multiplies: {found}"


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="reads the compiled kernels' assembly")
def test_batched_q4_multiplies_byte_pairs_on_x86():
    """kernels/bytedot.py: on x86-64 the batched q4 sums compile to `vpmaddubsw` (or SSSE3's
    `pmaddubsw`); its IR shape is easy to lose (a broadcast where a load was, a value carried
    across a loop), and then the sums are still right, only slow. AArch64 does not take the
    byte-pair form at all (it would cost ~50 instructions per 64 products there)."""
    import platform

    from edgelora_np.kernels import bytedot

    machine = platform.machine()
    if machine == "aarch64":
        assert not bytedot.PAIR_MADD
        return
    if machine != "x86_64":
        pytest.skip(f"no expectation written down for {machine}")
    assert bytedot.PAIR_MADD
    assert "pmaddubsw" in _kernel_assembly("matmul_q4")


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="reads the compiled kernels' assembly")
@pytest.mark.parametrize("qtype", [QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS], ids=lambda t: t.name)
def test_batched_decoded_types_multiply_byte_pairs_on_x86(qtype):
    """The batched Q2_K/Q3_K sums (one kernel) and the IQ4 ones (two) take the byte-pair form
    on x86-64 too, so that losing its shape shows up here and not only as a slower benchmark."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the byte-pair form is x86-64 only (test above)")
    assert "pmaddubsw" in _decoded_kernel_assembly(qtype)


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="reads the compiled kernels' assembly")
@pytest.mark.parametrize("kernel", ["matmul_q4", "matmul_q8"])
def test_next_block_is_prefetched(kernel):
    """kernels/prefetch.py's `llvm.prefetch` reaches the machine code on both targets
    (x86-64 `prefetcht0`, AArch64 `prfm`): nothing else tells when it silently does not, the
    results being the same either way."""
    import platform

    machine = platform.machine()
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"no expectation written down for {machine}")
    instruction = "prfm" if machine == "aarch64" else "prefetcht0"
    assert instruction in _kernel_assembly(kernel)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32])
def test_scratch_starts_on_a_cache_line(dtype):
    """kernels/scratch.py's empty_lines, compiled and as plain Python: every array starts on a
    64-byte boundary, has the asked shape and dtype, is C-contiguous and writable to its end,
    over sizes that leave the allocator's own alignment anywhere within a line."""
    @njit
    def addresses(n_max):
        found = np.empty((n_max, 2), np.int64)
        for n in range(1, n_max + 1):
            a = empty_lines((n, 3), dtype)
            a[...] = 1
            b = empty_lines((n,), dtype)
            b[...] = 2
            found[n - 1, 0] = a.ctypes.data
            found[n - 1, 1] = b.ctypes.data
        return found

    for fn in (addresses, getattr(addresses, "py_func", addresses)):     # (no py_func without the JIT)
        assert (fn(100) % 64 == 0).all()
    a = empty_lines((5, 7), dtype)
    assert a.shape == (5, 7) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 7])
def test_tile_runs_cover_every_tile_once(n_parts):
    """scratch.tile_run: the parts' runs are contiguous, in order, cover 0..n-1 exactly once,
    and differ in length by at most one tile."""
    for n_tiles in range(n_parts, 40):
        runs = [tile_run(p, n_parts, n_tiles) for p in range(n_parts)]
        assert runs[0][0] == 0 and runs[-1][1] == n_tiles
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        sizes = [end - first for first, end in runs]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


# Run in a child process: glibc's mmap threshold is fixed there at its starting value (128 KB;
# left alone, it rises after some frees, and whether a given allocation is mapped afresh would
# depend on what the test session freed before).
_FAULTS_PER_CALL = """
import ctypes, resource, sys
import numpy as np
from gguf import GGMLQuantizationType as QT
from tiny_model import random_weight
from edgelora_np.kernels import pack

M_MMAP_THRESHOLD = -3
assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1
qtype, n, k = QT[sys.argv[1]], 49152, 256
rng = np.random.default_rng(0)
w = pack.pack_gguf(random_weight(qtype, (n, k), rng, 0.05), qtype, n, k, 2)
assert w.qs.shape[0] >= 64, w.qs.shape                           # many tiles
x = rng.standard_normal((1, k)).astype(np.float32)
out = np.empty((1, n), np.float32)
for _ in range(3):
    pack.matmul(w, x, out)                                       # compiled, warmed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    pack.matmul(w, x, out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="counts the compiled kernels' page faults")
@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's mallopt")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K", "Q5_0", "IQ4_XS"])
def test_matmul_scratch_does_not_grow_with_the_tiles(qtype):
    """A one-token matmul against a matrix of many tiles (the output projection's shape, cut for
    two threads into 96 tiles of 512 rows) touches no new pages call after call: each thread
    allocates its scratch once, a few KB that malloc serves from memory it holds. Scratch per
    tile was 3-7 MB per call here, which glibc mapped afresh and faulted in on every call: 96
    faults per call for Q8_0, 387 for Q4_K and IQ4_XS with that code (more than half of the
    model's one-token output projection went there, docs/benchmarks.md)."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, qtype], capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 16, f"{result.stdout.strip()} page faults per call"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_q8_integer_sums_at_the_extremes(batch, sign):
    """Every Q8_0 code at -128 (a file may hold it, though llama.cpp writes -127..127) against
    activations quantized to +-127: each pair of rows the kernel sums in int16 reaches
    2 * 128 * 127 = 32512, three would overflow it."""
    n_rows, cols = 20, 256
    block = np.full(gguf.GGML_QUANT_SIZES[QT.Q8_0][1], 0x80, np.uint8)
    block[:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)      # d = 1
    raw = np.tile(block, (n_rows, cols // 32))
    w = pack.pack_gguf(raw, QT.Q8_0, n_rows, cols, 2)
    x = np.full((batch, cols), sign, np.float32)
    ours = pack.matmul(w, x)
    assert np.allclose(ours, pack.matmul_ref(w, x), rtol=1e-6, atol=0)
    assert np.allclose(ours, sign * cols * -128, rtol=1e-3, atol=0)   # activation scales: fp16


# Each type's fill byte that makes every code its largest magnitude, and its fp16 fields
# (d first, set to 1; a second one, m or dmin, set to 0).
EXTREME_BLOCKS = {QT.Q5_0: (0x00, [0]), QT.Q5_1: (0xFF, [0, 2]), QT.IQ4_NL: (0x00, [0]),
                  QT.Q2_K: (0xFF, [80, 82]), QT.Q3_K: (0x00, [108]), QT.IQ4_XS: (0x00, [0]),
                  QT.Q4_K: (0xFF, [0, 2]), QT.Q5_K: (0xFF, [0, 2]), QT.Q6_K: (0xFF, [208])}


@pytest.mark.parametrize("qtype", list(EXTREME_BLOCKS), ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_decoded_kernels_integer_sums_at_the_extremes(qtype, batch, sign):
    """Every weight at its largest magnitude (Q5_0 -16, Q5_1 31, Q2_K 3 * 15, Q3_K -4 * -32,
    IQ4 -127, Q4_K 63 * 15, Q5_K 63 * 31, Q6_K codes 63 at scale -1) against activations
    quantized to +-127 (q8_K: -128): the int16 partial sums at their bound."""
    fill, fp16_fields = EXTREME_BLOCKS[qtype]
    block = np.full(gguf.GGML_QUANT_SIZES[qtype][1], fill, np.uint8)
    for i, offset in enumerate(fp16_fields):
        block[offset:offset + 2] = np.frombuffer(np.float16(1.0 if i == 0 else 0.0).tobytes(),
                                                 np.uint8)
    n_rows, cols = 20, 512
    raw = np.tile(block, (n_rows, cols // block_size(qtype)))
    w = pack.pack_gguf(raw, qtype, n_rows, cols, 2)
    x = np.full((batch, cols), sign, np.float32)
    ours = pack.matmul(w, x)
    expected = sign * pack.dequantize_packed(w).astype(np.float64).sum(axis=1)   # [N]
    assert np.allclose(ours, pack.matmul_ref(w, x), rtol=1e-6, atol=0)
    assert np.allclose(ours, expected[None], rtol=1e-3, atol=0)  # activation scales are fp16


@njit
def _iq4_levels_of_bytes(codes, lo, hi):
    lookup.levels(codes, lo, 0)
    lookup.levels(codes, hi, 4)


def test_iq4_levels_looked_up_equal_ggml_table():
    """The IQ4 kernels look each code's level up 16 codes at a time in registers
    (kernels/lookup.py): every code byte gives gguf-py's kvalues for both nibbles."""
    kvalues = np.array(gguf.quants.IQ4_NL.kvalues, np.int16)
    codes = np.concatenate([np.arange(256), np.arange(256)[::-1]]).astype(np.uint8)
    lo, hi = np.empty(512, np.int8), np.empty(512, np.int8)
    _iq4_levels_of_bytes(codes, lo, hi)
    assert np.array_equal(lo, kvalues[codes & 15]) and np.array_equal(hi, kvalues[codes >> 4])


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="reads the compiled kernels' assembly")
def test_iq4_levels_compile_to_a_byte_shuffle():
    """The lookup's IR must reach the target's byte shuffle (x86 `pshufb`/`vpermb`, AArch64
    `tbl`): anything else means LLVM no longer saw the variable-permute shape and built the
    levels one byte at a time. On x86 also inside both IQ4 kernels at one token (in the
    emulated-Pi job, Numba gave back only these two kernels' entry stub as their assembly)."""
    import platform
    import re

    machine = platform.machine()
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"no expectation written down for {machine}")
    shuffle = r"\btbl\b" if machine == "aarch64" else r"\bv?(pshufb|permb)\b"
    codes = np.arange(64, dtype=np.uint8)
    _iq4_levels_of_bytes(codes, np.empty(64, np.int8), np.empty(64, np.int8))
    assert re.search(shuffle, "".join(_iq4_levels_of_bytes.inspect_asm().values()))
    if machine == "x86_64":
        for qtype in (QT.IQ4_NL, QT.IQ4_XS):
            assert re.search(shuffle, _decoded_kernel_assembly(qtype, tokens=1)), qtype.name


# --- packed_rows, pack_stacked -----------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_packed_rows_are_rows_of_the_dense_matrix(qtype):
    w = packed(qtype, 100, cols_for(qtype), seed=0)
    rows = np.array([0, 99, 15, 16, 17, 50, 50, 3])                      # tile edges, repeats
    got = pack.packed_rows(w, rows)
    assert got.dtype == np.float32 and got.shape == (len(rows), w.n_cols)
    assert np.array_equal(got, pack.dequantize_packed(w)[rows])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_pack_stacked_equals_stacking(qtype, n_threads):
    """q|k|v packed as one matrix: its rows are the parts' rows, tiles straddling parts."""
    cols = cols_for(qtype)
    rng = np.random.default_rng(int(qtype))
    sizes = [64, 17, 17]
    raws = [raw_tensor(qtype, n, cols, rng) for n in sizes]
    joined = pack.pack_stacked(list(zip(raws, sizes)), qtype, cols, n_threads)
    parts = [pack.pack_gguf(r, qtype, n, cols, n_threads) for r, n in zip(raws, sizes)]
    assert joined.n_rows == 98 and joined.kind == parts[0].kind
    dense = np.concatenate([pack.dequantize_packed(p) for p in parts])
    assert np.array_equal(pack.dequantize_packed(joined), dense)
    x = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    assert np.array_equal(pack.matmul(joined, x),
                          np.concatenate([pack.matmul(p, x) for p in parts], axis=1))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_packed_bytes_stay_close_to_the_file(qtype):
    """Repacking keeps the file's bits per weight: only tile padding (none here: 512 rows) and
    packed 6-bit scales widened to a byte each are added: Q3_K's and Q4_K/Q5_K's 12 bytes to
    16, IQ4_XS's 6 to 8."""
    rows, cols = 512, 1024
    raw = raw_tensor(qtype, rows, cols, np.random.default_rng(0))
    w = pack.pack_gguf(raw, qtype, rows, cols, n_threads=2)
    extra = {QT.Q3_K: 4, QT.Q4_K: 4, QT.Q5_K: 4, QT.IQ4_XS: 2}.get(qtype, 0) * rows * cols // 256
    assert w.nbytes == raw.nbytes + extra


# --- activation quantization --------------------------------------------------------------------

ACT_FORMATS = ["q8_0", "q8_1", "q8_K"]


def quantize(x, fmt):
    if fmt == "q8_K":
        return actquant.quantize_activations_q8_k(x)
    return actquant.quantize_activations(x, fmt)


def quantize_ref(x, fmt):
    if fmt == "q8_K":
        return actquant.quantize_activations_q8_k_ref(x)
    return actquant.quantize_activations_ref(x, fmt)


def assert_same_activations(x, fmt):
    xq, xd, xs = quantize(x, fmt)
    rq, rd, rs = quantize_ref(x, fmt)
    assert xq.dtype == np.int8 and xd.dtype == np.float32
    assert xs.dtype == (np.int32 if fmt == "q8_K" else np.float32)
    assert np.array_equal(xq, rq)
    assert np.array_equal(xd.view(np.uint32), rd.view(np.uint32))
    assert np.array_equal(xs, rs)           # values: the sign of a zero sum may differ


@pytest.mark.parametrize("fmt", ACT_FORMATS)
@quick
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 2 * actquant.SERIAL_ROWS + 1),
       n_super=st.integers(1, 2), log_scale=st.floats(-20, 10))
def test_quantize_activations_matches_reference(fmt, seed, batch, n_super, log_scale):
    """Batches on both sides of SERIAL_ROWS: the serial and the parallel kernels."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, 256 * n_super)) * 2.0**log_scale).astype(np.float32)
    x[rng.random(batch) < 0.3] = 0                               # whole rows of zeros
    x[:, :32] *= rng.random() < 0.5                              # a zero block in a live row
    assert_same_activations(x, fmt)


@pytest.mark.parametrize("fmt", ACT_FORMATS)
def test_quantize_activations_ties_round_to_even_in_both(fmt):
    """Values whose scaled form is exactly k + 1/2: both sides round half to even (np.rint,
    like ggml's SIMD paths), so no +-1 differences are allowed at all."""
    x = np.zeros((1, 256), np.float32)
    x[0, ::8] = 127.0                       # block max: scale exactly 1 for q8_0 / q8_1
    x[0, 1::8] = np.arange(32) % 8 + 0.5    # .5 ties: 0.5 1.5 ... 7.5 (q8_K: iscale = -1)
    x[0, 2::8] = -(np.arange(32) % 8 + 0.5)
    xq, _, _ = quantize(x, fmt)
    sign = -1 if fmt == "q8_K" else 1
    assert np.array_equal(xq[0, 1::8], sign * np.rint(x[0, 1::8]).astype(np.int8))
    assert_same_activations(x, fmt)


def test_quantize_activations_extremes():
    x = np.zeros((3, 256), np.float32)
    x[1] = 1e-30                             # tiny but not zero
    x[2, 5] = -3e4                            # one huge value: everything else rounds to 0
    for fmt in ACT_FORMATS:
        assert_same_activations(x, fmt)
        xq, xd, _ = quantize(x, fmt)
        assert not xq[0].any() and not xd[0].any()
        assert abs(int(xq[2, 5])) == 127


def test_q8_k_block_sums_are_sums_of_16():
    x = np.random.default_rng(5).standard_normal((2, 512)).astype(np.float32)
    xq, xd, bsums = actquant.quantize_activations_q8_k(x)
    assert xd.shape == (2, 2) and bsums.shape == (2, 32)
    assert np.array_equal(bsums, xq.reshape(2, 32, 16).astype(np.int32).sum(-1))


# --- attention ----------------------------------------------------------------------------------

def random_paged_attention(rng, lengths, n_kv_heads, group, head_dim, queries_per_seq):
    """Random fp16 caches holding sequences of `lengths` in shuffled pages, and queries for
    the last `queries_per_seq` positions of each (a prefill chunk or a decode token).
    Slots past a sequence's length hold large garbage, which must never be read."""
    n_pages = sum(-(-n // PAGE_SIZE) for n in lengths) + 2
    shape = (n_pages, n_kv_heads, PAGE_SIZE, head_dim)
    k = rng.standard_normal(shape).astype(np.float16)
    v = rng.standard_normal(shape).astype(np.float16)
    order = rng.permutation(n_pages)
    width = max(-(-n // PAGE_SIZE) for n in lengths)
    table = np.full((len(lengths), width), -1, np.int32)
    used = 0
    for s, n in enumerate(lengths):
        pages = order[used:used + -(-n // PAGE_SIZE)]
        used += len(pages)
        table[s, :len(pages)] = pages
        last, off = pages[-1], n % PAGE_SIZE
        if off:
            k[last, :, off:] = 1000.0
            v[last, :, off:] = 1000.0
    for spare in order[used:]:
        k[spare], v[spare] = 1000.0, 1000.0
    rows, positions = [], []
    for s, n in enumerate(lengths):
        for p in range(max(0, n - queries_per_seq), n):
            rows.append(s)
            positions.append(p)
    rows, positions = np.array(rows, np.int32), np.array(positions, np.int32)
    perm = rng.permutation(len(rows))                    # tokens of sequences interleaved
    q = rng.standard_normal((len(rows), n_kv_heads * group, head_dim)).astype(np.float32)
    return q, k.view(np.uint16), v.view(np.uint16), table, rows[perm], positions[perm]


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("queries_per_seq", [1, 5])
def test_attention_matches_reference(group, queries_per_seq):
    rng = np.random.default_rng([group, queries_per_seq])
    lengths = [1, 31, 33, 70]                        # one position, both sides of a page edge
    kvh, hd = 2, 16
    q, kc, vc, table, rows, positions = random_paged_attention(rng, lengths, kvh, group, hd,
                                                                queries_per_seq)
    scale = np.float32(1 / np.sqrt(hd))
    out = np.full_like(q, np.nan)
    attention.attention(q, kc, vc, table, rows, positions, scale, out)
    ref = attention.attention_ref(q, kc, vc, table, rows, positions, scale)
    # Both round the probabilities p to fp16 before weighting v, but p comes from float32 exp
    # and sums done in a different order, so a p lying at an fp16 rounding boundary may round
    # to the neighbouring fp16 value on one side: one fp16 ulp <= 2^-10 * p (or 2^-24 below the
    # normal range). Summed over positions (sum of p = 1) that is at most 2^-10 * max|v|.
    v_max = np.abs(vc[vc != np.float16(1000.0).view(np.uint16)].view(np.float16)).max()
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0**-10 * float(v_max) + 1e-5


@njit(fastmath={"contract", "reassoc", "nsz", "arcp"})    # the attention kernel's flags
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = attention.exp_f32(x[i])
    return out


def test_softmax_exp_is_within_one_ulp():
    """Against float64 exp: every float32 from -87 to 0 at 2^-10 steps and near 0, then the
    clamp (e^-87 below -87, where it only ever meets a sum of at least 1)."""
    x = np.concatenate([np.arange(-87 * 1024, 1, dtype=np.float32) / np.float32(1024),
                        -np.logspace(-30, 0, 1000, dtype=np.float32), np.float32([-0.0])])
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(_exp_all(x) - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 1.0
    low = _exp_all(np.float32([-87.5, -100, -1e30, -np.inf]))
    assert np.array_equal(low, np.full(4, _exp_all(np.float32([-87.0]))[0]))


def test_attention_single_position_returns_v():
    rng = np.random.default_rng(0)
    q, kc, vc, table, rows, positions = random_paged_attention(rng, [1], 2, 2, 16, 1)
    out = np.empty_like(q)
    attention.attention(q, kc, vc, table, rows, positions, np.float32(0.25), out)
    v0 = vc[table[0, 0], :, 0].view(np.float16).astype(np.float32)       # [KVH, HD]
    assert np.array_equal(out[0], np.repeat(v0, 2, axis=0))


# --- elementwise --------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, dim", [(1, 64), (7, 576), (3, 2048)])
def test_rmsnorm_matches_reference(batch, dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((batch, dim)) * rng.uniform(0.01, 100, (batch, 1))).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    out = np.empty_like(x)
    elementwise.rmsnorm(x, w, 1e-5, out)
    # The float64 sums of squares are added in different orders; after rounding the mean to
    # float32 they differ by at most one float32 ulp, hence the 1e-6 relative tolerance.
    np.testing.assert_allclose(out, elementwise.rmsnorm_ref(x, w, 1e-5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope_dim, head_dim", [(16, 16), (64, 64), (32, 64)])
def test_rope_store_matches_reference(rope_dim, head_dim):
    """Queries rotated into q; keys rotated and values stored as NumPy's fp16 of them, each at
    its token's cache slot; no other slot written."""
    rng = np.random.default_rng(rope_dim)
    H, KVH, B = 4, 2, 6
    cos, sin = elementwise.rope_tables(300, rope_dim, 10000.0, 1.0, None)
    positions = np.array([0, 1, 31, 32, 299, 5], np.int32)
    qkv = rng.standard_normal((B, (H + 2 * KVH) * head_dim)).astype(np.float32)
    qkv[5, -3:] = [1e5, 7e-8, -65510.0]                      # beyond fp16, subnormal, rounds down
    q, k, v = (qkv[:, :H * head_dim].reshape(B, H, head_dim),
               qkv[:, H * head_dim:(H + KVH) * head_dim].reshape(B, KVH, head_dim),
               qkv[:, (H + KVH) * head_dim:].reshape(B, KVH, head_dim))
    slot_page = np.array([3, 0, 2, 2, 1, 0])
    slot_off = np.array([0, 5, 31, 30, 7, 6])
    k_cache = np.full((4, KVH, 32, head_dim), 0xABCD, np.uint16)
    v_cache = k_cache.copy()
    ours = np.full((B, H, head_dim), np.nan, np.float32)
    elementwise.rope_store(qkv, H, KVH, positions, cos, sin, k_cache, v_cache, slot_page,
                           slot_off, ours)
    np.testing.assert_allclose(ours, elementwise.rope_ref(q, positions, cos, sin),
                               rtol=1e-6, atol=1e-7)
    assert np.array_equal(ours[0], q[0])                     # position 0: no rotation
    assert np.array_equal(ours[..., rope_dim:], q[..., rope_dim:])
    k_ref = elementwise.rope_ref(k, positions, cos, sin)
    with np.errstate(over="ignore"):
        k_bits, v_bits = (a.astype(np.float16).view(np.uint16) for a in (k_ref, v))
    written = np.zeros(k_cache.shape, bool)
    written[slot_page, :, slot_off] = True
    assert np.array_equal(k_cache[slot_page, :, slot_off], k_bits)     # same float32 arithmetic
    assert np.array_equal(v_cache[slot_page, :, slot_off], v_bits)
    assert (k_cache[~written] == 0xABCD).all() and (v_cache[~written] == 0xABCD).all()


@pytest.mark.parametrize("rope_dim, base, freq_scale, factors", [
    (64, 10000.0, 1.0, False), (64, 100000.0, 1.0, False), (128, 500000.0, 0.25, True),
    (16, 10000.0, 1.0, False)])
def test_rope_tables_against_the_float64_formula(rope_dim, base, freq_scale, factors):
    """theta_i(pos) = pos * freq_scale * base^(-2i/d) / factor_i, for positions < 2048."""
    n_pos = 2048
    ff = np.random.default_rng(0).uniform(1, 8, rope_dim // 2).astype(np.float32) if factors else None
    cos, sin = elementwise.rope_tables(n_pos, rope_dim, base, freq_scale, ff)
    assert cos.shape == sin.shape == (n_pos, rope_dim // 2) and cos.dtype == np.float32
    i = np.arange(rope_dim // 2)
    inv = base ** (-2.0 * i / rope_dim) / (ff.astype(np.float64) if factors else 1.0)
    exact = np.outer(np.arange(n_pos) * freq_scale, inv)                     # [P, d/2] float64
    ours = np.arctan2(sin.astype(np.float64), cos.astype(np.float64))      # in (-pi, pi]
    wrapped = np.angle(np.exp(1j * (ours - exact)))                        # difference mod 2 pi
    # ggml multiplies theta by base^(-2/d) once per pair in float32: relative error grows like
    # i * 2^-24, under 1e-5 for d <= 128; plus float32 cos/sin, a few 1e-7 absolute.
    assert np.all(np.abs(wrapped) <= 1e-5 * exact + 1e-6)
    np.testing.assert_allclose(cos.astype(np.float64) ** 2 + sin.astype(np.float64) ** 2, 1, atol=1e-6)


@pytest.mark.parametrize("batch, ffn", [(1, 32), (5, 1536)])
def test_swiglu_matches_reference(batch, ffn):
    rng = np.random.default_rng(ffn)
    gate_up = (rng.standard_normal((batch, 2 * ffn)) * 6).astype(np.float32)
    gate_up[0, :4] = [-100.0, 100.0, 0.0, -0.0]                 # exp overflow side, zero
    out = np.empty((batch, ffn), np.float32)
    with np.errstate(over="ignore"):                            # exp(100) is inf: silu -> -0
        elementwise.swiglu(gate_up, ffn, out)
        ref = elementwise.swiglu_ref(gate_up[:, :ffn], gate_up[:, ffn:])
    # The kernel may use a fast approximate exp and reciprocal (fastmath "afn", "arcp").
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-30)


def test_expf_has_the_c_librarys_bits():
    """elementwise.expf (SwiGLU's exponential) against the C library's expf, called through
    ctypes: the same bits across float32's range and past both ends (inf above 88.72, 0 below
    -103.97). glibc's expf uses FMA on AArch64 and on x86 with FMA, as this one does."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(21)
    n = 2000 if numba_config.DISABLE_JIT else 300_000      # plain Python: an exact fma per call
    x = np.concatenate([rng.uniform(-110.0, 95.0, n), rng.standard_normal(n) * 4,
                        [0.0, -0.0, 1e-30, -1e-30, 88.72, 88.73, -87.34, -103.97, -104.5, 200.0,
                         -200.0]]).astype(np.float32)
    ours = np.array([elementwise.expf(v) for v in x], np.float32) if numba_config.DISABLE_JIT \
        else _expf_all(x)
    theirs = np.array([libm.expf(float(v)) for v in x], np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@njit
def _expf_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = elementwise.expf(x[i])
    return out


# --- bits --------------------------------------------------------------------------------------

@njit
def widen_all(h, is_bf16, out):
    for i in range(h.shape[0]):
        out[i] = bits.bf16_to_f32(h[i]) if is_bf16 else bits.f16_to_f32(h[i])


@njit
def round_all(x, out):
    for i in range(x.shape[0]):
        out[i] = actquant.round_to_f16(x[i])


@njit(fastmath=True)
def round_all_fastmath(x, out):
    """As the attention and LoRA kernels call it: inlined into fastmath code. An add-and-subtract
    rounding ((x + big) - big) is folded to x there under "reassoc", and rounds nothing."""
    for i in range(x.shape[0]):
        out[i] = actquant.round_to_f16(x[i])


@njit
def scales_of(s, out):
    for i in range(s.shape[0]):
        out[i] = bits.scale_f32(s[i])


@njit
def _to_f16_bits(x):
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = bits.f32_to_f16_bits(x[i])
    return out


def test_f32_to_f16_bits_matches_numpy():
    """Float32 bit patterns from 2^-32 to past fp16's range (a stride of 2053), every pattern
    around the edges (the least subnormal, the least normal, 65504 to infinity, both signs),
    and 20,000 random bit patterns (NaNs among them). Small enough for the no-JIT run.

    NaNs are held to IEEE 754's rule instead: a quiet NaN with the payload's top 10 bits and
    the sign. NumPy's own answer for a signaling NaN depends on the machine (x86's software
    conversion keeps it signaling, aarch64's FCVT quiets it, found under tox -e arm64)."""
    edges = np.float32([2.0**-25, 2.0**-24, 2.0**-14, 65504.0, 65520.0]).view(np.uint32)
    grid = np.concatenate([np.arange(0x2F800000, 0x48000000, 2053, dtype=np.uint32),
                           *(np.arange(e - 4096, e + 4096, dtype=np.uint32) for e in edges)])
    rnd = np.random.default_rng(0).integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520,
                          2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-14]).view(np.uint32)
    signaling = np.uint32([0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7F802000, 0xFF9FB77A])
    for patterns in (grid, grid | np.uint32(0x80000000), rnd, special, signaling):
        x = patterns.view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            expected = x.astype(np.float16).view(np.uint16)
        nan = np.isnan(x)
        assert np.isnan(expected[nan].view(np.float16)).all()          # NumPy: a NaN, same sign
        assert np.array_equal(expected[nan] & 0x8000, (patterns[nan] >> 16) & 0x8000)
        expected[nan] = ((patterns[nan] >> 16) & 0x8000 | 0x7E00
                         | (patterns[nan] & 0x7FFFFF) >> 13).astype(np.uint16)
        assert np.array_equal(_to_f16_bits(x), expected)


@njit
def widen_all_arith(h, out):
    for i in range(h.shape[0]):
        out[i] = bits.f16_to_f32_arith(h[i])


def test_f16_to_f32_every_finite_pattern():
    """The kernels' widening (the CPU's conversion where it has one) and the integer version
    behind it, against NumPy, on every finite fp16 value."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = h[(h & 0x7C00) != 0x7C00]                                          # drop inf and NaN
    expected = h.view(np.float16).astype(np.float32).view(np.uint32)
    for widen in (lambda h, out: widen_all(h, False, out), widen_all_arith):
        out = np.empty(len(h), np.float32)
        widen(h, out)
        assert np.array_equal(out.view(np.uint32), expected)


@pytest.mark.skipif(bits.f16_to_f32 is not bits.f16_to_f32_native,
                    reason="this CPU has no fp16 conversion: kernels use the integer version")
def test_native_f16_widening_from_wider_integers_and_at_infinity():
    """The native widening reads the low 16 bits of whatever integer it is given, and keeps
    infinities (the integer version does not need to: scales and caches are finite)."""
    h = np.array([0x3C00, 0xFC00, 0x7C00, 0x0001, 0x8001], np.int64) | (7 << 16)
    out = np.empty(len(h), np.float32)
    widen_all(h, False, out)
    assert out.tolist() == [1.0, -np.inf, np.inf, 2.0**-24, -(2.0**-24)]


def test_bf16_to_f32_every_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(len(h), np.float32)
    widen_all(h, True, out)
    assert np.array_equal(out.view(np.uint32), h.astype(np.uint32) << 16)


def test_scale_f32_reads_fp16_bits_and_floats():
    f16 = np.array([1.0, -2.5, 6.1e-5, 65504.0], np.float16)
    out = np.empty(4, np.float32)
    scales_of(f16.view(np.uint16), out)
    assert np.array_equal(out, f16.astype(np.float32))
    f32 = np.array([1.0, -1e-30, 3e38, 0.1], np.float32)
    scales_of(f32, out)
    assert np.array_equal(out, f32)


@pytest.mark.parametrize("round_fn", [round_all, round_all_fastmath])
def test_round_to_f16_matches_numpy_including_ties(round_fn):
    rng = np.random.default_rng(0)
    # Every positive finite fp16 value, the midpoints between neighbours (exact ties, which
    # must go to the even neighbour), and random float32 values across the whole range.
    f16 = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = (f16[:-1] + f16[1:]) / 2                       # exact in float32 (12 bits)
    mids = np.concatenate([mids, [np.float32(2.0**-25)]])  # tie between 0 and the least subnormal
    rand = (rng.uniform(1, 2, 20000) * 2.0 ** rng.integers(-30, 15, 20000)).astype(np.float32)
    x = np.concatenate([f16, mids, rand, [0.0]]).astype(np.float32)
    x = np.concatenate([x, -x])
    out = np.empty_like(x)
    round_fn(x, out)
    # Compared as values: round_to_f16(-tiny) may return +0.0 where NumPy says -0.0.
    assert np.array_equal(out, x.astype(np.float16).astype(np.float32))


# --- PagedKVCache -------------------------------------------------------------------------------

def tiny_config(context_length: int = 256) -> LlamaConfig:
    return LlamaConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                       vocab_size=300, context_length=context_length, rope_base=10000.0,
                       rope_dim=16, rope_freq_scale=1.0, rms_eps=1e-5)


def test_kv_cache_accounting_and_block_tables():
    cache = PagedKVCache(tiny_config(), n_tokens=8 * PAGE_SIZE)
    assert cache.n_pages == 8 and cache.free_tokens == 8 * PAGE_SIZE
    assert cache.k.shape == (2, 8, 2, PAGE_SIZE, 16) and cache.k.dtype == np.uint16
    cache.reserve(5, 1)
    cache.reserve(9, PAGE_SIZE + 1)
    assert cache.free_tokens == 5 * PAGE_SIZE
    assert (cache.length(5), cache.length(9), cache.length(1)) == (1, PAGE_SIZE + 1, 0)
    cache.reserve(5, PAGE_SIZE)                       # still one page
    assert cache.free_tokens == 5 * PAGE_SIZE and cache.length(5) == PAGE_SIZE
    cache.reserve(9, 3)                               # shrinking requests change nothing
    assert cache.length(9) == PAGE_SIZE + 1
    assert cache.pages_needed(5, 3 * PAGE_SIZE) == 2
    table = cache.block_table(np.array([9, 5]))
    assert table.shape == (2, 2) and table.dtype == np.int32
    assert table[1, 1] == -1                          # padding
    pages = {int(p) for p in table[table >= 0]}
    assert len(pages) == 3 and pages <= set(range(8))  # distinct pages of the pool
    cache.release(9)
    assert cache.free_tokens == 7 * PAGE_SIZE and cache.length(9) == 0
    cache.release(9)                                  # releasing twice is harmless
    cache.reserve(2, 7 * PAGE_SIZE)                   # the freed pages are reused
    assert cache.free_tokens == 0


def test_kv_cache_overflow_errors():
    cache = PagedKVCache(tiny_config(context_length=256), n_tokens=4 * PAGE_SIZE, max_seq_len=80)
    assert cache.max_seq_len == 80
    with pytest.raises(ContextOverflowError, match="81"):
        cache.reserve(0, 81)                          # past max_seq_len
    cache.reserve(0, 80)
    cache.reserve(1, PAGE_SIZE)
    with pytest.raises(ContextOverflowError, match="full"):
        cache.reserve(2, 1)                           # every page taken
    assert cache.length(2) == 0 and cache.free_tokens == 0   # a failed reserve takes nothing
    cache.release(1)
    cache.reserve(2, 1)
    # max_seq_len defaults to the smaller of the pool and the model's context.
    assert PagedKVCache(tiny_config(context_length=64), n_tokens=4 * PAGE_SIZE).max_seq_len == 64
    assert PagedKVCache(tiny_config(context_length=256), n_tokens=100).max_seq_len == 100


@quick
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 120), st.booleans()), max_size=30))
def test_kv_cache_pages_are_never_shared(ops):
    cache = PagedKVCache(tiny_config(), n_tokens=6 * PAGE_SIZE)
    for seq, length, release in ops:
        if release:
            cache.release(seq)
            continue
        try:
            cache.reserve(seq, length)
        except ContextOverflowError:
            pass
        live = np.array([s for s in range(4) if cache.length(s) > 0])
        if len(live) == 0:
            assert cache.free_tokens == cache.n_pages * PAGE_SIZE
            continue
        table = cache.block_table(live)                               # [S, pages]
        owned = table[table >= 0]
        assert len(owned) == len(set(owned.tolist()))                 # no page in two sequences
        assert len(owned) + cache.free_tokens // PAGE_SIZE == cache.n_pages
        for row, s in enumerate(live.tolist()):
            assert (table[row] >= 0).sum() == -(-cache.length(s) // PAGE_SIZE)
