"""Train the task adapters (tools/adapter_tasks.py) with the real `peft` library, on CPU.

    tox -e train     (or, in a venv with torch==2.13.0, transformers, peft:
                      python tools/train_adapters.py [--tasks arith,sql] [--steps N] [--model PATH])

For each task: one LoRA adapter on SmolLM2-135M-Instruct, loaded by transformers from the same
Q4_1 GGUF file the engine serves (dequantized to float32, see tools/make_peft_golden.py).

The recipe, the same for every task but for its length (the constants below):
  - r=8, lora_alpha=16 on q_proj, v_proj, up_proj, down_proj of all 30 layers: 1.47M
    parameters, a 2.98 MB file in float16. q and v steer attention, up and down the MLP.
  - Examples are rendered with the model's own chat template, system prompt included, exactly
    as `engine.submit(prompt, chat=True)` renders them: prompt, then answer + <|im_end|>.
  - The loss is cross-entropy on the answer tokens and the closing <|im_end|> only, and the
    vocabulary projection runs on those positions only (it is a fifth of the model's work).
  - STEPS steps (STEPS_PER_TASK for the slow learners) of AdamW, learning rate LR with a
    linear warm-up and a cosine decay to zero, BATCH fresh examples per step (the data are
    generated, so little is seen twice), bfloat16 autocast (1.5x faster on CPU; the factors
    stay float32).
  - Seeded: torch.manual_seed(SEED) before each adapter's init, data from seed SEED.

After training the adapter is saved in float16 (save_adapter), reloaded the way anyone would
load it (PeftModel.from_pretrained), and that reloaded model
  - answers N_QUICK_EVAL held-out prompts greedily: the quick torch accuracy, and
  - answers the card's EXAMPLES_PER_CARD example prompts greedily: the goldens that
    tests/test_task_adapters.py checks edgelora_np against.

Writes models/adapters/<task>/{adapter_config.json, adapter_model.safetensors, card.json} and
tests/data/task_adapters_golden.json (entries of other tasks already there are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from edgelora_np.default_model import sha256_of

sys.path.insert(0, str(Path(__file__).parent))
from adapter_tasks import TASKS, Example, Task, examples  # noqa: E402
from make_peft_golden import load_base, save_adapter  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything is local; never ask a hub

ROOT = Path(__file__).parent.parent
ADAPTERS_DIR = ROOT / "models" / "adapters"
GOLDEN = ROOT / "tests" / "data" / "task_adapters_golden.json"

RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
STEPS, BATCH, LR, WARMUP = 150, 8, 2e-3, 15
STEPS_PER_TASK = {"arith": 800, "num2words": 200}    # where the default is not enough
SEED = 505
N_QUICK_EVAL = 30            # held-out prompts answered under torch after training
EXAMPLES_PER_CARD = 3        # held-out prompts in card.json, with HF goldens
CARD_SEED = 1                # the card's prompts: held-out, drawn apart from the eval's seed 0
LOG_EVERY = 25


def encode(tokenizer, example: Example, end_of_turn: str) -> tuple[list[int], int]:
    """Token ids of chat prompt + answer + end of turn, and the prompt's length.

    The prompt alone must tokenize to a prefix of the whole (true here: the template ends in a
    newline, and the answer starts a new pre-token), else the loss mask would be off."""
    messages = [{"role": "user", "content": example.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(prompt + example.answer + end_of_turn, add_special_tokens=False)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{example.task}: prompt tokens are not a prefix of prompt+answer "
                         f"for {example.prompt!r}")
    return ids, len(prompt_ids)


def collate(batch: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ids [N, T], attention mask [N, T], and the loss mask [N, T-1]: True where
    position t predicts an answer token (t + 1 >= the prompt's length)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for row, (seq, n_prompt) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        loss_mask[row, n_prompt - 1:len(seq) - 1] = True
    return ids, attention, loss_mask


def answer_loss(model, ids, attention, loss_mask):
    """Mean cross-entropy of the answer tokens, projecting to the vocabulary only there."""
    import torch.nn.functional as F

    causal_lm = model.get_base_model()                     # LlamaForCausalLM, LoRA inside
    hidden = causal_lm.model(input_ids=ids, attention_mask=attention).last_hidden_state
    picked = hidden[:, :-1][loss_mask]                     # [n_answer, D]
    logits = causal_lm.lm_head(picked)                     # [n_answer, V]
    return F.cross_entropy(logits.float(), ids[:, 1:][loss_mask])


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to zero."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def train(model, tokenizer, task: Task, steps: int, end_of_turn: str) -> list[float]:
    """Fine-tune the LoRA factors of `model` on `steps` batches of fresh examples; losses."""
    import torch

    data = [encode(tokenizer, e, end_of_turn) for e in examples(task, "train", steps * BATCH, SEED)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        batch = collate(data[step * BATCH:(step + 1) * BATCH], tokenizer.pad_token_id or 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, *batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % LOG_EVERY == 0:
            recent = sum(losses[-LOG_EVERY:]) / LOG_EVERY
            print(f"  {task.name} step {step + 1}/{steps} loss {recent:.4f}", file=sys.stderr)
    return losses


def greedy(model, tokenizer, prompt: str, max_tokens: int, stop_id: int) -> tuple[list[int], list[int]]:
    """Chat prompt ids and the greedy continuation (ending with the stop id if reached)."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=stop_id, pad_token_id=stop_id)
    return prompt_ids, out[0, len(prompt_ids):].tolist()


def evaluate(model, tokenizer, task: Task, stop_id: int) -> float:
    """Greedy accuracy on the first N_QUICK_EVAL held-out prompts (the eval tool's, seed 0)."""
    model.eval()
    correct = 0
    for e in examples(task, "heldout", N_QUICK_EVAL, 0):
        _, continuation = greedy(model, tokenizer, e.prompt, task.max_tokens, stop_id)
        correct += task.check(tokenizer.decode(continuation, skip_special_tokens=True), e.answer)
    return correct / N_QUICK_EVAL


def write_golden(golden: dict) -> None:
    """Indented JSON with each list of token ids on one line, so diffs stay readable."""
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[\s+(?=\d)", "[", re.sub(r"(?<=\d)\s+\]", "]", text))
    GOLDEN.write_text(re.sub(r"(?<=\d),\s+(?=\d)", ", ", text) + "\n")


def write_card(target: Path, task: Task, prompts: list[str], training: dict) -> None:
    card = {"name": task.name, "description": task.description, "keywords": list(task.keywords),
            "example_prompts": prompts, "task_source": "tools/adapter_tasks.py",
            "training": training}
    path = target / "card.json"
    if path.is_file():           # keep tools/make_router_examples.py's field across retraining
        old = json.loads(path.read_text())
        card.update({k: old[k] for k in ("router_examples",) if k in old})
    path.write_text(json.dumps(card, indent=2) + "\n")


def main() -> None:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--steps", type=int, default=None, help="override every task's step count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    ap.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    args = ap.parse_args()
    names = args.tasks.split(",")
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; the tasks are {sorted(TASKS)}")
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from edgelora_np.default_model import resolve_model_path
        args.model = resolve_model_path()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    end_of_turn = "<|im_end|>"
    stop_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"adapters": {}}
    golden["meta"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "model": args.model.name,
                      "model_sha256": sha256_of(args.model), "dtype": "float32", "decoding": "greedy"}
    base = load_base(args.model)
    for name in names:
        task = TASKS[name]
        steps = args.steps or STEPS_PER_TASK.get(name, STEPS)
        torch.manual_seed(SEED)
        model = get_peft_model(base, config)
        start = time.perf_counter()
        losses = train(model, tokenizer, task, steps, end_of_turn)
        seconds = time.perf_counter() - start
        target = args.out / name
        save_adapter(model, target)
        base = model.unload()                              # the plain model again, for reuse

        served = PeftModel.from_pretrained(base, str(target)).eval()   # as saved, float16
        accuracy = evaluate(served, tokenizer, task, stop_id)
        cards = examples(task, "heldout", EXAMPLES_PER_CARD, CARD_SEED)
        golden["adapters"][name] = []
        for e in cards:
            prompt_ids, continuation = greedy(served, tokenizer, e.prompt, task.max_tokens, stop_id)
            golden["adapters"][name].append(
                {"prompt": e.prompt, "answer": e.answer, "prompt_ids": prompt_ids,
                 "continuation_ids": continuation,
                 "continuation_text": tokenizer.decode(continuation, skip_special_tokens=True)})
        base = served.unload()
        final_loss = sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:])
        training = {"steps": steps, "batch": BATCH, "lr": LR, "rank": RANK, "lora_alpha": ALPHA,
                    "target_modules": sorted(TARGETS), "seed": SEED, "threads": args.threads,
                    "seconds": round(seconds, 1), "final_loss": round(final_loss, 4),
                    "heldout_accuracy_torch": round(accuracy, 3), "heldout_n_torch": N_QUICK_EVAL}
        write_card(target, task, [e.prompt for e in cards], training)
        write_golden(golden)
        size = (target / "adapter_model.safetensors").stat().st_size / 1e6
        print(f"| {name} | {steps} | {seconds:.0f} s | {final_loss:.4f} | {accuracy:.0%} | "
              f"{size:.2f} MB |", flush=True)


if __name__ == "__main__":
    main()
