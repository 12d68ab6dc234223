"""Running the server: `edgelora serve` calls run(options).

The socket is bound first (a busy port is a one-line error, not a traceback), uvicorn starts
serving /health (503 "Loading model") at once, and a loader thread loads the model, imports
--adapters into the store and starts the engine; then the banner with the URL and a curl
example is printed. A load that fails stops the server and run() raises its error.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time

import click

from edgelora_np.errors import EdgeLoraError
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
    import uvicorn

    from edgelora_np.server.app import create_app

    configure_logging(options.log_format)
    tenants = Tenants.load(options.api_keys) if options.api_keys else None
    sock = bind(options.host, options.port)
    service = Service(options, tenants)
    config = uvicorn.Config(create_app(service), log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
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
