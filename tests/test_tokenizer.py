"""Tokenizer tests: invariants on the real SmolLM2 vocab, exact behaviour on tiny synthetic vocabs.

Exactness against llama.cpp: test_matches_llama_cpp_golden_ids compares with the token ids
llama.cpp produced (tests/data/golden_tokens.json, recorded by tools/make_golden.py).
"""

import importlib.util
import json
from pathlib import Path

import gguf
import pytest

from edgelora_np.errors import TokenizerError
from edgelora_np.tokenizer import PRE_TOKENIZERS, StreamDecoder, Tokenizer

FALLBACK_MODEL = Path("/tmp/smollm2.gguf")

TEXTS = [
    "Hello world",
    "  leading, trailing   and   inner   spaces  ",
    "It's we'll they've I'M DON'T",
    "def f(x):\n\treturn x ** 2  # square\n\n\nprint(f(12))\r\n",
    "3.14159 and 1,234,567 and 2024-11-24 and 007",
    "Ελληνικά, русский, naïve café, 日本語、中文、한국어, العربية, हिन्दी",
    "emoji 🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "numbers in other scripts: ١٢٣ ０１２ ² ½ Ⅻ",
    "nbsp\u00a0and\u3000ideographic space",
    "",
]


def _model_path() -> Path:
    if importlib.util.find_spec("edgelora_np.default_model") is None:
        return FALLBACK_MODEL
    from edgelora_np.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def smollm_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(_model_path())


@pytest.fixture(scope="module")
def smollm_fields(smollm_reader) -> dict:
    return {k: f.contents() for k, f in smollm_reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(smollm_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(smollm_fields)


# --- synthetic vocabularies ---

def gpt2_byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 uses for bytes 0..255 (bytes_to_unicode)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def byte_level_fields(pre: str = "smollm") -> dict:
    """A gpt2-style vocab: 3 control tokens, 1 user-defined token, 256 bytes, a few merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
    merged = ["Ġt", "he", "Ġthe", "12", "123", "45"]
    tokens = specials + gpt2_byte_alphabet() + merged
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 4] + [1] * (256 + len(merged)),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "4 5"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def spm_fields(scores: dict[str, float], add_space_prefix: bool = True) -> dict:
    """A SentencePiece-style vocab: <unk> <s> </s>, 256 byte tokens, then `scores`' pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [4]
    pieces = list(scores)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens + pieces,
        "tokenizer.ggml.token_type": types + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * len(tokens) + [scores[p] for p in pieces],
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def texts_of(fields: dict, ids: list[int]) -> list[str]:
    return [fields["tokenizer.ggml.tokens"][i] for i in ids]


# --- SmolLM2 (byte-level BPE, pre-tokenizer "smollm") ---

@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smollm, text):
    assert smollm.decode(smollm.encode(text)) == text
    assert smollm.decode(smollm.encode(text, special=True)) == text


def test_pieces_are_the_utf8_bytes(smollm):
    text = "naïve 日本 🎉"
    ids = smollm.encode(text)
    assert b"".join(smollm.token_to_piece(i) for i in ids) == text.encode()


def test_every_digit_is_its_own_token(smollm):
    # The smollm pre-tokenizer isolates each \p{N} code point before the GPT-2 regex runs.
    ids = smollm.encode("year 2024, pi 3.14159, ١٢٣")
    ascii_pieces = [p.decode() for p in map(smollm.token_to_piece, ids) if p.isascii()]
    assert [p for p in ascii_pieces if any(c.isdigit() for c in p)] == list("2024314159")


def test_metadata(smollm, smollm_fields):
    tokens = smollm_fields["tokenizer.ggml.tokens"]
    assert smollm.vocab_size == len(tokens)
    assert smollm.bos_id == smollm_fields["tokenizer.ggml.bos_token_id"]
    assert smollm.eos_id == smollm_fields["tokenizer.ggml.eos_token_id"]
    assert smollm.eot_id is None  # the file has no tokenizer.ggml.eot_token_id
    assert smollm.chat_template == smollm_fields["tokenizer.chat_template"]
    assert smollm.add_bos is False


def test_stop_ids(smollm, smollm_fields):
    tokens = smollm_fields["tokenizer.ggml.tokens"]
    expected = {smollm.eos_id, tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert smollm.stop_ids == expected


def test_add_bos(smollm):
    assert smollm.encode("hi")[0] != smollm.bos_id  # add_bos_token is false for SmolLM2
    assert smollm.encode("hi", add_bos=True) == [smollm.bos_id, *smollm.encode("hi")]
    assert smollm.encode("", add_bos=True) == [smollm.bos_id]


def test_each_control_token_is_one_id_only_with_special(smollm, smollm_fields):
    tokens, types = smollm_fields["tokenizer.ggml.tokens"], smollm_fields["tokenizer.ggml.token_type"]
    controls = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k == 3]
    assert len(controls) > 3
    for token_id, text in controls:
        assert smollm.encode(text, special=True) == [token_id]
        plain = smollm.encode(text)
        assert token_id not in plain and len(plain) > 1
        assert smollm.decode(plain) == text


def test_special_tokens_inside_text(smollm, smollm_fields):
    tokens = smollm_fields["tokenizer.ggml.tokens"]
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = smollm.encode(text, special=True)
    assert ids[0] == start and ids.count(end) == 1
    assert ids[1:ids.index(end)] == smollm.encode("user\nHi")
    assert smollm.decode(ids) == text
    assert smollm.decode(ids, skip_special=True) == "user\nHi\n"
    assert smollm.token_to_piece(start) == b"<|im_start|>"
    assert smollm.token_to_piece(start, special=False) == b""


def test_stream_decoder_holds_back_split_characters(smollm):
    ids = smollm.encode("🎉")
    assert len(ids) > 1  # the emoji's 4 bytes are spread over several tokens
    stream = StreamDecoder(smollm)
    outputs = [stream.push(i) for i in ids]
    assert outputs[:-1] == [""] * (len(ids) - 1) and outputs[-1] == "🎉"
    assert stream.flush() == ""


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(smollm, text):
    ids = smollm.encode(text, special=True)
    stream = StreamDecoder(smollm)
    pushed = [stream.push(i) for i in ids]
    assert "".join(pushed) + stream.flush() == smollm.decode(ids) == text
    assert all("\ufffd" not in p for p in pushed)


def test_stream_decoder_flushes_an_incomplete_character(smollm):
    first_byte = smollm.encode("🎉")[0]
    stream = StreamDecoder(smollm)
    assert stream.push(first_byte) == ""
    assert stream.flush() == "\ufffd"


def test_token_to_piece_rejects_ids_outside_the_vocab(smollm):
    with pytest.raises(TokenizerError, match="outside the vocab"):
        smollm.token_to_piece(smollm.vocab_size)


# --- chat templates ---

def test_smollm_chat_template(smollm, smollm_fields):
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = smollm.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds a system turn
    assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.encode(prompt, special=True)
    assert ids.count(smollm_fields["tokenizer.ggml.tokens"].index("<|im_start|>")) == 3

    closed = smollm.apply_chat_template(messages, add_generation_prompt=False)
    assert closed.endswith("<|im_start|>user\nHi there<|im_end|>\n")


def test_chatml_fallback_without_template(smollm_fields):
    fields = {k: v for k, v in smollm_fields.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_fields(fields)
    assert tok.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_template_variables_and_raise_exception():
    fields = byte_level_fields()
    fields["tokenizer.chat_template"] = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] != 'user' %}{{ raise_exception('only user turns') }}{% endif %}"
        "{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}")
    tok = Tokenizer.from_gguf_fields(fields)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>"é"<|im_end|>')
    with pytest.raises(TokenizerError, match="only user turns"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_template_that_does_not_parse():
    fields = byte_level_fields()
    fields["tokenizer.chat_template"] = "{% for m in messages %}"
    with pytest.raises(TokenizerError, match="does not parse"):
        Tokenizer.from_gguf_fields(fields).apply_chat_template([])


@pytest.mark.parametrize("messages", [
    "hello",
    [("user", "hello")],
    [{"role": "user"}],
    [{"content": "hello"}],
    [{"role": "user", "content": 3}],
    [{"role": None, "content": "hello"}],
])
def test_bad_messages(smollm, messages):
    with pytest.raises(TokenizerError, match="messages"):
        smollm.apply_chat_template(messages)


# --- synthetic byte-level vocab: every pre-tokenizer ---

@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips(pre):
    tok = Tokenizer.from_gguf_fields(byte_level_fields(pre))
    assert tok.add_bos == (pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral",
                                   "tekken"))  # llama.cpp's default when the key is absent
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("pre, digits", [
    ("smollm", ["1", "2", "3", "4", "5"]),  # each digit alone, so "1 2" never merges
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("gpt-2", ["123", "45"]),
    ("llama3", ["123", "45"]),
])
def test_digit_grouping(pre, digits):
    fields = byte_level_fields(pre)
    tok = Tokenizer.from_gguf_fields(fields)
    assert texts_of(fields, tok.encode("12345", add_bos=False)) == digits


def test_merges_apply_within_words():
    fields = byte_level_fields("gpt-2")
    tok = Tokenizer.from_gguf_fields(fields)
    assert texts_of(fields, tok.encode("he the")) == ["he", "Ġthe"]


def test_user_defined_tokens_are_always_parsed():
    fields = byte_level_fields()
    tok = Tokenizer.from_gguf_fields(fields)
    tool = fields["tokenizer.ggml.tokens"].index("<tool>")
    assert tok.encode("a<tool>b") == tok.encode("a") + [tool] + tok.encode("b")
    assert tok.encode("a<tool>b", special=True) == tok.encode("a<tool>b")
    assert tok.decode([tool], skip_special=True) == "<tool>"


def test_add_bos_without_bos_id():
    fields = byte_level_fields()
    del fields["tokenizer.ggml.bos_token_id"]
    tok = Tokenizer.from_gguf_fields(fields)
    assert tok.bos_id is None
    with pytest.raises(TokenizerError, match="no bos token"):
        tok.encode("x", add_bos=True)
    fields["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(TokenizerError, match="bos_token_id"):
        Tokenizer.from_gguf_fields(fields)


# --- synthetic SentencePiece vocab ---

def test_spm_merges_by_score():
    base = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0}
    prefers_ab = spm_fields({**base, "ab": -3.0, "bc": -4.0})
    prefers_bc = spm_fields({**base, "ab": -4.0, "bc": -3.0})
    for fields, expected in [(prefers_ab, ["▁", "ab", "c"]), (prefers_bc, ["▁", "a", "bc"])]:
        tok = Tokenizer.from_gguf_fields(fields)
        assert texts_of(fields, tok.encode("abc", add_bos=False)) == expected


def test_spm_space_prefix_bos_and_round_trip():
    pieces = {"▁": -1.0, "h": -2.0, "i": -2.0, "▁h": -3.0, "▁hi": -4.0, "hi": -5.0}
    fields = spm_fields(pieces)
    tok = Tokenizer.from_gguf_fields(fields)
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2  # llama.cpp's SPM defaults
    ids = tok.encode("hi hi")
    assert texts_of(fields, ids) == ["<s>", "▁hi", "▁hi"]
    assert tok.decode(ids, skip_special=True) == "hi hi"
    assert tok.decode(ids) == "<s>hi hi"

    no_prefix = spm_fields(pieces, add_space_prefix=False)
    tok = Tokenizer.from_gguf_fields(no_prefix)
    assert texts_of(no_prefix, tok.encode("hi hi", add_bos=False)) == ["hi", "▁hi"]


def test_spm_byte_fallback():
    fields = spm_fields({"▁": -1.0, "h": -2.0})
    tok = Tokenizer.from_gguf_fields(fields)
    ids = tok.encode("hé", add_bos=False)
    assert texts_of(fields, ids) == ["▁", "h", "<0xC3>", "<0xA9>"]
    assert tok.token_to_piece(ids[2]) == b"\xc3"
    assert tok.decode(ids) == "hé"


def test_spm_special_and_user_defined_tokens():
    fields = spm_fields({"▁": -1.0, "h": -2.0, "▁h": -3.0})
    tok = Tokenizer.from_gguf_fields(fields)
    # Every text fragment after a special token gets the space prefix too, as in llama.cpp.
    ids = tok.encode("h<s>h<tool>h", add_bos=False, special=True)
    assert texts_of(fields, ids) == ["▁h", "<s>", "▁h", "<tool>", "▁h"]
    plain = tok.encode("h<s>h", add_bos=False)
    assert 1 not in plain and tok.decode(plain) == "h<s>h"


# --- errors ---

@pytest.mark.parametrize("key", [
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.pre",
])
def test_missing_key(key):
    fields = byte_level_fields()
    del fields[key]
    with pytest.raises(TokenizerError, match=key):
        Tokenizer.from_gguf_fields(fields)


def test_spm_missing_scores():
    fields = spm_fields({"▁": -1.0})
    del fields["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_fields(fields)


def test_unsupported_model():
    fields = byte_level_fields()
    fields["tokenizer.ggml.model"] = "bert"
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_gguf_fields(fields)


def test_unknown_pre_tokenizer_lists_the_supported_ones():
    with pytest.raises(TokenizerError, match="'no-such-pre'.*smollm"):
        Tokenizer.from_gguf_fields(byte_level_fields("no-such-pre"))


@pytest.mark.parametrize("change, message", [
    (lambda f: f["tokenizer.ggml.token_type"].pop(), "token_type has"),
    (lambda f: f["tokenizer.ggml.tokens"].__setitem__(5, f["tokenizer.ggml.tokens"][6]),
     "duplicate token"),
    (lambda f: f.__setitem__("tokenizer.ggml.eos_token_id", 10**6), "outside the vocab"),
    (lambda f: f.__setitem__("tokenizer.ggml.eos_token_id", "2"), "should be a int"),
    (lambda f: f["tokenizer.ggml.token_type"].__setitem__(0, 9), "token_type"),
    (lambda f: f["tokenizer.ggml.merges"].append("nospace"), "merges"),
    (lambda f: f["tokenizer.ggml.merges"].append("Ġ zz"), "cannot build"),
])
def test_inconsistent_metadata(change, message):
    fields = byte_level_fields()
    change(fields)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_fields(fields)


def test_encode_needs_a_string(smollm):
    with pytest.raises(TokenizerError, match="needs a str"):
        smollm.encode(b"bytes")


# --- exactness against llama.cpp: golden ids recorded by tools/make_golden.py ---

GOLDEN_TOKENS = json.loads((Path(__file__).parent / "data" / "golden_tokens.json").read_text())


@pytest.mark.parametrize("pre", sorted(GOLDEN_TOKENS["pre"]))
def test_matches_llama_cpp_golden_ids(pre, smollm_fields):
    """SmolLM2's vocab (re-labelled with each pre-tokenizer type) tokenized like llama.cpp."""
    ours = Tokenizer.from_gguf_fields({**smollm_fields, "tokenizer.ggml.pre": pre})
    expected = GOLDEN_TOKENS["pre"][pre]
    for kind, special in (("plain", False), ("special", True)):
        for text, ids in zip(GOLDEN_TOKENS["texts"], expected[kind]):
            assert ours.encode(text, add_bos=False, special=special) == ids, (kind, text)
