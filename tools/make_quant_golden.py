"""Record llama.cpp's logits on files llama.cpp quantized itself, for tests/test_quant_fidelity.py.

    tox -e oracle            (or: python tools/make_quant_golden.py [--threads 2])

The files are those of tests/llama_quantized.py: the default model requantized to every file type
but IQ1-IQ3, and the random 1024-wide model quantized `pure` to each type llama.cpp falls back to
or that needs whole 256-blocks. For each file this writes its sha256 and tensor type counts (read
with gguf-py) and, per prompt and position, llama.cpp's top-TOP_K logits (ids and values) and its
logits at SAMPLE fixed vocabulary ids, into tests/data/golden_quants.npz (about 2 MB). The default
model's prompts are the base-model goldens' seven (tools/make_golden.py).

It also records how far llama.cpp is from itself on each file: the same prompts evaluated in
batches of SELF_BATCH tokens instead of all at once change which activations round which way
(docs/benchmarks.md compares that with our distance from llama.cpp).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

from edgelora_np.default_model import sha256_of

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import llama_quantized as lq  # noqa: E402
from make_golden import PROMPTS  # noqa: E402

DEFAULT_PROMPTS = tuple(PROMPTS)
TOP_K = 8
SAMPLE = 64
SELF_BATCH = 8
SAMPLE_SEED = 20261130


def sample_ids(vocab: int) -> np.ndarray:
    rng = np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(vocab, size=min(SAMPLE, vocab), replace=False)).astype(np.int32)


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return dict(sorted(counts.items()))


def llama_logits(path: Path, token_lists: list[list[int]], threads: int,
                 n_batch: int = 512) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, n_threads=threads, n_threads_batch=threads,
                          flash_attn=False, verbose=False)
    out = []
    for tokens in token_lists:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[:len(tokens)], np.float32))             # [n, V]
    return out


def summarize(prefix: str, logits: np.ndarray, sample: np.ndarray, arrays: dict) -> None:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]                 # [n, TOP_K]
    arrays[f"{prefix}/top_ids"] = top.astype(np.int32)
    arrays[f"{prefix}/top_logits"] = np.take_along_axis(logits, top, axis=1)
    arrays[f"{prefix}/sample_logits"] = logits[:, sample]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent.parent / "tests" / "data" / "golden_quants.npz")
    args = ap.parse_args()
    import llama_cpp

    from edgelora_np.default_model import resolve_model_path

    vocab_only = llama_cpp.Llama(str(resolve_model_path()), vocab_only=True, verbose=False)
    prompts = {name: vocab_only.tokenize(PROMPTS[name].encode(), add_bos=True, special=True)
               for name in DEFAULT_PROMPTS}
    arrays: dict[str, np.ndarray] = {}
    meta = {"llama_cpp_python": llama_cpp.__version__, "top_k": TOP_K, "files": {},
            "default_prompts": list(DEFAULT_PROMPTS)}
    for name, tokens in prompts.items():
        arrays[f"default/{name}/tokens"] = np.array(tokens, np.int32)
    arrays["default/sample_ids"] = sample_ids(vocab_only.n_vocab())
    arrays["random/sample_ids"] = sample_ids(lq.RANDOM_SPEC["vocab"])
    arrays["random/tokens"] = np.array(lq.random_tokens(), np.int32)

    cases = [("default", f, lq.default_model_file(f)) for f in lq.DEFAULT_MODEL_FTYPES]
    cases += [("random", t.name, lq.random_model_file(t)) for t in lq.RANDOM_MODEL_FTYPES]
    for kind, name, path in cases:
        key = f"{kind}/{name}"
        meta["files"][key] = {"file": path.name, "sha256": sha256_of(path),
                              "tensor_types": tensor_types(path)}
        token_lists = list(prompts.values()) if kind == "default" else [lq.random_tokens()]
        sample = arrays[f"{kind}/sample_ids"]
        full = llama_logits(path, token_lists, args.threads)
        for prompt, logits in zip(prompts if kind == "default" else ["tokens"], full):
            summarize(f"{key}/{prompt}", logits, sample, arrays)
        split = np.concatenate(llama_logits(path, token_lists, args.threads, SELF_BATCH))
        full = np.concatenate(full)
        diff = np.abs(split - full)
        meta["files"][key]["llama_cpp_vs_itself"] = {
            "batch": SELF_BATCH, "mean_diff": float(diff.mean()), "max_diff": float(diff.max()),
            "top1": float((split.argmax(-1) == full.argmax(-1)).mean())}
        print(f"  {key}: {meta['files'][key]['tensor_types']}", file=sys.stderr)
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
