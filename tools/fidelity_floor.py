"""How close to llama.cpp's logits can an independent engine get? The floor under issue #14's
fidelity target, measured on the engine fidelity prompts (tests/data/golden_logits.npz).

    python tools/fidelity_floor.py          (needs llama-cpp-python: tools/install_llama_cpp_python.sh)

Prints the mean and max |logit difference|, over the golden's sampled and top-64 logits, of:
  - edgelora_np against the golden (what tests/test_fidelity.py bounds);
  - llama.cpp against its own golden, run as recorded (n_batch 512: 0 if this build rounds as
    the recording one did) and one token per batch (n_batch 1: llama.cpp's own disagreement
    with itself when only the batching changes);
  - edgelora_np against itself with one stage's outputs moved by one float32 ulp in 40% of
    their elements (a seeded random choice): how far a last-bit difference in any one stage
    spreads through 30 layers of 8-bit activation rounding.

    python tools/fidelity_floor.py --stages [PROMPT]

instead feeds each stage of block 0 llama.cpp's own inputs (captured with its eval callback)
and counts the outputs that differ from llama.cpp's in any bit: which stages round as it does.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

GOLDEN_PATH = Path(__file__).parent.parent / "tests" / "data" / "golden_logits.npz"


def golden_diffs(golden, logits: dict[str, np.ndarray]) -> np.ndarray:
    """|ours - golden| over each prompt's sampled and top-k logits, as the fidelity test takes them."""
    parts = []
    for name, lg in logits.items():
        parts.append(np.abs(lg[:, golden["sample_ids"]] - golden[f"{name}/sample_logits"]).ravel())
        top = np.take_along_axis(lg, golden[f"{name}/top_ids"], axis=1)
        parts.append(np.abs(top - golden[f"{name}/top_logits"]).ravel())
    return np.concatenate(parts)


def llama_cpp_logits(model: str, prompts: dict[str, np.ndarray], n_batch: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                          n_threads=2, flash_attn=False, verbose=False)
    out = {}
    for name, tokens in prompts.items():
        llm.reset()
        llm.eval(tokens.tolist())
        out[name] = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    return out


def perturbed_runs(model: str, prompts: dict[str, np.ndarray]):
    """(stage, our logits with that stage moved by one ulp) for each stage, and the baseline."""
    import edgelora_np as el
    import edgelora_np.model.llama as forward

    m = el.load_model(model, progress=False)
    rng = np.random.default_rng(0)

    def run() -> dict[str, np.ndarray]:
        return {n: m.logits(t) for n, t in prompts.items()}

    def nudge(a: np.ndarray) -> None:
        a *= (1 + np.float32(2.0 ** -23) * rng.choice([-1, 0, 0, 0, 1], size=a.shape)).astype(np.float32)

    def nudged(f, result):
        def wrapper(*args):
            y = f(*args)
            nudge(result(args, y))
            return y
        return wrapper

    # (stage, function of model/llama.py, where its result lands: returned or the out argument)
    stages = [("matmul outputs", "matmul", lambda args, y: y),
              ("attention output", "attention", lambda args, y: args[-1]),
              ("SwiGLU output", "swiglu", lambda args, y: args[-1])]
    yield "none (baseline)", run()
    for label, attr, result in stages:
        original = getattr(forward, attr)
        setattr(forward, attr, nudged(original, result))
        try:
            yield label, run()
        finally:
            setattr(forward, attr, original)


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h, llama-cpp-python 0.3.36), as far as reading a result needs."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def llama_cpp_block0(model: str, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """llama.cpp's named results of block 0 ("attn_norm-0", "Qcur-0", ...), by name; a name
    seen again (a reshaped or rotated view) gets "#1", "#2"."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    seen: dict[str, np.ndarray] = {}

    @lib.ggml_backend_sched_eval_callback
    def observe(ptr, ask, _):
        t = ctypes.cast(ptr, ctypes.POINTER(_GGMLTensor)).contents
        name = t.name.decode()
        if ask:
            return name.endswith("-0")
        if t.type in (0, 1) and t.data:                      # GGML_TYPE_F32, GGML_TYPE_F16
            dtype = np.dtype(np.float32 if t.type == 0 else np.float16)
            span = sum((n - 1) * s for n, s in zip(t.ne, t.nb)) + dtype.itemsize
            flat = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype)
            count = sum(k.split("#")[0] == name for k in seen)
            seen[f"{name}#{count}" if count else name] = np.lib.stride_tricks.as_strided(
                flat, shape=tuple(t.ne)[::-1], strides=tuple(t.nb)[::-1]).copy()
        return True

    default_params = lib.llama_context_default_params

    def with_callback():
        params = default_params()
        params.cb_eval = observe
        return params

    llama_cpp.llama.llama_cpp.llama_context_default_params = with_callback
    try:
        llm = llama_cpp.Llama(model, n_ctx=1024, n_batch=512, logits_all=True, n_threads=2,
                              flash_attn=False, verbose=False)
        seen.clear()
        llm.eval(tokens.tolist())
    finally:
        llama_cpp.llama.llama_cpp.llama_context_default_params = default_params
    return seen


def compare_stages(model: str, tokens: np.ndarray) -> None:
    """Block 0, each stage on llama.cpp's inputs: how many outputs differ from its outputs."""
    import edgelora_np as el
    from edgelora_np.kernels.elementwise import rmsnorm, rope_tables, swiglu
    from edgelora_np.kernels.pack import matmul, packed_rows

    theirs = {k: v.reshape(len(tokens), -1) for k, v in llama_cpp_block0(model, tokens).items()}
    m = el.load_model(model, progress=False)
    cfg, w = m.config, m.llama.weights
    layer, D, KVD, F, HD = w.layers[0], cfg.dim, cfg.kv_dim, cfg.ffn_dim, cfg.head_dim
    fused = lambda mats, x: np.concatenate([matmul(p, x) for p in mats], axis=1)   # noqa: E731
    h = np.empty((len(tokens), D), np.float32)
    rmsnorm(packed_rows(w.token_embd, tokens.astype(np.int32)), layer.attn_norm, cfg.rms_eps, h)
    qkv = fused(layer.qkv, theirs["attn_norm-0"])
    cos, sin = rope_tables(len(tokens), cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale,
                           w.rope_freq_factors)

    def rope(x):                     # [n, heads * HD], rope_ref's formula (adjacent pairs)
        x = x.reshape(len(tokens), -1, HD)
        c, s = cos[:, None, :], sin[:, None, :]
        y = x.copy()
        y[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        y[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return y.reshape(len(tokens), -1)

    act = np.empty((len(tokens), F), np.float32)
    swiglu(np.concatenate([theirs["ffn_gate-0"], theirs["ffn_up-0"]], axis=1), F, act)
    ffn_norm = np.empty_like(h)
    rmsnorm(theirs["ffn_inp-0"], layer.ffn_norm, cfg.rms_eps, ffn_norm)
    gate_up = fused(layer.gate_up, theirs["ffn_norm-0"])
    ours = {
        "attn_norm-0": h, "Qcur-0": qkv[:, :D], "Kcur-0": qkv[:, D:D + KVD],
        "Vcur-0": qkv[:, D + KVD:], "Qcur-0#2": rope(theirs["Qcur-0"]),
        "Kcur-0#2": rope(theirs["Kcur-0"]), "attn_out-0": matmul(layer.wo, theirs["kqv_out-0"]),
        "ffn_norm-0": ffn_norm, "ffn_gate-0": gate_up[:, :F], "ffn_up-0": gate_up[:, F:],
        "ffn_swiglu-0": act, "ffn_out-0": matmul(layer.down, theirs["ffn_swiglu-0"]),
    }
    print("\n| block 0 stage (llama.cpp's name) | outputs differing in any bit | largest difference |"
          "\n| --- | ---: | ---: |")
    for name, y in ours.items():
        differ = y != theirs[name]
        print(f"| {name} | {differ.sum()} of {differ.size} ({differ.mean():.0%}) | "
              f"{np.abs(y - theirs[name]).max():.2g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded default model)")
    ap.add_argument("--stages", nargs="?", const="code", metavar="PROMPT",
                    help="compare block 0 stage by stage on one golden prompt instead")
    args = ap.parse_args()
    from edgelora_np.default_model import resolve_model_path

    model = str(resolve_model_path(args.model, progress=False))
    golden = np.load(GOLDEN_PATH)
    meta = json.loads(str(golden["meta_json"]))
    prompts = {n: golden[f"{n}/tokens"] for n in meta["prompts"]}
    if args.stages:
        compare_stages(model, prompts[args.stages])
        return
    rows = []

    def row(label, d):
        rows.append((label, d.mean(), d.max()))
        print(f"{label:58s} {d.mean():6.3f} {d.max():6.2f}", file=sys.stderr, flush=True)

    baseline = None
    for stage, logits in perturbed_runs(model, prompts):
        if baseline is None:
            baseline = logits
            row("edgelora_np vs golden", golden_diffs(golden, logits))
            continue
        d = np.concatenate([np.abs(logits[n] - baseline[n]).ravel() for n in prompts])
        row(f"edgelora_np, {stage} moved 1 ulp, vs edgelora_np", d)
    for n_batch in (512, 1):
        row(f"llama.cpp n_batch {n_batch} vs golden",
            golden_diffs(golden, llama_cpp_logits(model, prompts, n_batch)))
    print("\n| comparison | mean abs logit diff | max |\n| --- | ---: | ---: |")
    for label, mean, mx in rows:
        print(f"| {label} | {mean:.3f} | {mx:.2f} |")


if __name__ == "__main__":
    main()
