"""The HTTP protocol: request bodies (read and checked as JSON by `body`) parsed and validated by hand into prompt
ids + `SamplingParams` (or, for /tokenize and /detokenize, ids); every bad request gets an OpenAI-style error
(`body.APIError`) naming the field or the header.

Every numeric field is bounded on both sides, and parameters this server does not implement are refused, never ignored.
User text is tokenised as plain text: only the chat template inserts control tokens. A completions prompt given
as token ids is used as is (the way to send special tokens on purpose). Prompts are refused by length before
tokenising when their characters alone prove they cannot fit (`Tokenizer.max_token_chars`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..chat import ASSISTANT, THINK_END, THINK_START, encode_message_segments
from ..constraints import GuidedSpec
from ..sampling import SamplingParams
from .body import MAX_BODY_BYTES, MAX_JSON_DEPTH, APIError, parse_body
from .body import printable as _printable
from .body import type_name as _type_name

__all__ = ["APIError", "Settings", "Parsed", "Prompt", "choice_seed", "parse_body", "parse_completion_request",
           "parse_chat_request", "parse_tokenize_request", "parse_detokenize_request", "request_id", "MAX_BODY_BYTES",
           "MAX_JSON_DEPTH", "REQUEST_ID_HEADER"]

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
INT64 = (-(2**63), 2**63 - 1)
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
MAX_CHOICES = 128        # n and best_of
MAX_SEQUENCES = 1024     # prompts x best_of in one completions request

# Accepted by other OpenAI-compatible servers but not implemented here: refused unless unset (or neutral).
_UNSUPPORTED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                "guided_decoding_backend", "structured_outputs", "functions", "function_call", "use_beam_search",
                "logits_processors", "bad_words", "allowed_token_ids")
_NEUTRAL = {"use_beam_search": False}
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


@dataclass
class Settings:
    """What request validation needs to know about the served model."""

    model_name: str
    max_seq_len: int            # the longest request (prompt + completion) the engine can ever hold
    vocab: int
    max_token_chars: int        # no token covers more characters (bounds tokens from below before tokenising)
    api_key: str | None = None
    max_queue: int = 512


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

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [Prompt(self.prompt, self.params)]

    def sequences(self) -> list[tuple[int, SamplingParams]]:
        """The engine requests to run: (prompt index, params with the choice's seed), best_of per prompt."""
        return [(i, p.params if j == 0 else dataclasses.replace(p.params, seed=choice_seed(p.params.seed, j)))
                for i, p in enumerate(self.prompts) for j in range(self.best_of)]


# ------------------------------------------------------------------------------------------------ fields

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    """v as a finite float, None if it is not a number or not representable as one (1e400, an integer over
    float range, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _opt_int(body: dict, name: str, lo: int, hi: int, label: str | None = None) -> int | None:
    label = label or name
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise APIError(f"'{label}' must be an integer, got {_type_name(v)}", label)
    if not lo <= v <= hi:
        shown = v if abs(v) < 10**30 else f"{'-' if v < 0 else ''}an integer of {len(str(abs(v)))} digits"
        raise APIError(f"'{label}' must be in [{lo}, {hi}], got {shown}", label)
    return v


def _opt_num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    f = _finite(v)
    if f is None:
        what = _type_name(v) if isinstance(v, bool) or not isinstance(v, (int, float)) else "out of range"
        raise APIError(f"'{name}' must be a finite number, got {what}", name)
    if f > hi or f < lo or (lo_open and f == lo):
        raise APIError(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {f:g}", name)
    return f


def _opt_bool(body: dict, name: str, default: bool = False, label: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{label or name}' must be a boolean, got {_type_name(v)}", label or name)
    return v


def _check_unsupported(body: dict) -> None:
    if body.get("suffix") not in (None, ""):
        raise APIError("'suffix' is not supported", "suffix")
    for name in _UNSUPPORTED:
        v = body.get(name)
        if v is not None and not (name in _NEUTRAL and v == _NEUTRAL[name] and type(v) is type(_NEUTRAL[name])):
            raise APIError(f"'{name}' is not supported by this server (leave it unset)", name)


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(f"'stop' must be a string or an array of strings, got {_type_name(v)}", "stop")
    if len(v) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(v)}", "stop")
    if any(s == "" for s in v):
        raise APIError("'stop' strings must not be empty", "stop")
    return tuple(v)


def _model_name(body: dict, s: Settings) -> None:
    v = body.get("model")
    if v is None:
        raise APIError("'model' is required", "model")
    if not isinstance(v, str):
        raise APIError(f"'model' must be a string, got {_type_name(v)}", "model")
    if v != s.model_name:
        raise APIError(f"the model '{v}' does not exist; this server serves '{s.model_name}'", "model", 404,
                       code="model_not_found")


def _sampling(body: dict, s: Settings, logprobs: int | None) -> tuple[dict, str, int | None]:
    """The sampling fields (validated, before tokenising), the name of the max-tokens field and its value."""
    temperature = _opt_num(body, "temperature", 0.0, 2.0)
    top_p = _opt_num(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _opt_int(body, "top_k", -1, s.vocab)
    seed = _opt_int(body, "seed", *INT64)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _opt_int(body, name, 1, s.max_seq_len)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < s.vocab for t in stop_ids):
        raise APIError(f"'stop_token_ids' must be an array of token ids in [0, {s.vocab})", "stop_token_ids")
    min_tokens = _opt_int(body, "min_tokens", 0, s.max_seq_len) or 0  # <= max_tokens: checked by _params
    fields = dict(temperature=1.0 if temperature is None else temperature, top_k=0 if top_k in (None, -1) else top_k,
                  top_p=1.0 if top_p is None else top_p, seed=seed, stop_token_ids=tuple(stop_ids),
                  stop=_stops(body), ignore_eos=_opt_bool(body, "ignore_eos"), logprobs=logprobs,
                  presence_penalty=_or(_opt_num(body, "presence_penalty", -2.0, 2.0), 0.0),
                  frequency_penalty=_or(_opt_num(body, "frequency_penalty", -2.0, 2.0), 0.0),
                  repetition_penalty=_or(_opt_num(body, "repetition_penalty", 0.0, 2.0, lo_open=True), 1.0),
                  min_p=_or(_opt_num(body, "min_p", 0.0, 1.0), 0.0), min_tokens=min_tokens,
                  logit_bias=_logit_bias(body, s))
    return fields, name, max_tokens


def _or(v: float | None, default: float) -> float:
    return default if v is None else v


def _logit_bias(body: dict, s: Settings) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias in [-100, 100]} as (id, bias) pairs."""
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise APIError(f"'logit_bias' must be an object mapping token ids to numbers, got {_type_name(v)}", "logit_bias")
    if len(v) > MAX_LOGIT_BIAS:
        raise APIError(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries, got {len(v)}", "logit_bias")
    out = []
    for key, b in v.items():
        shown = _printable(key[:20])
        if not (key.isascii() and key.isdigit() and len(key) < 12 and int(key) < s.vocab):
            raise APIError(f"'logit_bias' keys must be token ids in [0, {s.vocab}), got '{shown}'", "logit_bias")
        f = _finite(b)
        if f is None or not -100 <= f <= 100:
            raise APIError(f"'logit_bias' values must be numbers in [-100, 100], got {_type_name(b)} for '{shown}'",
                           "logit_bias")
        out.append((int(key), f))
    return tuple(out)


def _params(max_tokens: int, fields: dict) -> SamplingParams:
    """The request's SamplingParams; min_tokens above the (defaulted) max_tokens is a 400 naming it."""
    if fields["min_tokens"] > max_tokens:
        raise APIError(f"'min_tokens' ({fields['min_tokens']}) must be <= max_tokens ({max_tokens})", "min_tokens")
    return SamplingParams(max_tokens=max_tokens, **fields)


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


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """stream, stream_options.include_usage, stream_options.continuous_usage_stats (which, as in vLLM, adds usage
    to every chunk on top of include_usage's final usage chunk, so it needs include_usage)."""
    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    include = continuous = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise APIError(f"'stream_options' must be an object, got {_type_name(opts)}", "stream_options")
        include = _opt_bool(opts, "include_usage", label="stream_options.include_usage")
        continuous = _opt_bool(opts, "continuous_usage_stats", label="stream_options.continuous_usage_stats")
        if continuous and not include:
            raise APIError("'stream_options.continuous_usage_stats' needs 'stream_options.include_usage': true",
                           "stream_options.continuous_usage_stats")
    return stream, include, continuous


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

def _completion_prompt(p: Any, s: Settings, tok, param: str) -> tuple[list[int], str | None]:
    """One prompt: a string is plain text after BOS; token ids are used as is."""
    if isinstance(p, str):
        if not p:
            raise APIError(f"'{param}' must not be empty", "prompt")
        _check_chars(s, len(p), 1, "prompt")
        return [tok.bos_id] + tok.encode_text(p), p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        bad = [t for t in p if not 0 <= t < s.vocab]
        if bad:
            shown = [t if abs(t) < 10**30 else "<huge>" for t in bad[:5]]
            raise APIError(f"'{param}' token ids must be in [0, {s.vocab}), found {shown}", "prompt")
        return list(p), None
    raise APIError(f"'{param}' must be a non-empty string or a non-empty array of token ids", "prompt")


def _choices(body: dict, stream: bool) -> tuple[int, int]:
    """n and best_of (best_of >= n; best_of > n cannot stream: the choices kept are known only at the end)."""
    n = _opt_int(body, "n", 1, MAX_CHOICES) or 1
    best_of = _opt_int(body, "best_of", 1, MAX_CHOICES)
    if best_of is None:
        return n, n
    if best_of < n:
        raise APIError(f"'best_of' ({best_of}) must be >= 'n' ({n})", "best_of")
    if stream and best_of > n:
        raise APIError("'best_of' > 'n' cannot be streamed (the kept choices are known only at the end)", "best_of")
    return n, best_of


def parse_completion_request(body: dict, s: Settings, tok) -> Parsed:
    """/v1/completions: one prompt or a list of prompts (strings: plain text after BOS; token ids: used as is),
    n / best_of choices each, echo, logprobs of generated and (echo, prompt_logprobs) prompt tokens."""
    _model_name(body, s)
    _check_unsupported(body)
    logprobs = _opt_int(body, "logprobs", 0, MAX_LOGPROBS)
    echo = _opt_bool(body, "echo")
    prompt_lps = _opt_int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    stream, include, continuous = _stream_flags(body)
    n, best_of = _choices(body, stream)
    fields, name, max_tokens = _sampling(body, s, logprobs)
    p = body.get("prompt")
    if p is None:
        raise APIError("'prompt' is required", "prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        given = [(x, f"prompt[{i}]") for i, x in enumerate(p)]  # a batch of prompts
    elif isinstance(p, list) and any(isinstance(x, (str, list)) for x in p):
        raise APIError("'prompt' must be a string, an array of token ids, or an array of those (not mixed with "
                       "bare token ids)", "prompt")
    else:
        given = [(p, "prompt")]
    if len(given) * best_of > MAX_SEQUENCES:
        raise APIError(f"{len(given)} prompts x {best_of} choices = {len(given) * best_of} sequences; at most "
                       f"{MAX_SEQUENCES} per request", "prompt" if len(given) > 1 else "best_of")
    # Prompt logprobs are computed once, at the larger top-N that echo (logprobs) and prompt_logprobs ask for.
    want = [v for v in (logprobs if echo else None, prompt_lps) if v is not None]
    prompts = []
    for x, param in given:
        ids, text = _completion_prompt(x, s, tok, param)
        fitted = _fit(s, len(ids), "prompt", name, max_tokens, 16)
        params = _params(fitted, {**fields, "prompt_logprobs": max(want) if want else None})
        prompts.append(Prompt(ids, params, text))
    return Parsed(prompts[0].ids, prompts[0].params, stream, include, logprobs, continuous_usage=continuous,
                  prompts=prompts, n=n, best_of=best_of, echo=echo, prompt_logprobs=prompt_lps)


def _single_choice(body: dict) -> None:
    """Chat answers one choice: n / best_of other than 1, echo and prompt_logprobs are refused."""
    for name in ("n", "best_of"):
        v = body.get(name)
        if v is not None and not (_is_int(v) and v == 1):
            raise APIError(f"'{name}' must be 1 on /v1/chat/completions (n > 1 is served by /v1/completions)", name)
    if _opt_bool(body, "echo"):
        raise APIError("'echo' is not supported on /v1/chat/completions", "echo")
    if body.get("prompt_logprobs") is not None:
        raise APIError("'prompt_logprobs' is not supported on /v1/chat/completions (use /v1/completions)",
                       "prompt_logprobs")


def _thinking(body: dict) -> bool:
    kw = body.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise APIError(f"'chat_template_kwargs' must be an object, got {_type_name(kw)}", "chat_template_kwargs")
    v = body.get("thinking")
    name = "thinking"
    if v is None and kw:
        for key in ("thinking", "enable_thinking"):
            if kw.get(key) is not None:
                v, name = kw[key], f"chat_template_kwargs.{key}"
                break
    if v is None:
        return False
    if isinstance(v, dict) and v.get("type") in ("enabled", "disabled"):  # {"type": "enabled"} style
        return v["type"] == "enabled"
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean, got {_type_name(v)}", name)
    return v


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError("'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' must be a non-empty array of message objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(f"'messages[{i}]' must be an object, got {_type_name(m)}", "messages")
        m = {k: v for k, v in m.items() if k != "name"}
        c = m.get("content")
        if isinstance(c, list) and m.get("role") != "tool":  # content parts: text only
            texts = []
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"'messages[{i}].content[{j}]': only text content parts are supported",
                                   "messages")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        elif c is None and m.get("role") == "assistant":
            m["content"] = ""
        out.append(m)
    return out


def _tools(body: dict) -> list | None:
    """The request's tools (None under tool_choice "none"); tool_choice is checked here, enforced by `_guided`."""
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise APIError(f"'tools' must be an array, got {_type_name(tools)}", "tools")
    choice = body.get("tool_choice")
    if choice in (None, "none", "auto"):
        return None if choice == "none" else tools
    if choice != "required" and _tool_choice_name(choice) is None:
        shown = repr(choice) if isinstance(choice, str) and len(choice) < 40 else _type_name(choice)
        raise APIError(f"'tool_choice' must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {shown}", "tool_choice")
    if not tools:
        raise APIError("'tool_choice' other than \"none\" / \"auto\" needs 'tools'", "tool_choice")
    return tools


def _tool_choice_name(choice: Any) -> str | None:
    """The function a {"type": "function", "function": {"name": ...}} tool_choice names (None: not that form)."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return name if isinstance(name, str) and name else None
    return None


def _guided(body: dict, s: Settings, tok, tools: list | None, thinking: bool) -> GuidedSpec | None:
    """The constraint response_format (json_object, json_schema) or tool_choice (required, a named function) asks
    for, compiled once here so that a bad schema is a 400 naming the field; None when the output is free."""
    fmt = body.get("response_format")
    kind = None
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise APIError("'response_format' must be an object with a 'type'", "response_format")
        kind = fmt["type"]
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(f"'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", got "
                           f"{_printable(kind[:40])!r}", "response_format")
    choice = body.get("tool_choice")
    calls = tools is not None and (choice == "required" or _tool_choice_name(choice) is not None)
    parallel = _opt_bool(body, "parallel_tool_calls", default=True)
    if not parallel and not calls:
        raise APIError("'parallel_tool_calls': false is enforced only with tool_choice \"required\" or a named "
                       "function", "parallel_tool_calls")
    if calls and kind in ("json_object", "json_schema"):
        raise APIError("'tool_choice' forcing a tool call cannot be combined with a JSON 'response_format'",
                       "tool_choice")
    try:
        if calls:
            spec = GuidedSpec("tool_call", tools=tuple(tools), name=_tool_choice_name(choice), thinking=thinking,
                              tokenizer=tok, parallel=parallel)
        elif kind == "json_object":
            spec = GuidedSpec("json_object", thinking=thinking, tokenizer=tok)
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise APIError("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
            spec = GuidedSpec("json_schema", schema=js["schema"], thinking=thinking, tokenizer=tok)
        else:
            return None
        spec.check(s.vocab)
    except ValueError as exc:
        param = "tool_choice" if calls else "response_format"
        raise APIError(f"'{param}' cannot be enforced: {str(exc)[:500]}", param) from None
    return spec


def parse_chat_request(body: dict, s: Settings, tok) -> Parsed:
    """/v1/chat/completions: messages through the DeepSeek-V4 template; message text never becomes a control
    token."""
    _model_name(body, s)
    _check_unsupported(body)
    _single_choice(body)
    messages, thinking, effort, tools = _chat_inputs(body)
    lp = _opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top and not lp:
        raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top or 0) if lp else None
    stream, include, continuous = _stream_flags(body)
    fields, name, max_tokens = _sampling(body, s, logprobs)
    prompt = tok.encode_segments(_chat_segments(s, messages, thinking, effort, tools))
    fields["guided"] = _guided(body, s, tok, tools, thinking)
    max_tokens = _fit(s, len(prompt), "messages", name, max_tokens, None)
    return Parsed(prompt, _params(max_tokens, fields), stream, include, logprobs, thinking,
                  bool(tools), continuous)


def _chat_inputs(body: dict) -> tuple[list[dict], bool, str | None, list | None]:
    """The chat template's inputs: messages, thinking, reasoning_effort, tools."""
    messages = _messages(body)
    thinking = _thinking(body)
    effort = body.get("reasoning_effort")
    if effort not in (None, "high", "max"):
        shown = repr(effort) if isinstance(effort, str) and len(effort) < 40 else _type_name(effort)
        raise APIError(f"'reasoning_effort' must be null, 'high' or 'max', got {shown}", "reasoning_effort")
    return messages, thinking, effort, _tools(body)


def _chat_segments(s: Settings, messages: list[dict], thinking: bool, effort: str | None,
                   tools: list | None) -> list[tuple[str, bool]]:
    """The prompt as (text, is_control) segments, refused by length before tokenising when it cannot fit."""
    try:
        segments = encode_message_segments(messages, thinking=thinking, reasoning_effort=effort, tools=tools)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        msg = str(exc)
        param = "tools" if msg.startswith("tools") else "messages"
        raise APIError(f"invalid {param}: {msg}", param) from None
    _check_chars(s, sum(len(t) for t, c in segments if not c), sum(c for _, c in segments), "messages")
    return segments


def _optional_model(body: dict, s: Settings) -> None:
    if body.get("model") is not None:
        _model_name(body, s)


# vLLM's tokenize fields this server does not implement (refused unless unset or neutral).
_TOKENIZE_UNSUPPORTED = ("continue_final_message", "chat_template", "documents", "mm_processor_kwargs")
_NO_GENERATION_PROMPT_ENDS = ((ASSISTANT, True), (THINK_START, True)), ((ASSISTANT, True), (THINK_END, True))


def parse_tokenize_request(body: dict, s: Settings, tok) -> tuple[list[int], bool]:
    """/tokenize (vLLM's request shape): {"prompt": str, "add_special_tokens"?} tokenised as /v1/completions does
    (BOS, then plain text), or {"messages": [...], "add_generation_prompt"?, ...} through the chat template as
    /v1/chat/completions does (thinking, reasoning_effort, tools as there). Returns the ids and whether
    `return_token_strs` asked for the token strings."""
    _optional_model(body, s)
    strs = _opt_bool(body, "return_token_strs")
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise APIError("give either 'prompt' or 'messages', not both", "prompt")
        for name in _TOKENIZE_UNSUPPORTED:
            if body.get(name) not in (None, False):
                raise APIError(f"'{name}' is not supported by this server's /tokenize (leave it unset)", name)
        if _opt_bool(body, "add_special_tokens"):
            raise APIError("'add_special_tokens' applies to 'prompt' only: the chat template already starts with BOS",
                           "add_special_tokens")
        generation = _opt_bool(body, "add_generation_prompt", default=True)
        segments = _chat_segments(s, *_chat_inputs(body))
        if not generation and tuple(segments[-2:]) in _NO_GENERATION_PROMPT_ENDS:
            segments = segments[:-2]  # the template's opening of the reply: <｜Assistant｜> then <think> / </think>
        return tok.encode_segments(segments), strs
    p = body.get("prompt")
    if p is None:
        raise APIError("'prompt' (a string) or 'messages' is required", "prompt")
    if not isinstance(p, str):
        raise APIError(f"'prompt' must be a string, got {_type_name(p)}", "prompt")
    if body.get("add_generation_prompt") is not None:
        raise APIError("'add_generation_prompt' applies to 'messages' only", "add_generation_prompt")
    bos = _opt_bool(body, "add_special_tokens", default=True)
    _check_chars(s, len(p), int(bos), "prompt")
    return ([tok.bos_id] if bos else []) + tok.encode_text(p), strs


def parse_detokenize_request(body: dict, s: Settings, tok) -> list[int]:
    """/detokenize (vLLM's request shape): {"tokens": [ids]}; every id must be in the vocabulary."""
    _optional_model(body, s)
    t = body.get("tokens")
    if t is None:
        raise APIError("'tokens' is required", "tokens")
    if not isinstance(t, list):
        raise APIError(f"'tokens' must be an array of token ids, got {_type_name(t)}", "tokens")
    odd = [x for x in t if not _is_int(x)]
    if odd:
        raise APIError(f"'tokens' must hold integer token ids, found {_type_name(odd[0])}", "tokens")
    bad = [x for x in t if not 0 <= x < s.vocab]
    if bad:
        shown = [x if abs(x) < 10**30 else "<huge>" for x in bad[:5]]
        raise APIError(f"'tokens' ids must be in [0, {s.vocab}), found {shown}", "tokens")
    return t
