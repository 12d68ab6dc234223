"""Model weights: GGUF tensors repacked for the kernels, checked against the config.

Tensor names follow llama.cpp's llama layout (blk.N.attn_q.weight, ...). NumPy shapes are
(out_features, in_features). The q and k rows come from the GGUF converter already permuted
so that RoPE rotates adjacent pairs (see model/rope.py).

After loading, nothing references the memory-mapped file: the repacked arrays are the only
copy, so resident memory is about the size of the weights in the file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from edgelora_np.errors import GGUFFormatError, UnsupportedQuantError
from edgelora_np.gguf.quants import dequantize
from edgelora_np.gguf.reader import GGUFFile, TensorInfo
from edgelora_np.kernels.pack import PackedMatrix, pack_stacked
from edgelora_np.model.config import LlamaConfig

# The seven linear projections of a block that LoRA adapters may target, in GGUF naming.
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class LayerWeights:
    attn_norm: np.ndarray                 # [D] float32
    qkv: tuple[PackedMatrix, ...]          # q|k|v fused into one [D + 2*KVD, D], or three parts
    wo: PackedMatrix                       # [D, D]
    ffn_norm: np.ndarray                   # [D]
    gate_up: tuple[PackedMatrix, ...]      # gate|up fused into one [2F, D], or two parts
    down: PackedMatrix                     # [D, F]


@dataclass
class ModelWeights:
    token_embd: PackedMatrix               # [V, D]
    layers: list[LayerWeights]
    output_norm: np.ndarray                # [D]
    output: PackedMatrix                   # [V, D]; the same object as token_embd when tied
    rope_freq_factors: np.ndarray | None   # [rope_dim/2] (Llama 3.1 style), or None

    @property
    def nbytes(self) -> int:
        mats = [self.token_embd] + ([self.output] if self.output is not self.token_embd else [])
        for layer in self.layers:
            mats += [*layer.qkv, layer.wo, *layer.gate_up, layer.down]
        total = sum(m.nbytes for m in mats)
        return total + sum(x.attn_norm.nbytes + x.ffn_norm.nbytes for x in self.layers)


def load_weights(gf: GGUFFile, cfg: LlamaConfig, n_threads: int) -> ModelWeights:
    D, KVD, F, V = cfg.dim, cfg.kv_dim, cfg.ffn_dim, cfg.vocab_size

    def vector(name: str, n: int) -> np.ndarray:
        t = _expect(gf, name, (n,))
        with _in_file(gf):
            v = dequantize(t.data, t.qtype, (n,), name=name)
        gf.release_all()
        return v

    def matrices(shapes: dict[str, tuple[int, int]]) -> tuple[PackedMatrix, ...]:
        """The named matrices, stacked by rows into one when they share a type (q|k|v,
        gate|up: one kernel call and one activation quantization for all of them)."""
        infos = [_expect(gf, name, shape) for name, shape in shapes.items()]
        groups = [infos] if len({t.qtype for t in infos}) == 1 else [[t] for t in infos]
        with _in_file(gf):
            packed = tuple(pack_stacked([(t.data, t.shape[0]) for t in group], group[0].qtype,
                                        group[0].shape[1], n_threads,
                                        "+".join(t.name for t in group))
                           for group in groups)
        gf.release_all()
        return packed

    def matrix(name: str, rows: int, cols: int) -> PackedMatrix:
        return matrices({name: (rows, cols)})[0]

    token_embd = matrix("token_embd.weight", V, D)
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=vector(p + "attn_norm.weight", D),
            qkv=matrices({p + "attn_q.weight": (D, D), p + "attn_k.weight": (KVD, D),
                          p + "attn_v.weight": (KVD, D)}),
            wo=matrix(p + "attn_output.weight", D, D),
            ffn_norm=vector(p + "ffn_norm.weight", D),
            gate_up=matrices({p + "ffn_gate.weight": (F, D), p + "ffn_up.weight": (F, D)}),
            down=matrix(p + "ffn_down.weight", D, F),
        ))
    output = matrix("output.weight", V, D) if "output.weight" in gf.tensors else token_embd
    freq = vector("rope_freqs.weight", cfg.rope_dim // 2) if "rope_freqs.weight" in gf.tensors \
        else None
    return ModelWeights(token_embd, layers, vector("output_norm.weight", D), output, freq)


@contextlib.contextmanager
def _in_file(gf: GGUFFile):
    """Errors of the quant decoders name a tensor; this adds the file (an unsupported type)."""
    try:
        yield
    except (GGUFFormatError, UnsupportedQuantError) as e:
        raise type(e)(f"{gf.path}: {e}") from None


def _expect(gf: GGUFFile, name: str, shape: tuple[int, ...]) -> TensorInfo:
    t = gf.tensor(name)
    if t.shape != shape:
        raise GGUFFormatError(f"{gf.path}: tensor {name!r} has shape {t.shape}, expected {shape}")
    return t
