"""The public Python API: load a model, tokenize, get logits, generate text.

    import edgelora_np as el
    model = el.load_model()                       # the embedded SmolLM2-135M-Instruct Q4_1
    ids = model.tokenize("text")
    logits = model.logits(ids)                    # float32 [len(ids), V], fresh cache
    for piece in model.generate("The capital of France is", max_tokens=16, temperature=0):
        print(piece, end="")

    engine = el.Engine(model, max_batch_tokens=256, max_seqs=16)   # many requests at once
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np

from edgelora_np.default_model import resolve_model_path
from edgelora_np.engine.engine import Engine, Generation
from edgelora_np.errors import ContextOverflowError, EdgeLoraError
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.kernels.lora import LoraBatch
from edgelora_np.model.batch import Batch
from edgelora_np.model.config import LlamaConfig, config_from_gguf
from edgelora_np.model.llama import Llama
from edgelora_np.model.weights import load_weights
from edgelora_np.tokenizer import Tokenizer
from edgelora_np.warmup import release_compiler_memory, warm_forward

__all__ = ["Engine", "Generation", "Model", "load_model"]

DEFAULT_CONTEXT = 2048     # KV positions per sequence unless asked otherwise
PREFILL_CHUNK = 128        # prompt tokens per forward call: bounds activation memory


def load_model(path: str | os.PathLike | None = None, *, n_threads: int | None = None,
               n_ctx: int | None = None, progress: bool = True, warm: bool = True) -> Model:
    """Load a llama-architecture GGUF file; None means $EDGELORA_MODEL or the embedded default.

    `warm` runs every kernel once on a tiny model before the weights load (compiling them on
    a fresh install, loading cached code otherwise) and then releases the compiler's memory.
    """
    return Model(resolve_model_path(path, progress=progress), n_threads=n_threads, n_ctx=n_ctx,
                 warm=warm)


class Model:
    def __init__(self, path: Path, *, n_threads: int | None = None, n_ctx: int | None = None,
                 warm: bool = True):
        self.path = Path(path)
        self.n_threads = n_threads or numba.config.NUMBA_NUM_THREADS
        if not 1 <= self.n_threads <= numba.config.NUMBA_NUM_THREADS:
            raise EdgeLoraError(f"n_threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                                f"(NUMBA_NUM_THREADS), got {self.n_threads}")
        numba.set_num_threads(self.n_threads)
        gf = open_gguf(self.path)
        self.config: LlamaConfig = config_from_gguf(gf)
        self.tokenizer = Tokenizer.from_gguf(gf)
        self.metadata = {k: v for k, v in gf.fields.items() if not isinstance(v, list)}
        if warm and not numba.config.DISABLE_JIT:
            # Kernels first, while little else is resident: then the compiler's pages can go.
            warm_forward({t.qtype for t in gf.tensors.values() if len(t.shape) == 2},
                         self.n_threads)
            release_compiler_memory()
        weights = load_weights(gf, self.config, self.n_threads)
        del gf                        # drops the file mapping: the repacked weights are the copy
        self.llama = Llama(self.config, weights)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.config.context_length)
        self._engine = None
        self._fingerprint = None

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

    def logits(self, ids, *, adapter=None) -> np.ndarray:
        """float32 [len(ids), V]: the logits after every position, from a fresh cache.

        `adapter`: the name of a loaded adapter, or a path to one (see generate)."""
        ids = self._check_ids(ids)
        name = self._adapter_name(adapter)
        pool = self.engine.pool
        slot = -1 if name is None else pool.acquire(name)
        try:
            cache = self.llama.new_cache(len(ids))
            out = []
            for i in range(0, len(ids), PREFILL_CHUNK):
                batch = Batch.single(ids[i:i + PREFILL_CHUNK], start=i, adapter=slot,
                                     all_logits=True)
                lora = None if name is None else LoraBatch(pool, batch.adapters)
                with pool.reading():
                    out.append(self.llama.forward(batch, cache, lora))
        finally:
            if name is not None:
                pool.release(name)
        return np.concatenate(out)

    def _check_ids(self, ids) -> np.ndarray:
        try:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        except (OverflowError, ValueError, TypeError):      # 2^64, ragged lists, non-numbers
            raise EdgeLoraError(f"token ids must be a flat list of integers in "
                                f"0..{self.config.vocab_size - 1}") from None
        if len(ids) == 0:
            raise EdgeLoraError("no tokens given")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(ids)} tokens do not fit the context of {self.n_ctx} positions",
                n_prompt_tokens=len(ids), n_ctx=self.n_ctx)
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise EdgeLoraError(f"token id {int(ids[bad][0])} is outside the vocabulary "
                                f"(0..{self.config.vocab_size - 1})")
        return ids.astype(np.int32)

    # --- adapters and generation ----------------------------------------------------------------

    @property
    def engine(self):
        """The model's own engine (one sequence at a time, on its own thread), behind generate()
        and logits()."""
        if self._engine is None:
            from edgelora_np.engine.engine import Engine

            self._engine = Engine(self, max_seqs=1, kv_tokens=self.n_ctx)
        return self._engine

    def _adapter_name(self, adapter) -> str | None:
        """A loaded adapter's name, or a path to load (once) under its own path as name."""
        if adapter is None or (isinstance(adapter, str) and adapter in self.engine.pool):
            return adapter
        name = str(adapter)
        if name not in self.engine.pool:
            self.engine.add_adapter(name, adapter)
        return name

    @property
    def fingerprint(self) -> str:
        """The identity adapter stores record for this base model (adapters/store.py)."""
        if self._fingerprint is None:
            from edgelora_np.adapters.store import model_fingerprint

            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def prompt_ids(self, prompt, *, chat: bool = False) -> np.ndarray:
        """Token ids of a prompt: text, chat message(s) when chat=True, or ids already."""
        if isinstance(prompt, str) or (chat and isinstance(prompt, list)
                                       and all(isinstance(m, dict) for m in prompt)):
            if chat:
                return self._check_ids(self.tokenize(self.chat_prompt(prompt), special=True))
            return self._check_ids(self.tokenize(prompt))
        return self._check_ids(prompt)

    def generate(self, prompt, *, adapter=None, chat: bool = False, max_tokens: int = 128,
                 temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, stop=(), ignore_eos: bool = False):
        """Stream a completion of `prompt` (text, token ids, or chat messages with chat=True).

        Returns a Generation: iterate it for text pieces. `adapter` is the name of a loaded
        adapter or a path to a PEFT directory / GGUF-LoRA file."""
        return self.engine.submit(
            prompt, adapter=self._adapter_name(adapter), chat=chat, max_tokens=max_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
            stop=tuple(stop), ignore_eos=ignore_eos)
