"""The HTTP protocol's translation: a request validated by its pydantic model (`schemas`, after `body` read it as
JSON) becomes prompt ids + `SamplingParams` (with its constraint) or, for /tokenize and /detokenize, ids. What needs
the tokenizer is checked here, as a 400 naming the field (`body.APIError`): the context fit, a grammar that does not
compile.

User text is tokenised as plain text: only the chat template inserts control tokens. A completions prompt given
as token ids is used as is (the way to send special tokens on purpose). Prompts are refused by length before
tokenising when their characters alone prove they cannot fit (`Tokenizer.max_token_chars`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from ..chat import ASSISTANT, THINK_END, THINK_START, encode_message_segments
from ..constraints import GuidedSpec
from ..sampling import SamplingParams
from . import schemas as sc
from .body import MAX_BODY_BYTES, MAX_JSON_DEPTH, APIError, parse_body
from .schemas import Settings

__all__ = ["APIError", "Settings", "Parsed", "Prompt", "choice_seed", "parse_body", "parse_completion_request",
           "parse_chat_request", "parse_tokenize_request", "parse_detokenize_request", "request_id", "MAX_BODY_BYTES",
           "MAX_JSON_DEPTH", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128


@dataclass
class Prompt:
    """One prompt of a request: its ids, its sampling (max_tokens fitted to it), its text as given (echo)."""

    ids: list[int]
    params: SamplingParams
    text: str | None = None     # the prompt string; None when given as token ids


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` (0-based, of n or best_of) of a prompt whose request seed is `seed`: seed + choice,
    wrapped into int64. Choice 0 keeps the request's seed, so choice j of a seeded request equals a single-choice
    request with seed + j."""
    return (seed + choice + 2**63) % 2**64 - 2**63


@dataclass
class Parsed:
    """A validated request: prompt ids, sampling, and how to answer. `prompt`/`params` are the first (for chat,
    the only) prompt; a completions request lists all of its prompts in `prompts`."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None        # top-N (completions) or top_logprobs (chat); None = no logprobs
    thinking: bool = False
    tools: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: every streamed chunk carries usage
    prompts: list[Prompt] = field(default_factory=list)
    n: int = 1                  # choices returned per prompt
    best_of: int = 1            # choices generated per prompt (the n with the highest cumulative logprob are kept)
    echo: bool = False          # completions: the prompt text (and its logprobs) precede each choice's text
    prompt_logprobs: int | None = None  # vLLM's field: each choice also carries its prompt tokens' logprobs
    echo_only: bool = False     # completions max_tokens 0 with echo: the engine runs one token, none is returned
    single_tool_call: bool = False  # chat parallel_tool_calls false: only the first tool call is returned

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [Prompt(self.prompt, self.params)]

    def sequences(self) -> list[tuple[int, SamplingParams]]:
        """The engine requests to run: (prompt index, params with the choice's seed), best_of per prompt."""
        return [(i, p.params if j == 0 else dataclasses.replace(p.params, seed=choice_seed(p.params.seed, j)))
                for i, p in enumerate(self.prompts) for j in range(self.best_of)]


# ------------------------------------------------------------------------------------------------ translation

def _or(v: Any, default: Any) -> Any:
    return default if v is None else v


def _bad_words(words: list[str] | None, tok) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token-id sequences: each word (leading spaces dropped) as plain text, and once more after
    a space when that tokenises to as many tokens with another first token (a word is often a different token after
    a space)."""
    out: list[tuple[int, ...]] = []
    for i, word in enumerate(words or ()):
        text = word.lstrip()
        if not text:
            raise APIError(f"'bad_words[{i}]' holds only whitespace", "bad_words")
        ids = tuple(tok.encode_text(text))
        out.append(ids)
        spaced = tuple(tok.encode_text(" " + text))
        if len(spaced) == len(ids) and spaced[0] != ids[0]:
            out.append(spaced)
    return tuple(out)


def _sampling(req: sc.SamplingFields, tok, logprobs: int | None) -> dict:
    """The SamplingParams fields of a validated request (max_tokens apart: it depends on the prompt)."""
    stop = req.stop
    return dict(temperature=_or(req.temperature, 1.0), top_k=0 if req.top_k in (None, -1) else req.top_k,
                top_p=_or(req.top_p, 1.0), seed=req.seed, stop_token_ids=tuple(req.stop_token_ids or ()),
                stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), ignore_eos=bool(req.ignore_eos),
                logprobs=logprobs, presence_penalty=_or(req.presence_penalty, 0.0),
                frequency_penalty=_or(req.frequency_penalty, 0.0), repetition_penalty=_or(req.repetition_penalty, 1.0),
                min_p=_or(req.min_p, 0.0), min_tokens=req.min_tokens or 0,
                logit_bias=tuple((int(k), v) for k, v in (req.logit_bias or {}).items()),
                bad_words=_bad_words(req.bad_words, tok))


def _params(max_tokens: int, fields: dict) -> SamplingParams:
    """The request's SamplingParams; min_tokens above a defaulted max_tokens is a 400 naming it."""
    if fields["min_tokens"] > max_tokens:
        raise APIError(f"'min_tokens' ({fields['min_tokens']}) must be <= max_tokens ({max_tokens})", "min_tokens")
    return SamplingParams(max_tokens=max_tokens, **fields)


def _vllm_guided(req: sc.SamplingFields, thinking: bool, tok) -> tuple[str, GuidedSpec] | None:
    """vLLM's guided_json / guided_regex / guided_choice / guided_grammar or structured_outputs as a constraint,
    with the field that asked for it (None when none did; the schema refused asking for two)."""
    so = req.structured_outputs
    given = [("guided_json", "json", req.guided_json), ("guided_regex", "regex", req.guided_regex),
             ("guided_choice", "choice", req.guided_choice), ("guided_grammar", "grammar", req.guided_grammar)]
    if so is not None:
        given += [("structured_outputs", k, getattr(so, "json_" if k == "json" else k))
                  for k in ("json", "json_object", "regex", "choice", "grammar")]
    for param, kind, v in given:
        if v is None or v is False:
            continue
        return param, _spec(param, lambda: _vllm_spec(kind, v, thinking, tok))
    return None


def _vllm_spec(kind: str, v: Any, thinking: bool, tok) -> GuidedSpec:
    """The GuidedSpec of one of vLLM's constraint kinds (json, json_object, regex, choice, grammar)."""
    if kind == "json_object":
        return GuidedSpec("json_object", thinking=thinking, tokenizer=tok)
    if kind == "json":
        schema = v
        if isinstance(v, str):
            try:
                schema = json.loads(v)
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        return GuidedSpec("json_schema", schema=schema, thinking=thinking, tokenizer=tok)
    if kind == "choice":
        return GuidedSpec("choice", choices=tuple(v), thinking=thinking, tokenizer=tok)
    if kind == "regex" and (len(v) - len(v.rstrip("\\"))) % 2:
        # llguidance's regex_to_lark drops a trailing lone backslash ("a\\" became "a"); Rust's regex refuses it.
        raise ValueError("the regex ends in an incomplete escape (a lone backslash)")
    return GuidedSpec(kind, text=v, thinking=thinking, tokenizer=tok)


def _spec(param: str, make: Callable[[], GuidedSpec]) -> GuidedSpec:
    """The constraint `make` builds, refused as a 400 naming `param` when it is malformed."""
    try:
        return make()
    except ValueError as exc:
        raise APIError(f"'{param}' cannot be enforced: {str(exc)[:500]}", param) from None


def _compiled(spec: GuidedSpec, param: str, s: Settings) -> GuidedSpec:
    """`spec` once its grammar compiled against the served vocabulary (else a 400 naming `param`)."""
    return _spec(param, lambda: (spec.check(s.vocab), spec)[1])


def _fit(s: Settings, n_prompt: int, prompt_param: str, name: str, max_tokens: int | None,
         default_max: int | None) -> int:
    """max_tokens for a prompt of n_prompt tokens, or a 400 when the two do not fit the context."""
    room = s.max_seq_len - n_prompt
    if room < 1:
        raise APIError(f"the prompt is {n_prompt} tokens; this model's context holds {s.max_seq_len} tokens "
                       f"(prompt + completion), so at most {s.max_seq_len - 1} prompt tokens fit", prompt_param)
    if max_tokens is None:
        return room if default_max is None else min(default_max, room)
    if max_tokens > room:
        raise APIError(f"'{name}' is {max_tokens} but the prompt is {n_prompt} tokens and the context holds "
                       f"{s.max_seq_len}: at most {room} tokens can be generated", name)
    return max_tokens


def _check_chars(s: Settings, n_chars: int, n_control: int, prompt_param: str) -> None:
    """Refuse a prompt whose characters alone need more tokens than the context holds (before tokenising)."""
    least = -(-n_chars // s.max_token_chars) + n_control
    if least > s.max_seq_len - 1:
        raise APIError(f"the prompt is {n_chars} characters, at least {least} tokens; this model's context holds "
                       f"{s.max_seq_len} tokens (prompt + completion), so at most {s.max_seq_len - 1} prompt "
                       "tokens fit", prompt_param)


def request_id(values: list[str]) -> str | None:
    """The client's X-Request-Id (None when absent): 1 to MAX_REQUEST_ID printable ASCII characters, given once."""
    if not values:
        return None
    v = values[0]
    if len(values) > 1:
        raise APIError(f"the '{REQUEST_ID_HEADER}' header may be given once, got {len(values)}", REQUEST_ID_HEADER)
    if not 1 <= len(v) <= MAX_REQUEST_ID or not all(" " <= c <= "~" for c in v):
        raise APIError(f"the '{REQUEST_ID_HEADER}' header must be 1 to {MAX_REQUEST_ID} printable ASCII characters "
                       f"(got {len(v)} characters{'' if all(' ' <= c <= '~' for c in v) else ', not all printable'})",
                       REQUEST_ID_HEADER)
    return v


# ------------------------------------------------------------------------------------------------ endpoints

def _completion_prompt(p: str | list[int], s: Settings, tok) -> tuple[list[int], str | None]:
    """One prompt: a string is plain text after BOS; token ids are used as is."""
    if isinstance(p, str):
        _check_chars(s, len(p), 1, "prompt")
        return [tok.bos_id] + tok.encode_text(p), p
    return list(p), None


def _stream_flags(req: sc.SamplingFields) -> tuple[bool, bool, bool]:
    """stream, stream_options.include_usage, stream_options.continuous_usage_stats."""
    o = req.stream_options
    return bool(req.stream), bool(o and o.include_usage), bool(o and o.continuous_usage_stats)


def parse_completion_request(body: dict, s: Settings, tok) -> Parsed:
    """/v1/completions: one prompt or a list of prompts (strings: plain text after BOS; token ids: used as is),
    n / best_of choices each, echo, logprobs of generated and (echo, prompt_logprobs) prompt tokens."""
    req = sc.validate(sc.CompletionRequest, body, s)
    n = req.n or 1
    best_of = req.best_of or n
    fields = _sampling(req, tok, req.logprobs)
    guided = _vllm_guided(req, False, tok)
    if guided is not None:
        fields["guided"] = _compiled(guided[1], guided[0], s)
    # Prompt logprobs are computed once, at the larger top-N that echo (logprobs) and prompt_logprobs ask for.
    want = [v for v in (req.logprobs if req.echo else None, req.prompt_logprobs) if v is not None]
    prompts, batch = [], req.prompts()
    for i, x in enumerate(batch):
        try:
            ids, text = _completion_prompt(x, s, tok)
            fitted = _fit(s, len(ids), "prompt", "max_tokens", req.max_tokens, 16)
        except APIError as e:
            if len(batch) > 1:  # name the prompt of the batch that does not fit
                e.message = f"prompt[{i}]: {e.message}"
                e.args = (e.message,)
            raise
        # max_tokens 0: the prefill alone computes the prompt logprobs, but the engine always samples a token.
        params = _params(max(fitted, 1), {**fields, "prompt_logprobs": max(want) if want else None})
        prompts.append(Prompt(ids, params, text))
    stream, include, continuous = _stream_flags(req)
    return Parsed(prompts[0].ids, prompts[0].params, stream, include, req.logprobs, continuous_usage=continuous,
                  prompts=prompts, n=n, best_of=best_of, echo=bool(req.echo), prompt_logprobs=req.prompt_logprobs,
                  echo_only=req.max_tokens == 0)


def _messages(msgs: list[dict]) -> list[dict]:
    """Messages as the chat template reads them: text content parts joined, no `name`, null assistant content
    as empty."""
    out = []
    for m in msgs:
        m = {k: v for k, v in m.items() if k != "name"}
        c = m.get("content")
        if isinstance(c, list) and m.get("role") != "tool":  # text parts only (checked by the schema)
            m["content"] = "\n".join(part["text"] for part in c)
        elif c is None and m.get("role") == "assistant":
            m["content"] = ""
        out.append(m)
    return out


def _guided(req: sc.ChatCompletionRequest, s: Settings, tok, thinking: bool) -> GuidedSpec | None:
    """The constraint response_format (json_object, json_schema), tool_choice (required, a named function) or
    vLLM's fields ask for, compiled once here so that a bad schema is a 400 naming the field; None when the output
    is free. (The schema already refused asking for two.)"""
    forced, name = req.forced_tool()
    fmt = req.response_format
    if forced:
        spec, param = _spec("tool_choice", lambda: GuidedSpec(
            "tool_call", tools=tuple(req.tools), name=name, thinking=thinking, tokenizer=tok,
            parallel=req.parallel_tool_calls is not False)), "tool_choice"
    elif fmt is not None and fmt.type == "json_object":
        spec, param = GuidedSpec("json_object", thinking=thinking, tokenizer=tok), "response_format"
    elif fmt is not None and fmt.type == "json_schema":
        spec, param = GuidedSpec("json_schema", schema=fmt.json_schema.schema_, thinking=thinking,
                                 tokenizer=tok), "response_format"
    else:
        guided = _vllm_guided(req, thinking, tok)
        if guided is None:
            return None
        param, spec = guided
    return _compiled(spec, param, s)


def parse_chat_request(body: dict, s: Settings, tok) -> Parsed:
    """/v1/chat/completions: messages through the DeepSeek-V4 template (message text never becomes a control
    token); n choices, choice i sampled with seed + i."""
    req = sc.validate(sc.ChatCompletionRequest, body, s)
    thinking, tools = req.think(), req.chat_tools()
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    fields = _sampling(req, tok, logprobs)
    prompt = tok.encode_segments(_chat_segments(s, req, thinking))
    fields["guided"] = _guided(req, s, tok, thinking)
    max_tokens = _fit(s, len(prompt), "messages", req.max_tokens_field(), req.max_completion(), None)
    stream, include, continuous = _stream_flags(req)
    n = req.n or 1
    return Parsed(prompt, _params(max_tokens, fields), stream, include, logprobs, thinking, bool(tools), continuous,
                  n=n, best_of=n, single_tool_call=req.parallel_tool_calls is False)


def _chat_segments(s: Settings, req: sc.ChatInputs, thinking: bool) -> list[tuple[str, bool]]:
    """The prompt as (text, is_control) segments, refused by length before tokenising when it cannot fit."""
    try:
        segments = encode_message_segments(_messages(req.messages), thinking=thinking,
                                           reasoning_effort=req.effort(), tools=req.chat_tools())
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        msg = str(exc)
        param = "tools" if msg.startswith("tools") else "messages"
        raise APIError(f"invalid {param}: {msg}", param) from None
    _check_chars(s, sum(len(t) for t, c in segments if not c), sum(c for _, c in segments), "messages")
    return segments


_NO_GENERATION_PROMPT_ENDS = ((ASSISTANT, True), (THINK_START, True)), ((ASSISTANT, True), (THINK_END, True))


def parse_tokenize_request(body: dict, s: Settings, tok) -> tuple[list[int], bool]:
    """/tokenize (vLLM's request shape): {"prompt": str, "add_special_tokens"?} tokenised as /v1/completions does
    (BOS, then plain text), or {"messages": [...], "add_generation_prompt"?, ...} through the chat template as
    /v1/chat/completions does (thinking, reasoning_effort, tools as there). Returns the ids and whether
    `return_token_strs` asked for the token strings."""
    req = sc.validate(sc.TokenizeRequest, body, s)
    strs = bool(req.return_token_strs)
    if req.messages is not None:
        segments = _chat_segments(s, req, req.think())
        if req.add_generation_prompt is False and tuple(segments[-2:]) in _NO_GENERATION_PROMPT_ENDS:
            segments = segments[:-2]  # the template's opening of the reply: <｜Assistant｜> then <think> / </think>
        return tok.encode_segments(segments), strs
    bos = req.add_special_tokens is not False
    _check_chars(s, len(req.prompt), int(bos), "prompt")
    return ([tok.bos_id] if bos else []) + tok.encode_text(req.prompt), strs


def parse_detokenize_request(body: dict, s: Settings, tok) -> list[int]:
    """/detokenize (vLLM's request shape): {"tokens": [ids]}; every id must be in the vocabulary."""
    return sc.validate(sc.DetokenizeRequest, body, s).tokens
