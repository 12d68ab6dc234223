"""The FastAPI application: middleware, errors, authentication, and the routes of every API.

    create_app(service) -> FastAPI
        /v1/...              OpenAI and vLLM (server/openai.py)
        /completion, ...     llama-server (server/llamacpp.py)
        /health, /metrics    here

Errors everywhere are {"error": {"message", "type", "param", "code"}} with the status that fits
(service.ApiError); a request the server cannot parse is a 400, never a 500 (a 500 is a bug,
logged with its traceback). Keys are never logged.

A request with `X-Edgelora-Busy-Status: 503` (what the fleet's HAProxy sends) gets its 429s
("too busy": queue full, tenant limit) as 503 with `X-Edgelora-Busy: 429`, which the balancer
can retry on another board (docs/fleet.md).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgelora_np.server.schemas import ErrorResponse, Health
from edgelora_np.server.service import ApiError, Service
from edgelora_np.server.tenants import Tenant

log = logging.getLogger("edgelora_np.server")

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 503, 507)}


def create_app(service: Service) -> FastAPI:
    from edgelora_np.server import llamacpp_api, openai_api

    app = FastAPI(title="edgelora_np", version=_version(),
                  description="Multi-tenant LoRA serving: OpenAI, vLLM and llama-server APIs.",
                  responses=ERRORS)
    app.state.service = service
    app.state.metrics = service.metrics
    app.include_router(openai_api.router)
    app.include_router(llamacpp_api.router)
    _add_error_handlers(app)

    @app.get("/health", response_model=Health, tags=["server"],
             responses={503: {"model": ErrorResponse}})
    def health() -> Health:
        """200 when serving; 503 while the model loads or after the engine failed."""
        service.check_ready()
        return Health()

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def metrics(tenant: Authenticated) -> Response:
        """Prometheus text (a tenant needs `metrics = true` when --api-keys is set)."""
        if not tenant.metrics:
            raise ApiError(403, f"tenant {tenant.name!r} may not read /metrics")
        return Response(app.state.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return _Outer(app, service, set(app.openapi()["paths"]))


def _version() -> str:
    from edgelora_np import __version__

    return __version__


# --- authentication and readiness, as dependencies ---------------------------------------------

def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def authenticated(request: Request) -> Tenant:
    """The calling tenant (401 without a valid key, when the server has --api-keys)."""
    tenant = request.app.state.service.authenticate(_presented_key(request))
    if tenant is None:
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or "
                            "'X-Api-Key: KEY')", code="invalid_api_key")
    request.state.tenant = tenant.name
    return tenant


Authenticated = Annotated[Tenant, Depends(authenticated)]


def serving(request: Request, tenant: Authenticated) -> Tenant:
    """`authenticated`, and the model loaded and the engine alive (else 503)."""
    request.app.state.service.check_ready()
    return tenant


Serving = Annotated[Tenant, Depends(serving)]       # the tenant of a request the server can serve


# --- errors ---------------------------------------------------------------------------------------

def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, "the request body is not valid JSON "
                                           f"({first.get('ctx', {}).get('error', 'parse error')})"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return error_response(ApiError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"))


# --- the outer layer: body limit, server header, busy status, access log and request metrics ----

BUSY_STATUS_HEADER = b"x-edgelora-busy-status"   # request: answer "too busy" (429) with this
BUSY_HEADER = b"x-edgelora-busy"                 # response: the status it stands for (429)
BUSY_STATUSES = (429, 503)


def _busy_status(value: bytes | None) -> int | None:
    """The status a request asks "too busy" to be answered with (edgelora_np/fleet.py: HAProxy
    2.6 retries a 503 on another board but cannot retry a 429); None: the usual 429."""
    if value is None or not value.strip().isdigit() or int(value) not in BUSY_STATUSES:
        return None
    return int(value)


class _Outer:
    """Pure ASGI middleware around the app (no BaseHTTPMiddleware: it breaks streaming and
    disconnect detection). Refuses bodies over the limit with 413 before they are read whole."""

    def __init__(self, app: FastAPI, service: Service, known_paths: set[str]):
        self.app, self.service, self.known = app, service, known_paths
        self.limit = int(service.options.max_body_mb * 2**20)
        self.name = service.options.name
        self.state = app.state               # the routes' (tests reach the service through it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        busy_status = _busy_status(headers.get(BUSY_STATUS_HEADER))

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-edgelora-server", self.name.encode())] if self.name else []
                if message["status"] == 429 and busy_status is not None:
                    # A balancer asked for "too busy" in a status it retries elsewhere.
                    message = {**message, "status": busy_status}
                    extra.append((BUSY_HEADER, b"429"))
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            # llama-server reads every body as JSON, and its clients rely on it (curl -d).
            scope = {**scope, "headers": [*((k, v) for k, v in scope["headers"]
                                            if k != b"content-type"),
                                          (b"content-type", b"application/json")]}
        length = headers.get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                await self._too_large(scope, receive, send_wrapper)
            else:
                await self.app(scope, self._limited(receive, scope, send_wrapper), send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in self.known else "other"
            self.state.metrics.observe_request(path, status["code"])
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status["code"],
                     (time.perf_counter() - start) * 1e3,
                     extra={"tenant": scope.get("state", {}).get("tenant")})

    def _limited(self, receive, scope, send):
        """A receive() that stops a chunked body once it passes the limit."""
        seen = {"bytes": 0}

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.limit:
                    raise ApiError(413, f"request body over {self.limit} bytes",
                                   code="request_too_large")
            return message
        return limited

    async def _too_large(self, scope, receive, send):
        e = ApiError(413, f"request body over {self.limit} bytes (--max-body-mb)",
                     code="request_too_large")
        await error_response(e)(scope, receive, send)
