"""The shape of a Llama model, read once from GGUF metadata and checked.

Shape letters used across edgelora_np:
    B tokens in a batch        D model dim (embedding_length)   V vocabulary
    H query heads              KVH key/value heads              HD head dim = D / H
    F feed-forward dim         L layers                         R LoRA rank, S segments
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgelora_np.errors import GGUFFormatError, UnsupportedModelError
from edgelora_np.gguf.reader import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)
MAX_COUNT = 1 << 24          # bound on any size in the metadata (dims, heads, context, vocab)


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int            # L, transformer blocks
    dim: int                 # D, residual stream width
    n_heads: int             # H, query heads
    n_kv_heads: int          # KVH, key/value heads (grouped-query attention when < H)
    head_dim: int            # HD, per-head width
    ffn_dim: int             # F, SwiGLU hidden width
    vocab_size: int          # V
    context_length: int      # positions the model was trained for
    rope_base: float         # RoPE theta base (freq_base)
    rope_dim: int            # leading dims of each head that RoPE rotates (usually HD)
    rope_freq_scale: float   # linear RoPE scaling: positions are multiplied by this
    rms_eps: float           # RMSNorm epsilon
    name: str = ""           # general.name, for display

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def config_from_gguf(gf: GGUFFile) -> LlamaConfig:
    arch = gf.field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gf.path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    file_type = gf.fields.get("general.type", "model")   # optional key; absent means a model
    if file_type != "model":
        raise UnsupportedModelError(f"{gf.path}: general.type is {file_type!r}, expected 'model'")

    def count(name, default=None, minimum=1):
        return _count(gf, f"{arch}.{name}", default, minimum)

    def number(name, default=None):
        return _number(gf, f"{arch}.{name}", default)

    dim = count("embedding_length")
    n_heads = count("attention.head_count")
    n_kv_heads = count("attention.head_count_kv", n_heads)
    head_dim = count("attention.key_length", max(dim // n_heads, 1))
    embd = gf.tensor("token_embd.weight")
    vocab = count("vocab_size", embd.shape[0])
    scaling = gf.fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"{gf.path}: rope scaling {scaling!r} is not supported")
    factor = number("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
    cfg = LlamaConfig(
        n_layers=count("block_count", minimum=0),     # 0: embed -> norm -> output
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=count("feed_forward_length"),
        vocab_size=vocab,
        context_length=count("context_length"),
        rope_base=number("rope.freq_base", 10000.0),
        rope_dim=count("rope.dimension_count", head_dim),
        rope_freq_scale=1.0 / factor if factor else 1.0,
        rms_eps=number("attention.layer_norm_rms_epsilon"),
        name=str(gf.fields.get("general.name", "")),
    )
    _check(cfg, gf)
    return cfg


def _count(gf: GGUFFile, key: str, default=None, minimum: int = 1) -> int:
    """A metadata size (dims, heads, layers): an integer in minimum..MAX_COUNT."""
    value = gf.field(key) if default is None else gf.fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise GGUFFormatError(f"{gf.path}: metadata {key} is {value!r}, expected an integer in "
                              f"{minimum}..{MAX_COUNT}")
    return value


def _number(gf: GGUFFile, key: str, default=None) -> float:
    """A metadata float (rope base, epsilon, scaling factor): finite and >= 0."""
    value = gf.field(key) if default is None else gf.fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise GGUFFormatError(f"{gf.path}: metadata {key} is {value!r}, expected a finite "
                              f"number >= 0")
    return float(value)


def _check(cfg: LlamaConfig, gf: GGUFFile) -> None:
    problems = []
    if cfg.n_heads % cfg.n_kv_heads:
        problems.append(f"head_count {cfg.n_heads} is not a multiple of head_count_kv "
                        f"{cfg.n_kv_heads}")
    if cfg.q_dim != cfg.dim:
        problems.append(f"heads x head_dim = {cfg.q_dim} differs from embedding_length {cfg.dim}")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        problems.append(f"rope dimension_count {cfg.rope_dim} does not fit head_dim "
                        f"{cfg.head_dim}")
    if cfg.dim % 32 or cfg.ffn_dim % 32:
        problems.append(f"embedding_length {cfg.dim} and feed_forward_length {cfg.ffn_dim} "
                        f"must be multiples of 32")
    if problems:
        raise GGUFFormatError(f"{gf.path}: inconsistent llama metadata: " + "; ".join(problems))
