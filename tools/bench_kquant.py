"""K-quant models: resident memory against the file size, and logits and speed against llama.cpp.

    python tools/bench_kquant.py [--workdir DIR] [--threads 2]      (also run by tox -e bench)

The default model cannot show this: SmolLM2-135M's width (576) is not a multiple of 256, so
llama.cpp stores its "K-quant" files mostly as Q5_0/Q8_0. This tool writes a random llama
model whose every matrix has whole 256-blocks (tests/tiny_model.py, F16, 8 layers, width 1024)
and has llama.cpp itself quantize it, `pure` (every matrix the same type), to Q4_K, Q5_K and
Q6_K: real llama.cpp blocks, not ones we made. For each file it reports
  - the bytes of the repacked weights and the RSS the load adds, against the file size;
  - our logits against llama.cpp's on the same tokens (mean and max |difference|, top-1 agreement);
  - prefill and decode tok/s of both (tools/bench_vs_llamacpp.py, each in its own process).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from benchutil import current_rss_mb, run_child, warm_edgelora  # noqa: E402

SPEC = dict(n_layers=8, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816, vocab=960,
            context=512, tied=False, seed=7)
TYPES = ("Q4_K", "Q5_K", "Q6_K")
N_TOKENS = 64
CTX = 512


def make_models(workdir: Path) -> dict[str, Path]:
    """The F16 random model, and llama.cpp's pure K-quant conversions of it."""
    import llama_cpp
    from gguf import GGMLQuantizationType as QT
    from tiny_model import TinySpec, write_tiny_model

    source = workdir / "random-f16.gguf"
    if not source.exists():
        write_tiny_model(source, TinySpec(qtype=QT.F16, **SPEC))
    out = {}
    for name in TYPES:
        path = workdir / f"random-{name}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}_M"
                                   if name != "Q6_K" else "LLAMA_FTYPE_MOSTLY_Q6_K")
            params.pure = True
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(),
                                                ctypes.byref(params))
            if rc != 0:
                sys.exit(f"llama_model_quantize {name} failed ({rc})")
        out[name] = path
    return out


def token_ids() -> list[int]:
    return np.random.default_rng(0).integers(3, SPEC["vocab"], N_TOKENS).tolist()


def run_edgelora(model: str, threads: int, logits_out: str) -> dict:
    import edgelora_np as el
    import edgelora_np.model.llama  # noqa: F401  (Numba and the kernel modules: not the load's cost)

    before = current_rss_mb()
    # Kernels are compiled and cached already (warm_edgelora): no warm-up inside the measurement.
    m = el.load_model(model, n_threads=threads, n_ctx=CTX, progress=False, warm=False)
    loaded = current_rss_mb()
    np.save(logits_out, m.logits(token_ids()))
    return {"weights_mb": m.llama.weights.nbytes / 1e6, "load_rss_mb": loaded - before}


def run_llamacpp(model: str, threads: int, logits_out: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=CTX, n_batch=CTX, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, flash_attn=False,
                          verbose=False)
    ids = token_ids()
    llm.eval(ids)
    np.save(logits_out, np.array(llm.scores[:len(ids)], np.float32))
    return {}


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """|differences|, and top-1 agreement with llama.cpp's lead over its runner-up wherever
    the two disagree (a near-tie there is rounding, not a wrong kernel)."""
    diff = np.abs(ours - theirs)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    lead = top2[:, 1] - top2[:, 0]
    return {"mean_diff": float(diff.mean()), "max_diff": float(diff.max()),
            "logit_std": float(theirs.std()), "top1": float(agree.mean()),
            "worst_lead": float(lead[~agree].max()) if (~agree).any() else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["edgelora", "llamacpp"])
    ap.add_argument("--model")
    ap.add_argument("--logits-out")
    args = ap.parse_args()
    if args.child:
        run = run_edgelora if args.child == "edgelora" else run_llamacpp
        print(json.dumps(run(args.model, args.threads, args.logits_out)))
        return

    from edgelora_np.gguf.reader import open_gguf

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgelora_kquant_"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(workdir)
    bench = str(Path(__file__).parent / "bench_vs_llamacpp.py")
    rows = []
    for name, path in models.items():
        warm_edgelora(str(path))
        logits = {}
        for engine in ("edgelora", "llamacpp"):
            out = str(workdir / f"{name}-{engine}.npy")
            logits[engine] = run_child(__file__, engine, ["--model", str(path), "--threads",
                                                          str(args.threads), "--logits-out", out])
            logits[engine]["logits"] = np.load(out)
        speed = {engine: run_child(bench, engine, ["--model", str(path), "--threads",
                                                   str(args.threads), "--ctx", str(CTX)])
                 for engine in ("edgelora", "llamacpp")}
        ours = logits["edgelora"]
        types = sorted({t.qtype.name for t in open_gguf(path).tensors.values()
                        if len(t.shape) == 2})
        rows.append(dict(name=name, file_mb=path.stat().st_size / 1e6, types=types,
                         weights_mb=ours["weights_mb"], load_rss_mb=ours["load_rss_mb"],
                         **compare(ours["logits"], logits["llamacpp"]["logits"]),
                         speed=speed))

    print(f"random llama {SPEC}, llama.cpp `pure` quantization, {args.threads} threads\n")
    print("| type | file MB | repacked weights MB | load adds RSS MB | mean / max logit diff "
          "(logit std) | top-1 agree (largest lead where not) | prefill ours / llama.cpp "
          "| decode ours / llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        s = r["speed"]
        pre = s["edgelora"]["prefill_tok_s"] / s["llamacpp"]["prefill_tok_s"]
        dec = s["edgelora"]["decode_tok_s"] / s["llamacpp"]["decode_tok_s"]
        print(f"| {r['name']} ({'+'.join(r['types'])}) | {r['file_mb']:.1f} "
              f"| {r['weights_mb']:.1f} ({r['weights_mb'] / r['file_mb']:.3f}x) "
              f"| {r['load_rss_mb']:.1f} ({r['load_rss_mb'] / r['file_mb']:.3f}x) "
              f"| {r['mean_diff']:.4f} / {r['max_diff']:.3f} ({r['logit_std']:.2f}) "
              f"| {100 * r['top1']:.1f}% ({r['worst_lead']:.3f}) "
              f"| {s['edgelora']['prefill_tok_s']:.0f} / {s['llamacpp']['prefill_tok_s']:.0f} "
              f"= {pre:.2f}x | {s['edgelora']['decode_tok_s']:.0f} / "
              f"{s['llamacpp']['decode_tok_s']:.0f} = {dec:.2f}x |")


if __name__ == "__main__":
    main()
