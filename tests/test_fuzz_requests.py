"""Hostile requests against a live server (issue #17): schemathesis over /openapi.json, then
hand-written malformed requests. Every answer is a 2xx or a 4xx with an error message, never a
5xx, and the server keeps serving a well-formed request afterwards.

The server runs in this process (tests/test_server.py's InProcessServer) around the session's
real model, with --max-tokens 4 so that a fuzzed request asking for millions of tokens costs
at most four. schemathesis runs EDGELORA_FUZZ_REQUESTS cases per endpoint that takes input
(10 here; `tox -e fuzz` sets 150: over 1,000 in all).
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import InProcessServer

pytestmark = pytest.mark.slow

REQUESTS_PER_ENDPOINT = int(os.environ.get("EDGELORA_FUZZ_REQUESTS", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(real_model, tmp_path_factory):
    s = InProcessServer(real_model, tmp_path_factory.mktemp("fuzz_server"), max_seqs=4,
                        max_tokens=4)
    try:
        yield s.url
    finally:
        s.close()


def operations(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_schemathesis_every_endpoint(live):
    """EDGELORA_FUZZ_REQUESTS cases per endpoint, schema-valid and schema-violating (schemathesis'
    positive and negative modes); each response is checked for 5xx and against its declared
    status codes, content type and schema."""
    tried: dict[str, int] = {}
    ops = operations(live)
    assert len(ops) >= 10
    for op in ops:
        @given(case=op.as_strategy(GenerationMode.POSITIVE) | op.as_strategy(GenerationMode.NEGATIVE))
        @settings(max_examples=REQUESTS_PER_ENDPOINT, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(timeout=120)
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                assert response.json()["error"]["message"]
            tried[case.operation.label] = tried.get(case.operation.label, 0) + 1
        run()
    print("schemathesis cases per endpoint:", json.dumps(tried, indent=1),
          "total", sum(tried.values()))
    assert all(n >= 1 for n in tried.values()) and len(tried) == len(ops)
    ok_request(live)


# --- hand-written -----------------------------------------------------------------------------------

def post(url, path, content, content_type="application/json"):
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": content_type},
                      timeout=120)


def ok_request(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2,
                                                   "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text


def nested(depth):
    return '{"prompt": ' + "[" * depth + "]" * depth + "}"


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

MALFORMED = {
    "invalid json": ("/v1/completions", b'{"prompt": "hi", '),
    "invalid utf-8": ("/v1/completions", b'{"prompt": "\xff\xfe\xc3"}'),
    "invalid utf-8 chat": (CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'),
    "not an object": ("/v1/completions", b"[1, 2, 3]"),
    "empty body": ("/completion", b""),
    "deeply nested": ("/v1/completions", nested(100_000).encode()),
    "nested messages": (CHAT, ('{"messages": ' + "[" * 5000 + "]" * 5000 + "}").encode()),
    "wrong types": ("/v1/completions", json.dumps({"prompt": {"a": 1}, "max_tokens": "many"})),
    "negative max_tokens": ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -5})),
    "negative seed": ("/completion", json.dumps({"prompt": "hi", "n_predict": 1, "seed": -7})),
    "ragged token lists": ("/v1/completions", json.dumps({"prompt": [[1, 2], [3]]})),
    "NaN temperature": ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    "Infinity top_p": ("/completion", b'{"prompt": "hi", "top_p": Infinity}'),
    "1e999 temperature": (CHAT, json.dumps({"messages": MSG}).replace("}]", "}], \"temperature\": 1e999")),
    "10,000 stop strings": ("/v1/completions",
                            json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(10_000)]})),
    "a 100k-character stop": ("/completion", json.dumps({"prompt": "hi", "stop": ["x" * 100_000]})),
    "empty stop string": ("/v1/completions", json.dumps({"prompt": "hi", "stop": [""]})),
    "token id past the vocabulary": ("/v1/completions", json.dumps({"prompt": [10**9]})),
    "negative token id": ("/completion", json.dumps({"prompt": [-1, 5]})),
    "token id 2^64": ("/v1/completions", json.dumps({"prompt": [[2**64]]})),
    "detokenize garbage ids": ("/detokenize", json.dumps({"tokens": [-5, 2**40]})),
    "unknown role": (CHAT, json.dumps({"messages": [{"role": "root", "content": "hi"}]})),
    "no messages": (CHAT, json.dumps({"messages": []})),
    "content parts of garbage": (CHAT, json.dumps({"messages": [{"role": "user",
                                                                 "content": [{"type": 5}]}]})),
    "lone surrogate": ("/v1/completions", b'{"prompt": "\\ud800\\udfff\\ud800", "max_tokens": 1}'),
    "n=2": ("/v1/completions", json.dumps({"prompt": "hi", "n": 2})),
    "lora id out of range": ("/completion", json.dumps({"prompt": "hi", "lora": [{"id": 10**9}]})),
    "lora NaN scale": ("/completion", b'{"prompt": "hi", "lora": [{"id": 0, "scale": NaN}]}'),
    "model of control characters": (CHAT, json.dumps({"model": "\x00\x01\u202e", "messages": MSG})),
    "load path garbage": ("/v1/load_lora_adapter",
                          json.dumps({"lora_name": "x" * 10_000, "lora_path": "\x00"})),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_are_4xx_with_a_message(live, name):
    path, body = MALFORMED[name]
    r = post(live, path, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["error"]["message"]
    ok_request(live)


@pytest.mark.parametrize("extra", [{"seed": 2**70}, {"top_k": 2**63}, {"max_tokens": 2**70},
                                   {"repeat_last_n": 2**40}, {"temperature": 1e-300},
                                   {"temperature": 1e308}], ids=str)
def test_huge_but_legal_numbers_are_served(live, extra):
    # temperature 1e-300 used to raise IndexError on the engine thread: every request failed.
    r = httpx.post(f"{live}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{live}/health", timeout=30).status_code == 200


def test_unicode_garbage_prompts_are_served(live):
    for prompt in ["\u202e\u0000\ufeff", "🦙" * 200, "\U0010ffff\u0301\u0301", "a\r\n\t\x0b"]:
        r = httpx.post(f"{live}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                       timeout=120)
        assert r.status_code == 200, r.text


def test_a_10_mb_body_is_413(live):
    r = post(live, "/v1/completions", json.dumps({"prompt": "x" * (10 << 20)}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok_request(live)


def test_max_tokens_is_capped_by_the_server(live):
    r = httpx.post(f"{live}/v1/completions", json={"prompt": "Once", "max_tokens": 10**6,
                                                    "temperature": 0, "ignore_eos": True},
                   timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
