"""Score the task adapters served by edgelora_np: base model vs adapter vs all tasks mixed.

    python tools/eval_adapters.py [--n 50] [--tasks arith,sql] [--json results.json]

For every task of tools/adapter_tasks.py with an adapter in models/adapters/<task>/, the first
`n` held-out prompts (seed 0: values never trained on) are answered greedily by edgelora_np
(no torch anywhere) three ways, each request as a chat message (`submit(..., chat=True)`):

    base      the model without adapter, every task's prompts in one batch
    adapter   the task's adapter, the task's prompts alone in the batch
    mixed     every task's prompts interleaved in one queue, each with its own adapter, so
              each engine step mixes up to `max_seqs` sequences of different adapters

and scored by the task's checker (lenient: see adapter_tasks.py). Base and adapter get the same
token budget (Task.max_tokens). Greedy decoding does not depend on the batch's company, so
the mixed answers should equal the adapter-alone answers; the tool counts the ones that do.

Prints a markdown table (the one in docs/adapters.md) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from adapter_tasks import TASKS, Example, examples  # noqa: E402

ROOT = Path(__file__).parent.parent
ADAPTERS_DIR = ROOT / "models" / "adapters"
MAX_BATCH_TOKENS, MAX_SEQS, MAX_ADAPTERS = 256, 16, 16


def answer_all(engine, requests: list[tuple[Example, str | None]]) -> list[str]:
    """Submit every (example, adapter) at once, run the engine until all are done; the replies.

    Reading the first Generation drives engine steps for all of them (nothing runs on a
    background thread here), so the submission order is the batching order."""
    generations = [engine.submit(e.prompt, adapter=adapter, chat=True, temperature=0.0,
                                 max_tokens=TASKS[e.task].max_tokens) for e, adapter in requests]
    return [g.run().text for g in generations]


def score(items: list[Example], replies: list[str]) -> float:
    return sum(TASKS[e.task].check(r, e.answer) for e, r in zip(items, replies)) / len(items)


def interleave(per_task: dict[str, list[Example]]) -> list[Example]:
    """Round-robin over the tasks: arith[0], num2words[0], ..., arith[1], ..."""
    rows = zip(*per_task.values())
    return [e for row in rows for e in row]


def main() -> None:
    import edgelora_np as el

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per task")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: every shipped adapter)")
    ap.add_argument("--adapters", type=Path, default=ADAPTERS_DIR)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    names = args.tasks.split(",") if args.tasks else [t for t in TASKS if (args.adapters / t).is_dir()]
    missing = [t for t in names if t not in TASKS or not (args.adapters / t).is_dir()]
    if missing or not names:
        sys.exit(f"no task adapter for {missing or 'any task'} in {args.adapters}")

    model = el.load_model(progress=False)
    engine = el.Engine(model, max_batch_tokens=MAX_BATCH_TOKENS, max_seqs=MAX_SEQS,
                       max_adapters=max(len(names), MAX_ADAPTERS))
    for name in names:
        engine.add_adapter(name, args.adapters / name)
    per_task = {name: examples(TASKS[name], "heldout", args.n, 0) for name in names}

    start = time.perf_counter()
    everything = interleave(per_task)
    base = dict(zip(everything, answer_all(engine, [(e, None) for e in everything])))
    alone = {}
    for name, items in per_task.items():
        alone.update(zip(items, answer_all(engine, [(e, name) for e in items])))
    mixed = dict(zip(everything, answer_all(engine, [(e, e.task) for e in everything])))
    seconds = time.perf_counter() - start

    results = {}
    for name, items in per_task.items():
        results[name] = {
            "n": len(items),
            "base": score(items, [base[e] for e in items]),
            "adapter": score(items, [alone[e] for e in items]),
            "mixed": score(items, [mixed[e] for e in items]),
            "mixed_equals_alone": sum(mixed[e] == alone[e] for e in items),
            "example": {"prompt": items[0].prompt, "answer": items[0].answer,
                        "base": base[items[0]], "adapter": alone[items[0]]}}

    print("| task | base model | adapter | all tasks, mixed batch | n |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['base']:.0%} | {r['adapter']:.0%} | {r['mixed']:.0%} | {r['n']} |")
    same = sum(r["mixed_equals_alone"] for r in results.values())
    total = sum(r["n"] for r in results.values())
    print(f"\nmixed-batch replies identical to adapter-alone replies: {same}/{total}; "
          f"{3 * total} requests in {seconds:.0f} s")
    for name, r in results.items():
        ex = r["example"]
        print(f"\n{name}: {ex['prompt']!r} (expected {ex['answer']!r})\n"
              f"  base:    {ex['base']!r}\n  adapter: {ex['adapter']!r}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "seconds": seconds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
