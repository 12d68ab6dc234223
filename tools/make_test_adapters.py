"""Write small seeded LoRA adapters for SmolLM2-135M in llama.cpp's GGUF-LoRA format.

    python tools/make_test_adapters.py [--out tests/data/lora]

The adapters are random, not trained: what the tests need is a change to the logits that is
large enough to see through quantization noise (the "strong" ones move the logits by ~1-3 on
average under llama.cpp) and one small enough to be almost invisible ("weak", ~0.05). They
differ in rank, layers and projections on purpose, so one batch mixes unlike adapters:

    strong_a  rank 8, every third layer (0, 3, ..., 27), all seven projections
    strong_b  rank 4, all 30 layers, attention only (q, k, v, o)
    weak      rank 4, every third layer from 1 (1, 4, ..., 28), all seven projections

File layout (llama.cpp src/llama-adapter.cpp, convert_lora_to_gguf.py): general.type 'adapter',
adapter.type 'lora', adapter.lora.alpha (f32), general.architecture 'llama'; for each adapted
base tensor `blk.N.<proj>.weight` a pair `.lora_a` with NumPy shape [R, in] (ggml ne = [in, R])
and `.lora_b` with NumPy shape [out, R] (ne = [R, out]), stored as F16. llama.cpp computes
    y = W x + scale * alpha / R * (B @ (A @ x))        (llm_graph_context::build_lora_mm)
with `scale` the user's adapter scale. q and k are in GGUF's row order (convert_hf_to_gguf's
LlamaModel.permute), which for random factors only matters when comparing with PEFT.

NumPy and gguf-py only; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora_np.default_model import sha256_of

# SmolLM2-135M: D model dim, KVD = KVH * HD kv dim, F ffn dim, L layers.
D, KVD, F, L = 576, 3 * 64, 1536, 30

# projection -> (in, out) of the base weight y = W x, W of NumPy shape [out, in]
PROJ_DIMS = {
    "attn_q": (D, D), "attn_k": (D, KVD), "attn_v": (D, KVD), "attn_output": (D, D),
    "ffn_gate": (D, F), "ffn_up": (D, F), "ffn_down": (F, D),
}
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
ALL_SEVEN = tuple(PROJ_DIMS)


@dataclass(frozen=True)
class AdapterSpec:
    rank: int                    # R
    alpha: float                 # llama.cpp scales B @ A by alpha / R
    layers: tuple[int, ...]      # adapted layers
    projections: tuple[str, ...]
    strength: float              # std of B * sqrt(R); A has std 1 / sqrt(in)
    seed: int


SPECS = {
    "strong_a": AdapterSpec(rank=8, alpha=16.0, layers=tuple(range(0, L, 3)), projections=ALL_SEVEN,
                            strength=0.2, seed=101),
    "strong_b": AdapterSpec(rank=4, alpha=8.0, layers=tuple(range(L)), projections=ATTENTION,
                            strength=0.2, seed=202),
    "weak": AdapterSpec(rank=4, alpha=8.0, layers=tuple(range(1, L, 3)), projections=ALL_SEVEN,
                        strength=0.008, seed=303),
}


def make_factors(spec: AdapterSpec) -> dict[str, np.ndarray]:
    """{gguf tensor name: float16 array}: A [R, in] and B [out, R] per adapted projection."""
    rng = np.random.default_rng(spec.seed)
    R = spec.rank
    out = {}
    for layer in spec.layers:
        for proj in spec.projections:
            n_in, n_out = PROJ_DIMS[proj]
            a = rng.standard_normal((R, n_in)) / np.sqrt(n_in)                     # [R, in]
            b = rng.standard_normal((n_out, R)) * (spec.strength / np.sqrt(R))   # [out, R]
            name = f"blk.{layer}.{proj}.weight"
            out[f"{name}.lora_a"] = a.astype(np.float16)
            out[f"{name}.lora_b"] = b.astype(np.float16)
    return out


def write_gguf_lora(path: Path, tensors: dict[str, np.ndarray], alpha: float,
                    arch: str = "llama") -> None:
    """A GGUF-LoRA file as llama.cpp's llama_adapter_lora_init reads it."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_nbytes(spec: AdapterSpec) -> int:
    """F16 bytes of the factors: per pair R * (in + out) values of 2 bytes."""
    per_layer = sum(spec.rank * sum(PROJ_DIMS[p]) for p in spec.projections)
    return 2 * per_layer * len(spec.layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent.parent / "tests" / "data" / "lora")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, spec in SPECS.items():
        path = args.out / f"{name}.gguf"
        write_gguf_lora(path, make_factors(spec), spec.alpha)
        manifest[name] = {"file": path.name, "sha256": sha256_of(path), "rank": spec.rank,
                          "alpha": spec.alpha, "layers": list(spec.layers),
                          "projections": list(spec.projections), "strength": spec.strength,
                          "seed": spec.seed}
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, "
              f"{lora_nbytes(spec) / 1e6:.2f} MB of factors)", file=sys.stderr)
    target = args.out / "adapters.json"
    target.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
