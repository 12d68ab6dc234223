"""Add `router_examples` to the shipped adapters' cards: more example prompts for the router.

    python tools/make_router_examples.py [--n 16] [--adapters models/adapters]

A card's three `example_prompts` (held-out prompts with goldens, tools/train_adapters.py) are
few for a centroid. This adds `--n` more per adapter, rendered from the task's own *training*
templates (tools/adapter_tasks.py) with *training-split* values, cycling through the templates:
what the adapter was trained on, which an adapter's author always has at hand (LoraRetriever
and LoRAuter represent an adapter the same way, by a few of its training prompts).

Nothing here comes from tests/data/router_eval.jsonl, whose templates were written apart from
the training ones, so the router evaluation stays a test on other phrasings. Seeded: the same
cards come out every time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from adapter_tasks import TASKS, draw_in_split  # noqa: E402

ADAPTERS = Path(__file__).parent.parent / "models" / "adapters"
SEED = 314


def router_examples(name: str, n: int, exclude: list[str]) -> list[str]:
    """n distinct training-template prompts of task `name`, templates in turn."""
    task = TASKS[name]
    rng = random.Random(f"{name}/router_examples/{SEED}")
    out: list[str] = []
    while len(out) < n:
        template = task.templates[len(out) % len(task.templates)]
        prompt = template.format(**draw_in_split(task, "train", rng).fields)
        if prompt not in out and prompt not in exclude:
            out.append(prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="router examples per adapter")
    ap.add_argument("--adapters", type=Path, default=ADAPTERS)
    args = ap.parse_args()
    for path in sorted(args.adapters.glob("*/card.json")):
        card = json.loads(path.read_text())
        name = path.parent.name
        if name not in TASKS:
            continue
        card["router_examples"] = router_examples(name, args.n, card.get("example_prompts", []))
        path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"{path}: {len(card['router_examples'])} router examples", file=sys.stderr)


if __name__ == "__main__":
    main()
