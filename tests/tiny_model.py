"""Synthetic GGUF files for tests: tiny random llama models, valid or broken on purpose.

    path = write_tiny_model(tmp_path / "m.gguf", TinySpec(qtype=GGMLQuantizationType.Q8_0))

A model has random weights with std 1/sqrt(fan-in) (so activations stay O(1)), F32 norms near 1,
and a gpt2 byte-level tokenizer vocabulary of `vocab` tokens that Tokenizer.from_gguf_fields
accepts. The corruptions the loader must reject are keyword options of `write_tiny_model`.

gguf-py quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 itself. It cannot make K-quants
or IQ4 blocks, so those weights are random blocks (every bit pattern of such a block is valid
once its fp16 scales are finite) whose fp16 scales are set so that the decoded weights have the
wanted std.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as QT

K_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS)   # 256-element blocks
RANDOM_TYPES = (*K_TYPES, QT.IQ4_NL)               # the block types gguf-py cannot quantize
BLOCK_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, *RANDOM_TYPES)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# Byte offset of each random-block type's fp16 fields: (d, dmin) or (d,).
_K_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
                    QT.Q6_K: (208,), QT.IQ4_XS: (0,), QT.IQ4_NL: (0,)}
# dmin / d that centres a random Q2_K/Q4_K/Q5_K block on zero: E[sc * q] = E[mn] * E[q] with
# sc, mn uniform on the same range, so dmin = d * E[q] (E[q] = 1.5, 7.5, 15.5 for 2, 4, 5 bits).
_K_DMIN_RATIO = {QT.Q2_K: 1.5, QT.Q4_K: 7.5, QT.Q5_K: 15.5}


def random_k_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator,
                    std: float | None = None) -> np.ndarray:
    """uint8 [n_blocks, bytes per block] random valid blocks of a K-quant or IQ4 type.

    With std None the fp16 scales are random finite values of any magnitude (for bit-exactness
    tests). Otherwise d (and dmin) are set so the decoded weights have about that std.
    """
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    offsets = _K_SCALE_OFFSETS[qtype]
    if std is None:
        for off in offsets:
            bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits & np.uint16(0xBFFF), bits)  # no inf/NaN
            blocks[:, off:off + 2] = bits.astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
        return blocks
    ratios = (1.0, _K_DMIN_RATIO.get(qtype, 1.0))
    for unit in (1.0, None):                      # first measure at d = 1, then rescale
        if unit is None:
            measured = float(gguf.quants.dequantize(blocks, qtype).std())
            unit = std / measured
        for off, ratio in zip(offsets, ratios):
            value = np.array([unit * ratio], np.float16).view(np.uint8)
            blocks[:, off:off + 2] = value
    return blocks


def random_weight(qtype: QT, shape: tuple[int, ...], rng: np.random.Generator,
                  std: float) -> np.ndarray:
    """A random tensor of logical `shape` (NumPy order) encoded as GGUFWriter.add_tensor takes it:
    float32/float16 arrays for F32/F16, uint8 [rows, row bytes] for everything else."""
    if qtype in RANDOM_TYPES:
        rows, cols = shape
        n = cols // gguf.GGML_QUANT_SIZES[qtype][0]
        return random_k_blocks(qtype, rows * n, rng, std).reshape(rows, -1)
    x = (rng.standard_normal(shape) * std).astype(np.float32)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)          # BF16, Q4_0, Q4_1, Q5_x, Q8_0: uint8 bytes


def raw_bytes_of_type(qtype: QT, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes] of any ggml type (e.g. one we do not support, like IQ2_XXS)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    return rng.integers(0, 256, size=(rows, cols // block * nbytes), dtype=np.uint8)


# --- tokenizer ---------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def gpt2_byte_alphabet() -> list[str]:
    """The printable stand-ins GPT-2 uses for bytes 0..255 (bytes_to_unicode)."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = itertools.count(256)
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def gpt2_vocab(n_tokens: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): specials, 256 bytes, then merged pairs up to n_tokens."""
    tokens = [*SPECIAL_TOKENS, *gpt2_byte_alphabet()]
    n_merges = n_tokens - len(tokens)
    if n_merges < 0:
        raise ValueError(f"a byte-level vocab needs at least {len(tokens)} tokens")
    letters = string.ascii_lowercase
    pairs = [("Ġ", c) for c in letters] + list(itertools.product(letters, letters))
    merges = [f"{a} {b}" for a, b in pairs[:n_merges]]
    tokens += [a + b for a, b in pairs[:n_merges]]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, types, merges


# --- models ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySpec:
    n_layers: int = 2
    dim: int = 64             # D
    n_heads: int = 4          # H
    n_kv_heads: int = 2       # KVH
    ffn_dim: int = 128        # F
    vocab: int = 300          # V
    context: int = 128
    qtype: QT = QT.F32        # type of every matrix
    embd_qtype: QT | None = None   # token_embd type; None = qtype
    tied: bool = True         # no output.weight: the output projection reuses token_embd
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0


def k_spec(qtype: QT, **kw) -> TinySpec:
    """A spec whose matrices have whole 256-blocks per row (D=256, F=512), for K-quants."""
    return TinySpec(dim=256, ffn_dim=512, qtype=qtype, **kw)


def tensor_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, name -> NumPy shape (out, in), in file order."""
    D, F, V = spec.dim, spec.ffn_dim, spec.vocab
    KVD = spec.n_kv_heads * (D // spec.n_heads)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, D)}
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (D,), p + "attn_q.weight": (D, D), p + "attn_k.weight": (KVD, D),
            p + "attn_v.weight": (KVD, D), p + "attn_output.weight": (D, D),
            p + "ffn_norm.weight": (D,), p + "ffn_gate.weight": (F, D), p + "ffn_up.weight": (F, D),
            p + "ffn_down.weight": (D, F),
        })
    shapes["output_norm.weight"] = (D,)
    if not spec.tied:
        shapes["output.weight"] = (V, D)
    return shapes


def write_tiny_model(path: str | Path, spec: TinySpec = TinySpec(), *, arch: str = "llama",
                     tensor_types: dict[str, QT] | None = None, drop: tuple[str, ...] = (),
                     shapes: dict[str, tuple[int, ...]] | None = None,
                     truncate_bytes: int = 0) -> Path:
    """Write a random llama GGUF. Corruptions for loader tests:
    arch          another general.architecture (keys are written under that prefix)
    tensor_types  name -> type overriding the spec (any ggml type; unsupported ones get random bytes)
    drop          tensor names left out
    shapes        name -> shape overriding the right one
    truncate_bytes  cut this many bytes off the end of the finished file
    """
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tensor_types = tensor_types or {}
    shapes = {**tensor_shapes(spec), **(shapes or {})}
    tokens, types, merges = gpt2_vocab(spec.vocab)

    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-random-llama")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_dimension_count(spec.dim // spec.n_heads)
    w.add_vocab_size(spec.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(0)

    for name, shape in shapes.items():
        if name in drop:
            continue
        if len(shape) == 1:                                   # norm weights: F32, near 1
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        default = spec.qtype
        if name == "token_embd.weight" and spec.embd_qtype is not None:
            default = spec.embd_qtype
        qtype = tensor_types.get(name, default)
        std = 1.0 / np.sqrt(shape[1])
        if qtype in FLOAT_TYPES or qtype in BLOCK_TYPES:
            data = random_weight(qtype, shape, rng, std)
            w.add_tensor(name, data, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
        else:
            w.add_tensor(name, raw_bytes_of_type(qtype, shape, rng), raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_bytes:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - truncate_bytes)
    return path
