"""Record llama.cpp's tokens and logits on a fixed set of prompts, for the fidelity tests.

    tox -e oracle            (or: python tools/make_golden.py [--model PATH] [--out DIR])

Runs llama.cpp through llama-cpp-python (a tools-only dependency) on the same GGUF file the
engine loads, with logits for every position (logits_all=True), flash attention off, and
writes tests/data/golden_<model>.npz. A full logit matrix is 49152 floats per position, so the
file keeps, per position, the top GOLDEN_TOP_K logits (ids and values) and the logits at a fixed
random sample of GOLDEN_SAMPLE vocabulary ids: enough to compare top-1 choices, margins, and the
mean and max absolute logit difference, in a file small enough to commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgelora_np.default_model import sha256_of

GOLDEN_TOP_K = 64
GOLDEN_SAMPLE = 1024
SAMPLE_SEED = 20260101

LONG_PROMPT = (
    "The history of the bicycle spans more than two centuries. Early designs, such as the "
    "draisine of 1817, had no pedals at all: riders pushed themselves along with their feet. "
    "Pedals attached to the front wheel arrived in the 1860s, and the high-wheeled 'penny "
    "farthing' followed, fast but dangerous. The safety bicycle of the 1880s, with two wheels "
    "of equal size and a chain driving the rear wheel, settled the basic shape that most "
    "bicycles still have today. Pneumatic tyres, invented by John Boyd Dunlop in 1888, made "
    "riding far more comfortable, and within a decade cycling clubs had spread across Europe "
    "and North America. Bicycles changed how people travelled to work, gave women new "
    "independence, and even influenced the early aviation pioneers, since the Wright brothers "
    "ran a bicycle shop before they built their first aeroplane. Today engineers continue to "
    "refine frames, gears and brakes, while cities build dedicated lanes to keep riders safe."
)

PROMPTS = {
    "prose": "The capital of France is",
    "story": "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
    "numbers": "Compute 1234 + 5678 = 6912, then 3.14159 * 2 = 6.28318, and 2^10 = 1024.",
    "non_ascii": "Café, naïve, Straße, 東京, Москва, and emoji 🚲🌍 are all unicode text.",
    "chat": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "Name three primary colours.<|im_end|>\n<|im_start|>assistant\n"),
    "long": LONG_PROMPT,
}


# Texts for tokenizer exactness: llama.cpp's token ids for each, with and without parsing
# special tokens, under SmolLM2's own pre-tokenizer and re-labelled with other pre types.
TOKENIZER_TEXTS = [
    "", " ", "  ", "\n", "\n\n", " \n", "\t", "Hello world", "Hello  world", " Hello",
    "It's a dog's life; I'm sure we'll've done it. DON'T SHOUT. I'LL GO, he'S",
    "The quick brown fox jumps over the lazy dog.\nThe end.\r\nWindows line.\r\n",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "12345 1,234,567.89 3.14159 2024-11-24 0x1F 1e-10 -42 +7 007",
    "Numbers: \u0661\u0662\u0663 \uff10\uff11 \u00b2\u00b3 \u00bd",
    "h\u00e9llo w\u00f6rld \u00e7a va? na\u00efve caf\u00e9",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u4e2d\u6587\u3002\ud55c\uad6d\uc5b4",
    "emoji \U0001f389\U0001f389 \U0001f44d\U0001f3fd \u2764\ufe0f \u2728",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>", "<|im_start", "x<|im_end|>y", "<|im_start|> x",
    "nbsp\u00a0here ideographic\u3000space", "zero\u200bwidth", "\x01\x1c\x7f",
    "  leading and trailing   ", "a\tb\t\tc \t d", "!!!???...,,,;;;", "a---b___c===d",
    "$100 + 50% = <html> ^_^ ~~ ||", "email@example.com https://example.com/path?q=1&r=2#frag",
    "CamelCase XMLHttpRequest iPhone McDonald's \u00c9COLE \u00c9cole", "x  \n  y\n\n\nz \t\n",
    "'s 'S 'll 'LL 've 're 'd 'm 't", "(a+b)*[c-d]/e{f}", "\u00a1Hola! \u00bfQu\u00e9 tal?",
    *PROMPTS.values(),
]
TOKENIZER_PRE_TYPES = ["smollm", "gpt-2", "llama-bpe", "qwen2", "tekken", "default"]


def record_tokenizer(model_path: Path, workdir: Path) -> dict:
    """{pre: {"plain": [[ids]...], "special": [[ids]...]}} from llama.cpp's tokenizer."""
    import gguf
    import llama_cpp

    reader = gguf.GGUFReader(model_path)
    out = {"texts": TOKENIZER_TEXTS, "pre": {}}
    for pre in TOKENIZER_PRE_TYPES:
        path = workdir / f"vocab-{pre}.gguf"
        _write_metadata_only(reader, path, {"tokenizer.ggml.pre": pre})
        oracle = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        out["pre"][pre] = {
            kind: [oracle.tokenize(t.encode("utf-8"), add_bos=False, special=special)
                   for t in TOKENIZER_TEXTS]
            for kind, special in (("plain", False), ("special", True))}
        del oracle
    return out


def _write_metadata_only(reader, target: Path, changes: dict) -> None:
    """Copy a GGUF file's metadata, with `changes`, to a file without tensors."""
    import gguf

    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue                                   # GGUFWriter writes these itself
        value = changes[key] if key in changes else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def sample_ids(vocab: int) -> np.ndarray:
    rng = np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(vocab, size=min(GOLDEN_SAMPLE, vocab), replace=False)).astype(np.int32)


def record(model_path: Path, n_threads: int) -> dict[str, np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), n_ctx=1024, n_batch=512, logits_all=True,
                          n_threads=n_threads, flash_attn=False, verbose=False)
    vocab = llm.n_vocab()
    sample = sample_ids(vocab)
    arrays = {"sample_ids": sample}
    meta = {"llama_cpp_python": llama_cpp.__version__, "model": model_path.name,
            "model_sha256": sha256_of(model_path), "top_k": GOLDEN_TOP_K, "prompts": {}}
    for name, text in PROMPTS.items():
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)          # [n, V]
        top = np.argsort(-logits, axis=1, kind="stable")[:, :GOLDEN_TOP_K]      # [n, top_k]
        arrays[f"{name}/tokens"] = np.array(tokens, np.int32)
        arrays[f"{name}/top_ids"] = top.astype(np.int32)
        arrays[f"{name}/top_logits"] = np.take_along_axis(logits, top, axis=1)
        arrays[f"{name}/sample_logits"] = logits[:, sample]
        greedy = _greedy(llm, tokens, 12)
        arrays[f"{name}/greedy"] = np.array(greedy, np.int32)
        meta["prompts"][name] = {"text": text, "n_tokens": len(tokens),
                                 "greedy_text": llm.detokenize(greedy).decode("utf-8", "replace")}
        print(f"  {name}: {len(tokens)} tokens", file=sys.stderr)
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False))
    return arrays


def _greedy(llm, tokens: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from edgelora_np.default_model import resolve_model_path
        args.model = resolve_model_path()
    arrays = record(args.model, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "golden_logits.npz"
    np.savez_compressed(target, **arrays)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tokens = record_tokenizer(args.model, Path(tmp))
    target = args.out / "golden_tokens.json"
    target.write_text(json.dumps(tokens, ensure_ascii=False))
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
