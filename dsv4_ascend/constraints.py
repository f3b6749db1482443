"""Constrained decoding with llguidance: one grammar per request (any JSON object, a JSON schema, DeepSeek's DSML
tool-call block, a regex, a choice among strings, or a client's Lark / GBNF grammar), a matcher that follows the request's tokens, and the allowed-token bitmask it writes on the host
between decode steps (`logits_process` applies it on the device).

llguidance (https://github.com/guidance-ai/llguidance) compiles JSON schemas and Lark grammars against the
tokenizer's byte strings and computes a token mask per step in Rust; its wheel has no Python dependencies (why it
was chosen: docs/design.md, "Sampling"). The tool-call grammar writes exactly the block `chat.parse_completion`
reads (the official encoder's `<｜DSML｜tool_calls>` layout, chat.TOOLS_SECTION_TEMPLATE).
"""
from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .chat import BOS, DSML, EOS, THINK_END, THINK_START

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["GuidedSpec", "Matcher", "ll_tokenizer", "mask_words", "JSON_WHITESPACE"]

KINDS = ("json_object", "json_schema", "tool_call", "regex", "choice", "grammar")

# JSON whitespace between tokens, bounded: an unbounded run lets a model loop on spaces forever (xgrammar bounds
# it the same way with `max_whitespace_cnt`); 32 characters still fit pretty-printing several levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"


# Reasoning text: anything without the texts `chat.parse_completion` refuses inside it (llguidance regexes take
# `&` and `~`: this lexeme is "any text" and "not containing one of them").
_FREE_TEXT = "/(?s:.*)/ & ~/(?s:.*)(" + "|".join(
    re.escape(t).replace("/", r"\/") for t in (BOS, EOS, THINK_START, THINK_END, DSML)) + ")(?s:.*)/"


def mask_words(vocab: int) -> int:
    """int32 words of one row's allowed-token bitmask (bit t % 32 of word t // 32 = token t allowed)."""
    return (vocab + 31) // 32


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tok: Tokenizer, vocab: int):
    """The llguidance tokenizer of `tok` over the model's `vocab` ids (ids past the tokenizer's are never allowed);
    built once per tokenizer (about a second for the 129k-token DeepSeek vocabulary)."""
    import llguidance  # noqa: PLC0415  (lazy: only requests with a grammar need it)

    return llguidance.LLTokenizer(tok.backend_json(), n_vocab=vocab, eos_token=tok.eos_id)


def _lit(text: str) -> str:
    """A Lark string literal of `text` (JSON escapes are Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: Any) -> str:
    """`%json {...}` of `schema` with the bounded whitespace (llguidance reads options from "x-guidance")."""
    schema = copy.deepcopy(schema) if isinstance(schema, dict) else {}
    schema.setdefault("x-guidance", {"whitespace_pattern": JSON_WHITESPACE})
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _string_value(prop: dict) -> str:
    """A string="true" parameter value: raw text without '<' (the parser ends it at '</｜DSML｜parameter>'), an enum
    of such literals, or bounded by min/maxLength."""
    if isinstance(prop.get("enum"), list) and prop["enum"] and all(isinstance(e, str) for e in prop["enum"]):
        return "(" + " | ".join(_lit(e) for e in prop["enum"]) + ")"
    lo, hi = prop.get("minLength", 0), prop.get("maxLength")
    return f"/[^<]{{{lo},{hi if hi is not None else ''}}}/"


def _invoke_rule(i: int, fn: dict) -> list[str]:
    """Lark rules for one invoke of function `fn`: its parameters in schema order, required ones mandatory."""
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required = set(params.get("required") or ())
    body, rules = [], []
    for j, (key, prop) in enumerate(props.items()):
        prop = prop if isinstance(prop, dict) else {}
        is_str = prop.get("type") == "string"
        value = _string_value(prop) if is_str else _json_rule(prop)
        head = _lit(f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">')
        rules.append(f"p{i}_{j}: {head} {value} {_lit(f'</{DSML}parameter>')} \"\\n\"")
        body.append(f"p{i}_{j}" + ("" if key in required else "?"))
    head = _lit(f'<{DSML}invoke name="{fn["name"]}">\n')
    return [f"invoke{i}: {head} {' '.join(body)} {_lit(f'</{DSML}invoke>')}", *rules]


@dataclass(frozen=True, eq=False)
class GuidedSpec:
    """What a request's output must match: "json_object" (any JSON object), "json_schema" (`schema`),
    "tool_call" (a DSML tool-call block calling `name` once, or any of `tools` when `name` is None: one call
    or, with `parallel`, one or more), "regex" (`text`, Rust regex syntax, matching the whole output), "choice"
    (exactly one of `choices`) or "grammar" (`text`: a Lark grammar in llguidance's dialect, or GBNF).

    `thinking`: the output first holds free reasoning (without the markers `chat.parse_completion` refuses in it)
    closed by the </think> token.
    `tokenizer`: the served tokenizer, whose byte strings the grammar is compiled against.
    """

    kind: str
    schema: dict | None = None
    tools: tuple = ()
    name: str | None = None
    parallel: bool = True
    text: str | None = None
    choices: tuple[str, ...] = ()
    thinking: bool = False
    tokenizer: Tokenizer | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"guided kind must be one of {KINDS}, found {self.kind!r}")
        if self.kind == "json_schema" and not isinstance(self.schema, dict):
            raise ValueError("a json_schema constraint needs the schema as an object")
        if self.kind == "tool_call":
            fns = [t.get("function") if isinstance(t, dict) else None for t in self.tools]
            names = [f.get("name") if isinstance(f, dict) else None for f in fns]
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError("a tool_call constraint needs tools, each with a function name")
            if self.name is not None and self.name not in names:
                raise ValueError(f"the function {self.name!r} is not among the tools ({', '.join(names)})")
        if self.kind in ("regex", "grammar") and not isinstance(self.text, str):
            raise ValueError(f"a {self.kind} constraint needs its text")
        if self.kind == "choice" and not (self.choices and all(isinstance(c, str) for c in self.choices)):
            raise ValueError("a choice constraint needs one or more strings")

    def lark(self) -> str:
        """The constraint as a Lark grammar in llguidance's dialect."""
        lines = []
        if self.kind == "tool_call":
            fns = [t["function"] for t in self.tools]
            if self.name is not None:
                fns = [next(f for f in fns if f["name"] == self.name)]
            for i, fn in enumerate(fns):
                lines += _invoke_rule(i, fn)
            invoke = " | ".join(f"invoke{i}" for i in range(len(fns)))
            repeat = "+" if self.name is None and self.parallel else ""
            opening, closing = _lit(f"\n\n<{DSML}tool_calls>\n"), _lit(f"</{DSML}tool_calls>")
            lines.insert(0, f'body: {opening} ((({invoke}) "\\n"){repeat}) {closing}')
        elif self.kind == "regex":
            import llguidance  # noqa: PLC0415

            lines.insert(0, f"body: /{llguidance.regex_to_lark(self.text, '')}/")
        elif self.kind == "choice":
            lines.insert(0, "body: " + " | ".join(_lit(c) for c in self.choices))
        elif self.kind == "grammar":
            lines.insert(0, "body: @user")  # the client's grammar, a second grammar of `grammar()`
        else:
            lines.insert(0, f"body: {_json_rule(self.schema if self.kind == 'json_schema' else {'type': 'object'})}")
        start = "start: body"
        if self.thinking:  # free reasoning, then the </think> token (which llguidance deems special)
            end = self.tokenizer.token_to_id(THINK_END) if self.tokenizer is not None else None
            start = f"start: THINK {_lit(THINK_END) if end is None else f'<[{end}]>'} body\nTHINK: {_FREE_TEXT}"
        return "\n".join([start, *lines]) + "\n"

    def grammar(self) -> str:
        """llguidance's grammar (JSON): `lark()`, and for "grammar" the client's grammar (GBNF turned into Lark by
        llguidance's converter) as the sub-grammar "user"."""
        grammars: list[dict] = [{"lark_grammar": self.lark()}]
        if self.kind == "grammar":
            from llguidance.gbnf_to_lark import any_to_lark  # noqa: PLC0415

            try:
                user = any_to_lark(self.text)
            except Exception as exc:  # the converter raises plain exceptions on a malformed grammar
                raise ValueError(f"the grammar is neither Lark nor GBNF: {exc}") from None
            grammars.append({"name": "user", "lark_grammar": user})
        return json.dumps({"grammars": grammars})

    def check(self, vocab: int) -> None:
        """Raise ValueError with llguidance's message when the grammar does not compile (e.g. a bad schema)."""
        import llguidance  # noqa: PLC0415

        if self.tokenizer is None:
            raise ValueError("a guided request needs the tokenizer its grammar is compiled against")
        err = llguidance.LLMatcher.validate_grammar(self.grammar(), ll_tokenizer(self.tokenizer, vocab))
        if err:
            raise ValueError(err)


class Matcher:
    """One request's grammar state: the allowed next tokens, advanced by each token it generates."""

    def __init__(self, spec: GuidedSpec, vocab: int) -> None:
        import llguidance  # noqa: PLC0415

        if spec.tokenizer is None:
            raise ValueError("a guided request needs the tokenizer its grammar is compiled against")
        self._m = llguidance.LLMatcher(ll_tokenizer(spec.tokenizer, vocab), spec.grammar())
        if self._m.is_error():
            raise ValueError(self._m.get_error())
        self.eos = spec.tokenizer.eos_id

    def fill(self, row: Tensor) -> None:
        """Write the allowed-token bitmask into `row` (int32 [mask_words(vocab)], CPU, contiguous). After a
        token the grammar refused (the matcher is then in its error state) only EOS is allowed: the request ends."""
        if self._m.is_error():
            row.zero_()
            row[self.eos // 32] = (1 << (self.eos % 32)) - (1 << 32 if self.eos % 32 == 31 else 0)
            return
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> bool:
        """Follow a generated token; False when the grammar refuses it."""
        return self._m.consume_token(token)

    @property
    def error(self) -> str | None:
        """llguidance's message once the matcher has refused a token, else None."""
        return self._m.get_error() if self._m.is_error() else None
