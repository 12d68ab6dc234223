"""The `edgelora` command line, run in-process with click's CliRunner.

Fast tests cover help, usage errors and the context-trimming policy of `chat`. Tests marked slow
run the real default model; most share one loaded model (the module fixture `shared_model`
makes the CLI's `load_model` return it), and one goes through the real loading path.
"""

import collections
import json
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from tiny_model import k_spec, write_tiny_model

from edgelora_np.cli import _fit_context, main
from edgelora_np.default_model import resolve_model_path

PROMPT = "The capital of France is"
COMMANDS = ("generate", "chat", "inspect", "warmup")


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_user_error(result, *needles):
    """Exit code 2, and the last stderr line is one `error: ...` naming every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last


# ----------------------------------------------------------------------------------------------
# Fast: no model.

@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert "Usage: " in result.stdout
    if command is None:
        assert all(c in result.stdout for c in COMMANDS)


def test_generate_help_documents_greedy():
    assert "0 = greedy" in run("generate", "--help").stdout


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert "0." in result.stdout


def test_missing_model_file(tmp_path):
    path = tmp_path / "missing.gguf"
    assert_user_error(run("generate", "--model", path, "hi"), str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a model " * 50)
    assert_user_error(run("generate", "--model", path, "hi"), str(path), "not a GGUF")
    assert_user_error(run("inspect", path), str(path))


def test_usage_errors_are_one_line():
    assert_user_error(run("generate"), "PROMPT")
    assert_user_error(run("generate", "-n", "many", "hi"), "--max-tokens")
    assert_user_error(run("no-such-command"), "no-such-command")


def test_sampling_options_checked_before_loading(tmp_path):
    # The model path does not exist: the bad option must be reported first.
    assert_user_error(run("generate", "--top-p", "1.5", "--model", tmp_path / "x.gguf", "hi"),
                      "top_p")


class WordModel:
    """Stands in for api.Model in _fit_context: one token per word of the joined messages."""

    def __init__(self, n_ctx):
        self.n_ctx = n_ctx

    def chat_prompt(self, messages):
        return " ".join(m["content"] for m in messages) + " reply:"

    def tokenize(self, text, special=False):
        assert special
        return text.split()


def turn(role, n_words):
    return {"role": role, "content": " ".join([role] * n_words)}


def test_fit_context_drops_oldest_turns_keeps_system():
    system = turn("system", 3)
    messages = [system, turn("user", 5), turn("assistant", 5), turn("user", 5),
                turn("assistant", 5), turn("user", 5)]
    ids = _fit_context(WordModel(n_ctx=30), messages, n_keep=1, max_tokens=10)
    # 3 + 5 + 5 + 5 + 1 ("reply:") = 19 prompt tokens, + 10 to generate fits 30; one more turn not.
    assert messages == [system, turn("user", 5), turn("assistant", 5), turn("user", 5)]
    assert len(ids) == 19


def test_fit_context_keeps_everything_that_fits():
    messages = [turn("user", 2), turn("assistant", 2), turn("user", 2)]
    before = list(messages)
    assert len(_fit_context(WordModel(n_ctx=100), messages, n_keep=0, max_tokens=10)) == 7
    assert messages == before


def test_fit_context_last_message_alone():
    # Room for the prompt but not for all of max_tokens: generate anyway (it stops at "context").
    messages = [turn("system", 2), turn("user", 2), turn("assistant", 2), turn("user", 20)]
    ids = _fit_context(WordModel(n_ctx=30), messages, n_keep=1, max_tokens=50)
    assert len(ids) == 23 and len(messages) == 2
    # No room at all: None, and the caller drops the message.
    assert _fit_context(WordModel(n_ctx=10), [turn("user", 20)], n_keep=0, max_tokens=5) is None


# ----------------------------------------------------------------------------------------------
# Slow: the real default model.

@pytest.fixture(scope="module")
def model_path():
    return resolve_model_path()


@pytest.fixture(scope="module")
def loaded_model(model_path):
    from edgelora_np.api import load_model

    return load_model(model_path)


@pytest.fixture
def shared_model(loaded_model, monkeypatch):
    """Make the CLI reuse one loaded model instead of loading the file for every command."""
    from edgelora_np import api

    def load_model(path=None, *, n_threads=None, n_ctx=None, progress=True):
        assert resolve_model_path(path) == loaded_model.path
        loaded_model.n_ctx = min(n_ctx or api.DEFAULT_CONTEXT, loaded_model.config.context_length)
        return loaded_model

    monkeypatch.setattr(api, "load_model", load_model)
    return loaded_model


@pytest.mark.slow
def test_generate_greedy(shared_model):
    result = run("generate", "--temperature", "0", "-n", "8", PROMPT)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" Paris")
    assert "tok/s" in result.stderr


@pytest.mark.slow
def test_generate_json_real_load(model_path):
    from edgelora_np.api import load_model

    result = run("generate", "--temperature", "0", "-n", "8", "--json", "--model", model_path,
                 PROMPT)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"text", "tokens", "finish_reason", "prompt_tokens", "completion_tokens",
                        "prefill_tok_per_s", "decode_tok_per_s", "model", "adapter"}
    assert out["text"].startswith(" Paris") and out["adapter"] is None
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == len(out["tokens"]) == 8
    model = load_model(model_path)
    assert out["prompt_tokens"] == len(model.tokenize(PROMPT))
    assert model.detokenize(out["tokens"]) == out["text"]
    assert out["decode_tok_per_s"] > 0 and out["prefill_tok_per_s"] > 0
    assert out["model"] == str(model_path)


@pytest.mark.slow
def test_generate_stop_string(shared_model):
    result = run("generate", "--temperature", "0", "-n", "8", "--stop", ".", "--json", PROMPT)
    out = json.loads(result.stdout)
    assert out["text"] == " Paris"
    assert out["finish_reason"] == "stop"


@pytest.mark.slow
def test_generate_chat_template(shared_model):
    result = run("generate", "--chat", "--temperature", "0", "-n", "4", "--json", "Hi")
    out = json.loads(result.stdout)
    prompt = shared_model.tokenize(shared_model.chat_prompt("Hi"), special=True)
    assert out["prompt_tokens"] == len(prompt)


@pytest.mark.slow
def test_prompt_longer_than_context(shared_model):
    result = run("generate", "--ctx", "4", "one two three four five six seven eight")
    assert_user_error(result, "context of 4")


@pytest.mark.slow
def test_chat_answers_and_exits(shared_model):
    result = run("chat", "-n", "16", "--temperature", "0", input="Hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert "> " not in result.stdout          # stdin is not a terminal: no prompt


@pytest.mark.slow
def test_chat_outgrows_small_context(shared_model):
    lines = ["Tell me about Paris", "And London?", "/reset", "And Rome?", "And Berlin?",
             "x " * 200, "Thanks"]
    result = run("chat", "-n", "16", "--temperature", "0", "--ctx", "64", "--system", "Be brief.",
                 input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "does not fit the context of 64" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 5      # every other line got an answer


@pytest.mark.slow
def test_inspect_json(model_path):
    reader = gguf.GGUFReader(model_path)
    n_layers = int(reader.fields["llama.block_count"].parts[-1][0])
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    q4_1_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name == "Q4_1")

    result = run("inspect", "--json", model_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["n_layers"] == n_layers == 30
    assert report["tokenizer"]["vocab_size"] == n_vocab == 49152
    assert report["tokenizer"]["kind"] == "gpt2" and report["tokenizer"]["chat_template"]
    assert report["tensors"]["Q4_1"] == {"count": counts["Q4_1"], "bytes": q4_1_bytes,
                                         "supported": True}
    assert report["supported"] and report["problem"] is None
    assert report["n_tensors"] == len(reader.tensors)
    assert report["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    L, KVH, HD = n_layers, report["config"]["n_kv_heads"], report["config"]["head_dim"]
    assert report["memory"]["kv_cache_bytes_per_1k_tokens"] == 2 * L * KVH * HD * 2 * 1024

    text = run("inspect", model_path)
    assert text.exit_code == 0
    assert "Q4_1" in text.stdout and "49152" in text.stdout


def test_inspect_names_the_types_it_cannot_read(tmp_path):
    path = write_tiny_model(tmp_path / "iq.gguf", k_spec(QT.Q4_K),
                            tensor_types={"blk.1.ffn_up.weight": QT.IQ3_XXS})
    report = json.loads(run("inspect", "--json", str(path)).stdout)
    assert report["supported"] is False and "IQ3_XXS" in report["problem"]
    assert report["tensors"]["IQ3_XXS"]["count"] == 1
    assert report["tensors"]["IQ3_XXS"]["supported"] is False
    assert report["tensors"]["Q4_K"]["supported"] is True
    text = run("inspect", str(path)).stdout
    assert "cannot read: IQ3_XXS" in text and "not supported" in text


@pytest.mark.slow
def test_inspect_estimate_matches_loaded_weights(model_path, loaded_model):
    report = json.loads(run("inspect", "--json", model_path).stdout)
    actual = loaded_model.llama.weights.nbytes
    assert abs(report["memory"]["weights_bytes"] - actual) < 0.01 * actual


@pytest.mark.slow
def test_warmup(shared_model):
    result = run("warmup")
    assert result.exit_code == 0, result.output
    for name in ("matmul Q4_K", "matmul Q5_K", "matmul Q6_K", "matmul BF16", "prefill", "total"):
        assert name in result.stdout


@pytest.mark.slow
def test_generate_with_adapter_changes_the_answer(model_path):
    adapter = str(Path(__file__).parent / "data" / "lora" / "peft_strong")
    base = run("generate", "--temperature", "0", "-n", "12", "--json", "--model", model_path,
               "Once upon a time")
    tuned = run("generate", "--temperature", "0", "-n", "12", "--json", "--model", model_path,
                "--adapter", adapter, "Once upon a time")
    assert base.exit_code == 0 and tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["adapter"] == adapter
    assert json.loads(tuned.stdout)["tokens"] != json.loads(base.stdout)["tokens"]


def test_adapters_inspect_reports_and_refuses(model_path, tmp_path):
    adapter = Path(__file__).parent / "data" / "lora" / "peft_strong"
    result = run("adapters", "inspect", str(adapter), "--model", model_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "peft" and report["ranks"]["attn_q"] == [8]
    assert len(report["targets"]) == 7
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    result = run("adapters", "inspect", str(bad), "--model", model_path)
    assert result.exit_code == 2 and "bad.gguf" in result.stderr and "Traceback" not in result.output
