"""Request and response bodies, as pydantic models (FastAPI turns them into /openapi.json).

Requests accept the fields OpenAI, vLLM and llama-server clients send; fields we do not use
are ignored (`extra="ignore"`), fields we cannot honour with the value given are a 400 that
says so (see `unsupported`). Missing sampling fields take llama-server's defaults
(edgelora_np/sampling.py), since this server is a drop-in for it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Sampling fields shared by every generation route."""

    temperature: float | None = Field(None, description="0 = greedy [default 0.8]")
    top_p: float | None = Field(None, description="nucleus mass [default 0.95]")
    top_k: int | None = Field(None, description="[default 40]; 0 = off")
    min_p: float | None = Field(None, description="[default 0.05]; 0 = off")
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = Field(None, description="RNG seed; absent or -1 = random")
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    cache_prompt: bool = Field(True, description="reuse cached KV pages of an identical prompt "
                                                 "prefix (same adapter and scale); llama.cpp's field")


# --- OpenAI ---------------------------------------------------------------------------------

class _OpenAIRequest(_Sampling):
    model: str | None = Field(None, description="an adapter's name, the base model's id, or "
                                                "\"auto\" (the router chooses)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, description="tokens to generate at most")
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, description="[default: what the context leaves]")
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = {"cached_tokens": 0}


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgelora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraRequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Request):
    lora_name: str


# --- llama.cpp ------------------------------------------------------------------------------

class LoraChoice(_Request):
    id: int
    scale: float = 1.0


class LlamaCompletionRequest(_Sampling):
    prompt: str | list[int]
    n_predict: int = Field(-1, description="tokens to generate at most; -1 = until the context")
    stream: bool = False
    lora: list[LoraChoice] | None = Field(None, description="[{id, scale}], ids as in "
                                                            "GET /lora-adapters")
    adapter: str | None = Field(None, description="an adapter by name (edgelora's extension)")
    n_probs: int = 0


class Timings(BaseModel):
    cache_n: int = 0                # prompt tokens served from the prefix cache
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class LlamaCompletionResponse(BaseModel):
    index: int = 0
    content: str
    tokens: list[int]
    id_slot: int = -1
    stop: bool = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict[str, Any]
    prompt: str
    has_new_line: bool
    truncated: bool = False
    stop_type: Literal["eos", "word", "limit", "none"]
    stopping_word: str = ""
    tokens_cached: int = 0          # as cache_n: prompt tokens reused from the prefix cache
    timings: Timings


class LoraAdapterInfo(BaseModel):
    id: int
    name: str
    path: str
    scale: float = 0.0
    task_name: str = ""
    prompt_prefix: str = ""


class TokenizeRequest(_Request):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(_Request):
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    content: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
