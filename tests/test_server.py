"""`edgelora serve` over real HTTP, with the official `openai` client and raw requests.

One server runs as a subprocess (`edgelora serve` on a loopback port, the shipped task adapters
imported into a fresh store, an --api-keys file of three tenants). Tests that need a special
set-up (a tiny queue, an injected engine failure) run a second server in this process around
the session's model, on its own port, through the same create_app/Service code.

The references are independent of the server: each request's greedy tokens alone vs. in a
crowd, streamed vs. not, the in-process engine's output, the shipped adapters' cards, the
counters prometheus-client's parser reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgelora_np.server.tenants import hash_key

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "models" / "adapters"
TASKS = sorted(p.name for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())
KEYS = {"alice": "alice-key-1", "bob": "bob-key-2", "ops": "ops-key-3"}
DEADLINE = 300        # seconds: start-up and deadlock detection, never a speed bound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def card_prompt(task: str) -> str:
    return json.loads((ADAPTERS / task / "card.json").read_text())["example_prompts"][0]


def wait_healthy(url: str, proc=None) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server never became healthy")


def metrics(url: str, key: str = KEYS["ops"]) -> dict:
    """{(name, sorted label items): value} of every sample /metrics reports."""
    text = httpx.get(f"{url}/metrics", headers={"X-Api-Key": key}, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_idle(url: str) -> dict:
    """Poll /metrics until nothing runs or waits; returns that scrape."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        m = metrics(url)
        if (sample(m, "edgelora_num_requests_running") == 0
                and sample(m, "edgelora_num_requests_waiting") == 0):
            return m
        time.sleep(0.05)
    raise AssertionError("requests still running")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    keys = root / "keys.toml"
    keys.write_text(f"""
[tenants.alice]
key_sha256 = "{hash_key(KEYS['alice'])}"
adapters = ["sql", "dates", "alice-*"]
can_load = true

[tenants.bob]
key_sha256 = "{hash_key(KEYS['bob'])}"
adapters = ["reverse", "units"]
max_concurrent = 1

[tenants.ops]
key_sha256 = "{hash_key(KEYS['ops'])}"
adapters = ["*"]
metrics = true
""")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgelora_np.cli", "serve", "--port", str(port),
         "--store", str(root / "store"), "--adapters", str(ADAPTERS), "--api-keys", str(keys),
         "--allow-adapter-dir", str(root / "allowed"), "--max-seqs", "8", "--name", "board-1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def client(url: str, tenant: str = "ops", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0, **kw)


def greedy_chat(c: openai.OpenAI, model: str, prompt: str, n: int = 24, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                     max_tokens=n, temperature=0, **kw)


# --- the official client ------------------------------------------------------------------------

def test_models_list_and_start_banner(server):
    url, root = server
    ids = [m.id for m in client(url).models.list().data]
    base = ids[0]
    assert base == "SmolLM2-135M-Instruct.Q4_1" and sorted(ids[1:]) == TASKS
    cards = httpx.get(f"{url}/v1/models", headers={"X-Api-Key": KEYS["ops"]}).json()["data"]
    assert all(c["parent"] == base and c["root"].endswith(c["id"]) for c in cards[1:])
    assert "serving SmolLM2-135M-Instruct.Q4_1 and 7 adapter(s)" in (root / "server.log").read_text()
    assert httpx.get(f"{url}/health").headers["x-edgelora-server"] == "board-1"


def test_chat_and_completions_streamed_equal_plain(server):
    url, _ = server
    c = client(url)
    for task in ("dates", "sql"):
        prompt = card_prompt(task)
        plain = greedy_chat(c, task, prompt)
        assert plain.model == task and plain.choices[0].finish_reason in ("stop", "length")
        chunks = list(greedy_chat(c, task, prompt, stream=True,
                                  stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
            plain.usage.completion_tokens
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == plain.choices[0].message.content and streamed
        # Without include_usage: no usage chunk.
        assert all(ch.choices for ch in greedy_chat(c, task, prompt, stream=True))
    text = c.completions.create(model="reverse", prompt="Once upon a time", max_tokens=12,
                                temperature=0)
    pieces = c.completions.create(model="reverse", prompt="Once upon a time", max_tokens=12,
                                  temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    assert text.choices[0].finish_reason == "".join(
        [p.choices[0].finish_reason or "" for p in c.completions.create(
            model="reverse", prompt="Once upon a time", max_tokens=12, temperature=0,
            stream=True)])


def test_adapters_act_and_answer_their_tasks(server):
    url, _ = server
    c = client(url)
    dates = greedy_chat(c, "dates", "What is Jan 10, 1973 in ISO format?").choices[0].message
    base = greedy_chat(c, "SmolLM2-135M-Instruct.Q4_1",
                       "What is Jan 10, 1973 in ISO format?").choices[0].message
    assert "1973-01-10" in dates.content and dates.content != base.content


def test_client_exceptions(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        greedy_chat(c, "no-such-adapter", "hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        greedy_chat(openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0),
                    "sql", "hi")
    with pytest.raises(openai.BadRequestError, match="n=2"):
        c.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="top_p") as e:
        c.completions.create(model="sql", prompt="hi", top_p=2.0)
    assert e.value.body["param"] == "top_p"
    long = "word " * 3000
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="sql", prompt=long)
    n = len(post(url, "/tokenize", {"content": long}).json()["tokens"])
    assert e.value.body["n_prompt_tokens"] == n > 2048 and e.value.body["n_ctx"] == 2048


def test_model_auto_routes_within_the_callers_adapters(server):
    url, _ = server
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is Jan 10, 1973 in ISO format?"}],
        max_tokens=16, temperature=0)
    reply = raw.parse()
    assert reply.model == "dates" and "1973-01-10" in reply.choices[0].message.content
    assert raw.headers["x-edgelora-route"].startswith("dates; probability=")
    general = greedy_chat(c, "auto", "What is the capital of Italy?", n=4)
    assert general.model == "SmolLM2-135M-Instruct.Q4_1"
    # bob may use reverse and units only: the dates prompt is never routed to dates.
    bob = greedy_chat(client(url, "bob"), "auto", "What is Jan 10, 1973 in ISO format?", n=4)
    assert bob.model in ("SmolLM2-135M-Instruct.Q4_1", "reverse", "units")
    r = post(url, "/completion", {"prompt": "SQL for employees: Who was hired after 2013?",
                                  "n_predict": 4, "temperature": 0, "adapter": "auto"})
    assert r.json()["model"] == "sql" and "reason=" in r.headers["x-edgelora-route"]


# --- llama.cpp's API, raw HTTP --------------------------------------------------------------------

def post(url, path, body, tenant="ops", **kw):
    return httpx.post(f"{url}{path}", json=body, headers={"X-Api-Key": KEYS[tenant]},
                      timeout=120, **kw)


def test_llamacpp_completion_with_lora_ids_and_adapter_names(server):
    url, _ = server
    adapters = httpx.get(f"{url}/lora-adapters", headers={"X-Api-Key": KEYS["ops"]}).json()
    assert [a["name"] for a in adapters] == TASKS and [a["id"] for a in adapters] == \
        list(range(len(TASKS)))
    assert all(a["scale"] == 0.0 for a in adapters)
    sql = TASKS.index("sql")
    prompt = "SQL for employees: How many employees are based in Lisbon?"
    by_id = post(url, "/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0,
                                      "lora": [{"id": sql, "scale": 1.0}]}).json()
    by_name = post(url, "/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0,
                                        "adapter": "sql"}).json()
    base = post(url, "/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0}).json()
    assert by_id["content"] == by_name["content"] != base["content"]
    assert by_id["tokens"] == by_name["tokens"] and by_id["tokens_predicted"] == len(by_id["tokens"])
    assert by_id["stop"] is True and by_id["stop_type"] in ("eos", "limit")
    assert by_id["timings"]["predicted_n"] == by_id["tokens_predicted"]
    # Scale 0 is no adapter; two non-zero adapters are refused.
    zero = post(url, "/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0,
                                     "lora": [{"id": sql, "scale": 0.0}]}).json()
    assert zero["content"] == base["content"]
    two = post(url, "/completion", {"prompt": prompt, "lora": [{"id": 0, "scale": 1},
                                                               {"id": 1, "scale": 0.5}]})
    assert two.status_code == 400 and "one adapter per request" in two.json()["error"]["message"]
    bad = post(url, "/completion", {"prompt": prompt, "lora": [{"id": 99, "scale": 1}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora"
    # A stop word: stop_type "word", the word itself not in the text.
    word = post(url, "/completion", {"prompt": "Count: one, two, three,", "n_predict": 20,
                                     "temperature": 0, "stop": [" six"]}).json()
    assert word["stop_type"] == "word" and word["stopping_word"] == " six"
    assert "six" not in word["content"]


def test_llamacpp_stream_framing(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/completion", headers={"X-Api-Key": KEYS["ops"]},
                      json={"prompt": "Once upon a time", "n_predict": 10, "temperature": 0,
                            "stream": True, "adapter": "reverse"}, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    # Events are `data: {json}` lines ended by a blank line; lines starting with ':' are SSE
    # comments (keep-alive pings on a slow stream), which clients skip.
    events = [e for e in raw.split("\n\n") if e.strip() and not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:300]
    chunks = [json.loads(e[6:]) for e in events]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    tokens = [t for c in chunks[:-1] for t in c["tokens"]]
    final = chunks[-1]
    assert final["tokens_predicted"] == len(tokens) == 10 and final["stop_type"] == "limit"
    plain = post(url, "/completion", {"prompt": "Once upon a time", "n_predict": 10,
                                      "temperature": 0, "adapter": "reverse"}).json()
    assert "".join(c["content"] for c in chunks) == plain["content"]
    assert tokens == plain["tokens"]


def test_tokenize_detokenize_round_trip(server):
    url, _ = server
    text = "Héllo wörld, 12345 <|im_start|> 🙂"
    ids = post(url, "/tokenize", {"content": text}).json()["tokens"]
    assert post(url, "/detokenize", {"tokens": ids}).json()["content"] == text
    pieces = post(url, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                      for p in pieces)
    assert joined.decode() == text
    plain = post(url, "/tokenize", {"content": "<|im_start|>", "parse_special": False}).json()
    assert len(plain["tokens"]) > 1 and len(post(url, "/tokenize", {
        "content": "<|im_start|>"}).json()["tokens"]) == 1
    assert post(url, "/detokenize", {"tokens": [10**7]}).status_code == 400
    props = httpx.get(f"{url}/props", headers={"X-Api-Key": KEYS["ops"]}).json()
    assert props["default_generation_settings"]["n_ctx"] == 2048 and props["total_slots"] == 8


def test_oversized_bodies_are_413(server):
    url, _ = server
    big = {"prompt": "x" * (5 << 20), "n_predict": 1}                 # over the 4 MiB default
    r = post(url, "/completion", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():                                  # no Content-Length: chunked, counted as read
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{url}/completion", content=chunks(), timeout=120,
                   headers={"X-Api-Key": KEYS["ops"], "Content-Type": "application/json"})
    assert r.status_code == 413
    assert post(url, "/completion", {"prompt": "hi", "n_predict": 1}).status_code == 200


# --- many tenants at once -------------------------------------------------------------------------

def test_concurrent_clients_with_different_adapters_get_their_solo_outputs(server):
    url, _ = server
    c = client(url)
    jobs = [(task, card_prompt(task)) for task in TASKS]
    jobs.append(("SmolLM2-135M-Instruct.Q4_1", card_prompt("sql")))
    assert len({model for model, _ in jobs}) == 8
    solo = [greedy_chat(c, model, prompt, n=32).choices[0].message.content
            for model, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: greedy_chat(c, *j, n=32).choices[0].message.content,
                                 jobs))
    assert together == solo
    assert len(set(solo)) == len(solo)


# --- disconnects ----------------------------------------------------------------------------------

def test_disconnects_release_kv_pages_and_pins(server):
    url, _ = server
    body = {"model": "units", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    headers = {"X-Api-Key": KEYS["ops"]}
    for stream in (True, False):
        with httpx.Client(timeout=httpx.Timeout(120, read=2.0 if not stream else 120)) as http:
            if stream:
                with http.stream("POST", f"{url}/v1/chat/completions", headers=headers,
                                 json={**body, "stream": True}) as r:
                    lines = r.iter_lines()
                    got = [next(lines) for _ in range(6)]
                    assert any('"content"' in line for line in got)
                    m = metrics(url)
                    assert sample(m, "edgelora_num_requests_running") == 1
                    assert sample(m, "edgelora_adapter_pool_bytes_pinned") > 0
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(f"{url}/v1/chat/completions", headers=headers, json=body)
        m = wait_idle(url)
        assert sample(m, "edgelora_kv_cache_pages_used") == 0
        assert sample(m, "edgelora_adapter_pool_bytes_pinned") == 0


# --- tenants --------------------------------------------------------------------------------------

def test_tenant_isolation(server):
    url, _ = server
    bob = client(url, "bob")
    assert [m.id for m in bob.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1", "reverse",
                                                      "units"]
    with pytest.raises(openai.NotFoundError) as hidden:
        greedy_chat(bob, "sql", "hi")
    with pytest.raises(openai.NotFoundError) as missing:
        greedy_chat(bob, "sqlx", "hi")
    assert hidden.value.body["message"].replace("sql", "?") == \
        missing.value.body["message"].replace("sqlx", "?")
    ids = httpx.get(f"{url}/lora-adapters", headers={"X-Api-Key": KEYS["bob"]}).json()
    assert [(a["id"], a["name"]) for a in ids] == [(0, "reverse"), (1, "units")]
    r = post(url, "/completion", {"prompt": "hi", "n_predict": 2, "lora": [{"id": 2, "scale": 1}]},
             tenant="bob")
    assert r.status_code == 400
    r = post(url, "/completion", {"prompt": "hi", "n_predict": 2, "adapter": "sql"}, tenant="bob")
    assert r.status_code == 404
    assert httpx.get(f"{url}/metrics", headers={"X-Api-Key": KEYS["bob"]}).status_code == 403
    no_key = httpx.get(f"{url}/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert "bob-key-2" not in (server[1] / "server.log").read_text()


def test_tenant_concurrency_limit(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEYS['bob']}"}
    body = {"model": "units", "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json=body,
                      timeout=120) as r:
        lines = r.iter_lines()          # kept: a dropped iterator closes the connection
        next(lines)
        second = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                            json={**body, "stream": False, "max_tokens": 2}, timeout=120)
    assert second.status_code == 429 and second.headers["retry-after"]
    assert second.json()["error"]["code"] == "tenant_limit"
    wait_idle(url)
    ok = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                    json={**body, "stream": False, "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200


def test_runtime_loads_are_confined_and_private(server):
    url, root = server
    allowed, outside = root / "allowed", root / "outside"
    shutil.copytree(ADAPTERS / "dates", allowed / "my-dates", dirs_exist_ok=True)
    shutil.copytree(ADAPTERS / "dates", outside / "evil", dirs_exist_ok=True)
    link = allowed / "link"
    if not link.exists():
        link.symlink_to(outside / "evil")

    def load(name, path, tenant="alice"):
        return post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                    tenant=tenant)

    for path in (outside / "evil", allowed / ".." / "outside" / "evil", link):
        r = load("alice-evil", path)
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path", path
    assert load("alice-x", allowed / "my-dates", tenant="bob").status_code == 403
    assert load("alice-dates", allowed / "my-dates").status_code == 200
    assert load("alice-dates", allowed / "my-dates").status_code == 400     # already loaded
    alice, bob = client(url, "alice"), client(url, "bob")
    assert "alice-dates" in [m.id for m in alice.models.list().data]
    assert "alice-dates" not in [m.id for m in bob.models.list().data]
    prompt = "What is Jan 10, 1973 in ISO format?"
    assert greedy_chat(alice, "alice-dates", prompt).choices[0].message.content == \
        greedy_chat(alice, "dates", prompt).choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        greedy_chat(bob, "alice-dates", prompt)
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "alice-dates"},
                tenant="bob").status_code == 403
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "alice-dates"},
                tenant="alice").status_code == 200
    assert "alice-dates" not in [m.id for m in alice.models.list().data]
    assert not any((root / "store" / "data").glob("alice-dates*"))


# --- metrics --------------------------------------------------------------------------------------

def test_metrics_count_what_happened(server):
    url, _ = server
    c = client(url)
    wait_idle(url)
    before = metrics(url)
    results = [c.completions.create(model=m, prompt="Once upon a time", max_tokens=5 + i,
                                    temperature=0) for i, m in enumerate(("arith", "units", None))]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="arith", prompt="x", n=3)
    after = wait_idle(url)
    done = sample(after, "edgelora_requests_total", endpoint="/v1/completions", status="200") - \
        sample(before, "edgelora_requests_total", endpoint="/v1/completions", status="200")
    refused = sample(after, "edgelora_requests_total", endpoint="/v1/completions", status="400") - \
        sample(before, "edgelora_requests_total", endpoint="/v1/completions", status="400")
    assert (done, refused) == (3, 1)
    generated = sum(r.usage.completion_tokens for r in results)
    assert sample(after, "edgelora_generation_tokens_total") - \
        sample(before, "edgelora_generation_tokens_total") == generated
    assert sample(after, "edgelora_prompt_tokens_total") - \
        sample(before, "edgelora_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert sample(after, "edgelora_time_to_first_token_seconds_count") - \
        sample(before, "edgelora_time_to_first_token_seconds_count") == 3
    assert sample(after, "edgelora_adapter_pool_hits_total") + \
        sample(after, "edgelora_adapter_pool_misses_total") >= 2
    info = [k for k in after if k[0] == "edgelora_lora_requests_info"]
    assert info and dict(info[0][1])["running_lora_adapters"] == "" and \
        dict(info[0][1])["max_lora"] == "64"


def test_prefix_cache_reports_reuse_per_api(server):
    url, _ = server
    c = client(url)
    system = ("You are the assistant of a small shop. Answer in one short sentence, politely, "
              "and never invent prices or opening hours you were not told. ") * 3
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    wait_idle(url)
    before = metrics(url)
    off = c.chat.completions.create(model="units", messages=messages, max_tokens=8,
                                    temperature=0, extra_body={"cache_prompt": False})
    first = c.chat.completions.create(model="units", messages=messages, max_tokens=8,
                                      temperature=0)
    again = c.chat.completions.create(model="units", messages=messages, max_tokens=8,
                                      temperature=0)
    base = c.chat.completions.create(model=None, messages=messages, max_tokens=8, temperature=0)
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.prompt_tokens_details.cached_tokens == 0   # off fed nothing
    hit = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < hit < again.usage.prompt_tokens and hit % 32 == 0
    assert base.usage.prompt_tokens_details.cached_tokens == 0    # another identity
    assert off.choices[0].message.content == first.choices[0].message.content == \
        again.choices[0].message.content
    # llama.cpp's fields: tokens_cached and timings.cache_n; prompt_n counts what was computed.
    body = {"prompt": system + "Q: what is 2+2?", "n_predict": 4, "temperature": 0,
            "adapter": "units"}
    cold = post(url, "/completion", body).json()
    warm = post(url, "/completion", body).json()
    assert cold["tokens_cached"] == 0 and cold["timings"]["prompt_n"] == cold["tokens_evaluated"]
    assert warm["tokens_cached"] == warm["timings"]["cache_n"] > 0
    assert warm["timings"]["prompt_n"] == warm["tokens_evaluated"] - warm["tokens_cached"]
    assert warm["generation_settings"]["cache_prompt"] is True
    unc = post(url, "/completion", {**body, "cache_prompt": False}).json()
    assert unc["tokens_cached"] == 0 and unc["content"] == warm["content"] == cold["content"]
    after = wait_idle(url)
    assert sample(after, "edgelora_prefix_cache_hit_tokens_total") - \
        sample(before, "edgelora_prefix_cache_hit_tokens_total") == hit + warm["tokens_cached"]
    assert sample(after, "edgelora_kv_cache_pages_cached") > 0
    assert sample(after, "edgelora_kv_cache_pages_used") == 0


# --- a second server, in this process: tiny queue, injected failure ---------------------------

class InProcessServer:
    def __init__(self, model, tmp_path, *, adapters_dir=ADAPTERS, **options):
        import uvicorn

        from edgelora_np.server.app import create_app
        from edgelora_np.server.main import bind
        from edgelora_np.server.service import ServerOptions, Service

        port = free_port()
        self.service = Service(ServerOptions(
            port=port, store_dir=str(tmp_path / "store"),
            adapters_dir=adapters_dir and str(adapters_dir), **options), None)
        self.service.load(model)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_config=None,
                                                    access_log=False))
        sock = bind("127.0.0.1", port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.url)

    def close(self):
        self.server.should_exit = True
        self.thread.join(DEADLINE)
        self.service.close()


def test_full_queue_is_429_with_retry_after(real_model, tmp_path):
    s = InProcessServer(real_model, tmp_path, max_seqs=1, max_queue=1)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        long = {"model": "units", "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 300, "temperature": 0, "extra_body": {"ignore_eos": True}}
        running = c.chat.completions.create(**long, stream=True)
        chunks = iter(running)
        next(chunks)                                          # the role
        next(chunks)                                          # a token: admitted and decoding
        waiting = ThreadPoolExecutor(1).submit(c.chat.completions.create, **long)
        deadline = time.monotonic() + DEADLINE
        while s.service.engine.stats().waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**long)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        running.close()
        assert waiting.result(DEADLINE).choices[0].finish_reason == "length"
    finally:
        s.close()


def test_engine_failure_reaches_clients_and_health(real_model, tmp_path, monkeypatch):
    s = InProcessServer(real_model, tmp_path, max_seqs=4)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        body = {"model": "sql", "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 500, "temperature": 0, "extra_body": {"ignore_eos": True}}
        stream = c.chat.completions.create(**body, stream=True)
        pieces = iter(stream)
        next(pieces)
        pending = ThreadPoolExecutor(1).submit(c.chat.completions.create, **body)
        engine = s.service.engine

        def broken_plan():
            raise RuntimeError("injected engine fault")

        monkeypatch.setattr(engine, "_plan", broken_plan)
        with pytest.raises(openai.APIError, match="injected engine fault"):
            for _ in pieces:
                pass
        with pytest.raises(openai.InternalServerError) as e:    # 503
            pending.result(DEADLINE)
        assert e.value.status_code == 503
        health = httpx.get(f"{s.url}/health")
        assert health.status_code == 503 and "injected engine fault" in \
            health.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="sql", prompt="hi", max_tokens=2)
    finally:
        s.close()
