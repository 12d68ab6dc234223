"""The three APIs a benchmark can speak: what to ask a server, what to send, how to read its stream.

    openai     POST /v1/completions, `model` = the adapter's name (the base model's id for a base
               request, "auto" for the router); adapters listed by GET /v1/models (cards with a
               `parent`, as vLLM and edgelora list them)
    llamacpp   POST /completion, `lora: [{"id": i, "scale": 1}]`, ids as GET /lora-adapters lists
               them. llama-server applies a request's `lora` list if it has one, else the global
               scales (1 for every --lora adapter, 0 with --lora-init-without-apply); adapters
               missing from a list get scale 0. So a base request lists every adapter at scale 0,
               which is right whichever way the server was started.
    edgelora   POST /completion, `adapter: NAME` (absent for the base model, "auto" for the
               router); adapters listed by GET /lora-adapters

Every request streams, ignores EOS and asks for exactly the drawn number of tokens. Prompts are
token ids (both /completion and /v1/completions take them), so a prompt of k ids is k tokens on
any server, with no re-tokenization and no BOS added. The ids are drawn from a pool of ordinary
tokens: the server's POST /tokenize of a plain English text (llama-server, vLLM and edgelora
all have it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePath

import httpx

from edgelora_np.errors import BenchError
from edgelora_np.loadgen.workload import AUTO, BASE

POOL_TEXT = (
    "The village sat at the edge of a wide valley, where the river turned slowly toward the "
    "sea. Every morning the baker opened his shop before sunrise, and the smell of fresh bread "
    "drifted along the narrow streets. Children walked to school past the old stone bridge, "
    "counting the boats that waited for the tide. In the afternoon the market filled with "
    "farmers selling apples, cheese, honey and warm wool. Travelers often asked for directions "
    "to the castle on the hill, which had been a library for more than a hundred years. Its "
    "rooms held maps of distant islands, letters from forgotten kings, and notebooks full of "
    "careful drawings of birds, flowers and machines. When the weather changed, fishermen "
    "repaired their nets, teachers read stories aloud, and the whole town seemed to listen to "
    "the wind. Numbers such as 12, 365 and 2048 appeared on the station clock, the bus timetable "
    "and the price of a ticket to the city."
)


@dataclass(frozen=True)
class Targets:
    """What a run's requests point at. Adapter index i of a Workload is adapters[i]."""

    adapters: tuple[str, ...]                  # names, popularity rank 1 first
    lora_ids: tuple[int, ...] = ()             # llamacpp: the id of each of `adapters`
    all_lora_ids: tuple[int, ...] = ()         # llamacpp: every id listed (base: all at 0)
    base_model: str | None = None              # openai: the `model` of base requests

    @cached_property
    def all_lora_off(self) -> tuple[dict, ...]:
        """llamacpp: a base request's `lora` (one tuple shared by every such request)."""
        return tuple({"id": i, "scale": 0.0} for i in self.all_lora_ids)

    def describe(self, target: int) -> tuple[str, str | None]:
        """(kind, adapter name) of a Workload target."""
        if target == BASE:
            return "base", None
        if target == AUTO:
            return "auto", None
        return "adapter", self.adapters[target]


@dataclass(frozen=True)
class Listed:
    """An adapter as a server lists it."""

    name: str                       # what a request names it by (llama-server: the file's stem)
    lora_id: int | None = None      # llama-server's id (GET /lora-adapters)
    path: str | None = None         # where the server loaded it from, if it says


@dataclass
class StreamState:
    """What one response stream has said so far."""

    output_chunks: int = 0                 # chunks that carried generated output
    output_tokens: int | None = None       # the server's own count, when it gives one
    prompt_tokens: int | None = None
    finished: bool = False                 # the server marked the end of the generation
    error: str | None = None               # an error event's message


def _error_message(data: dict) -> str | None:
    err = data.get("error")
    if err is None:
        return None
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


class Api:
    """One API: its generation route, a request body per target, the reading of its events."""

    name: str
    route: str

    async def listing(self, client: httpx.AsyncClient) -> tuple[list[Listed], str | None]:
        """(the adapters the server lists, in its order; the base model's name or None)."""
        raise NotImplementedError

    def payload(self, targets: Targets, target: int, prompt: list[int], max_tokens: int) -> dict:
        raise NotImplementedError

    def on_event(self, data: dict, state: StreamState) -> int:
        """Update `state` from one `data:` event; return how many output chunks it carried."""
        raise NotImplementedError


class OpenAIApi(Api):
    """Base requests name the listed base model (cards without a `parent`), or no model at all
    when none is listed; a server that lists no `parent` has no adapters to discover."""

    name, route = "openai", "/v1/completions"

    async def listing(self, client):
        cards = (await _get_json(client, "/v1/models")).get("data", [])
        base = [c["id"] for c in cards if c.get("parent") is None]
        return [Listed(c["id"]) for c in cards if c.get("parent") is not None], (base or [None])[0]

    def payload(self, targets, target, prompt, max_tokens):
        kind, name = targets.describe(target)
        model = {"adapter": name, "auto": "auto", "base": targets.base_model}[kind]
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        return body if model is None else {"model": model, **body}

    def on_event(self, data, state):
        state.error = _error_message(data)
        n = 0
        for choice in data.get("choices") or ():
            if choice.get("text"):
                n += 1
            if choice.get("finish_reason") is not None:
                state.finished = True
        usage = data.get("usage")
        if usage:
            state.output_tokens = usage.get("completion_tokens")
            state.prompt_tokens = usage.get("prompt_tokens")
        state.output_chunks += n
        return n


class LlamaCppApi(Api):
    name, route = "llamacpp", "/completion"

    async def listing(self, client):
        rows = await _get_json(client, "/lora-adapters")
        return [Listed(name=row.get("name") or PurePath(row["path"]).stem, lora_id=int(row["id"]),
                       path=row.get("path")) for row in rows], None

    def payload(self, targets, target, prompt, max_tokens):
        body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "ignore_eos": True}
        kind, _ = targets.describe(target)
        if kind == "auto":
            raise BenchError("llama-server has no router: 'auto' requests need --api openai or "
                             "edgelora")
        if kind == "adapter":
            return {**body, "lora": [{"id": targets.lora_ids[target], "scale": 1.0}]}
        return {**body, "lora": targets.all_lora_off} if targets.all_lora_ids else body

    def on_event(self, data, state):
        state.error = _error_message(data)
        if data.get("stop"):                      # the last event: counts, no new output
            state.finished = True
            state.output_tokens = data.get("tokens_predicted")
            state.prompt_tokens = data.get("tokens_evaluated")
            return 0
        n = 1 if data.get("tokens") or data.get("content") else 0
        state.output_chunks += n
        return n


class EdgeLoraApi(LlamaCppApi):
    name, route = "edgelora", "/completion"

    async def listing(self, client):
        listed, _ = await super().listing(client)
        return [Listed(row.name, path=row.path) for row in listed], None

    def payload(self, targets, target, prompt, max_tokens):
        body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "ignore_eos": True}
        kind, name = targets.describe(target)
        adapter = {"adapter": name, "auto": "auto", "base": None}[kind]
        return body if adapter is None else {**body, "adapter": adapter}


APIS: dict[str, Api] = {api.name: api for api in (OpenAIApi(), LlamaCppApi(), EdgeLoraApi())}


def api_of(name: str) -> Api:
    try:
        return APIS[name]
    except KeyError:
        raise BenchError(f"unknown API {name!r} (one of {', '.join(APIS)})") from None


async def _get_json(client: httpx.AsyncClient, path: str):
    try:
        r = await client.get(path)
    except httpx.HTTPError as e:
        raise BenchError(f"GET {client.base_url.join(path)} failed: {e!r}") from None
    if r.status_code != 200:
        raise BenchError(f"GET {client.base_url.join(path)} answered {r.status_code}: "
                         f"{r.text[:200]}")
    return r.json()


async def discover(client: httpx.AsyncClient, api: Api, adapters=None,
                   base_model: str | None = None) -> Targets:
    """The run's targets from the server's own listing.

    adapters: None (every adapter listed), an int n (the first n listed) or adapter names (for
    llama-server: the file stems or paths GET /lora-adapters shows). The order is the
    popularity rank. base_model overrides the listed base model's name (openai).
    """
    listed, listed_base = await api.listing(client)
    names = [row.name for row in listed]
    if adapters is None:
        chosen = listed
    elif isinstance(adapters, int):
        if not 0 <= adapters <= len(listed):
            raise BenchError(f"{adapters} adapters asked, the server lists {len(listed)}")
        chosen = listed[:adapters]
    else:
        where = {row.path: row for row in listed if row.path} | {row.name: row for row in listed}
        missing = [a for a in adapters if a not in where]
        if missing:
            raise BenchError(f"adapter {missing[0]!r} is not listed by the server (it lists "
                             f"{', '.join(names[:8]) or 'none'}{' ...' if len(names) > 8 else ''})")
        chosen = [where[a] for a in adapters]
    ids = tuple(row.lora_id for row in listed if row.lora_id is not None)
    return Targets(adapters=tuple(row.name for row in chosen),
                   lora_ids=tuple(row.lora_id for row in chosen) if ids else (),
                   all_lora_ids=ids, base_model=base_model or listed_base)


async def token_pool(client: httpx.AsyncClient, text: str = POOL_TEXT) -> list[int]:
    """Distinct token ids of `text` by the server's POST /tokenize (llama-server and edgelora
    read `content`, vLLM reads `prompt`)."""
    try:
        r = await client.post("/tokenize", json={"content": text, "prompt": text})
    except httpx.HTTPError as e:
        raise BenchError(f"POST {client.base_url.join('/tokenize')} failed: {e!r}") from None
    if r.status_code != 200:
        raise BenchError(f"POST /tokenize answered {r.status_code}: the prompt token pool needs "
                         "it (or give token ids: --token-ids LO:HI)")
    tokens = r.json().get("tokens", [])
    ids = sorted({t["id"] if isinstance(t, dict) else int(t) for t in tokens})
    if not ids:
        raise BenchError("POST /tokenize returned no tokens")
    return ids
