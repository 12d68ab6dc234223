"""Every quant type: resident memory against the file size, and logits and speed against llama.cpp.

    python tools/bench_kquant.py [--threads 2] [--types Q4_K,IQ4_NL]   (also run by tox -e bench)

The default model cannot show most types: SmolLM2-135M's width (576) is not a multiple of 256,
so llama.cpp stores its "K-quant" files mostly as Q5_0/Q5_1/Q8_0/IQ4_NL. This tool uses the
random llama model whose every matrix has whole 256-blocks (tests/tiny_model.py, F16, 8 layers,
width 1024), quantized by llama.cpp's own llama-quantize, `pure` (every matrix the same type),
to each type: real llama.cpp blocks, not ones we made (the files of tests/llama_quantized.py).
It adds SmolLM2's Q4_K_M, the file its users download. For each file it reports
  - the bytes of the repacked weights and the RSS the load adds, against the file size;
  - our logits against llama.cpp's on the same tokens (mean and max |difference|, top-1 agreement);
  - prefill and decode tok/s of both (tools/bench_vs_llamacpp.py, each in its own process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import llama_quantized as lq  # noqa: E402
from benchutil import current_rss_mb, run_child, warm_edgelora  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q5_0", "Q5_1",
         "SmolLM2-Q4_K_M")

N_TOKENS = 64
CTX = 512


def make_models(types: list[str]) -> dict[str, Path]:
    """llama.cpp's pure conversions of the random model to `types`, and SmolLM2's Q4_K_M."""
    from gguf import GGMLQuantizationType as QT

    out = {name: lq.random_model_file(QT[name]) for name in types if name != "SmolLM2-Q4_K_M"}
    if "SmolLM2-Q4_K_M" in types:
        out["SmolLM2-Q4_K_M"] = lq.default_model_file("Q4_K_M")
    return out


def token_ids(model: str) -> list[int]:
    """64 tokens: of the base-model goldens' long prompt for SmolLM2, random for the random model."""
    if "SmolLM2" in Path(model).name:
        golden = np.load(Path(__file__).parent.parent / "tests" / "data" / "golden_logits.npz")
        return golden["long/tokens"][:N_TOKENS].tolist()
    return lq.random_tokens(N_TOKENS)


def run_edgelora(model: str, threads: int, logits_out: str) -> dict:
    import edgelora_np as el
    import edgelora_np.model.llama  # noqa: F401  (Numba and the kernel modules: not the load's cost)

    before = current_rss_mb()
    # Kernels are compiled and cached already (warm_edgelora): no warm-up inside the measurement.
    m = el.load_model(model, n_threads=threads, n_ctx=CTX, progress=False, warm=False)
    loaded = current_rss_mb()
    np.save(logits_out, m.logits(token_ids(model)))
    return {"weights_mb": m.llama.weights.nbytes / 1e6, "load_rss_mb": loaded - before}


def run_llamacpp(model: str, threads: int, logits_out: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=CTX, n_batch=CTX, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, flash_attn=False,
                          verbose=False)
    ids = token_ids(model)
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
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated, of " + ",".join(TYPES))
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

    workdir = Path(tempfile.mkdtemp(prefix="edgelora_kquant_"))
    models = make_models(args.types.split(","))
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

    print(f"random llama {lq.RANDOM_SPEC}, llama.cpp `pure` quantization, and SmolLM2-135M "
          f"Q4_K_M; {args.threads} threads\n")
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
