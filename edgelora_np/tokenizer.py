"""Text <-> token ids, built from a GGUF file's tokenizer metadata, matching llama.cpp.

We do not hand-write BPE. The HuggingFace `tokenizers` library does the merging; this module only
configures it the way llama.cpp (src/llama-vocab.cpp) reads the same metadata:

  tokenizer.ggml.model = "gpt2"   byte-level BPE. Text is split into words by the regexes llama.cpp
                                  uses for the `tokenizer.ggml.pre` value (table PRE_TOKENIZERS),
                                  each regex splitting the pieces of the one before; every byte of
                                  a word is mapped to a printable stand-in character; then the
                                  merges in `tokenizer.ggml.merges` are applied, lowest rank first.
  tokenizer.ggml.model = "llama"  SentencePiece-style BPE. Spaces become "▁", one "▁" is prepended
                                  (tokenizer.ggml.add_space_prefix), adjacent pieces are merged by
                                  the highest `tokenizer.ggml.scores` value, and characters missing
                                  from the vocab fall back to byte tokens "<0xNN>".

Special tokens (llama.cpp's `parse_special`): before any of that, the text is cut at the texts of
CONTROL and UNKNOWN tokens only when `encode(..., special=True)`, and at USER_DEFINED tokens always.

Decoding goes the other way one token at a time: `token_to_piece` gives a token's raw bytes (a
multi-byte character may be split over tokens), and `StreamDecoder` assembles them into text.
"""

from __future__ import annotations

import codecs
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from functools import cached_property

from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from edgelora_np.errors import TokenizerError


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2  # e.g. "<unk>"
    CONTROL = 3  # e.g. "<s>", "<|im_start|>": shown only when asked for
    USER_DEFINED = 4  # added tokens that are always matched as a whole, even in plain text
    UNUSED = 5
    BYTE = 6  # "<0x41>": one raw byte (SentencePiece byte fallback)


# --- Pre-tokenizers: regexes copied from llama.cpp's llm_tokenizer_bpe constructor --------------

# GPT-2's word regex. llama.cpp's string lacks the final "|\s+", but the hand-written matcher that
# runs it (unicode_regex_split_custom_gpt2 in unicode.cpp) implements that branch too.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp cuts text into words before BPE, for one family of `tokenizer.ggml.pre`."""

    regexes: tuple[str, ...]  # applied in order; each splits the pieces the previous one made
    ignore_merges: bool = False  # a word that is itself in the vocab is taken whole
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2_PRE = PreTokenizer((_GPT2,))
# Every digit on its own first, then GPT-2 words ("starcoder"-style, which SmolLM uses).
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer((_QWEN2,))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": _GPT2_PRE, "phi-2": _GPT2_PRE, "mpt": _GPT2_PRE, "olmo": _GPT2_PRE,
    "llama3": _LLAMA3_PRE, "llama-v3": _LLAMA3_PRE, "llama-bpe": _LLAMA3_PRE,
    "falcon3": _LLAMA3_PRE, "pixtral": _LLAMA3_PRE,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "qwen2": _QWEN2_PRE, "deepseek-r1-qwen": _QWEN2_PRE, "stablelm2": _QWEN2_PRE,
    "megrez": _QWEN2_PRE,
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
}

# Texts of tokens that end a turn. A CONTROL token with one of these texts stops generation, as
# in llama.cpp's end-of-generation list (which is longer, and also promotes non-control tokens).
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                     "<|endoftext|>", "<|end_of_text|>")

# Used when the GGUF has no tokenizer.chat_template: plain ChatML, no default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPACE = "▁"  # U+2581, SentencePiece's visible space


class Tokenizer:
    """Encode and decode text for one model; build it with `Tokenizer.from_gguf_fields`."""

    def __init__(self, *, model: str, tokens: list[str], token_types: list[TokenType],
                 hf: HFTokenizer, add_bos: bool,
                 add_space_prefix: bool, bos_id: int | None, eos_id: int | None,
                 eot_id: int | None, chat_template: str | None):
        self.model = model  # "gpt2" or "llama"
        self.add_bos = add_bos  # what encode() does when add_bos is None
        self._tokens = tokens
        # One HF tokenizer serves both modes: with encode_special_tokens it cuts the text only at
        # USER_DEFINED tokens (CONTROL texts stay plain text), without it at both. The flag is
        # the tokenizer's state, so encoding holds a lock (a second tokenizer would cost ~15 MB).
        self._hf = hf
        self._hf_lock = threading.Lock()
        self._add_space_prefix = add_space_prefix
        self._bos_id, self._eos_id, self._eot_id = bos_id, eos_id, eot_id
        self._chat_template = chat_template
        # Raw bytes of every token, and the ids that decode to nothing unless special=True.
        self._pieces = [_token_bytes(t, k, model) for t, k in zip(tokens, token_types)]
        self._hidden = {i for i, k in enumerate(token_types)
                        if k in (TokenType.CONTROL, TokenType.UNKNOWN)}
        self._stop_ids = frozenset(
            {i for i in (eos_id, eot_id) if i is not None}
            | {i for i, (t, k) in enumerate(zip(tokens, token_types))
               if k == TokenType.CONTROL and t in END_OF_TURN_TEXTS})

    @classmethod
    def from_gguf(cls, gf) -> Tokenizer:
        """From an open GGUF file (gguf/reader.py); errors name the file."""
        try:
            return cls.from_gguf_fields(gf.fields)
        except TokenizerError as e:
            raise TokenizerError(f"{gf.path}: {e}") from None

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """Build from GGUF metadata, given as a plain dict of key -> Python value."""
        model = _required(fields, "tokenizer.ggml.model", str)
        tokens = _required(fields, "tokenizer.ggml.tokens", list)
        token_types = _read_token_types(fields, len(tokens))
        vocab = _vocab_dict(tokens)
        special = [AddedToken(t, special=True, normalized=False)
                   for t, k in zip(tokens, token_types)
                   if k in (TokenType.CONTROL, TokenType.UNKNOWN)]
        user = [AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, token_types) if k == TokenType.USER_DEFINED]

        if model == "gpt2":
            build, defaults = _byte_level_bpe(fields, vocab)
        elif model == "llama":
            build, defaults = _sentencepiece_bpe(fields, tokens, vocab)
        else:
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r}; "
                                 f"supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)")

        hf = build()
        hf.add_special_tokens(special)
        hf.add_tokens(user)

        bos_id = _token_id(fields, "tokenizer.ggml.bos_token_id", len(tokens), defaults.bos_id)
        add_bos = _optional(fields, "tokenizer.ggml.add_bos_token", bool, defaults.add_bos)
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true, "
                                 "but tokenizer.ggml.bos_token_id is not set")
        return cls(
            model=model, tokens=tokens, token_types=token_types, hf=hf, add_bos=add_bos,
            add_space_prefix=defaults.add_space_prefix,
            bos_id=bos_id,
            eos_id=_token_id(fields, "tokenizer.ggml.eos_token_id", len(tokens), defaults.eos_id),
            eot_id=_token_id(fields, "tokenizer.ggml.eot_token_id", len(tokens), None),
            chat_template=_optional(fields, "tokenizer.chat_template", str, None))

    # --- properties ---

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eot_id(self) -> int | None:
        """tokenizer.ggml.eot_token_id, or None when the file does not set it."""
        return self._eot_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, eot, and CONTROL tokens named in END_OF_TURN_TEXTS.

        For ChatML models (SmolLM2) that adds "<|im_end|>" and "<|endoftext|>".
        """
        return self._stop_ids

    @property
    def chat_template(self) -> str | None:
        """The GGUF's tokenizer.chat_template, or None (then ChatML is used)."""
        return self._chat_template

    # --- text -> ids ---

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. `special=True` parses control-token texts like "<|im_start|>"."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:       # a lone surrogate ("\ud800"): not UTF-8 text
            raise TokenizerError(f"text is not valid Unicode: {e.reason} at character "
                                 f"{e.start}") from None
        with self._hf_lock:
            self._hf.encode_special_tokens = not special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise TokenizerError("add_bos requested, but the model has no bos token")
            ids = [self._bos_id, *ids]
        return ids

    # --- ids -> bytes -> text ---

    def token_to_piece(self, token_id: int, *, special: bool = True) -> bytes:
        """Raw bytes of one token; CONTROL/UNKNOWN tokens give b"" unless `special`."""
        if not 0 <= token_id < len(self._pieces):
            raise TokenizerError(f"token id {token_id} is outside the vocab (size {self.vocab_size})")
        if not special and token_id in self._hidden:
            return b""
        return self._pieces[token_id]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD.

        SentencePiece models drop the one space that encode() prepended to the first word
        (llama.cpp keeps it when the ids start with bos; HF drops it, as we do).
        """
        ids = list(ids)
        pieces = [self.token_to_piece(i, special=not skip_special) for i in ids]
        first = 1 if ids and ids[0] == self._bos_id else 0  # the first piece after bos
        if self._add_space_prefix and len(pieces) > first and pieces[first].startswith(b" "):
            pieces[first] = pieces[first][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    # --- chat ---

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        _check_messages(messages)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self._text_of(self._bos_id),
                                         eos_token=self._text_of(self._eos_id))
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                AttributeError, RecursionError) as e:     # the template is the model file's code
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: "
                                 f"{e}") from None

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]

    @cached_property
    def _template(self):
        # The environment transformers uses for chat templates (apply_chat_template). jinja2 is
        # imported here, on first use: a process that never renders a chat costs 7 MB less.
        from jinja2 import TemplateError

        env = _chat_sandbox()(trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_from_template
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self._chat_template or CHATML_TEMPLATE)
        except TemplateError as e:
            raise TokenizerError(f"tokenizer.chat_template does not parse: {e}") from e


# What one `*` or `**` in a chat template may make: a model file's template runs on every chat
# request, and "{{ 'x' * 10**10 }}" would otherwise allocate gigabytes or spin forever.
MAX_TEMPLATE_REPEAT = 100_000
MAX_TEMPLATE_EXPONENT = 64


def _chat_sandbox():
    """jinja2's ImmutableSandboxedEnvironment (no attribute access to Python internals, no
    mutation of the messages), with `*` and `**` bounded."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class ChatSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_TEMPLATE_EXPONENT:
                raise SecurityError(f"exponent {right} is over {MAX_TEMPLATE_EXPONENT}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                            and len(seq) * n > MAX_TEMPLATE_REPEAT:
                        raise SecurityError(f"repeating a sequence {n} times makes more than "
                                            f"{MAX_TEMPLATE_REPEAT} items")
            return super().call_binop(context, operator, left, right)

    return ChatSandbox


class StreamDecoder:
    """Turns generated ids into text as they come, never splitting a UTF-8 character.

    push() returns only complete characters and holds back the first bytes of a character whose
    remaining bytes come in later tokens; flush() returns what is left (invalid bytes as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_piece(token_id, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# --- the two model kinds ---

@dataclass(frozen=True)
class _Defaults:
    """llama.cpp's defaults for keys a GGUF may leave out, per tokenizer kind."""

    add_bos: bool
    bos_id: int | None
    eos_id: int | None
    add_space_prefix: bool


def _byte_level_bpe(fields: dict, vocab: dict[str, int]):
    """`tokenizer.ggml.model = "gpt2"`: returns (a function building the HF tokenizer, defaults).

    llama.cpp defaults bos and eos to id 11 for these; we leave them unset instead.
    """
    pre = _pre_tokenizer(fields)
    merges = _read_merges(fields)

    def build() -> HFTokenizer:
        hf = _bpe(vocab, merges, ignore_merges=pre.ignore_merges)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    return build, _Defaults(add_bos=pre.add_bos, bos_id=None, eos_id=None,
                            add_space_prefix=False)


def _sentencepiece_bpe(fields: dict, tokens: list[str], vocab: dict[str, int]):
    """`tokenizer.ggml.model = "llama"`: returns (a function building the HF tokenizer, defaults)."""
    scores = _required(fields, "tokenizer.ggml.scores", list)
    if len(scores) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries "
                             f"but tokenizer.ggml.tokens has {len(tokens)}")
    merges = _merges_from_scores(tokens, scores, vocab)
    add_space_prefix = _optional(fields, "tokenizer.ggml.add_space_prefix", bool, True)
    unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", len(tokens), 0)

    def build() -> HFTokenizer:
        hf = _bpe(vocab, merges, byte_fallback=True, unk_token=tokens[unk_id])
        # " " -> "▁", and one "▁" in front of every piece of text between special tokens.
        prefix = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
        hf.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", _SPACE)])
        return hf

    return build, _Defaults(add_bos=True, bos_id=1, eos_id=2, add_space_prefix=add_space_prefix)


# --- reading the metadata ---

def _required(fields: dict, key: str, kind: type):
    if key not in fields:
        raise TokenizerError(f"GGUF metadata has no {key!r}, needed to build the tokenizer")
    return _checked(fields, key, kind)


def _optional(fields: dict, key: str, kind: type, default):
    return _checked(fields, key, kind) if key in fields else default


def _checked(fields: dict, key: str, kind: type):
    value = fields[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TokenizerError(f"{key} should be a {kind.__name__}, got {type(value).__name__}")
    return value


def _token_id(fields: dict, key: str, n_tokens: int, default: int | None) -> int | None:
    token_id = _optional(fields, key, int, default)
    if token_id is not None and not 0 <= token_id < n_tokens:
        raise TokenizerError(f"{key} = {token_id} is outside the vocab (size {n_tokens})")
    return token_id


def _read_token_types(fields: dict, n_tokens: int) -> list[TokenType]:
    raw = _required(fields, "tokenizer.ggml.token_type", list)
    if len(raw) != n_tokens:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(raw)} entries "
                             f"but tokenizer.ggml.tokens has {n_tokens}")
    try:
        return [TokenType(k) for k in raw]
    except ValueError as e:
        raise TokenizerError(f"tokenizer.ggml.token_type: {e}") from e


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    if not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is empty")
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if not isinstance(text, str):
            raise TokenizerError(f"tokenizer.ggml.tokens[{i}] should be a str, "
                                 f"got {type(text).__name__}")
        if text in vocab:
            raise TokenizerError(f"duplicate token {text!r} in tokenizer.ggml.tokens "
                                 f"(ids {vocab[text]} and {i})")
        vocab[text] = i
    return vocab


def _pre_tokenizer(fields: dict) -> PreTokenizer:
    name = _required(fields, "tokenizer.ggml.pre", str)
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported tokenizer.ggml.pre {name!r}; "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    return PRE_TOKENIZERS[name]


def _read_merges(fields: dict) -> list[tuple[str, str]]:
    merges = []
    for rank, line in enumerate(_required(fields, "tokenizer.ggml.merges", list)):
        # llama.cpp splits at the first space after the first character.
        cut = line.find(" ", 1) if isinstance(line, str) else -1
        if cut < 0:
            raise TokenizerError(f"tokenizer.ggml.merges[{rank}] = {line!r} is not 'left right'")
        merges.append((line[:cut], line[cut + 1:]))
    return merges


def _merges_from_scores(tokens: list[str], scores: list[float],
                        vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece tokenizer.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is the vocab entry with the
    highest score (leftmost on ties). As BPE: one merge (left, right) per way to cut each token
    into two vocab entries, ranked by the token's score, highest first. Equal scores of different
    tokens are ordered by id, where llama.cpp takes the leftmost pair instead.
    """
    ranked = []
    for token_id, text in enumerate(tokens):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> HFTokenizer:
    try:
        return HFTokenizer(models.BPE(vocab, merges, **options))
    except Exception as e:  # tokenizers raises plain Exception for an inconsistent vocab
        raise TokenizerError(f"cannot build the BPE model from the GGUF vocab: {e}") from e


# --- decoding tables ---

def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for (bytes_to_unicode, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in stand_in):
        stand_in[b] = chr(256 + n)
    return {char: b for b, char in stand_in.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _token_bytes(text: str, kind: TokenType, model: str) -> bytes:
    """The bytes one token stands for (llama.cpp's token_to_piece with special=true)."""
    if kind in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
        return text.encode()
    if kind == TokenType.BYTE:
        if len(text) != 6 or not text.startswith("<0x") or not text.endswith(">"):
            raise TokenizerError(f"byte token {text!r} is not of the form <0xNN>")
        return bytes([int(text[3:5], 16)])
    if kind != TokenType.NORMAL:
        return b""  # UNUSED and UNDEFINED tokens print nothing
    if model == "llama":
        return text.replace(_SPACE, " ").encode()
    # A character outside the byte alphabet stands for itself (as in HF's ByteLevel decoder).
    return b"".join(bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode() for c in text)


# --- chat messages ---

def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise TokenizerError(f"messages should be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{i}] should be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise TokenizerError(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise TokenizerError(f"messages[{i}][{key!r}] should be a str, "
                                     f"got {type(message[key]).__name__}")


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    # transformers' override of jinja's tojson, which would HTML-escape the text.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)


def _raise_from_template(message: str):
    raise TokenizerError(f"the chat template rejected the messages: {message}")
