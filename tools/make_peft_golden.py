"""Make a seeded PEFT LoRA adapter for SmolLM2 and record transformers+PEFT logits with it.

    tox -e train     (or, in a venv with torch==2.13.0, transformers, peft:
                      python tools/make_peft_golden.py [--model PATH] [--out DIR])

The float oracle for LoRA. transformers loads the same GGUF file the engine loads, dequantized
to float32 (its GGUF loader undoes llama.cpp's q/k row permutation, so the model is in HF
layout), and the `peft` library wraps it with a real LoRA adapter, r=8, lora_alpha=16, on all
seven projections of every third layer from 2 (layers_to_transform keeps the file small). Both
factors are random and seeded (PEFT initializes lora_B to zero, which would change nothing)
and rounded to float16, so the saved float16 adapter is exactly the one that was run.

Writes tests/data/lora/:
    peft_strong/adapter_config.json, peft_strong/adapter_model.safetensors   (save_pretrained)
    golden_lora_peft.npz, laid out like golden_lora_llamacpp.npz (tools/make_lora_golden.py)
        with cases "base" (no adapter) and "peft_strong", float32, eval mode, no greedy.
The token ids are llama.cpp's, read from tests/data/golden_logits.npz (tools/make_golden.py),
and fed to transformers as they are. The logits differ from llama.cpp's by the Q4_1/Q8_0
activation noise (~0.2 mean), which is why tests compare changes and clear top-1 choices only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from edgelora_np.default_model import sha256_of

sys.path.insert(0, str(Path(__file__).parent))
from make_golden import GOLDEN_TOP_K, PROMPTS, sample_ids  # noqa: E402
from make_lora_golden import LORA_DIR, LORA_PROMPTS, change_stats, position_arrays  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything is local; never ask a hub

BASE_GOLDEN = Path(__file__).parent.parent / "tests" / "data" / "golden_logits.npz"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
LAYERS = tuple(range(2, 30, 3))
STRENGTH = 0.2           # std of lora_B * sqrt(r); lora_A has std 1 / sqrt(in)
SEED = 404


def load_base(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def make_peft(base):
    """get_peft_model with seeded float16-exact random lora_A [r, in] and lora_B [out, r]."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                        layers_to_transform=list(LAYERS), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    rng = np.random.default_rng(SEED)
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            a = module.lora_A["default"].weight                    # [r, in]
            b = module.lora_B["default"].weight                    # [out, r]
            a_new = rng.standard_normal(tuple(a.shape)) / np.sqrt(a.shape[1])
            b_new = rng.standard_normal(tuple(b.shape)) * (STRENGTH / np.sqrt(RANK))
            a.copy_(torch.from_numpy(a_new.astype(np.float16).astype(np.float32)))
            b.copy_(torch.from_numpy(b_new.astype(np.float16).astype(np.float32)))
    return model.eval()


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)[None]))
    return out.logits[0].float().numpy()                           # [n, V]


def record_case(model, tokens: dict[str, np.ndarray], sample: np.ndarray) -> dict[str, np.ndarray]:
    rows = {}
    for p, ids in tokens.items():
        for key, value in position_arrays(logits_of(model, ids), sample).items():
            rows[f"{p}/{key}"] = value
    return rows


def save_adapter(model, target: Path) -> None:
    """save_pretrained in float16 (lossless: the factors are float16 values), minus the README,
    with target_modules sorted (PEFT writes a set, whose order varies from run to run) and the
    base model named by its hub id (set after saving: PEFT would try to fetch its config)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.float16)
    model.save_pretrained(str(target), save_embedding_layers=False)
    (target / "README.md").unlink(missing_ok=True)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = BASE_MODEL_ID      # not the local cache directory
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def main() -> None:
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    ap.add_argument("--out", type=Path, default=LORA_DIR)
    args = ap.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from edgelora_np.default_model import resolve_model_path
        args.model = resolve_model_path()
    torch.manual_seed(SEED)

    golden = np.load(BASE_GOLDEN)
    tokens = {p: golden[f"{p}/tokens"] for p in LORA_PROMPTS}
    tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    hf_agrees = {p: tokenizer.encode(PROMPTS[p], add_special_tokens=False) == ids.tolist()
                 for p, ids in tokens.items()}

    base = load_base(args.model)
    sample = sample_ids(base.config.vocab_size)
    np.testing.assert_array_equal(sample, golden["sample_ids"])
    arrays = {"sample_ids": sample, **{f"{p}/tokens": ids for p, ids in tokens.items()}}
    per_case = {"base": record_case(base, tokens, sample)}
    model = make_peft(base)
    per_case["peft_strong"] = record_case(model, tokens, sample)

    adapter_dir = args.out / "peft_strong"
    save_adapter(model, adapter_dir)
    reloaded = PeftModel.from_pretrained(load_base(args.model), str(adapter_dir)).eval()
    check = record_case(reloaded, tokens, sample)
    for key, value in check.items():
        np.testing.assert_allclose(value, per_case["peft_strong"][key], atol=1e-3,
                                   err_msg=f"reloaded adapter differs at {key}")

    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "model": args.model.name, "model_sha256": sha256_of(args.model),
            "top_k": GOLDEN_TOP_K, "tokens_from": BASE_GOLDEN.name,
            "hf_tokenizer_agrees": hf_agrees,
            "prompts": {p: PROMPTS[p] for p in LORA_PROMPTS},
            "cases": {"base": {"adapter": None, "scale": 0.0},
                      "peft_strong": {"adapter": "peft_strong", "scale": 1.0,
                                      "sha256": sha256_of(adapter_dir / "adapter_model.safetensors"),
                                      "rank": RANK, "lora_alpha": ALPHA, "layers": list(LAYERS),
                                      "strength": STRENGTH, "seed": SEED,
                                      **change_stats(per_case["peft_strong"], per_case["base"],
                                                     LORA_PROMPTS)}}}
    for case, rows in per_case.items():
        arrays.update({f"{case}/{k}": v for k, v in rows.items()})
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False))
    target = args.out / "golden_lora_peft.npz"
    np.savez_compressed(target, **arrays)
    print(f"  peft_strong: {meta['cases']['peft_strong']}", file=sys.stderr)
    print(f"  HF tokenizer agrees with llama.cpp: {hf_agrees}", file=sys.stderr)
    print(f"wrote {adapter_dir} and {target} ({target.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
