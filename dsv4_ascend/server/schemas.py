"""Pydantic models of the HTTP API: the request contract (every type, bound, enum and cross-field rule; validated
here, FastAPI's way) and the responses, for /openapi.json and /docs.

`validate(model, body, settings)` checks a decoded JSON body (`body.parse_body`) against a request model and turns
pydantic's ValidationError into the OpenAI-style 400 (`body.APIError`) naming the field. Bounds that depend on the
served model (vocabulary, context length, the model's name) read `Settings` from the validation context. Fields that
other OpenAI-compatible servers define but this one does not implement are refused unless unset (or neutral); fields
no such server defines (`user`, `metadata`) are ignored. `protocol` only translates a valid request into engine
inputs (prompt ids, SamplingParams, constraints); what needs the tokenizer (the context fit, grammars) stays there.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WrapValidator, field_validator, model_validator
from pydantic.json_schema import models_json_schema

from .validation import (Int, Settings, TokenId, check_ids, fail, no_adjustment_when_speculative, one_error,
                         served_model, settings_of, validate, whole, within_context)

__all__ = ["Settings", "validate", "CompletionRequest", "ChatCompletionRequest", "TokenizeRequest",
           "DetokenizeRequest", "CompletionResponse", "ChatCompletionResponse", "ErrorResponse", "ModelCard",
           "ModelList", "TokenizeResponse", "DetokenizeResponse", "VersionResponse", "request_body", "responses",
           "add_request_schemas", "MAX_LOGPROBS", "MAX_CHOICES", "MAX_SEQUENCES"]

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_CHOICES = 128        # n and best_of
MAX_SEQUENCES = 1024     # prompts x best_of in one completions request
MAX_LOGIT_BIAS = 1024    # entries of logit_bias
MAX_BAD_WORDS = 128
INT64 = (-(2**63), 2**63 - 1)


class _Strict(BaseModel):
    """JSON types exactly (no "7" for 7, no 1 for true), finite numbers; unknown fields kept (checked by callers)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(_Strict):
    model_config = ConfigDict(extra="forbid")


# Accepted by other OpenAI-compatible servers but not implemented here: refused unless unset (or neutral).
# OpenAI's `modalities` / `verbosity` and vLLM's `include_reasoning` change the answer: only their defaults pass.
_UNSUPPORTED = ("guided_decoding_backend", "guided_whitespace_pattern", "functions", "function_call",
                "use_beam_search", "logits_processors", "allowed_token_ids", "structural_tag", "prediction", "audio",
                "web_search_options", "modalities", "verbosity", "include_reasoning")
_NEUTRAL = {"use_beam_search": False, "modalities": ["text"], "verbosity": "medium", "include_reasoning": True}


def _refuse_unsupported(body: Any, also: dict[str, tuple] = {}) -> None:  # noqa: B006 (read only)
    """Refuse the unimplemented fields of `_UNSUPPORTED`, and those of `also` ({name: (neutral values, why)})."""
    if not isinstance(body, dict):
        return
    for name in _UNSUPPORTED:
        v = body.get(name)
        if v is not None and not (name in _NEUTRAL and type(v) is type(_NEUTRAL[name]) and v == _NEUTRAL[name]):
            neutral = f" or {json.dumps(_NEUTRAL[name])}" if name in _NEUTRAL else ""
            raise fail(name, f"'{name}' is not supported by this server (leave it unset{neutral})")
    for name, (neutral, why) in also.items():
        v = body.get(name)
        if v is not None and not any(v is x or (type(v) is type(x) and v == x) for x in neutral):
            raise fail(name, f"'{name}' is not supported {why}")


class StreamOptions(_Closed):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = Field(None, description="vLLM's: usage on every chunk (needs include_usage)")

    @model_validator(mode="after")
    def _needs_include(self) -> StreamOptions:
        if self.continuous_usage_stats and not self.include_usage:
            raise fail("stream_options.continuous_usage_stats", "'stream_options.continuous_usage_stats' needs "
                       "'stream_options.include_usage': true")
        return self


class StructuredOutputs(_Closed):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (object or string)")
    json_object: bool | None = Field(None, description="true: any JSON object")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect) or GBNF")

    model_config = ConfigDict(populate_by_name=True)


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
Word = Annotated[str, Field(min_length=1)]


class SamplingFields(_Strict):
    """What /v1/completions and /v1/chat/completions share: the model, sampling, constraints, streaming."""

    model: str = Field(description="the served model name (GET /v1/models)")
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1, description="-1 or 0: off; at most the vocabulary size")
    seed: Int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: Annotated[Word | Annotated[list[Word], Field(max_length=MAX_STOP_STRINGS)] | None, one_error(
        f"must be a non-empty string or an array of at most {MAX_STOP_STRINGS} non-empty strings")] = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,11}$")],
                               Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)] | None = \
        Field(None, description="token id -> bias in [-100, 100]")
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: Int | None = Field(None, ge=0)
    bad_words: Annotated[list[Word], Field(max_length=MAX_BAD_WORDS)] | None = Field(
        None, description="vLLM's: words never completed (as text, and after a space)")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: output matches this JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's: output matches this regex")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM's: output is one of these")
    guided_grammar: str | None = Field(None, description="vLLM's: a Lark (llguidance dialect) or GBNF grammar")
    structured_outputs: StructuredOutputs | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("model")
    @classmethod
    def _served(cls, v: str, info: ValidationInfo) -> str:
        return served_model(v, info)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None, info: ValidationInfo) -> int | None:
        s = settings_of(info)
        if v is not None and s is not None and v > s.vocab:
            raise fail("top_k", f"'top_k' must be in [-1, {s.vocab}], got {v if v < 10**30 else 'a huge integer'}")
        return v

    @field_validator("max_tokens", "min_tokens")
    @classmethod
    def _context(cls, v: int | None, info: ValidationInfo) -> int | None:
        return within_context(v, info)

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        return v if v is None else check_ids(v, info, "ids")

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v: dict | None, info: ValidationInfo) -> dict | None:
        if v is not None:
            check_ids([int(k) for k in v], info, "keys (token ids)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, body: Any) -> Any:
        _refuse_unsupported(body, {"suffix": (("",), "by this server (only empty)")})
        return body

    @model_validator(mode="after")
    def _cross(self) -> SamplingFields:
        given = [n for n in _GUIDED if getattr(self, n) is not None]
        if len(given) > 1:
            raise fail(given[1], f"'{given[1]}' cannot be combined with '{given[0]}': give one constraint")
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in ("json", "json_object", "regex", "choice", "grammar")
                     if getattr(so, "json_" if k == "json" else k) not in (None, False)]
            if len(kinds) != 1:
                raise fail("structured_outputs", "'structured_outputs' must set exactly one of json, json_object, "
                           f"regex, choice, grammar (got {', '.join(kinds) or 'none'})")
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            # OpenAI and vLLM answer 400 too; accepting it would silently drop include_usage.
            raise fail("stream_options", "'stream_options' applies only with 'stream': true")
        if self.min_tokens and self.max_completion() is not None and self.min_tokens > self.max_completion():
            raise fail("min_tokens", f"'min_tokens' ({self.min_tokens}) must be <= max_tokens "
                       f"({self.max_completion()})")
        return self

    @model_validator(mode="after")
    def _speculative(self, info: ValidationInfo) -> SamplingFields:
        return no_adjustment_when_speculative(self, info)

    def max_completion(self) -> int | None:
        """The completion-length limit the request gives (None: the server's default)."""
        return self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_tokens"


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Annotated[Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
                      | Annotated[list[Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(
                          min_length=1)]], Field(min_length=1)],
                      one_error("must be a non-empty string, a non-empty array of token ids, or a non-empty array "
                                 "of those (not mixed with bare token ids)")] = Field(
        description="a string (plain text after BOS), token ids (as is), or a list of those (one choice each)")
    max_tokens: Int | None = Field(None, ge=0, description="0 (with echo): the prompt alone, with its logprobs")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="top-N logprobs per token (prompt tokens too with echo)")
    echo: bool | None = Field(None, description="the prompt (and its logprobs) precede each choice")
    n: Int | None = Field(None, ge=1, le=MAX_CHOICES)
    best_of: Int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description=">= n; the n with the highest cumulative logprob")
    prompt_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's: per-prompt-token logprobs")
    suffix: Literal[""] | None = Field(None, description="not supported: only empty")

    @field_validator("prompt")
    @classmethod
    def _prompt_ids(cls, v: Any, info: ValidationInfo) -> Any:
        for i, p in enumerate(v if isinstance(v, list) and v and not isinstance(v[0], int) else [v]):
            if isinstance(p, list):
                s = settings_of(info)
                bad = [t for t in p if s is not None and t >= s.vocab]
                if bad:
                    where = "prompt" if p is v else f"prompt[{i}]"
                    raise fail("prompt", f"'{where}' token ids must be in [0, {s.vocab}), found {bad[:5]}")
        return v

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        n, best_of = self.n or 1, self.best_of
        if self.max_tokens == 0 and not self.echo:  # vLLM and OpenAI's legacy API: 0 scores the echoed prompt
            raise fail("max_tokens", "'max_tokens': 0 needs 'echo': true (it returns the prompt alone)")
        if best_of is not None and best_of < n:
            raise fail("best_of", f"'best_of' ({best_of}) must be >= 'n' ({n})")
        if self.stream and best_of is not None and best_of > n:
            raise fail("best_of", "'best_of' > 'n' cannot be streamed (the kept choices are known only at the end)")
        prompts = len(self.prompts())
        if prompts * (best_of or n) > MAX_SEQUENCES:
            raise fail("prompt" if prompts > 1 else "best_of", f"{prompts} prompts x {best_of or n} choices = "
                       f"{prompts * (best_of or n)} sequences; at most {MAX_SEQUENCES} per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or a batch."""
        p = self.prompt
        return p if isinstance(p, list) and not isinstance(p[0], int) else [p]


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _name(cls, v: dict) -> dict:
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError("needs a non-empty 'name'")
        return v


class JsonSchemaFormat(_Strict):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs 'json_schema': {\"schema\": {...}}")
        return self


class Thinking(_Closed):
    """DeepSeek's `{"type": "enabled" | "disabled"}`; other keys (a `budget_tokens`) are not implemented: refused."""

    type: Literal["enabled", "disabled"]


class ChatTemplateKwargs(_Closed):
    """The template switches this server reads; any other key would be silently unused: refused."""

    thinking: bool | None = None
    enable_thinking: bool | None = None


def _text_parts_only(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, m in enumerate(msgs):
        c = m.get("content")
        if isinstance(c, list) and m.get("role") != "tool":
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise fail("messages", f"'messages[{i}].content[{j}]': only text content parts are supported")
    return msgs


Messages = Annotated[list[dict[str, Any]], Field(min_length=1)]


class ChatInputs(_Strict):
    """What the chat template reads besides the messages."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | ToolChoiceFunction | None, one_error(
        "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")] = None
    thinking: Annotated[bool | Thinking | None, one_error(
        "must be a boolean or {\"type\": \"enabled\" | \"disabled\"} (no other keys)")] = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    reasoning_effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="DeepSeek's: high or max; low and medium mean high, xhigh max (as DeepSeek's API maps them)")

    @field_validator("messages", check_fields=False)
    @classmethod
    def _parts(cls, v: list | None) -> list | None:
        return v if v is None else _text_parts_only(v)

    def think(self) -> bool:
        """Whether the reply opens with reasoning (thinking, or chat_template_kwargs' thinking / enable_thinking)."""
        v = self.thinking
        if v is None and self.chat_template_kwargs is not None:
            kw = self.chat_template_kwargs
            v = kw.thinking if kw.thinking is not None else kw.enable_thinking
        if isinstance(v, Thinking):
            return v.type == "enabled"
        return bool(v)

    def effort(self) -> str | None:
        """The template's reasoning_effort (None, "high" or "max"), mapped as DeepSeek's API documents its thinking
        mode (https://api-docs.deepseek.com/guides/thinking_mode): low and medium -> high, xhigh -> max."""
        return {"low": "high", "medium": "high", "xhigh": "max"}.get(self.reasoning_effort, self.reasoning_effort)

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether tool_choice forces a call, the function it names or None)."""
        c = self.tool_choice
        if isinstance(c, ToolChoiceFunction):
            return True, c.function["name"]
        return c == "required", None

    def chat_tools(self) -> list | None:
        """The tools the template shows (None under tool_choice "none")."""
        return None if self.tool_choice == "none" else (self.tools or None)

    def _check_tools(self) -> None:
        if self.forced_tool()[0] and not self.tools:
            raise fail("tool_choice", "'tool_choice' other than \"none\" / \"auto\" needs 'tools'")


class ChatCompletionRequest(ChatInputs, SamplingFields):
    """POST /v1/chat/completions (DeepSeek-V4 chat template)."""

    messages: Messages
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: bool | None = None
    response_format: Annotated[ResponseFormat | None, WrapValidator(whole)] = Field(
        None, description="text, json_object or json_schema")
    n: Int | None = Field(None, ge=1, le=MAX_CHOICES, description="choices; choice i samples with seed + i")

    @model_validator(mode="before")
    @classmethod
    def _chat_only(cls, body: Any) -> Any:
        _refuse_unsupported(body, {"echo": ((False,), "on /v1/chat/completions"),
                                   "prompt_logprobs": ((), "on /v1/chat/completions (use /v1/completions)"),
                                   "best_of": ((1,), "on /v1/chat/completions (use n)")})
        return body

    @field_validator("max_completion_tokens")
    @classmethod
    def _context2(cls, v: int | None, info: ValidationInfo) -> int | None:
        return within_context(v, info)

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise fail("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        self._check_tools()
        forced = self.forced_tool()[0]
        if self.parallel_tool_calls is False and not self.tools:
            # OpenAI refuses it without tools too; with tools: a forced call is one call (grammar), under "auto"
            # the calls after the first are dropped, as vLLM does.
            raise fail("parallel_tool_calls", "'parallel_tool_calls': false applies only with 'tools'")
        rf = self.response_format
        if forced and rf is not None and rf.type != "text":
            raise fail("tool_choice", "'tool_choice' forcing a tool call cannot be combined with a JSON "
                       "'response_format'")
        other = [n for n in _GUIDED if getattr(self, n) is not None]
        if other and (forced or (rf is not None and rf.type != "text")):
            raise fail(other[0], f"'{other[0]}' cannot be combined with 'response_format' or a forced tool call")
        return self

    def max_completion(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


# vLLM's tokenize fields this server does not implement (refused unless unset or false).
_TOKENIZE_UNSUPPORTED = {name: ((False,), "by this server's /tokenize (leave it unset)")
                         for name in ("continue_final_message", "chat_template", "documents", "mm_processor_kwargs")}


class TokenizeRequest(ChatInputs):
    """POST /tokenize (vLLM): a prompt as /v1/completions tokenises it, or messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None

    @field_validator("model")
    @classmethod
    def _served(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else served_model(v, info)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, body: Any) -> Any:
        if isinstance(body, dict) and body.get("messages") is not None:
            _refuse_unsupported(body, _TOKENIZE_UNSUPPORTED)
        return body

    @model_validator(mode="after")
    def _shape(self) -> TokenizeRequest:
        if self.messages is not None:
            if self.prompt is not None:
                raise fail("prompt", "give either 'prompt' or 'messages', not both")
            if self.add_special_tokens:
                raise fail("add_special_tokens", "'add_special_tokens' applies to 'prompt' only: the chat template "
                           "already starts with BOS")
            self._check_tools()
            return self
        if self.prompt is None:
            raise fail("prompt", "'prompt' (a string) or 'messages' is required")
        if self.add_generation_prompt is not None:
            raise fail("add_generation_prompt", "'add_generation_prompt' applies to 'messages' only")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]

    @field_validator("model")
    @classmethod
    def _served(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else served_model(v, info)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v: list[int], info: ValidationInfo) -> list[int]:
        return check_ids(v, info, "ids")


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
