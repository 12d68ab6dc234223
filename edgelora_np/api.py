"""The public Python API: load a model, tokenize, get logits, generate text.

    import edgelora_np as el
    model = el.load_model()                       # the embedded SmolLM2-135M-Instruct Q4_1
    ids = model.tokenize("text")
    logits = model.logits(ids)                    # float32 [len(ids), V], fresh cache
    for piece in model.generate("The capital of France is", max_tokens=16, temperature=0):
        print(piece, end="")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from edgelora_np.default_model import resolve_model_path
from edgelora_np.errors import ContextOverflowError, EdgeLoraError
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.model.batch import Batch
from edgelora_np.model.config import LlamaConfig, config_from_gguf
from edgelora_np.model.llama import Llama
from edgelora_np.model.weights import load_weights
from edgelora_np.sampling import Sampler, SamplingParams, StopMatcher
from edgelora_np.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CONTEXT = 2048     # KV positions per sequence unless asked otherwise
PREFILL_CHUNK = 128        # prompt tokens per forward call: bounds activation memory


def load_model(path: str | os.PathLike | None = None, *, n_threads: int | None = None,
               n_ctx: int | None = None, progress: bool = True) -> Model:
    """Load a llama-architecture GGUF file; None means $EDGELORA_MODEL or the embedded default."""
    return Model(resolve_model_path(path, progress=progress), n_threads=n_threads, n_ctx=n_ctx)


@dataclass
class Generation:
    """Iterate to stream text pieces; afterwards the fields describe the whole generation."""

    _pieces: Iterator[str]
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None     # "stop" (EOS or stop string), "length" or "context"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text += piece
            yield piece

    def run(self) -> Generation:
        """Consume the whole generation (for callers that do not stream)."""
        for _ in self:
            pass
        return self


class Model:
    def __init__(self, path: Path, *, n_threads: int | None = None, n_ctx: int | None = None):
        self.path = Path(path)
        self.n_threads = n_threads or numba.config.NUMBA_NUM_THREADS
        if not 1 <= self.n_threads <= numba.config.NUMBA_NUM_THREADS:
            raise EdgeLoraError(f"n_threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                                f"(NUMBA_NUM_THREADS), got {self.n_threads}")
        numba.set_num_threads(self.n_threads)
        gf = open_gguf(self.path)
        self.config: LlamaConfig = config_from_gguf(gf)
        self.tokenizer = Tokenizer.from_gguf_fields(gf.fields)
        self.metadata = {k: v for k, v in gf.fields.items() if not isinstance(v, list)}
        weights = load_weights(gf, self.config, self.n_threads)
        del gf                        # drops the file mapping: the repacked weights are the copy
        self.llama = Llama(self.config, weights)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.config.context_length)

    # --- text <-> tokens -----------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def chat_prompt(self, messages: list[dict] | str) -> str:
        """Render messages (or one user message) with the model's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    # --- forward ---------------------------------------------------------------------------

    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), V]: the logits after every position, from a fresh cache."""
        ids = self._check_ids(ids)
        cache = self.llama.new_cache(len(ids))
        out = [self.llama.forward(Batch.single(ids[i:i + PREFILL_CHUNK], start=i, all_logits=True),
                                  cache)
               for i in range(0, len(ids), PREFILL_CHUNK)]
        return np.concatenate(out)

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise EdgeLoraError("no tokens given")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(ids)} tokens do not fit the context of {self.n_ctx} positions")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise EdgeLoraError(f"token id {int(ids[bad][0])} is outside the vocabulary "
                                f"(0..{self.config.vocab_size - 1})")
        return ids.astype(np.int32)

    # --- generation ------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], *, chat: bool = False, max_tokens: int = 128,
                 temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, stop: tuple[str, ...] | list[str] = (),
                 ignore_eos: bool = False) -> Generation:
        """Stream a completion of `prompt` (text, or token ids); see Generation."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                repeat_last_n=repeat_last_n, seed=seed, stop=tuple(stop),
                                ignore_eos=ignore_eos)
        if isinstance(prompt, str):
            text = self.chat_prompt(prompt) if chat else prompt
            ids = self.tokenize(text, special=chat)
        else:
            ids = list(prompt)
        ids = self._check_ids(ids)
        gen = Generation(iter(()), prompt_tokens=len(ids))
        gen._pieces = self._stream(ids, params, gen)
        return gen

    def _stream(self, ids: np.ndarray, params: SamplingParams, gen: Generation) -> Iterator[str]:
        cache = self.llama.new_cache(self.n_ctx)
        sampler = Sampler(params)
        sampler.accept_many(ids.tolist())
        decoder = StreamDecoder(self.tokenizer)
        stops = StopMatcher(params.stop)
        stop_ids = set() if params.ignore_eos else set(self.tokenizer.stop_ids)

        t0 = time.perf_counter()
        for i in range(0, len(ids), PREFILL_CHUNK):
            logits = self.llama.forward(Batch.single(ids[i:i + PREFILL_CHUNK], start=i), cache)
        gen.prefill_seconds = time.perf_counter() - t0

        n = len(ids)
        t0 = time.perf_counter()
        while True:
            token = sampler.sample(logits[-1])
            if token in stop_ids:
                gen.finish_reason = "stop"
                break
            sampler.accept(token)
            gen.token_ids.append(token)
            text, hit = stops.push(decoder.push(token))
            if text:
                yield text
            if hit:
                gen.finish_reason = "stop"
                break
            if len(gen.token_ids) >= params.max_tokens:
                gen.finish_reason = "length"
                break
            if n >= self.n_ctx:
                gen.finish_reason = "context"
                break
            logits = self.llama.forward(Batch.single([token], start=n), cache)
            n += 1
        gen.decode_seconds = time.perf_counter() - t0
        if not stops.stopped:
            tail, hit = stops.push(decoder.flush())
            if not hit:
                tail += stops.flush()
            if stops.stopped:
                gen.finish_reason = "stop"
            if tail:
                yield tail
