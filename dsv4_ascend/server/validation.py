"""How a request model's errors become the OpenAI-style 400 naming the field (`validate`), and what the request
models (`schemas`) share: `Settings` (the served model's bounds, read from the validation context), errors that
name their field (`fail`), JSON integers (`Int`) and the context-dependent checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, WrapValidator
from pydantic_core import PydanticCustomError

from .body import APIError, printable

__all__ = ["Settings", "validate", "fail", "settings_of", "Int", "TokenId", "one_error", "whole", "check_ids",
           "served_model", "within_context", "no_adjustment_when_speculative"]


@dataclass
class Settings:
    """What request validation needs to know about the served model."""

    model_name: str
    max_seq_len: int            # the longest request (prompt + completion) the engine can ever hold
    vocab: int
    max_token_chars: int        # no token covers more characters (bounds tokens from below before tokenising)
    api_key: str | None = None
    max_queue: int = 512
    speculative: bool = False   # MTP drafting: the engine's verify step samples without logit adjustments


def fail(param: str, message: str, kind: str = "invalid_field") -> PydanticCustomError:
    """A validation error naming `param` (the field an OpenAI-style 400 reports); `kind` "model_not_found": 404."""
    return PydanticCustomError(kind, message, {"param": param})


def settings_of(info: ValidationInfo) -> Settings | None:
    """The Settings `validate` put into the validation context (None when validated without: documentation)."""
    return info.context.get("settings") if isinstance(info.context, dict) else None


def _param(model: type[BaseModel], loc: tuple) -> str | None:
    """The field a pydantic error location names: its leading field names ('stream_options.include_usage')."""
    parts, cls = [], model
    for key in loc:
        if cls is None or not isinstance(key, str) or key not in cls.model_fields:
            break
        parts.append(key)
        ann = cls.model_fields[key].annotation
        subs = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = subs[0] if len(subs) == 1 else None
    return ".".join(parts) or None


def _where(loc: tuple) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{printable(str(key))}" if out else printable(str(key)))
    return out


def validate(model: type[BaseModel], body: dict, settings: Settings | None) -> Any:
    """`body` validated as `model` (an APIError naming the field when it is not: the first error pydantic reports,
    400, or 404 for a model name this server does not serve)."""
    try:
        return model.model_validate(body, context={"settings": settings})
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        ctx = err.get("ctx") or {}
        if "param" in ctx:  # our own errors carry their field and a whole message
            status, code = (404, "model_not_found") if err["type"] == "model_not_found" else (400, None)
            raise APIError(err["msg"], ctx["param"], status, code=code) from None
        param = _param(model, err["loc"])
        raise APIError(f"'{_where(err['loc']) or param}': {err['msg']}", param) from None


def _integral(v: Any) -> Any:
    """An integral float (2.0) as an int, as JSON does not tell them apart; anything else unchanged."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def one_error(message: str) -> WrapValidator:
    """Replace the errors of a field (a union's many) by one message naming the field."""
    def wrap(v: Any, handler, info: ValidationInfo) -> Any:
        try:
            return handler(v)
        except ValidationError:
            raise fail(info.field_name, f"'{info.field_name}' {message}") from None
    return WrapValidator(wrap)



Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[Int, Field(ge=0, le=2**31 - 1)]

def check_ids(ids: list[int], info: ValidationInfo, what: str) -> list[int]:
    """`ids` when each is in the served vocabulary (else an error naming the field)."""
    s = settings_of(info)
    if s is not None:
        bad = [t for t in ids if t >= s.vocab]
        if bad:
            raise fail(info.field_name, f"'{info.field_name}' {what} must be in [0, {s.vocab}), found {bad[:5]}")
    return ids


def served_model(v: str, info: ValidationInfo) -> str:
    """`v` when it is the served model's name (else a 404 naming 'model')."""
    s = settings_of(info)
    if s is not None and v != s.model_name:
        raise fail("model", f"the model '{printable(v)}' does not exist; this server serves '{s.model_name}'",
                   "model_not_found")
    return v


def within_context(v: int | None, info: ValidationInfo) -> int | None:
    """A token count no larger than the context."""
    s = settings_of(info)
    if v is not None and s is not None and v > s.max_seq_len:
        raise fail(info.field_name, f"'{info.field_name}' must be at most {s.max_seq_len} (the context), got "
                   f"{v if v < 10**30 else 'a huge integer'}")
    return v


# The request fields that make `SamplingParams.adjusted` true, and their values that do not.
_ADJUSTING = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens",
              "bad_words", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
              "response_format", "tool_choice")


def no_adjustment_when_speculative(req: Any, info: ValidationInfo) -> Any:
    """`req` unless the server drafts with MTP and it asks for a logit adjustment, which the engine's verify step
    cannot apply: then an error naming the field (the engine's refusal named 'prompt')."""
    s = settings_of(info)
    if s is None or not s.speculative:
        return req
    for name in _ADJUSTING:
        v = getattr(req, name, None)
        if name == "response_format" and v is not None and v.type == "text":
            continue
        if v not in (None, False, 0, {}, [], "auto", "none") and not (name == "repetition_penalty" and v == 1):
            raise fail(name, f"'{name}' is not supported with speculative decoding (this server runs "
                       "--speculative-tokens)")
    return req


def whole(v: Any, handler, info: ValidationInfo) -> Any:
    """A nested object's errors reported as one naming the top-level field (as OpenAI names response_format)."""
    try:
        return handler(v)
    except ValidationError as exc:
        e = exc.errors(include_url=False, include_input=False)[0]
        inner = _where(e["loc"])
        raise fail(info.field_name, f"'{info.field_name}{'.' + inner if inner else ''}': {e['msg']}") from None
