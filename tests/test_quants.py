"""Quant formats: every decoder bit-exact against gguf-py, the quantizers against ggml's recipes.

gguf-py is itself tested bit-exact against ggml's C code, so it is our oracle for decoding.
It cannot quantize to K-quants, so K-quant blocks are made here from random bytes with
finite fp16 scales (every other bit pattern of a K-quant block is a valid block).
"""

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgelora_np.errors import GGUFFormatError, UnsupportedQuantError
from edgelora_np.gguf import quants

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL,
               T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]

# Byte offsets of the fp16 scale fields in each block type; everything else is free bits.
FP16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.IQ4_NL: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_XS: [0],
}
FP16_ONE = 0x3C00  # bit pattern of 1.0 in fp16
FP16_EXPONENT = 0x7C00  # all-ones exponent = inf or NaN

SHAPES = [(1, 1), (1, 3), (4, 2), (9, 5)]  # (rows, blocks per row)

quick = settings(max_examples=40, deadline=None)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same shape, float32, same bits everywhere except that any NaN matches any NaN."""
    assert ours.dtype == np.float32
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref, equal_nan=True)
    nan = np.isnan(ours)
    np.testing.assert_array_equal(nan, np.isnan(ref))
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def finite_fp16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """uint16[n] random fp16 bit patterns, any sign or magnitude, never inf or NaN."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    is_special = (bits & FP16_EXPONENT) == FP16_EXPONENT
    return np.where(is_special, bits & np.uint16(0xBFFF), bits).astype(np.uint16)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_blocks, bytes_per_block]: random valid blocks with finite scales."""
    qt = quants.QUANT_TYPES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, qt.bytes_per_block), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale_bytes = finite_fp16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        blocks[:, offset : offset + 2] = scale_bytes
    return blocks


# --------------------------------------------------------------------------------------------
# The table


def test_table_sizes_match_gguf_py():
    for qtype, qt in quants.QUANT_TYPES.items():
        assert (qt.block_size, qt.bytes_per_block) == gguf.GGML_QUANT_SIZES[qtype], qt.name
    q8_k = quants.ACTIVATION_TYPES[T.Q8_K]
    assert (q8_k.block_size, q8_k.bytes_per_block) == gguf.GGML_QUANT_SIZES[T.Q8_K]


def test_q8_1_is_36_bytes_as_in_ggml_common_h():
    # gguf-py still says 40: d and s were float32 before ggml made them fp16.
    assert quants.ACTIVATION_TYPES[T.Q8_1].bytes_per_block == 2 + 2 + 32


def test_table_rows_describe_themselves():
    assert quants.QUANT_TYPES[T.Q4_K].name == "Q4_K"
    assert quants.QUANT_TYPES[T.Q4_K].bits_per_weight == 4.5
    assert quants.QUANT_TYPES[T.Q6_K].bits_per_weight == 6.5625
    with pytest.raises(TypeError):
        quants.QUANT_TYPES[T.IQ2_XXS] = quants.QUANT_TYPES[T.Q4_K]  # the table is read-only


def test_row_bytes():
    assert quants.row_bytes(T.Q4_K, 4096) == 16 * 144
    assert quants.row_bytes(T.Q8_0, 64) == 2 * 34
    assert quants.row_bytes(T.F16, 7) == 14
    assert quants.row_bytes(int(T.Q6_K), 256) == 210  # plain ints work too
    assert quants.row_bytes(T.Q8_K, 512) == 2 * 292  # activation formats too
    assert quants.row_bytes(T.Q8_1, 64) == 2 * 36


# --------------------------------------------------------------------------------------------
# Decoders bit-exact against gguf-py


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", SHAPES)
def test_block_types_match_gguf_py(qtype, rows, blocks_per_row):
    qt = quants.QUANT_TYPES[qtype]
    rng = np.random.default_rng([int(qtype), rows, blocks_per_row])
    blocks = random_blocks(qtype, rows * blocks_per_row, rng)
    raw = blocks.reshape(rows, blocks_per_row * qt.bytes_per_block)  # as GGUFReader gives it
    ours = quants.dequantize(raw, qtype, (rows, blocks_per_row * qt.block_size))
    assert_bit_exact(ours, gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0],
                         ids=lambda t: t.name)
def test_blocks_quantized_by_gguf_py_match(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 10, size=(5, 1))).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)  # uint8[5, 3 * bytes_per_block]
    assert_bit_exact(quants.dequantize(raw, qtype, x.shape), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@quick
@given(seed=st.integers(0, 2**32 - 1), n_blocks=st.integers(1, 6))
def test_block_decoders_match_gguf_py_property(qtype, seed, n_blocks):
    blocks = random_blocks(qtype, n_blocks, np.random.default_rng(seed))
    ours = quants.QUANT_TYPES[qtype].dequantize_blocks(blocks)
    assert_bit_exact(ours, gguf.quants.dequantize(blocks, qtype))


def test_f32_typed_and_bytes():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=(3, 17), dtype=np.uint32)  # includes NaN and inf
    typed = bits.view(np.float32)
    assert_bit_exact(quants.dequantize(typed, T.F32, (3, 17)), gguf.quants.dequantize(typed, T.F32))
    assert_bit_exact(quants.dequantize(typed.view(np.uint8), T.F32, (3, 17)), typed)


def test_f16_typed_and_bytes():
    every_f16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    ref = gguf.quants.dequantize(every_f16, T.F16)
    assert_bit_exact(quants.dequantize(every_f16, T.F16, (256, 256)), ref)
    assert_bit_exact(quants.dequantize(every_f16.view(np.uint8), T.F16, (256, 256)), ref)
    assert_bit_exact(quants.dequantize(every_f16.reshape(-1), T.F16, (1 << 16,)), ref.reshape(-1))


def test_f16_big_endian_typed_array():
    x = np.array([[1.5, -2.0, 65504.0]], dtype=np.float16)
    swapped = x.astype(">f2")
    assert_bit_exact(quants.dequantize(swapped, T.F16, (1, 3)), x.astype(np.float32))


def test_bf16_matches_gguf_py():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    raw = gguf.quants.quantize(x, T.BF16)  # uint8[4, 96], round to nearest even
    assert_bit_exact(quants.dequantize(raw, T.BF16, x.shape), gguf.quants.dequantize(raw, T.BF16))
    every_bf16 = np.arange(1 << 16, dtype=np.uint16)
    assert_bit_exact(
        quants.dequantize(every_bf16, T.BF16, (1 << 16,)),
        gguf.quants.dequantize(every_bf16.view(np.uint8).reshape(1, -1), T.BF16).reshape(-1),
    )


def test_reads_what_gguf_reader_exposes(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    expected = {}
    for qtype in BLOCK_TYPES:
        qt = quants.QUANT_TYPES[qtype]
        raw = random_blocks(qtype, 6, rng).reshape(3, 2 * qt.bytes_per_block)
        writer.add_tensor(qtype.name, raw, raw_dtype=qtype)
        expected[qtype.name] = gguf.quants.dequantize(raw, qtype)
    f32 = rng.standard_normal((2, 5)).astype(np.float32)
    writer.add_tensor("F32", f32)
    expected["F32"] = f32
    f16 = rng.standard_normal(8).astype(np.float16)
    writer.add_tensor("F16", f16)
    expected["F16"] = f16.astype(np.float32)
    bf16 = gguf.quants.quantize(f32, T.BF16)
    writer.add_tensor("BF16", bf16, raw_dtype=T.BF16)
    expected["BF16"] = gguf.quants.dequantize(bf16, T.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(expected)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF ne -> (rows, cols)
        ours = quants.dequantize(tensor.data, tensor.tensor_type, shape, name=tensor.name)
        assert_bit_exact(ours, expected[tensor.name])


def test_large_tensor_is_decoded_in_chunks():
    rng = np.random.default_rng(3)
    n_blocks = 2 * quants._BLOCKS_PER_CHUNK + 7
    blocks = random_blocks(T.Q8_0, n_blocks, rng)  # one block per row
    ours = quants.dequantize(blocks, T.Q8_0, (n_blocks, 32))
    assert_bit_exact(ours, gguf.quants.dequantize(blocks, T.Q8_0))


# --------------------------------------------------------------------------------------------
# Element order inside a block, as docs/quant_formats.md draws it: set one quant in an
# otherwise all-zero block (scales 1, mins 0) and see exactly one element light up.


def unit_block(qtype: T) -> np.ndarray:
    """uint8[1, bytes_per_block]: a block whose elements all decode to 0, with unit scales."""
    qt = quants.QUANT_TYPES[qtype]
    block = np.zeros((1, qt.bytes_per_block), dtype=np.uint8)
    one = np.array([FP16_ONE], dtype="<u2").view(np.uint8)
    if qtype is T.Q4_0:
        block[0, 0:2] = one
        block[0, 2:] = 0x88  # q = 8 is zero
    elif qtype in (T.Q4_1, T.Q8_0):
        block[0, 0:2] = one  # Q4_1 offset m stays 0
    elif qtype in (T.Q4_K, T.Q5_K):
        block[0, 0:2] = one  # d = 1, dmin = 0
        block[0, 4:8] = 1  # scales 0-3 = 1
        block[0, 12:16] = 0x01  # low nibbles: scales 4-7 = 1; high nibbles: mins 4-7 = 0
    elif qtype is T.Q6_K:
        block[0, 128:192] = 0xAA  # high bits 0b10 everywhere: q = 32 is zero
        block[0, 192:208] = 1  # sub-block scales
        block[0, 208:210] = one
    return block


def lit_element(qtype: T, block: np.ndarray) -> int:
    out = quants.QUANT_TYPES[qtype].dequantize_blocks(block)[0]
    (lit,) = np.flatnonzero(out)  # exactly one element is nonzero
    return int(lit)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_legacy_4bit_nibble_order(qtype):
    first_q = 2 if qtype is T.Q4_0 else 4
    for j in range(16):
        for nibble, expected in ((0x01, j), (0x10, j + 16)):
            block = unit_block(qtype)
            block[0, first_q + j] ^= nibble  # Q4_0: 8 -> 9; Q4_1: 0 -> 1
            assert lit_element(qtype, block) == expected


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_k4_nibble_order(qtype):
    first_q = 16 if qtype is T.Q4_K else 48
    for c in range(4):
        for lane in range(32):
            for nibble, expected in ((0x01, 64 * c + lane), (0x10, 64 * c + 32 + lane)):
                block = unit_block(qtype)
                block[0, first_q + 32 * c + lane] = nibble
                assert lit_element(qtype, block) == expected


def test_q5_k_high_bit_order():
    for lane in range(32):
        for bit in range(8):
            block = unit_block(T.Q5_K)
            block[0, 16 + lane] = 1 << bit
            out = quants.dequantize_q5_K(block)[0]
            assert np.flatnonzero(out).tolist() == [32 * bit + lane]
            assert out[32 * bit + lane] == 16


def test_q6_k_element_order():
    for half in range(2):
        for lane in range(32):
            ql = 64 * half + lane
            cases = [
                (ql, 0x01, 0),  # low nibble of ql[l]      -> element 128h + l
                (ql + 32, 0x01, 32),  # low nibble of ql[32+l]   -> element 128h + 32 + l
                (ql, 0x10, 64),  # high nibble of ql[l]     -> element 128h + 64 + l
                (ql + 32, 0x10, 96),  # high nibble of ql[32+l]  -> element 128h + 96 + l
            ]
            for byte, nibble, k32 in cases:
                block = unit_block(T.Q6_K)
                block[0, byte] = nibble
                assert lit_element(T.Q6_K, block) == 128 * half + k32 + lane
            for k in range(4):  # qh[32h + l] bits 2k..2k+1 -> element 128h + 32k + l
                block = unit_block(T.Q6_K)
                block[0, 128 + 32 * half + lane] ^= 1 << (2 * k)  # q: 32 -> 33
                assert lit_element(T.Q6_K, block) == 128 * half + 32 * k + lane


def pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of ggml get_scale_min_k4, from the docs' byte table: 8 + 8 six-bit -> 12 bytes."""
    packed = np.zeros(12, dtype=np.uint8)
    packed[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    packed[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    packed[8:12] = (sc[4:8] & 0x0F) | ((mn[4:8] & 0x0F) << 4)
    return packed


@quick
@given(
    sc=hnp.arrays(np.uint8, 8, elements=st.integers(0, 63)),
    mn=hnp.arrays(np.uint8, 8, elements=st.integers(0, 63)),
)
def test_k_scale_packing(sc, mn):
    block = unit_block(T.Q4_K)
    block[0, 2:4] = np.array([FP16_ONE], dtype="<u2").view(np.uint8)  # dmin = 1
    block[0, 4:16] = pack_k_scales(sc, mn)
    block[0, 16:144] = 0x11  # every q = 1
    out = quants.dequantize_q4_K(block).reshape(8, 32)  # [sub-block, 32]
    expected = sc.astype(np.float32) - mn.astype(np.float32)  # d * sc * 1 - dmin * mn
    np.testing.assert_array_equal(out, np.repeat(expected[:, None], 32, axis=1))


# --------------------------------------------------------------------------------------------
# fp16 / bf16 lookup tables


def test_f16_table_follows_the_ieee_formula():
    bits = np.arange(1 << 16, dtype=np.int64)
    sign = np.where(bits >> 15, -1.0, 1.0)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    normal = sign * (1024 + mantissa) * 2.0 ** (exponent - 25)
    subnormal = sign * mantissa * 2.0**-24
    value = np.where(exponent == 0, subnormal, normal)
    value = np.where(exponent == 31, np.where(mantissa == 0, sign * np.inf, np.nan), value)
    table = quants.f16_to_f32_table()
    assert table.dtype == np.float32 and table.shape == (1 << 16,)
    assert_bit_exact(table, value.astype(np.float32))


def test_bf16_table_is_the_top_half_of_f32():
    table = quants.bf16_to_f32_table()
    assert table.shape == (1 << 16,)
    bits = np.arange(1 << 16, dtype=np.uint32) << 16
    np.testing.assert_array_equal(table.view(np.uint32), bits)


def test_tables_are_cached_and_read_only():
    assert quants.f16_to_f32_table() is quants.f16_to_f32_table()
    assert quants.bf16_to_f32_table() is quants.bf16_to_f32_table()
    with pytest.raises(ValueError):
        quants.f16_to_f32_table()[0] = 1.0


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x55, 0xAA])
@pytest.mark.parametrize("scale", [0x7BFF, 0xFBFF, 0x0001, 0x8000])   # +-65504, 2**-24, -0.0
def test_block_decoders_at_the_edges(qtype, fill, scale):
    """Every code, scale and high bit at its extreme (all bits 0 or 1, or alternating),
    under the largest, smallest and negative-zero fp16 scales."""
    qt = quants.QUANT_TYPES[qtype]
    blocks = np.full((2, qt.bytes_per_block), fill, np.uint8)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = np.array([scale], np.uint16).view(np.uint8)
    assert_bit_exact(qt.dequantize_blocks(blocks), gguf.quants.dequantize(blocks, qtype))


# --------------------------------------------------------------------------------------------
# Errors that name the problem


def test_unsupported_type_names_itself_and_the_supported_ones():
    with pytest.raises(UnsupportedQuantError) as err:
        quants.quant_type(T.IQ2_XXS, tensor="blk.0.ffn_down.weight")
    message = str(err.value)
    assert "IQ2_XXS" in message and "blk.0.ffn_down.weight" in message
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K",
                 "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
        assert name in message


def test_unsupported_type_in_dequantize_and_row_bytes():
    with pytest.raises(UnsupportedQuantError, match="IQ3_S"):
        quants.dequantize(np.zeros((1, 110), np.uint8), T.IQ3_S, (1, 256), name="w")
    with pytest.raises(UnsupportedQuantError, match="Q8_K"):  # activations only, not in files
        quants.dequantize(np.zeros((1, 292), np.uint8), T.Q8_K, (1, 256), name="w")
    with pytest.raises(UnsupportedQuantError, match="IQ1_S"):
        quants.row_bytes(T.IQ1_S, 256)
    with pytest.raises(UnsupportedQuantError, match="unknown type id 999"):
        quants.quant_type(999)


def test_wrong_byte_count_names_the_tensor():
    raw = np.zeros((2, 144 - 1), dtype=np.uint8)
    with pytest.raises(GGUFFormatError, match=r"'blk\.3\.attn_q\.weight'.*288 bytes.*286"):
        quants.dequantize(raw, T.Q4_K, (2, 256), name="blk.3.attn_q.weight")
    with pytest.raises(GGUFFormatError, match="token_embd"):
        quants.check_tensor_bytes("token_embd.weight", T.F16, (4, 8), 63)
    assert quants.check_tensor_bytes("token_embd.weight", T.F16, (4, 8), 64) == 64


def test_f32_array_passed_as_f16_is_caught():
    with pytest.raises(GGUFFormatError, match="needs 16 bytes, found 32"):
        quants.dequantize(np.zeros(8, np.float32), T.F16, (8,), name="norm")


def test_row_not_whole_blocks():
    with pytest.raises(GGUFFormatError, match="'w'.*whole blocks of 32"):
        quants.check_tensor_bytes("w", T.Q8_0, (1, 40), 34)
    with pytest.raises(GGUFFormatError, match="100 columns"):
        quants.row_bytes(T.Q4_K, 100)


# --------------------------------------------------------------------------------------------
# Quantizers


def float_rows(block: int, max_rows: int = 3, max_blocks: int = 3):
    """Strategy: float32[rows, block * k] with magnitudes fp16 can scale."""
    dims = st.tuples(st.integers(1, max_rows), st.integers(1, max_blocks))
    shapes = dims.map(lambda s: (s[0], s[1] * block))
    # Magnitudes below ~4e-37 overflow the inverse scale: see the tiny-block test instead.
    normal = st.floats(-1000, 1000, width=32).filter(lambda v: v == 0 or abs(v) > 1e-30)
    values = normal | st.sampled_from([0.0, 0.5, -0.5, 2.5, 1e-3])
    return hnp.arrays(np.float32, shapes, elements=values)


@quick
@given(x=float_rows(32))
def test_q8_0_matches_gguf_py(x):
    ours = quants.quantize_q8_0(x)  # [rows, n/32, 34]
    assert ours.shape == (x.shape[0], x.shape[1] // 32, 34)
    np.testing.assert_array_equal(ours.reshape(x.shape[0], -1), gguf.quants.quantize(x, T.Q8_0))


def test_q8_0_random_normal_matches_gguf_py():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 4096)) * 3).astype(np.float32)
    np.testing.assert_array_equal(
        quants.quantize_q8_0(x).reshape(6, -1), gguf.quants.quantize(x, T.Q8_0)
    )


def test_q8_0_hand_checked_rounds_half_away_from_zero():
    x = np.zeros(32, dtype=np.float32)
    x[:7] = [127, 0.5, 2.5, -0.5, -2.5, 1.4999999, 0.49999997]  # amax 127 -> d = 1
    block = quants.quantize_q8_0(x)[0]
    assert block[0:2].view("<u2")[0] == FP16_ONE
    assert block[2:9].view(np.int8).tolist() == [127, 1, 3, -1, -3, 1, 0]
    assert not block[9:].any()


def test_tiny_blocks_quantize_to_zero_like_ggml_on_x86():
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, :3] = [1e-38, -5e-39, 3e-39]  # 127 / 1e-38 overflows float32
    assert not quants.quantize_q8_0(x).any()
    assert not quants.quantize_q8_1(x).any()
    d, q, bsums = split_q8_K(quants.quantize_q8_K(x)[0])
    assert d == 0 and not q.any() and not bsums.any()
    d_ref, q_ref, _ = quantize_q8_K_scalar(x[0])
    assert q_ref == [0] * 256 and d_ref == 0  # the C loop agrees (d is -0.0 there and here)


def test_zero_blocks_quantize_to_zero():
    x = np.zeros((2, 256), dtype=np.float32)
    assert not quants.quantize_q8_0(x).any()
    assert not quants.quantize_q8_1(x).any()
    assert not quants.quantize_q8_K(x).any()


@quick
@given(x=float_rows(32))
def test_q8_1_is_q8_0_plus_the_scaled_sum(x):
    q8_1 = quants.quantize_q8_1(x)  # [rows, nb, 36]
    q8_0 = quants.quantize_q8_0(x)  # [rows, nb, 34]
    np.testing.assert_array_equal(q8_1[..., 0:2], q8_0[..., 0:2])  # same d
    np.testing.assert_array_equal(q8_1[..., 4:], q8_0[..., 2:])  # same q
    xb = x.reshape(*q8_1.shape[:2], 32)
    d32 = np.abs(xb).max(axis=-1) / np.float32(127)  # the float32 d, before fp16
    q = q8_1[..., 4:].view(np.int8)
    s_expected = (q.astype(np.int32).sum(axis=-1).astype(np.float32) * d32).astype("<f2")
    np.testing.assert_array_equal(q8_1[..., 2:4].view("<f2")[..., 0], s_expected)
    # Rounding error at most half a step, against the unrounded scale ...
    err = np.abs(xb - d32[..., None] * q.astype(np.float32))
    assert np.all(err <= d32[..., None] * np.float32(0.5001))
    # ... and against the fp16 scale a dequantizer sees, plus the scale's own rounding.
    back = quants.dequantize_q8_1(q8_1.reshape(-1, 36)).reshape(xb.shape)
    d16 = q8_1[..., 0:2].view("<f2")[..., 0].astype(np.float32)
    bound = d32 * 0.5001 + np.abs(d16 - d32) * 127
    assert np.all(np.abs(xb - back) <= bound[..., None])


def test_q8_1_hand_checked():
    x = np.zeros(32, dtype=np.float32)
    x[0], x[16], x[31] = 127.0, 3.0, -0.5  # d = 1; q = 127, 3, -1
    block = quants.quantize_q8_1(x)[0]
    assert block[0:2].view("<u2")[0] == FP16_ONE
    assert block[2:4].view("<f2")[0] == 129.0  # s = d * (127 + 3 - 1)
    q = block[4:].view(np.int8)
    assert (q[0], q[16], q[31]) == (127, 3, -1)


def nearest_int(v: np.float32) -> int:
    """ggml's nearest_int, literally: add 1.5 * 2**23 and read the low mantissa bits."""
    shifted = np.float32(v) + np.float32(12582912.0)
    return int((shifted.view(np.int32) & 0x007FFFFF) - 0x00400000)


def store_int8(v: int) -> int:
    """C's conversion of an int to int8_t: keep the low byte (what gcc and clang do)."""
    return (v + 128) % 256 - 128


def quantize_q8_K_scalar(block: np.ndarray) -> tuple[np.float32, list[int], list[int]]:
    """A line-by-line transcription of ggml quantize_row_q8_K_ref for one block of 256."""
    amax, peak = np.float32(0), np.float32(0)
    for v in block:
        if abs(v) > amax:
            amax, peak = abs(v), v
    if amax == 0:
        return np.float32(0), [0] * 256, [0] * 16
    with np.errstate(over="ignore", invalid="ignore"):  # the tiny-block case
        iscale = np.float32(-127) / peak
        q = [store_int8(min(127, nearest_int(iscale * v))) for v in block]
    bsums = [sum(q[16 * g : 16 * g + 16]) for g in range(16)]
    return np.float32(1) / iscale, q, bsums


def split_q8_K(blocks: np.ndarray):
    """uint8[..., 292] -> (d float32[...], q int8[..., 256], bsums int16[..., 16])."""
    d = blocks[..., 0:4].view("<f4")[..., 0]
    q = blocks[..., 4:260].view(np.int8)
    bsums = blocks[..., 260:292].view("<i2")
    return d, q, bsums


def test_q8_K_matches_the_c_loop():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 512)) * rng.uniform(0.1, 50)).astype(np.float32)
    x[1, 256 + 7] = -2 * np.abs(x[1, 256:]).max()  # a negative peak
    d, q, bsums = split_q8_K(quants.quantize_q8_K(x))
    for row in range(2):
        for b in range(2):
            d_ref, q_ref, bsums_ref = quantize_q8_K_scalar(x[row, 256 * b : 256 * (b + 1)])
            assert d[row, b].view(np.uint32) == d_ref.view(np.uint32)
            assert q[row, b].tolist() == q_ref
            assert bsums[row, b].tolist() == bsums_ref


def test_q8_K_hand_checked():
    x = np.zeros(256, dtype=np.float32)
    x[:5] = [-127, 0.5, 1.5, 2.5, -0.5]  # peak -127 -> iscale = 1; ties go to even
    d, q, bsums = split_q8_K(quants.quantize_q8_K(x)[0])
    assert d == 1.0
    assert q[:5].tolist() == [-127, 0, 2, 2, 0]
    assert bsums.tolist() == [-123] + [0] * 15

    y = np.zeros(256, dtype=np.float32)
    y[0], y[255] = 2.0, 1.0  # positive peak -> iscale = -63.5, d < 0
    d, q, bsums = split_q8_K(quants.quantize_q8_K(y)[0])
    assert d == np.float32(1) / np.float32(-63.5)
    assert (q[0], q[255]) == (-127, -64)  # -63.5 rounds to the even -64
    assert bsums[0] == -127 and bsums[15] == -64


@quick
@given(x=float_rows(256, max_rows=2, max_blocks=2))
def test_q8_K_invariants(x):
    blocks = quants.quantize_q8_K(x)  # [rows, nb, 292]
    d, q, bsums = split_q8_K(blocks)
    xb = x.reshape(*blocks.shape[:2], 256)
    q32 = q.astype(np.int32)
    np.testing.assert_array_equal(bsums, q32.reshape(*q.shape[:2], 16, 16).sum(axis=-1))
    assert np.all(np.abs(q32) <= 127)
    back = quants.dequantize_q8_K(blocks.reshape(-1, 292)).reshape(xb.shape)
    assert np.all(np.abs(xb - back) <= np.abs(d)[..., None] * np.float32(0.5001))
    peak = np.argmax(np.abs(xb), axis=-1)  # first element of largest magnitude
    peak_q = np.take_along_axis(q32, peak[..., None], axis=-1)[..., 0]
    nonzero = np.abs(xb).max(axis=-1) > 0
    assert np.all(peak_q[nonzero] == -127)


def test_quantizers_reject_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        quants.quantize_q8_0(np.zeros(33, np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quants.quantize_q8_K(np.zeros((2, 128), np.float32))
