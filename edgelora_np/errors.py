"""Every error edgelora_np raises on bad input derives from EdgeLoraError.

The CLI catches EdgeLoraError, prints its message as one line and exits with code 2.
Messages name the file, tensor or value at fault, and what was expected.
"""

from __future__ import annotations


class EdgeLoraError(Exception):
    """Base class of all user-facing errors."""


class ModelNotFoundError(EdgeLoraError):
    """A model path does not exist, or the default model cannot be fetched."""


class GGUFFormatError(EdgeLoraError):
    """A file is not a GGUF file, is truncated, or its metadata is inconsistent."""


class UnsupportedModelError(EdgeLoraError):
    """A GGUF file is valid but describes an architecture we do not run."""


class UnsupportedQuantError(EdgeLoraError):
    """A tensor is stored in a quantization type we have no kernel for."""


class TokenizerError(EdgeLoraError):
    """The GGUF tokenizer metadata is missing or of an unsupported kind."""


class ContextOverflowError(EdgeLoraError):
    """A sequence would grow past the model's (or the cache's) context length."""

    def __init__(self, message: str, *, n_prompt_tokens: int | None = None,
                 n_ctx: int | None = None):
        super().__init__(message)
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


class SamplingError(EdgeLoraError):
    """A sampling parameter is out of range."""


class AdapterError(EdgeLoraError):
    """A LoRA adapter is malformed, unsupported, or does not fit the base model."""


class StoreWriteError(AdapterError):
    """An adapter could not be written into the store (`disk_full`: no space left)."""

    def __init__(self, message: str, *, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


class CapacityError(EdgeLoraError):
    """A bounded resource (adapter slots, KV pages, the adapter pool) is exhausted."""


class QueueFullError(CapacityError):
    """The engine's queue of waiting requests is at its bound: retry later."""


class EngineError(EdgeLoraError):
    """The engine has stopped (it failed, or was closed) and takes no more requests."""


class BenchError(EdgeLoraError):
    """A load-generator setting is out of range, or a server cannot be benchmarked as asked."""
