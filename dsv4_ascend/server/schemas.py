"""Pydantic models of the HTTP API, for /openapi.json and /docs (FastAPI's OpenAPI generation).

They describe the request bodies the parsers in `protocol` accept and the JSON the routes in `app` answer;
tests/test_server_openapi.py validates real requests and responses against them. Requests are still validated by
`protocol` (every bound, cross-field rules, the context fit, OpenAI-style 400s naming the field): these models are
lax where `protocol` is exact (they do not repeat its checks), and accept unknown fields, as the server ignores
fields no OpenAI-compatible server defines (`user`, `metadata`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

__all__ = ["CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest",
           "CompletionResponse", "ChatCompletionResponse", "ErrorResponse", "ModelCard", "ModelList",
           "TokenizeResponse", "DetokenizeResponse", "VersionResponse", "request_body", "responses",
           "add_request_schemas"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = Field(None, description="vLLM's: usage on every chunk (needs include_usage)")


class _Sampling(_Open):
    model: str = Field(description="the served model name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str | list[int]] = Field(
        description="a string (plain text after BOS), token ids (as is), or a list of those (one choice each)")
    logprobs: int | None = Field(None, ge=0, le=20, description="top-N logprobs per token (prompt tokens too with echo)")
    echo: bool | None = Field(None, description="the prompt (and its logprobs) precede each choice")
    n: int | None = Field(None, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128, description=">= n; the n with the highest cumulative logprob")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="vLLM's: per-prompt-token logprobs")
    suffix: Literal[""] | None = Field(None, description="not supported: only empty")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions (DeepSeek-V4 chat template)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")
    thinking: bool | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["high", "max"] | None = None
    n: Literal[1] | None = None


class TokenizeRequest(_Open):
    """POST /tokenize (vLLM): a prompt as /v1/completions tokenises it, or messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort", "error"] | None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, list[ChatTokenLogprob]] | None
    finish_reason: Literal["stop", "length", "abort", "tool_calls", "error"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the field (or header) at fault")
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its body itself (FastAPI's documented way to declare it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


def responses(model: type[BaseModel] | None, stream: bool = False) -> dict:
    """The `responses` of a route: `model` as 200 (server-sent events too when it streams), errors as 4xx/5xx."""
    ok: dict[str, Any] = {"model": model} if model is not None else {}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string",
                                                          "description": "chunks as `data: {...}`, then [DONE]"}}}
    return {200: ok, 400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
            503: {"model": ErrorResponse}}


REQUESTS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def add_request_schemas(openapi: dict) -> dict:
    """Put the request models (referenced by `request_body`) into an OpenAPI document's components."""
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS], ref_template="#/components/schemas/{model}")
    openapi.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    return openapi
