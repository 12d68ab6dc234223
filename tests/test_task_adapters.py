"""The shipped task adapters (models/adapters/*/): complete, small, trained, and served faithfully.

tools/train_adapters.py trains one LoRA adapter per task of tools/adapter_tasks.py with
transformers+peft and records, for each card's example prompts, the chat prompt's token ids
and transformers+peft's greedy answer (tests/data/task_adapters_golden.json). Here:

  - every adapter directory is complete, in float16, under SIZE_LIMIT bytes, with a card;
  - each adapter, loaded by our PEFT reader through the engine, changes the greedy reply to
    its card's prompts (an adapter that changes nothing would pass every other test);
  - teacher-forced along transformers+peft's greedy answer, our top-1 token equals theirs at
    >= MIN_AGREEMENT of the positions, pooled over all adapters. The two runs differ by more
    than the adapter: transformers runs the dequantized weights in float32, we quantize the
    activations to 8 bits (docs/forward.md), so a near-tie may flip; a wrong delta would not
    stay that close;
  - tests/data/router_eval.jsonl is large enough, labelled with shipped adapters, and worded
    apart from the training templates.
"""

import json
import re
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ADAPTERS = ROOT / "models" / "adapters"
GOLDEN = Path(__file__).parent / "data" / "task_adapters_golden.json"
ROUTER_EVAL = Path(__file__).parent / "data" / "router_eval.jsonl"
SHIPPED = sorted(card.parent.name for card in ADAPTERS.glob("*/card.json"))
SIZE_LIMIT = 3_000_000               # bytes of adapter_model.safetensors
MIN_AGREEMENT = 0.99
REPLY_TOKENS = 12                    # enough to see a reply change

sys.path.insert(0, str(ROOT / "tools"))
from adapter_tasks import TASKS  # noqa: E402


def safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes named in a safetensors header (u64 little-endian length, then JSON)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_every_task_has_a_shipped_adapter():
    assert len(SHIPPED) >= 6
    assert SHIPPED == sorted(TASKS)


@pytest.mark.parametrize("name", SHIPPED)
def test_adapter_directory(name, golden):
    folder = ADAPTERS / name
    config = json.loads((folder / "adapter_config.json").read_text())
    card = json.loads((folder / "card.json").read_text())
    weights = folder / "adapter_model.safetensors"
    assert 8 <= config["r"] <= 16
    assert weights.stat().st_size < SIZE_LIMIT
    assert safetensors_dtypes(weights) == {"F16"}
    assert card["name"] == name and card["description"]
    assert card["keywords"] and all(isinstance(k, str) for k in card["keywords"])
    assert card["example_prompts"] == [g["prompt"] for g in golden["adapters"][name]]


def test_router_eval_file():
    rows = [json.loads(line) for line in ROUTER_EVAL.read_text().splitlines()]
    labels = [r["adapter"] for r in rows]
    assert len(rows) >= 300
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert set(labels) == set(SHIPPED) | {"none"}
    assert labels.count("none") >= 40
    assert min(labels.count(name) for name in SHIPPED) >= 30


def test_router_eval_is_worded_apart_from_training():
    """No router prompt fits a training template of its task (each {field} matching anything)."""
    rows = [json.loads(line) for line in ROUTER_EVAL.read_text().splitlines()]
    for task in TASKS.values():
        prompts = [r["prompt"] for r in rows if r["adapter"] == task.name]
        for template in task.templates:
            pattern = re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)) + r"\Z")
            clash = [p for p in prompts if pattern.match(p)]
            assert not clash, f"{task.name} template {template!r} matches {clash[:3]}"


@pytest.mark.slow
def test_adapters_change_the_greedy_reply(real_model):
    import edgelora_np as el

    engine = el.Engine(real_model, max_batch_tokens=256, max_seqs=16, max_adapters=16)
    for name in SHIPPED:
        engine.add_adapter(name, ADAPTERS / name)
    requests = [(name, prompt) for name in SHIPPED
                for prompt in json.loads((ADAPTERS / name / "card.json").read_text())["example_prompts"]]
    # base and adapter requests all in one batch: it also exercises mixed adapters per step
    gens = {(adapter, name, prompt): engine.submit(prompt, adapter=adapter, chat=True,
                                                   max_tokens=REPLY_TOKENS, temperature=0.0)
            for name, prompt in requests for adapter in (None, name)}
    texts = {key: g.run().text for key, g in gens.items()}
    unchanged = [(name, prompt, texts[(None, name, prompt)]) for name, prompt in requests
                 if texts[(name, name, prompt)] == texts[(None, name, prompt)]]
    assert not unchanged


@pytest.mark.slow
def test_engine_agrees_with_transformers_peft(real_model, golden, record_property):
    import numpy as np

    agree, total, per_adapter = 0, 0, {}
    for name in SHIPPED:
        hits = positions = 0
        for case in golden["adapters"][name]:
            prompt_ids, answer_ids = case["prompt_ids"], case["continuation_ids"]
            ours = real_model.tokenize(real_model.chat_prompt(case["prompt"]), special=True)
            assert ours == prompt_ids, f"{name}: chat prompt tokens differ from transformers'"
            logits = real_model.logits(prompt_ids + answer_ids[:-1], adapter=ADAPTERS / name)
            top1 = np.argmax(logits[len(prompt_ids) - 1:], axis=-1)        # [len(answer)]
            hits += int((top1 == np.asarray(answer_ids)).sum())
            positions += len(answer_ids)
        per_adapter[name] = f"{hits}/{positions}"
        agree, total = agree + hits, total + positions
    record_property("top1_agreement", f"{agree}/{total}")
    assert agree / total >= MIN_AGREEMENT, f"top-1 agreement {agree}/{total}: {per_adapter}"
