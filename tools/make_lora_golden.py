"""Record llama.cpp's logits with the test LoRA adapters applied, for the LoRA fidelity tests.

    python tools/make_test_adapters.py          # tests/data/lora/{strong_a,strong_b,weak}.gguf
    python tools/make_peft_golden.py            # (trainvenv) tests/data/lora/peft_strong/
    python tools/make_lora_golden.py [--model PATH] [--out DIR]

Runs llama.cpp (llama-cpp-python, a tools-only dependency) on the default GGUF model with each
case of CASES: an adapter file and its scale, set on one context with llama_set_adapters_lora,
and "base" with no adapter, so tests can compare the logit change an adapter causes on both
sides. The PEFT adapter (tests/data/lora/peft_strong/) is converted to a GGUF-LoRA file the
way llama.cpp's convert_lora_to_gguf.py does (see peft_to_gguf_factors) in a temporary
directory, so the same adapter has a quantized oracle (llama.cpp) and a float one (PEFT).

tests/data/lora/golden_lora_llamacpp.npz holds, as tools/make_golden.py does per position:
    sample_ids                       [1024]    the vocabulary sample (make_golden.sample_ids)
    <prompt>/tokens                  [n]       llama.cpp's tokens (special=True, no BOS)
    <case>/<prompt>/top_ids          [n, 64]   ids of the 64 largest logits, largest first
    <case>/<prompt>/top_logits       [n, 64]   their logits
    <case>/<prompt>/sample_logits    [n, 1024] the logits at sample_ids
    <case>/<prompt>/greedy           [12]      greedy continuation (llama.cpp's argmax)
    meta_json                        cases (adapter, sha256, scale, measured change), prompts
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgelora_np.default_model import sha256_of

sys.path.insert(0, str(Path(__file__).parent))
from make_golden import GOLDEN_TOP_K, PROMPTS, _greedy, sample_ids  # noqa: E402

LORA_DIR = Path(__file__).parent.parent / "tests" / "data" / "lora"
LORA_PROMPTS = ("prose", "story", "code", "chat")
N_GREEDY = 12

# case -> (adapter in tests/data/lora, or None for the base model; llama.cpp adapter scale)
CASES = {
    "base": (None, 0.0),
    "strong_a": ("strong_a.gguf", 1.0),
    "strong_a_half": ("strong_a.gguf", 0.5),
    "strong_b": ("strong_b.gguf", 1.0),
    "weak": ("weak.gguf", 1.0),
    "peft_strong": ("peft_strong", 1.0),
}

# PEFT module path -> GGUF tensor name (gguf-py's TensorNameMap for llama)
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def position_arrays(logits: np.ndarray, sample: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: top-k ids and logits, and the logits at the sample ids."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :GOLDEN_TOP_K]      # [n, top_k]
    return {"top_ids": top.astype(np.int32),
            "top_logits": np.take_along_axis(logits, top, axis=1).astype(np.float32),
            "sample_logits": logits[:, sample].astype(np.float32)}       # [n, n_sample]


def change_stats(case: dict[str, np.ndarray], base: dict[str, np.ndarray], prompts) -> dict:
    """Mean |logit change| at the sample ids and the share of positions whose top-1 changed."""
    diff = np.concatenate([np.abs(case[f"{p}/sample_logits"] - base[f"{p}/sample_logits"]).ravel()
                           for p in prompts])
    moved = np.concatenate([case[f"{p}/top_ids"][:, 0] != base[f"{p}/top_ids"][:, 0]
                            for p in prompts])
    return {"mean_abs_change": round(float(diff.mean()), 4),
            "max_abs_change": round(float(diff.max()), 4),
            "top1_changed": round(float(moved.mean()), 4)}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q/k (convert_hf_to_gguf.py LlamaModel.permute): within each head,
    rows [0, 2, 4, ..., 1, 3, 5, ...] of the rotary pairs. w [out, ...] -> [out, ...]."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def peft_to_gguf_factors(adapter_dir: Path, n_head: int, n_head_kv: int
                         ) -> tuple[dict[str, np.ndarray], float]:
    """A PEFT LoRA directory as GGUF-LoRA tensors and alpha, as convert_lora_to_gguf.py writes
    them: lora_A [R, in] and lora_B [out, R] unchanged, except that the q and k permutation acts
    on lora_B's rows (LoraTorchTensor.permute permutes only B). PEFT scales B @ A by
    lora_alpha / r, llama.cpp by alpha / R: the same number when there is one r and alpha."""
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is not supported by this converter")
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is not supported by this converter")
    state = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, value in state.items():
        # base_model.model.model.layers.N.<module>.lora_<A|B>.weight
        prefix, _, tail = key.partition(".layers.")
        layer, _, rest = tail.partition(".")
        module, _, factor = rest.rpartition(".lora_")
        if prefix != "base_model.model.model" or module not in HF_TO_GGUF:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r}")
        proj = HF_TO_GGUF[module]
        if factor == "B.weight" and proj in ("attn_q", "attn_k"):
            value = permute_rows(value, n_head if proj == "attn_q" else n_head_kv)
        suffix = {"A.weight": "lora_a", "B.weight": "lora_b"}[factor]
        out[f"blk.{layer}.{proj}.weight.{suffix}"] = np.ascontiguousarray(value)
    return out, float(config["lora_alpha"])


class AdapterSwitch:
    """One llama.cpp context whose single active LoRA adapter (or none) can be changed."""

    def __init__(self, llm):
        self.llm = llm
        self.loaded: dict[Path, object] = {}

    def set(self, path: Path | None, scale: float) -> None:
        import llama_cpp

        if path is None:
            rc = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            if path not in self.loaded:
                adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model,
                                                            str(path).encode("utf-8"))
                if adapter is None:
                    raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
                self.loaded[path] = adapter
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.loaded[path])
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora({path}, {scale}) returned {rc}")


def record(model_path: Path, lora_dir: Path, workdir: Path, n_threads: int) -> dict[str, np.ndarray]:
    import llama_cpp
    from make_test_adapters import write_gguf_lora

    llm = llama_cpp.Llama(str(model_path), n_ctx=512, n_batch=512, logits_all=True,
                          n_threads=n_threads, flash_attn=False, verbose=False)
    sample = sample_ids(llm.n_vocab())
    arrays = {"sample_ids": sample}
    meta = {"llama_cpp_python": llama_cpp.__version__, "model": model_path.name,
            "model_sha256": sha256_of(model_path), "top_k": GOLDEN_TOP_K, "n_greedy": N_GREEDY,
            "prompts": {p: PROMPTS[p] for p in LORA_PROMPTS}, "cases": {}}
    tokens = {p: llm.tokenize(PROMPTS[p].encode("utf-8"), add_bos=True, special=True)
              for p in LORA_PROMPTS}
    for p, ids in tokens.items():
        arrays[f"{p}/tokens"] = np.array(ids, np.int32)

    switch = AdapterSwitch(llm)
    per_case: dict[str, dict[str, np.ndarray]] = {}
    for case, (adapter, scale) in CASES.items():
        path = None if adapter is None else lora_dir / adapter
        info = {"adapter": adapter, "scale": scale}
        if path is not None and path.is_dir():                  # a PEFT directory
            info["sha256"] = sha256_of(path / "adapter_model.safetensors")
            arch = llm.metadata["general.architecture"]
            tensors, alpha = peft_to_gguf_factors(
                path, int(llm.metadata[f"{arch}.attention.head_count"]),
                int(llm.metadata[f"{arch}.attention.head_count_kv"]))
            path = workdir / f"{adapter}.gguf"
            write_gguf_lora(path, tensors, alpha)
            info["converted"] = "peft_to_gguf_factors (q/k lora_B rows permuted to GGUF order)"
        elif path is not None:
            info["sha256"] = sha256_of(path)
        switch.set(path, scale)
        rows: dict[str, np.ndarray] = {}
        for p, ids in tokens.items():
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)       # [n, V]
            for key, value in position_arrays(logits, sample).items():
                rows[f"{p}/{key}"] = value
            rows[f"{p}/greedy"] = np.array(_greedy(llm, ids, N_GREEDY), np.int32)
        switch.set(None, 0.0)
        per_case[case] = rows
        if case != "base":
            info.update(change_stats(rows, per_case["base"], LORA_PROMPTS))
        meta["cases"][case] = info
        arrays.update({f"{case}/{k}": v for k, v in rows.items()})
        print(f"  {case}: {info}", file=sys.stderr)
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False))
    return arrays


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    ap.add_argument("--lora-dir", type=Path, default=LORA_DIR)
    ap.add_argument("--out", type=Path, default=LORA_DIR)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from edgelora_np.default_model import resolve_model_path
        args.model = resolve_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        arrays = record(args.model, args.lora_dir, Path(tmp), args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "golden_lora_llamacpp.npz"
    np.savez_compressed(target, **arrays)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
