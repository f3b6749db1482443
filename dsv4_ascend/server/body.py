"""A request body as JSON, checked before any field is read: a UTF-8 JSON object whose strings are valid Unicode
(no lone surrogates), nesting at most `MAX_JSON_DEPTH` levels; and the OpenAI-style error every bad request gets
({"error": {"message", "type", "param", "code"}}, naming the field or the header).
"""
from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["APIError", "parse_body", "type_name", "printable", "MAX_BODY_BYTES", "MAX_JSON_DEPTH"]

MAX_BODY_BYTES = 16 << 20
MAX_JSON_DEPTH = 64


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def type_name(v: Any) -> str:
    """The JSON type name of a decoded value ("object", "array", ...)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')


def printable(s: str) -> str:
    """`s` with lone surrogates escaped, safe to put into a message."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _path(node: tuple | None) -> str:
    """'messages[2].content' from a (parent, key) chain."""
    keys = []
    while node is not None:
        node, key = node
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{printable(key)}" if out else printable(key))
    return out


def _deep_field(text: str) -> str | None:
    """The top-level key under which `text` nests deeper than MAX_JSON_DEPTH (None if not found)."""
    depth, key = 0, None
    for m in _JSON_TOKENS.finditer(text):
        t = m.group()
        if t in ("[", "{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif t in ("]", "}"):
            depth -= 1
        elif depth == 1 and t.endswith(":"):
            try:
                key = printable(json.loads(t[:-1].rstrip()))
            except ValueError:
                key = None
    return key


def _check_tree(body: dict) -> None:
    """Refuse strings that are not valid Unicode and nesting deeper than MAX_JSON_DEPTH, naming the field."""
    stack: list[tuple[Any, int, tuple | None]] = [(body, 1, None)]
    while stack:
        v, depth, node = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                field = _path(node) or "body"
                raise APIError(f"'{field}' is not valid Unicode (it holds a lone surrogate)", field)
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                while node[0] is not None:  # name the top-level field
                    node = node[0]
                field = _path(node)
                raise APIError(f"'{field}' nests deeper than {MAX_JSON_DEPTH} levels", field)
            if isinstance(v, dict):
                for k, x in v.items():
                    if _SURROGATE.search(k):
                        field = _path((node, k))
                        raise APIError(f"the key '{field}' is not valid Unicode (it holds a lone surrogate)",
                                       _path(node) or None)
                    if isinstance(x, (str, dict, list)):
                        stack.append((x, depth + 1, (node, k)))
            else:
                stack += [(x, depth + 1, (node, i)) for i, x in enumerate(v) if isinstance(x, (str, dict, list))]


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong (CPU-bound: run it off the event loop)."""
    try:
        text = raw.decode("utf-8")
        body = json.loads(text)
    except RecursionError:
        field = _deep_field(text)
        where = f"'{field}'" if field else "the request body"
        raise APIError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels", field) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, integers over 4300 digits
        raise APIError(f"the request body is not valid JSON: {exc}", None) from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type_name(body)}", None)
    _check_tree(body)
    return body
