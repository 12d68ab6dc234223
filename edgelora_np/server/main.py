"""Running the server: `edgelora serve` calls run(options).

The socket is bound first (a busy port is a one-line error, not a traceback), uvicorn starts
serving /health (503 "Loading model") at once, and a loader thread loads the model, imports
--adapters into the store and starts the engine; then the banner with the URL and a curl
example is printed. A load that fails stops the server and run() raises its error.

SIGTERM (or Ctrl-C) drains: /health and new requests get 503 (a balancer sends them to another
board), the requests already accepted, queued or running, finish within --drain-timeout, then
the server stops and run() returns (exit status 0). Requests still going at the timeout get
a 503 (or an error event) saying so. A second signal stops at once.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time

import click
import uvicorn

from edgelora_np.errors import EdgeLoraError, EngineError
from edgelora_np.server.service import ServerOptions, Service
from edgelora_np.server.tenants import Tenants

log = logging.getLogger("edgelora_np.server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and tenant, when known)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if getattr(record, "tenant", None):
            doc["tenant"] = record.tenant
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("edgelora_np", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgeLoraError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but its first SIGTERM/SIGINT drains before it stops (see above)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drainer is not None or not self.service.ready.is_set():
            return super().handle_exit(sig, frame)      # a second signal, or still loading
        self._drainer = threading.Thread(target=self._drain, name="edgelora-drain", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        timeout = self.service.options.drain_timeout_s
        log.info("shutting down: refusing new requests, waiting up to %g s for %d in flight",
                 timeout, self.service.engine.pending)
        try:
            if not self.service.drain(timeout):
                log.warning("drain timeout: failing %d request(s) still going",
                            self.service.engine.pending)
                self.service.engine.close(EngineError(
                    f"the server shut down: this request did not finish within its "
                    f"--drain-timeout of {timeout:g} s"))
        finally:
            # Not uvicorn's handle_exit: that would re-raise the signal once stopped, and the
            # process would end killed by it instead of with status 0.
            self.should_exit = True


def banner(service: Service, seconds: float) -> str:
    o = service.options
    url = f"http://{'127.0.0.1' if o.host in ('0.0.0.0', '::') else o.host}:{o.port}"
    names = service.catalog.order
    example = names[0] if names else service.model_id
    key = " -H 'Authorization: Bearer $KEY'" if service.tenants is not None else ""
    body = json.dumps({"model": example, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 32})
    return (f"edgelora: serving {service.model_id} and {len(names)} adapter(s) on {url} "
            f"(ready in {seconds:.1f} s)\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key} "
            f"-d '{body}'")


def run(options: ServerOptions) -> None:
    from edgelora_np.server.app import create_app

    configure_logging(options.log_format)
    tenants = Tenants.load(options.api_keys) if options.api_keys else None
    sock = bind(options.host, options.port)
    service = Service(options, tenants)
    config = uvicorn.Config(create_app(service), log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = _DrainingServer(config, service)
    t0 = time.perf_counter()

    def load():
        try:
            service.load()
        except BaseException as e:       # noqa: BLE001 - reported by run(), server stopped
            service.load_error = e
            server.should_exit = True
            return
        click.echo(banner(service, time.perf_counter() - t0), err=True)

    threading.Thread(target=load, name="edgelora-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
    if service.load_error is not None:
        raise service.load_error
