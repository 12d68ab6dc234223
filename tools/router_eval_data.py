"""The data tools/eval_router.py works on: labelled prompts, their phrasing templates and
answers, the cards, and every prompt's embedding at every layer (computed once, cached).

    rows = eval_rows()          # tests/data/router_eval.jsonl, each with its template and answer
    emb = Embeddings.compute(model, prompts)        # or .load(path) when cached
    emb.at(8, prompts)          # [n, D] mean-after-first embeddings after 8 blocks
    emb.last(prompts)           # [n, D] the last token after all blocks (a baseline)

The template of a router_eval prompt is recovered by matching it against the templates of
tools/make_router_eval.py (each in-scope prompt fits exactly one); the answer by replaying that
script's seeded draws, which gives back exactly the file's prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import make_router_eval as mre  # noqa: E402
from adapter_tasks import TASKS, draw_in_split  # noqa: E402

from edgelora_np.model.batch import Batch  # noqa: E402
from edgelora_np.router import index as index_mod  # noqa: E402
from edgelora_np.router.embed import BATCH_TOKENS, pool  # noqa: E402

ROOT = Path(__file__).parent.parent
EVAL_FILE = ROOT / "tests" / "data" / "router_eval.jsonl"
HAND_FILE = ROOT / "tests" / "data" / "router_handwritten.jsonl"
ADAPTERS = ROOT / "models" / "adapters"
NONE = "none"


@dataclass(frozen=True)
class Row:
    prompt: str
    label: str                  # adapter name or "none"
    template: str               # phrasing template (a "none" prompt is its own)
    answer: str | None = None   # reference answer (in-scope router_eval prompts)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _templates() -> dict[str, list[str]]:
    """task -> the outer phrasing templates of make_router_eval.py."""
    return {"arith": [*mre.ARITH["+"], *mre.ARITH["-"]], "num2words": list(mre.NUM2WORDS),
            "dates": list(mre.DATES), "units": list(mre.UNITS), "reverse": list(mre.REVERSE),
            "json_extract": list(mre.JSON_EXTRACT), "sql": list(mre.SQL.values())}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile("(?:.+?)".join(re.escape(p) for p in parts) + r"\Z", re.DOTALL)


def template_of(prompt: str, task: str) -> str:
    hits = [t for t in _templates()[task] if _pattern(t).match(prompt)]
    if len(hits) != 1:
        raise SystemExit(f"{task} prompt {prompt!r} fits {len(hits)} templates, expected one")
    return hits[0]


def _answers() -> dict[str, str]:
    """prompt -> answer, by replaying make_router_eval.py's draws (same seed, same order)."""
    rng = random.Random(mre.SEED)
    out: dict[str, str] = {}
    for name in TASKS:
        mine: list[str] = []
        while len(mine) < mre.PER_TASK:            # the loop of mre.task_prompts, keeping answers
            values = draw_in_split(TASKS[name], "heldout", rng)
            prompt = mre.PROMPTERS[name](values.fields, rng)
            if prompt not in mine:
                mine.append(prompt)
                out[prompt] = values.answer
    return out


def eval_rows() -> list[Row]:
    answers = _answers()
    rows = []
    for r in read_jsonl(EVAL_FILE):
        p, y = r["prompt"], r["adapter"]
        if y == NONE:
            rows.append(Row(p, y, "none: " + p))
        else:
            if p not in answers:
                raise SystemExit(f"router_eval prompt {p!r} is not what make_router_eval.py draws")
            rows.append(Row(p, y, template_of(p, y), answers[p]))
    return rows


def hand_rows() -> list[Row]:
    return [Row(r["prompt"], r["adapter"], "hand") for r in read_jsonl(HAND_FILE)]


def shipped_cards(folder: Path = ADAPTERS) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/card.json"))}


class Embeddings:
    """prompt -> its embedding after each number of blocks 1..L, and its last token's at L."""

    def __init__(self, prompts: list[str], by_layer: np.ndarray, last: np.ndarray):
        self.prompts = list(prompts)
        self.row = {p: i for i, p in enumerate(self.prompts)}
        self.by_layer = by_layer          # [L, n, D]: after blocks 0..l-1, at index l-1
        self.last_token = last            # [n, D]

    def at(self, n_layers: int, prompts: list[str]) -> np.ndarray:
        return self.by_layer[n_layers - 1, [self.row[p] for p in prompts]]

    def last(self, prompts: list[str]) -> np.ndarray:
        return self.last_token[[self.row[p] for p in prompts]]

    @staticmethod
    def key(model, prompts: list[str], max_tokens: int) -> str:
        h = hashlib.sha256(json.dumps([model.fingerprint, max_tokens, index_mod.POOLING,
                                       sorted(prompts)]).encode())
        return h.hexdigest()[:16]

    @classmethod
    def compute(cls, model, prompts: list[str], max_tokens: int, progress=None) -> Embeddings:
        llama, L = model.llama, model.config.n_layers
        prompts = sorted(set(prompts))
        by_layer = np.empty((L, len(prompts), model.config.dim), np.float32)
        last = np.empty((len(prompts), model.config.dim), np.float32)
        tokens = [np.asarray(model.tokenize(p)[:max_tokens], np.int32) for p in prompts]
        start = 0
        while start < len(prompts):
            stop, n_tok = start, 0
            while stop < len(prompts) and (stop == start or n_tok + len(tokens[stop]) <= BATCH_TOKENS):
                n_tok += len(tokens[stop])
                stop += 1
            group = tokens[start:stop]
            lengths = np.array([len(t) for t in group])
            batch = Batch(np.concatenate(group), np.repeat(np.arange(len(group), dtype=np.int32), lengths),
                          np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
                          np.full(int(lengths.sum()), -1, np.int32), np.zeros(1, np.int32))
            cache = llama.new_cache(int(lengths.sum()) + 32 * len(group))
            states = llama.hidden_states(batch, cache, L, every_layer=True)    # [L, B, D]
            for i, end in enumerate(np.cumsum(lengths)):
                mine = states[:, end - lengths[i]:end]                        # [L, T, D]
                for layer in range(L):
                    by_layer[layer, start + i] = pool(mine[layer])
                last[start + i] = mine[-1, -1]
            if progress:
                progress(stop - start)
            start = stop
        return cls(prompts, by_layer, last)

    def save(self, path: Path, key: str) -> None:
        np.savez(path, key=key, prompts=np.array(self.prompts), by_layer=self.by_layer,
                 last=self.last_token)

    @classmethod
    def load(cls, path: Path, key: str) -> Embeddings | None:
        if not path.is_file():
            return None
        data = np.load(path)
        if str(data["key"]) != key:
            return None
        return cls([str(p) for p in data["prompts"]], data["by_layer"], data["last"])
