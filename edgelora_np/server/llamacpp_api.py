"""llama-server's own API: /completion, /lora-adapters, /tokenize, /detokenize, /props.

Field names and shapes follow llama.cpp's tools/server (server-task.cpp, server-common.cpp), so
its clients work unchanged. A request picks its adapter with `lora: [{id, scale}]` (ids as
GET /lora-adapters lists them for the caller) or, our extension, `adapter: NAME`. Unlike
llama-server, requests with different adapters share one batch, and `scale` scales only that
request's LoRA correction. One adapter per request: two or more with a non-zero scale is a 400.
A /completion stream is `data: {chunk}` lines, the last with "stop": true and the timings, and
no [DONE] (llama-server sends none on this route).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from edgelora_np.errors import EdgeLoraError
from edgelora_np.server.app import Serving
from edgelora_np.server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    LlamaCompletionRequest,
    LlamaCompletionResponse,
    LoraAdapterInfo,
    TokenizeRequest,
    TokenizeResponse,
)
from edgelora_np.server.service import ApiError, api_error_of, failure_of

router = APIRouter(tags=["llama.cpp"])

SSE = {200: {"content": {"text/event-stream": {}, "application/json": {}}}}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
            "repeat_last_n": 64}        # edgelora_np.sampling.SamplingParams, as llama-server's


def _adapter_of(service, tenant, body: LlamaCompletionRequest) -> tuple[str | None, float]:
    """(adapter name or None, its scale) from `lora` ids or `adapter`."""
    chosen = [c for c in body.lora or () if c.scale != 0.0]
    if len(chosen) > 1:
        raise ApiError(400, f"{len(chosen)} adapters with a non-zero scale: this server applies "
                       "one adapter per request", param="lora")
    if chosen and body.adapter is not None:
        raise ApiError(400, "give `lora` or `adapter`, not both", param="adapter")
    if chosen:
        ids = service.lora_ids(tenant)
        if not 0 <= chosen[0].id < len(ids):
            raise ApiError(400, f"lora id {chosen[0].id} is not one of GET /lora-adapters' "
                           f"(0..{len(ids) - 1})", param="lora")
        return ids[chosen[0].id], chosen[0].scale
    return service.resolve_model(tenant, body.adapter, param="adapter"), 1.0


def _timings(gen) -> dict:
    n_prompt, n_gen = gen.prompt_tokens - gen.cached_tokens, len(gen.token_ids)  # computed
    prompt_ms, gen_ms = gen.prefill_seconds * 1e3, gen.decode_seconds * 1e3
    return {"cache_n": gen.cached_tokens,
            "prompt_n": n_prompt, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
            "prompt_per_second": 1e3 * n_prompt / prompt_ms if prompt_ms else 0.0,
            "predicted_n": n_gen, "predicted_ms": gen_ms,
            "predicted_per_token_ms": gen_ms / n_gen if n_gen else 0.0,
            "predicted_per_second": 1e3 * n_gen / gen_ms if gen_ms else 0.0}


def _stop_type(gen) -> str:
    if gen.finish_reason == "stop":
        return "word" if gen.stopping_word else "eos"
    return "limit" if gen.finish_reason in ("length", "context") else "none"


@router.post("/completion", response_model=LlamaCompletionResponse, responses=SSE)
async def completion(body: LlamaCompletionRequest, request: Request, response: Response,
                     tenant: Serving):
    """Complete a prompt (text or token ids), llama-server style."""
    service = request.app.state.service
    adapter, scale = _adapter_of(service, tenant, body)
    if body.n_predict == 0:
        raise ApiError(400, "n_predict must be -1 (until the context is full) or >= 1",
                       param="n_predict")
    settings = {name: getattr(body, name) if getattr(body, name) is not None else default
                for name, default in DEFAULTS.items()}
    sampling = {**settings, "max_tokens": body.n_predict if body.n_predict > 0 else
                service.model.n_ctx, "ignore_eos": body.ignore_eos,
                "stop": [body.stop] if isinstance(body.stop, str) else body.stop or [],
                "cache_prompt": body.cache_prompt}
    if body.seed is not None and body.seed != -1:
        sampling["seed"] = body.seed
    flight = await service.submit(tenant, body.prompt, adapter=adapter, scale=scale, **sampling)
    gen = flight.gen
    response.headers.update(flight.headers)
    prompt_text = body.prompt if isinstance(body.prompt, str) else ""

    def final() -> dict:
        return {"index": 0, "content": "", "tokens": [], "id_slot": -1, "stop": True,
                "model": flight.model(adapter), "tokens_predicted": len(gen.token_ids),
                "tokens_evaluated": gen.prompt_tokens,
                "generation_settings": {**sampling, "n_predict": body.n_predict,
                                        "lora": [{"id": c.id, "scale": c.scale}
                                                 for c in body.lora or ()]},
                "prompt": prompt_text, "has_new_line": "\n" in gen.text, "truncated": False,
                "stop_type": _stop_type(gen), "stopping_word": gen.stopping_word,
                "tokens_cached": gen.cached_tokens, "timings": _timings(gen)}

    if not body.stream:
        await service.finish(request, flight)
        return {**final(), "content": gen.text, "tokens": gen.token_ids}

    async def events():
        n = 0
        try:
            async for delta in flight.deltas():
                n += len(delta.token_ids)
                yield {"data": json.dumps({
                    "index": 0, "content": delta.text, "tokens": list(delta.token_ids),
                    "stop": False, "id_slot": -1, "tokens_predicted": n,
                    "tokens_evaluated": gen.prompt_tokens})}
        except EdgeLoraError as e:
            yield {"data": json.dumps(failure_of(e).body())}
            return
        yield {"data": json.dumps(final())}

    return EventSourceResponse(events(), sep="\n", headers=flight.headers,
                               background=BackgroundTask(flight.close))


@router.get("/lora-adapters", response_model=list[LoraAdapterInfo])
async def lora_adapters(request: Request, tenant: Serving) -> list[LoraAdapterInfo]:
    """The caller's adapters; `id` is what `lora: [{id, scale}]` takes. `scale` is 0: no
    adapter applies unless a request asks for it."""
    service = request.app.state.service
    return [LoraAdapterInfo(id=i, name=name, path=service.catalog.sources[name])
            for i, name in enumerate(service.lora_ids(tenant))]


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, tenant: Serving) -> TokenizeResponse:
    """Token ids of `content` (with_pieces: each id with its text, or its bytes when the piece
    is not valid UTF-8 on its own)."""
    model = request.app.state.service.model

    def work():
        ids = model.tokenize(body.content, special=body.parse_special, add_bos=body.add_special)
        if not body.with_pieces:
            return ids
        out = []
        for i in ids:
            raw = model.tokenizer.token_to_piece(i)
            try:
                piece = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)
            out.append({"id": i, "piece": piece})
        return out

    try:
        return TokenizeResponse(tokens=await run_in_threadpool(work))
    except EdgeLoraError as e:
        raise api_error_of(e) from None


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request,
                     tenant: Serving) -> DetokenizeResponse:
    """The text of token ids."""
    model = request.app.state.service.model
    bad = [t for t in body.tokens if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary "
                       f"(0..{model.config.vocab_size - 1})", param="tokens")
    return DetokenizeResponse(content=await run_in_threadpool(model.detokenize, body.tokens))


@router.get("/props")
async def props(request: Request, tenant: Serving) -> dict:
    """Server properties, as llama-server's GET /props."""
    service = request.app.state.service
    model, o = service.model, service.options
    tok = model.tokenizer
    return {
        "default_generation_settings": {"params": {**DEFAULTS, "n_predict": -1},
                                        "n_ctx": model.n_ctx},
        "total_slots": o.max_seqs,
        "model_alias": service.model_id,
        "model_path": str(model.path),
        "modalities": {"vision": False, "video": False, "audio": False},
        "chat_template": tok.chat_template or "",
        "bos_token": "" if tok.bos_id is None else model.detokenize([tok.bos_id]),
        "eos_token": "" if tok.eos_id is None else model.detokenize([tok.eos_id]),
        "build_info": f"edgelora_np {request.app.version}",
        "is_sleeping": False,
    }
