"""What the routes stand on: the loaded model and engine, the adapter catalog, tenants' limits,
and one way to run a request (submit, stream or wait, cancel on disconnect).

The event loop never runs model code: tokenizing and submitting go to a worker thread, the
engine thread runs the forwards, and a request's output reaches the loop through its
Generation's async stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgelora_np.adapters.store import AUTO
from edgelora_np.engine.generation import Generation
from edgelora_np.errors import (
    AdapterError,
    CapacityError,
    ContextOverflowError,
    EdgeLoraError,
    EngineError,
    QueueFullError,
    SamplingError,
    StoreWriteError,
    TokenizerError,
)
from edgelora_np.server.metrics import ServerMetrics
from edgelora_np.server.tenants import Tenant, Tenants

log = logging.getLogger("edgelora_np.server")

RETRY_AFTER_SECONDS = 1


class ApiError(HTTPException):
    """An HTTP error with an OpenAI-style body: {"error": {message, type, param, code}}.

    An HTTPException, so that FastAPI passes it through untouched even when it is raised while
    the body is read (the 413 of an over-long chunked body)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "unavailable_error",
             507: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None, extra: dict | None = None):
        super().__init__(status, message, headers or {})
        self.status, self.message, self.param, self.code = status, message, param, code
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code, **self.extra}}


def api_error_of(e: EdgeLoraError) -> ApiError:
    """The HTTP error for an engine refusal: the client's fault is a 4xx, never a 500."""
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), code="context_length_exceeded", param="prompt",
                        extra={"n_prompt_tokens": e.n_prompt_tokens, "n_ctx": e.n_ctx})
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, EngineError):
        return ApiError(503, str(e), code="engine_failed")
    if isinstance(e, StoreWriteError):
        return ApiError(507 if e.disk_full else 503, str(e), code="store_write_failed")
    if isinstance(e, SamplingError):
        return ApiError(400, str(e), param=str(e).split(" ", 1)[0])
    if isinstance(e, (CapacityError, TokenizerError, AdapterError)):
        return ApiError(400, str(e))
    return ApiError(400, str(e))


def failure_of(error: BaseException) -> ApiError:
    """The HTTP error for a request that failed while being served (not the client's fault):
    503 when the engine stopped or the adapter's file or index entry cannot be read now (a
    balancer may retry elsewhere), else 500."""
    if isinstance(error, EngineError):
        return ApiError(503, str(error), code="engine_failed")
    if isinstance(error, AdapterError):
        return ApiError(503, str(error), code="adapter_unavailable")
    return ApiError(500, f"the request failed: {error}", code="request_failed")


@dataclass(frozen=True)
class ServerOptions:
    """What `edgelora serve` was started with (each field is one of its options)."""

    model_path: str | None = None
    store_dir: str | None = None           # None: the cached demo store
    adapters_dir: str | None = None        # imported into the store at start
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: str | None = None            # TOML file of tenants; None: an open server
    allow_adapter_dirs: tuple[str, ...] = ()   # the only roots runtime loads may read
    max_seqs: int = 16
    max_batch_tokens: int = 256
    max_queue: int = 256
    adapter_pool_mb: float = 256
    prefix_cache: bool = True              # reuse KV pages of cached prompt prefixes
    threads: int | None = None
    ctx: int | None = None
    log_format: str = "text"
    max_body_mb: float = 4.0
    max_tokens: int | None = None          # no request generates more (None: the context)
    name: str | None = None                # answered in the X-Edgelora-Server header
    drain_timeout_s: float = 30.0          # on SIGTERM, how long accepted requests may finish


@dataclass
class Catalog:
    """The adapters the server offers, in registration order (llama.cpp's lora ids count in it).

    Ids are positions in a tenant's own list, so they are contiguous for every tenant and
    reveal nothing of others' adapters; loading appends, so earlier ids do not move."""

    order: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)    # name -> where it came from
    runtime: dict[str, str] = field(default_factory=dict)    # loaded over HTTP: name -> tenant

    def add(self, name: str, source: str) -> None:
        if name not in self.sources:
            self.order.append(name)
        self.sources[name] = source

    def remove(self, name: str) -> None:
        self.order.remove(name)
        del self.sources[name]
        self.runtime.pop(name, None)

    def visible(self, tenant: Tenant) -> list[str]:
        return [n for n in self.order if tenant.sees(n)]


class Service:
    """The model, engine and catalog behind the routes; `load()` fills it in (in a thread)."""

    def __init__(self, options: ServerOptions, tenants: Tenants | None):
        self.options = options
        self.tenants = tenants
        self.open_tenant = Tenant("anonymous", metrics=True, can_load=True)
        self.model = None
        self.engine = None
        self.store = None
        self.model_id = ""
        self.catalog = Catalog()
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.draining = threading.Event()       # set on SIGTERM: new requests get 503
        self.started = int(time.time())
        self.metrics = ServerMetrics(lambda: self.engine if self.ready.is_set() else None)
        self._inflight: dict[str, int] = {}     # tenant -> requests in flight (event loop only)

    # --- start-up ----------------------------------------------------------------------------

    def load(self, model=None) -> None:
        """Load the model (or serve `model`, already loaded), open the store (importing
        --adapters), start the engine."""
        from edgelora_np import api
        from edgelora_np.adapters.store import AdapterStore
        from edgelora_np.default_model import cache_dir, resolve_model_path
        from edgelora_np.engine.engine import Engine

        o = self.options
        if model is None:
            path = resolve_model_path(o.model_path, progress=False)
            model = api.load_model(path, n_threads=o.threads, n_ctx=o.ctx, progress=False)
        store = AdapterStore(o.store_dir or cache_dir() / "demo_store", create=True)
        store.clean()
        if o.adapters_dir:
            self._import_folder(store, model, Path(o.adapters_dir))
        engine = Engine(model, store=store, max_seqs=o.max_seqs,
                        max_batch_tokens=o.max_batch_tokens, max_queue=o.max_queue,
                        adapter_pool_mb=o.adapter_pool_mb, prefix_cache=o.prefix_cache,
                        kv_tokens=o.max_seqs * model.n_ctx)
        for row in store.rows():
            if row.fingerprint == model.fingerprint:
                self.catalog.add(row.name, row.source)
            else:
                log.warning("store adapter %r was imported for another base model; not served",
                            row.name)
        log.info("router: %d adapter(s) with cards to choose from for model 'auto'",
                 len(engine.router.adapters))                       # embeds new cards, once
        engine.start()
        engine.submit([0], max_tokens=1, temperature=0.0).run()      # kernels loaded, warm
        self.model, self.store, self.engine = model, store, engine
        self.model_id = model.path.name.removesuffix(".gguf")
        self.ready.set()

    @staticmethod
    def _import_folder(store, model, folder: Path) -> None:
        if not folder.is_dir():
            raise EdgeLoraError(f"--adapters {folder}: not a directory")
        sources = sorted(p for p in folder.iterdir()
                         if (p / "adapter_config.json").is_file() or p.suffix == ".gguf")
        if not sources:
            raise EdgeLoraError(f"--adapters {folder}: no PEFT directories or .gguf files in it")
        for src in sources:
            store.import_adapter(src, model.config, model.fingerprint)

    def close(self) -> None:
        """Stop the engine; a request still going gets a 503 (or its stream an error event)."""
        if self.engine is not None:
            self.engine.close(EngineError("the server shut down before this request finished"))

    def check_ready(self) -> None:
        """503 while the model loads, once the engine has failed, or while shutting down."""
        if not self.ready.is_set():
            raise ApiError(503, "Loading model", code="loading")
        if self.engine.failure is not None:
            raise ApiError(503, str(self.engine.failure), code="engine_failed")
        if self.draining.is_set():
            raise ApiError(503, "the server is shutting down; retry on another server",
                           code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503) and wait up to `timeout_s` for the accepted ones to be
        answered. True when none is left."""
        self.draining.set()
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def idle(self) -> bool:
        """Nothing queued, running or still being answered."""
        return (self.engine is None or self.engine.pending == 0) and \
            not any(tuple(self._inflight.values()))      # tuple(): copied at once

    # --- who and what ------------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Tenant | None:
        if self.tenants is None:
            return self.open_tenant
        return self.tenants.authenticate(key)

    def resolve_model(self, tenant: Tenant, model: str | None, *, param: str = "model",
                      auto: bool = True) -> str | None:
        """The adapter a request names (None: the base model; "auto": the router chooses), or
        a 404 that does not tell another tenant's adapter from one that does not exist."""
        if model == AUTO and auto:
            if not tenant.base_model:
                raise ApiError(400, f"`{AUTO}` may choose the base model, which tenant "
                               f"{tenant.name!r} may not use", param=param)
            return AUTO
        if model is None or model == self.model_id:
            if not tenant.base_model:
                raise ApiError(404, f"The model `{self.model_id}` does not exist or you do not "
                               "have access to it.", param=param, code="model_not_found")
            return None
        if model in self.catalog.sources and tenant.sees(model):
            return model
        raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param=param, code="model_not_found")

    def lora_ids(self, tenant: Tenant) -> list[str]:
        """The tenant's adapters; llama.cpp's lora id of each is its index here."""
        return self.catalog.visible(tenant)

    # --- running a request -------------------------------------------------------------------

    async def submit(self, tenant: Tenant, prompt, *, adapter: str | None, scale: float = 1.0,
                     chat: bool = False, **sampling) -> Flight:
        """Queue a request for `tenant`; refusals become ApiErrors (4xx, or 503)."""
        limit = tenant.max_concurrent
        if limit is not None and self._inflight.get(tenant.name, 0) >= limit:
            raise ApiError(429, f"tenant {tenant.name!r} already has {limit} requests in flight "
                           "(its max_concurrent)", code="tenant_limit",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        cap = self.options.max_tokens
        if cap is not None and isinstance(sampling.get("max_tokens"), int):
            sampling["max_tokens"] = min(sampling["max_tokens"], cap)

        def allowed(name: str) -> bool:           # for "auto": the tenant's served adapters
            return name in self.catalog.sources and tenant.sees(name)

        try:
            gen = await run_in_threadpool(self.engine.submit, prompt, adapter=adapter,
                                          adapter_scale=scale, chat=chat, allowed=allowed,
                                          **sampling)
        except EdgeLoraError as e:
            raise api_error_of(e) from None
        self._inflight[tenant.name] = self._inflight.get(tenant.name, 0) + 1
        return Flight(self, tenant, gen)

    async def finish(self, request: Request, flight: Flight):
        """Wait for a request to end while watching the client: a disconnect cancels it."""
        gen = flight.gen
        try:
            consume = asyncio.ensure_future(_drain(gen))
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not consume.done():
                consume.cancel()
                raise ApiError(499, "client disconnected")
            gone.cancel()
            error = consume.exception()
            if error is not None:
                raise failure_of(error)
            return gen
        finally:
            flight.close()


@dataclass(eq=False)
class Flight:
    """A submitted request, on the server's side. `close()` runs exactly once, however the
    request ends (finished, failed, or its client gone, even before its stream started): it
    cancels the request if still going, frees the tenant's place and counts the tokens."""

    service: Service
    tenant: Tenant
    gen: Generation
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.gen.done:
            self.gen.cancel()
        self.service._inflight[self.tenant.name] -= 1
        if self.gen.finish_reason in ("stop", "length", "context"):
            self.service.metrics.observe_generation(self.gen)

    def model(self, requested: str | None) -> str:
        """What the response names: the adapter that served it (the router's choice for
        "auto"), or the base model's id."""
        if requested == AUTO or requested is None:
            return self.gen.adapter or self.service.model_id
        return requested

    @property
    def headers(self) -> dict[str, str]:
        """X-Edgelora-Route for a routed request: the choice, its probability and the reason."""
        route = self.gen.route
        if route is None:
            return {}
        return {"X-Edgelora-Route": f"{route.adapter or self.service.model_id}; "
                                    f"probability={route.probability:.3f}; reason={route.reason}"}

    async def deltas(self):
        """The request's Deltas (for a streaming response, which closes the flight after)."""
        async for delta in self.gen.stream():
            yield delta


async def _drain(gen) -> None:
    async for _ in gen.stream():
        pass


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
