"""The OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) and vLLM's runtime
adapter routes (/v1/load_lora_adapter, /v1/unload_lora_adapter).

`model` names an adapter the caller may use, or the base model's id; the response echoes it.
Streams are server-sent events: `data: {chunk}` lines, then `data: [DONE]`. A chat stream's
first delta carries the role, then come content deltas, then a chunk with `finish_reason`, then
(only with stream_options.include_usage) a chunk with no choices and the usage.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from edgelora_np.errors import EdgeLoraError
from edgelora_np.server.app import Serving
from edgelora_np.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
)
from edgelora_np.server.service import ApiError, api_error_of, failure_of

router = APIRouter(prefix="/v1", tags=["openai"])

SSE = {200: {"content": {"text/event-stream": {}, "application/json": {}}}}
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def sampling_of(req, max_tokens: int) -> dict:
    """Engine sampling keywords from a request (absent fields: llama-server's defaults)."""
    kw = {"max_tokens": max_tokens, "ignore_eos": req.ignore_eos,
          "cache_prompt": req.cache_prompt}
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.seed is not None and req.seed != -1:
        kw["seed"] = req.seed
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    return kw


def _or(value, default):
    return default if value is None else value


def unsupported(**fields) -> None:
    """400 for a field whose value we cannot honour (the first of `name=(value, ok)`)."""
    for name, (value, ok) in fields.items():
        if not ok:
            raise ApiError(400, f"{name}={value!r} is not supported by this server", param=name)


def usage(gen) -> dict:
    n = len(gen.token_ids)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n,
            "total_tokens": gen.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}


def sse_event(payload) -> dict:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload)}


def openai_stream(flight, body, rid: str, created: int, model: str, obj: str, choice_of,
                  first: dict | None = None) -> EventSourceResponse:
    """An OpenAI stream as server-sent events: `first` (if any), a chunk per Delta with
    `choice_of(text)`, the chunk with `finish_reason` (`choice_of(None)`), the usage chunk
    (stream_options.include_usage), then [DONE]. The Flight closes after the response."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    gen = flight.gen

    def chunk(choice: dict | None, finish: str | None = None) -> dict:
        choices = [] if choice is None else \
            [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}]
        c = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        return {**c, "usage": None} if include_usage else c

    async def events():
        if first is not None:
            yield sse_event(chunk(first))
        try:
            async for delta in flight.deltas():
                yield sse_event(chunk(choice_of(delta.text)))
        except EdgeLoraError as e:
            yield sse_event(failure_of(e).body())
            return
        yield sse_event(chunk(choice_of(None), FINISH[gen.finish_reason]))
        if include_usage:
            yield sse_event({**chunk(None), "usage": usage(gen)})
        yield sse_event("[DONE]")

    return EventSourceResponse(events(), sep="\n", headers=flight.headers,
                               background=BackgroundTask(flight.close))


# --- /v1/completions ----------------------------------------------------------------------------

@router.post("/completions", response_model=CompletionResponse, responses=SSE)
async def completions(body: CompletionRequest, request: Request, response: Response,
                      tenant: Serving):
    """Complete a prompt (text or token ids; one prompt per request)."""
    service = request.app.state.service
    unsupported(n=(body.n, body.n == 1), best_of=(body.best_of, body.best_of in (None, 1)),
                echo=(body.echo, not body.echo), logprobs=(body.logprobs, body.logprobs is None),
                suffix=(body.suffix, not body.suffix))
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request ({len(prompt)} given)", param="prompt")
        prompt = prompt[0]
    adapter = service.resolve_model(tenant, body.model)
    flight = await service.submit(tenant, prompt, adapter=adapter,
                               **sampling_of(body, _or(body.max_tokens, service.model.n_ctx)))
    gen, model = flight.gen, flight.model(body.model)
    response.headers.update(flight.headers)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        await service.finish(request, flight)
        return CompletionResponse(id=rid, created=created, model=model, usage=usage(gen),
                                  choices=[{"text": gen.text,
                                            "finish_reason": FINISH[gen.finish_reason]}])
    return openai_stream(flight, body, rid, created, model, "text_completion",
                         lambda text: {"text": text or ""})


# --- /v1/chat/completions -----------------------------------------------------------------------

def _messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"message {i}: content part of type {part.type!r} is "
                                   "not supported (text only)", param=f"messages.{i}.content")
                parts.append(part.text)
            content = "".join(parts)
        out.append({"role": m.role, "content": content or ""})
    return out


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response,
                           tenant: Serving):
    """Answer a conversation, rendered with the model's chat template."""
    service = request.app.state.service
    unsupported(n=(body.n, body.n == 1), logprobs=(body.logprobs, not body.logprobs),
                tools=(body.tools, not body.tools),
                response_format=(body.response_format, body.response_format in (
                    None, {"type": "text"})))
    adapter = service.resolve_model(tenant, body.model)
    max_tokens = _or(body.max_completion_tokens, _or(body.max_tokens, service.model.n_ctx))
    flight = await service.submit(tenant, _messages(body), adapter=adapter, chat=True,
                               **sampling_of(body, max_tokens))
    gen, model = flight.gen, flight.model(body.model)
    response.headers.update(flight.headers)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        await service.finish(request, flight)
        return ChatCompletionResponse(
            id=rid, created=created, model=model, usage=usage(gen),
            choices=[{"message": {"content": gen.text},
                      "finish_reason": FINISH[gen.finish_reason]}])
    return openai_stream(flight, body, rid, created, model, "chat.completion.chunk",
                         lambda text: {"delta": {} if text is None else {"content": text}},
                         first={"delta": {"role": "assistant", "content": ""}})


# --- /v1/models -----------------------------------------------------------------------------------

@router.get("/models", response_model=ModelList)
async def models(request: Request, tenant: Serving) -> ModelList:
    """The base model (if the caller may use it) and every adapter the caller may use."""
    service = request.app.state.service
    n_ctx, created = service.model.n_ctx, service.started
    cards = []
    if tenant.base_model:
        cards.append(ModelCard(id=service.model_id, created=created,
                               root=str(service.model.path), max_model_len=n_ctx))
    sources = service.catalog.sources
    cards += [ModelCard(id=name, created=created, root=sources[name], parent=service.model_id,
                        max_model_len=n_ctx) for name in service.lora_ids(tenant)]
    return ModelList(data=cards)


# --- vLLM's runtime adapters --------------------------------------------------------------------

MAX_ADAPTER_ENTRIES = 256     # files and folders an adapter directory may hold (PEFT has 2-4)


def confined(path: str, roots: tuple[str, ...]) -> tuple[Path, Path]:
    """`path` resolved (symlinks and '..' followed) and the root it lies under, if it lies under
    one of `roots` and so does everything in it: a symlink inside an adapter directory that
    points out of the root, a FIFO or a device file (a read that never ends) are refused like a
    path outside."""
    if not roots:
        raise ApiError(403, "runtime adapter loading is off (start the server with "
                            "--allow-adapter-dir DIR)", param="lora_path")
    try:
        resolved = Path(path).resolve()
    except (ValueError, OSError) as e:                 # an embedded NUL, a symlink loop
        raise ApiError(400, f"lora_path {path!r} is not a usable path: {e}",
                       param="lora_path") from None
    for root in (Path(r).resolve() for r in roots):
        if resolved.is_relative_to(root):
            _check_entries(path, resolved, root)
            return resolved, root
    raise ApiError(403, f"lora_path {path!r} is outside the directories this server may load "
                        "adapters from", param="lora_path")


def _check_entries(path: str, resolved: Path, root: Path) -> None:
    if not resolved.exists():
        return                                         # the caller's 400 says so
    entries = [resolved]
    if resolved.is_dir():
        for i, entry in enumerate(resolved.rglob("*")):
            if i >= MAX_ADAPTER_ENTRIES:
                raise ApiError(400, f"lora_path {path!r} holds more than {MAX_ADAPTER_ENTRIES} "
                                    "entries; an adapter directory holds a few files",
                               param="lora_path")
            entries.append(entry)
    for entry in entries:
        real = entry.resolve()
        if not real.is_relative_to(root):
            raise ApiError(403, f"lora_path {path!r}: {entry.name!r} links outside the "
                                "directories this server may load adapters from",
                           param="lora_path")
        try:
            mode = real.stat().st_mode
        except OSError as e:
            raise ApiError(400, f"lora_path {path!r}: {entry.name!r} is unreadable: "
                                f"{e.strerror}", param="lora_path") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ApiError(403, f"lora_path {path!r}: {entry.name!r} is not a regular file or "
                                "directory (a FIFO, socket or device is never read)",
                           param="lora_path")


MAX_ADAPTER_BYTES = 1 << 31   # what one runtime load may copy (a rank-64 7B adapter is ~0.3 GB)


@contextlib.contextmanager
def snapshot(path: str, resolved: Path, root: Path):
    """A private copy of the checked `resolved` (a file or directory), read without following
    any symlink below `root`: a link swapped in after `confined` checked the path (a race on a
    directory the caller controls) makes the load a 403, never a read outside the root."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

    def refuse(what: str):
        return ApiError(403, f"lora_path {path!r}: {what} changed into a link, FIFO or device "
                             "while it was being loaded", param="lora_path")

    def open_at(dir_fd: int, name: str) -> int:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as e:         # ELOOP: a symlink; ENXIO: a FIFO nobody writes
            raise refuse(repr(name)) from e

    def copy(fd: int, name: str, dest: Path, budget: list[int]) -> None:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            dest.mkdir()
            for entry in sorted(os.listdir(fd)):
                budget[1] -= 1
                if budget[1] < 0:
                    raise ApiError(400, f"lora_path {path!r} holds more than "
                                        f"{MAX_ADAPTER_ENTRIES} entries", param="lora_path")
                child = open_at(fd, entry)
                try:
                    copy(child, entry, dest / entry, budget)
                finally:
                    os.close(child)
        elif stat.S_ISREG(mode):
            with open(dest, "wb") as out:
                while chunk := os.read(fd, 1 << 20):
                    budget[0] -= len(chunk)
                    if budget[0] < 0:
                        raise ApiError(400, f"lora_path {path!r} is larger than "
                                            f"{MAX_ADAPTER_BYTES >> 20} MiB", param="lora_path")
                    out.write(chunk)
        else:
            raise refuse(repr(name))

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in resolved.relative_to(root).parts:
            inner = open_at(fd, part)
            os.close(fd)
            fd = inner
        with tempfile.TemporaryDirectory(prefix="edgelora-load-") as tmp:
            copy(fd, resolved.name, Path(tmp) / resolved.name, [MAX_ADAPTER_BYTES,
                                                                MAX_ADAPTER_ENTRIES])
            yield Path(tmp) / resolved.name
    finally:
        os.close(fd)


# Success is vLLM's plain text; errors are JSON like everywhere (so the route's class stays JSON).
PLAIN_OK = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.post("/load_lora_adapter", tags=["vllm"], responses=PLAIN_OK)
async def load_lora_adapter(body: LoadLoraRequest, request: Request,
                            tenant: Serving):
    """Import an adapter (PEFT directory or GGUF-LoRA file) into the store and serve it."""
    from edgelora_np.adapters.store import check_name

    service = request.app.state.service
    if not tenant.can_load:
        raise ApiError(403, f"tenant {tenant.name!r} may not load adapters")
    try:
        name = check_name(body.lora_name)
    except EdgeLoraError as e:
        raise ApiError(400, str(e), param="lora_name") from None
    if name in service.catalog.sources or name == service.model_id:
        raise ApiError(400, f"an adapter named {name!r} is already loaded", param="lora_name")
    source, root = confined(body.lora_path, service.options.allow_adapter_dirs)
    if not source.exists():
        raise ApiError(400, f"lora_path {body.lora_path!r} does not exist", param="lora_path")
    model = service.model

    def load() -> None:
        with snapshot(body.lora_path, source, root) as copy:
            service.store.import_adapter(copy, model.config, model.fingerprint, name=name,
                                         force=True, origin=str(source))
        service.engine.refresh_store()

    try:
        await run_in_threadpool(load)
    except EdgeLoraError as e:
        raise api_error_of(e) from None
    service.catalog.add(name, str(source))
    service.catalog.runtime[name] = tenant.name
    tenant.owned.add(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", tags=["vllm"], responses=PLAIN_OK)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request,
                              tenant: Serving):
    """Stop serving an adapter (one loaded at runtime is removed from the store too)."""
    service = request.app.state.service
    if not tenant.can_load:
        raise ApiError(403, f"tenant {tenant.name!r} may not unload adapters")
    name = service.resolve_model(tenant, body.lora_name, param="lora_name", auto=False)
    if name is None:
        raise ApiError(400, "the base model cannot be unloaded", param="lora_name")
    try:
        service.engine.remove_adapter(name)
    except EdgeLoraError as e:
        raise ApiError(409, str(e), param="lora_name") from None
    if name in service.catalog.runtime:
        await run_in_threadpool(service.store.remove, name)
    service.catalog.remove(name)
    tenant.owned.discard(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
