"""A fleet of boards behind HAProxy: `edgelora fleet haproxy` writes the balancer's config.

Every request for one adapter goes to one board (adapter affinity), so each board's pool holds
the adapters it is asked for instead of every adapter the fleet serves; an adapter moves only
when its board leaves (or a new board takes over a share of the hash ring). HAProxy does the
work (docs/fleet.md); this module only writes its config:

    frontend   reads the adapter a request names from its JSON body (`option
               http-buffer-request`): `$.model` on /v1/ routes, `$.adapter` on llama.cpp's
               /completion, `$.lora_name` when loading or unloading an adapter at runtime
    by_adapter `balance hash var(txn.adapter)` + `hash-type consistent`: one board per adapter
    any_board  `balance leastconn`: the base model, "auto" (each board's router chooses) and
               everything else (listings, /tokenize, ...)

A board that cannot take a request hands it on: connection failures, a board that closes the
connection without answering, and 503 are retried on another board (`retry-on`, `option
redispatch 1`). HAProxy 2.6 (Debian 12) cannot retry on 429, so the balancer sends
`X-Edgelora-Busy-Status: 503` with each request; a board with a full queue then answers 503 with
`X-Edgelora-Busy: 429`, the balancer retries it elsewhere, and if every board is full it turns
the last answer back into the 429 the client expects.

Consistent hashing places each server on the ring by its numeric id, so the id of a board is
derived from its address (`board_id`): the same boards give the same adapter-to-board mapping
whatever order they are listed in, and two balancers with the same boards agree.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import jinja2

from edgelora_np.default_model import MODEL_FILENAME
from edgelora_np.errors import EdgeLoraError

BUSY_STATUS_HEADER = "X-Edgelora-Busy-Status"   # request: answer "too busy" with this status
BUSY_HEADER = "X-Edgelora-Busy"                 # response: the status the board meant (429)
MAX_BOARD_ID = 30_000     # ids * 4096 ring points per server stay below 2**32 (no wrap-around)
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


class FleetError(EdgeLoraError):
    """A fleet option that cannot make a working config (names the option and the value)."""


@dataclass(frozen=True)
class Board:
    host: str
    port: int
    id: int               # HAProxy's server id: its place on the consistent-hash ring

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        """The server's name in HAProxy's logs and stats: the address, made a valid name."""
        return "board_" + re.sub(r"[^A-Za-z0-9]", "_", self.address)


def parse_address(value: str, what: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 host in brackets) -> (host, port), or a FleetError naming `what`."""
    m = _HOST_PORT.match(value.strip())
    if m is None or not 0 < int(m["port"]) < 65536:
        raise FleetError(f"{what} {value!r}: expected HOST:PORT (e.g. 192.168.1.21:8080; an IPv6 "
                         "address in brackets, [fd00::21]:8080)")
    return m["host"], int(m["port"])


def board_id(address: str) -> int:
    """The HAProxy server id of a board: a hash of its address, in 1..MAX_BOARD_ID."""
    return 1 + zlib.crc32(address.encode()) % MAX_BOARD_ID


def boards_of(addresses: list[str]) -> list[Board]:
    """The boards, each with its id (a collision moves the later one to the next free id)."""
    if not addresses:
        raise FleetError("no boards: give at least one --board HOST:PORT")
    boards, used = [], set()
    for value in addresses:
        host, port = parse_address(value, "--board")
        address = f"{host}:{port}"
        if any(b.address == address for b in boards):
            raise FleetError(f"--board {address} is given twice")
        i = board_id(address)
        while i in used:
            i = i % MAX_BOARD_ID + 1
        used.add(i)
        boards.append(Board(host, port, i))
    return boards


@dataclass(frozen=True)
class FleetOptions:
    """What the config is made of (each field is an option of `edgelora fleet haproxy`)."""

    boards: tuple[str, ...]                 # HOST:PORT of each `edgelora serve`
    listen: str = "0.0.0.0:8000"            # where HAProxy accepts clients
    base_models: tuple[str, ...] = (MODEL_FILENAME.removesuffix(".gguf"),)  # ids not hashed
    affinity: bool = True                   # False: round-robin (the benchmark's baseline)
    balance_factor: int = 0                 # hash-balance-factor (0: off; 125..200 bound load)
    check_interval_s: float = 2.0           # health check period; down after 2 failures
    connect_timeout_s: float = 2.0          # a dead board fails this fast
    response_timeout_s: float = 600.0       # silence allowed from a board (prefill, long answers)
    max_body_kb: int = 64                   # requests up to this are routed by body and retried
    maxconn: int = 1024                     # client connections HAProxy holds at once
    stats: str | None = None                # ADDR:PORT of HAProxy's stats page (boards up/down)


def haproxy_config(options: FleetOptions) -> str:
    """The text of a complete haproxy.cfg for `options` (HAProxy 2.6 or later)."""
    boards = boards_of(list(options.boards))
    parse_address(options.listen, "--listen")
    if options.stats is not None:
        parse_address(options.stats, "--stats")
    if options.balance_factor and not 100 < options.balance_factor <= 1000:
        raise FleetError(f"--balance-factor {options.balance_factor}: a percentage above 100 "
                         "(125 to 200 is reasonable), or 0 for off")
    if options.max_body_kb < 16:
        raise FleetError(f"--max-body-kb {options.max_body_kb}: at least 16 (HAProxy's default "
                         "buffer)")
    for name in options.base_models:
        if not name or any(c.isspace() or c in "'\"\\" for c in name):
            raise FleetError(f"--base-model {name!r}: a model id without spaces or quotes")
    return _template().render(o=options, boards=boards, retries=max(3, len(boards)),
                              bufsize=options.max_body_kb * 1024,
                              busy_status=BUSY_STATUS_HEADER, busy=BUSY_HEADER, t=_duration)


def _duration(seconds: float) -> str:
    """HAProxy's time format: '2s', or '500ms'."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _template() -> jinja2.Template:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE)


TEMPLATE = """\
# HAProxy config for a fleet of `edgelora serve` boards, written by `edgelora fleet haproxy`.
{% if o.affinity %}
# Requests naming an adapter go to one board per adapter (consistent hashing); the base model,
# "auto" and everything else go to the least busy board.
{% else %}
# Round-robin over the boards, without adapter affinity (the baseline of docs/fleet.md).
{% endif %}
# Run: haproxy -f THIS_FILE   (check it: haproxy -c -f THIS_FILE)
global
    maxconn {{ o.maxconn }}
    # A request is surely routed by its JSON body, and replayed on another board, only if it
    # fits in one buffer: {{ o.max_body_kb }} KiB.
    tune.bufsize {{ bufsize }}
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option http-no-delay                 # forward each streamed token at once
    timeout connect {{ t(o.connect_timeout_s) }}
    timeout client {{ t(o.response_timeout_s) }}
    timeout server {{ t(o.response_timeout_s) }}  # a long prefill or non-streamed answer is silent
    timeout http-request 30s
    timeout http-keep-alive 60s
    timeout queue 30s
    # A dead, restarting or full board hands the request to another one (losing affinity only
    # then). 429 is not retryable in HAProxy 2.6: boards answer "queue full" with 503 when asked
    # by {{ busy_status }} (set below) and mark it with {{ busy }}.
    retries {{ retries }}
    option redispatch 1
    retry-on conn-failure empty-response 503
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host edgelora
    http-check expect status 200
    default-server inter {{ t(o.check_interval_s) }} fall 2 rise 1

frontend edgelora
    bind {{ o.listen }}
    option http-buffer-request
    http-request set-header {{ busy_status }} 503
{% if o.affinity %}
    # The adapter a request names: `model` (OpenAI and vLLM routes), `adapter` (llama.cpp's
    # /completion), `lora_name` (runtime load/unload: the adapter lands where it is served).
    acl openai_route path_beg /v1/
    acl llamacpp_route path /completion
    acl runtime_load path /v1/load_lora_adapter /v1/unload_lora_adapter
    http-request set-var(txn.adapter) req.body,json_query('$.model') if METH_POST openai_route
    http-request set-var(txn.adapter) req.body,json_query('$.adapter') if METH_POST llamacpp_route
    http-request set-var(txn.adapter) req.body,json_query('$.lora_name') if METH_POST runtime_load
    acl names_adapter var(txn.adapter) -m found
    acl any_board_model var(txn.adapter) -m str auto{% for m in o.base_models %} {{ m }}{% endfor %}

    use_backend by_adapter if names_adapter !any_board_model
{% endif %}
    default_backend any_board
{% if o.stats %}

frontend stats
    # Each board's state (UP, DOWN), requests and retries; CSV at /;csv
    bind {{ o.stats }}
    stats enable
    stats uri /
    stats refresh 5s
{% endif %}
{% if o.affinity %}

backend by_adapter
    balance hash var(txn.adapter)
    hash-type consistent
{% if o.balance_factor %}
    hash-balance-factor {{ o.balance_factor }}
{% endif %}
    http-response set-status 429 if { res.hdr({{ busy }}) -m found }
{% for b in boards %}
    server {{ b.name }} {{ b.address }} id {{ b.id }} check
{% endfor %}
{% endif %}

backend any_board
    balance {{ "leastconn" if o.affinity else "roundrobin" }}
    http-response set-status 429 if { res.hdr({{ busy }}) -m found }
{% for b in boards %}
{% if o.affinity %}
    server {{ b.name }} {{ b.address }} id {{ b.id }} track by_adapter/{{ b.name }}
{% else %}
    server {{ b.name }} {{ b.address }} id {{ b.id }} check
{% endif %}
{% endfor %}
"""
