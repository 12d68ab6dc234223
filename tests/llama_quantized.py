"""GGUF files quantized by llama.cpp itself, for the fidelity tests of every file type
(tests/test_quant_fidelity.py) and for tools/make_quant_golden.py, which records llama.cpp's
logits on the same files.

llama.cpp's quantizers (its K-quant and IQ4 searches) are not ours to re-implement: the files are
written by llama.cpp's `llama-quantize`, built from the llama-cpp-python 0.3.36 source the other
oracles come from, without native CPU flags, so any x86-64 machine writes the same bytes
(tools/build_llama_quantize.sh; .ci/run builds it, and it is built here on first use). Each
golden records the sha256 of the file it was measured on, and the test checks it.

Two sets of files:
  - the default model (SmolLM2-135M-Instruct Q4_1) requantized to every file type
    llama-quantize offers for a Llama model but the IQ1/IQ2/IQ3 codebook types. Its width, 576,
    is not a multiple of 256, so llama.cpp falls back from the K types to Q5_0/Q5_1/Q8_0/IQ4_NL
    for most matrices: these are the files a SmolLM2 user downloads.
  - the random 1024-wide model of tools/bench_kquant.py, quantized `pure` (every matrix the same
    type): whole 256-blocks everywhere, so each K and IQ4 type is exercised on every matrix.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gguf import GGMLQuantizationType as QT

LLAMA_CPP_VERSION = "0.3.36"
REPO = Path(__file__).resolve().parent.parent

# llama-quantize's names for the file types of a Llama model, minus the IQ1/IQ2/IQ3 ones.
DEFAULT_MODEL_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
                        "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS",
                        "F16", "BF16", "F32")
# The random model, `pure`: the ftype that makes every matrix of this tensor type.
RANDOM_MODEL_FTYPES = {QT.Q2_K: "Q2_K", QT.Q3_K: "Q3_K_M", QT.Q4_K: "Q4_K_M",
                       QT.Q5_K: "Q5_K_M", QT.Q6_K: "Q6_K", QT.IQ4_XS: "IQ4_XS",
                       QT.IQ4_NL: "IQ4_NL", QT.Q5_0: "Q5_0", QT.Q5_1: "Q5_1"}
# tools/bench_kquant.py's model, F16 before llama.cpp quantizes it.
RANDOM_SPEC = dict(n_layers=8, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816, vocab=960,
                   context=512, tied=False, seed=7)


def cache_dir() -> Path:
    root = os.environ.get("EDGELORA_CACHE") or Path.home() / ".cache" / "edgelora_np"
    return Path(root)


def llama_quantize() -> Path:
    """The llama-quantize binary: $EDGELORA_LLAMA_QUANTIZE, else the cached build, else built now
    by tools/build_llama_quantize.sh (a few minutes; needs cmake and a C++ compiler)."""
    if os.environ.get("EDGELORA_LLAMA_QUANTIZE"):
        return Path(os.environ["EDGELORA_LLAMA_QUANTIZE"])
    binary = cache_dir() / f"llama-quantize-{LLAMA_CPP_VERSION}" / "llama-quantize"
    if not binary.exists():
        subprocess.run(["bash", str(REPO / "tools" / "build_llama_quantize.sh")], check=True)
    return binary


def quantize(source: Path, target: Path, ftype: str, pure: bool = False) -> Path:
    """llama.cpp's `ftype` version of the GGUF `source`, written once to `target`."""
    if not target.exists():
        partial = target.with_suffix(".partial")
        args = [str(llama_quantize()), "--allow-requantize", *(["--pure"] if pure else []),
                str(source), str(partial), ftype, "2"]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
        partial.rename(target)
    return target


def default_model_file(ftype: str) -> Path:
    from edgelora_np.default_model import resolve_model_path

    out = cache_dir() / "quantized" / f"SmolLM2-135M-Instruct.{ftype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    return quantize(resolve_model_path(), out, ftype)


def random_model_file(qtype: QT) -> Path:
    from tiny_model import TinySpec, write_tiny_model

    folder = cache_dir() / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "random-1024-F16.gguf"
    if not source.exists():
        write_tiny_model(source.with_suffix(".partial"), TinySpec(qtype=QT.F16, **RANDOM_SPEC))
        source.with_suffix(".partial").rename(source)
    return quantize(source, folder / f"random-1024-{qtype.name}.gguf",
                    RANDOM_MODEL_FTYPES[qtype], pure=True)


def random_tokens(n: int = 64) -> list[int]:
    """tools/bench_kquant.py's tokens for the random model."""
    import numpy as np

    return np.random.default_rng(0).integers(3, RANDOM_SPEC["vocab"], n).tolist()
