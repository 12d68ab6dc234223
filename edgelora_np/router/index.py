"""The router's index in the adapter store: each card's example prompts, embedded once.

An adapter is routable when its card has example prompts: `example_prompts` (what the card
shows people) and `router_examples` (more prompts, for the router only; `edgelora adapters
import --example`). Their embeddings (embed.py) are summarized as Moments and stored in the
store's `router_vectors` table under a spec naming the base model, the number of layers and the
pooling, with a digest of the prompts, so that

  - importing an adapter with a card indexes it (the CLI does it right after the import);
  - a store written before the table existed, an adapter imported through the Python API, or a
    router with another n_layers simply indexes what is missing when it opens the store;
  - a changed card (re-import) is re-embedded, because its digest no longer matches.

An adapter without examples is never indexed, so never chosen automatically.

The base model has a card too (base_card.json: general requests, hand-written for the router)
and is indexed the same way, under the name "(base model)", which no adapter can have.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgelora_np.errors import AdapterError
from edgelora_np.router.embed import Moments, embed_tokens

BASE_NAME = "(base model)"
BASE_CARD = Path(__file__).with_name("base_card.json")
EXAMPLE_FIELDS = ("example_prompts", "router_examples")
POOLING = "mean-after-first"       # embed.pool; part of the spec: change it, re-embed everything
INDEX_VERSION = 1


def examples(card: dict, name: str = "") -> list[str]:
    """The card's example prompts, then its router examples, each once, blanks dropped."""
    out: list[str] = []
    for field in EXAMPLE_FIELDS:
        values = card.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise AdapterError(f"adapter {name!r}: card field {field!r} must be a list of strings, "
                               f"got {type(values).__name__}")
        out += [v.strip() for v in values if v.strip() and v.strip() not in out]
    return out


def base_card() -> dict:
    return json.loads(BASE_CARD.read_text())


def spec(fingerprint: str, n_layers: int) -> str:
    return f"{fingerprint};layers={n_layers};pool={POOLING};v{INDEX_VERSION}"


def digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def embed_prompts(model, prompts: list[str], n_layers: int, max_tokens: int):
    """[N, D] embeddings of prompts (their first max_tokens tokens; an empty one is skipped by
    `examples`, so every prompt here has a token)."""
    tokens = [model.tokenize(p)[:max_tokens] for p in prompts]
    return embed_tokens(model.llama, tokens, n_layers)


def moments_of(model, prompts: list[str], n_layers: int, max_tokens: int) -> Moments:
    return Moments.of(embed_prompts(model, prompts, n_layers, max_tokens))


def index_store(store, model, n_layers: int, max_tokens: int, *, names=None,
                progress=None) -> tuple[dict[str, Moments], dict[str, dict], Moments | None]:
    """Make sure every routable adapter (or those of `names`) and the base card are indexed
    for this model and n_layers; returns (name -> Moments, name -> card) of the routable
    adapters and the base card's Moments (None when no adapter is routable).
    `progress(name)` is called before each card that gets embedded."""
    key = spec(model.fingerprint, n_layers)
    stored = store.router_vectors(key)
    dim = model.config.dim

    def indexed(name: str, prompts: list[str]) -> Moments:
        sha = digest(prompts)
        row = stored.get(name)
        if row is not None and row[0] == sha and row[2] == dim:
            return Moments.from_bytes(row[1], row[3], dim)
        if progress is not None:
            progress(name)
        m = moments_of(model, prompts, n_layers, max_tokens)
        store.put_router_vectors(name, key, sha, m.n, dim, m.to_bytes())
        return m

    moments: dict[str, Moments] = {}
    cards: dict[str, dict] = {}
    for name, card in store.cards().items():
        prompts = examples(card, name) if names is None or name in names else []
        if prompts:
            moments[name], cards[name] = indexed(name, prompts), card
    base = indexed(BASE_NAME, examples(base_card(), BASE_NAME)) if moments else None
    return moments, cards, base
