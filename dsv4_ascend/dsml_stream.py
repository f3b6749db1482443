"""DeepSeek-V4 tool calls parsed as the reply streams: content before the DSML block, then OpenAI-style
`delta.tool_calls` (index, id, type and name once an invoke's header is complete, then argument fragments as the
parameters arrive).

The grammar is `chat.parse_completion`'s (DeepSeek's `encoding_dsv4.py` tool-call format); the arguments string is
built the same way (`{"key": value, ...}`, string values JSON-quoted, others pasted as written), so for a
well-formed reply the fragments concatenate to exactly the non-streamed `tool_calls`. Each update re-reads the
block from its start (linear in the block, which stays short) and sends only what grew. String values stream
character by character (JSON escaping is per character); text that may begin a closing tag is held back.

Malformed markup: the calls are what the longest prefix of the block that can still become valid holds (the
deltas up to that point are sent first), and the block's raw text follows as content; a block that holds no call
by then is content only. That depends on the text alone, not on where the stream cut it, so the non-streamed
reply, which feeds the whole text at once (`ToolCallStream.reply`), has exactly the final structure the streamed
deltas add up to.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from .chat import (_CALLS_CLOSE, _CALLS_START_IN_COMPLETION, _INVOKE_CLOSE, _INVOKE_OPEN, _PARAM_END, _PARAM_OPEN,
                   _to_json)

__all__ = ["ToolCallStream", "partial_tool_calls", "merge_tool_calls"]

_GAP = ">\n"
_NEXT_INVOKE = (_GAP + _INVOKE_OPEN, _GAP + _CALLS_CLOSE)
_NEXT_PARAM = (_GAP + _PARAM_OPEN, _GAP + _INVOKE_CLOSE)
_VALUE_ENDS = ("<\n" + _PARAM_END, "<" + _PARAM_END)
_HEADER = re.compile(r'\s*name="(.*?)">\n\n?', re.S)          # chat._parse_tool_calls' invoke header
_PARAM_HEAD = re.compile(r' name="(.*?)" string="(true|false)">', re.S)
_PARAM = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.S)  # chat._parse_tool_calls' parameter


class MalformedToolCalls(ValueError):
    """The DSML block cannot become tool calls."""


def _holdback(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):
            return k
    return 0


def _pending(rest: str, markers: tuple[str, ...]) -> None:
    """`rest` (no marker found in it yet) must still be able to become one of `markers`."""
    if not any(m.startswith(rest) for m in markers):
        raise MalformedToolCalls(f"tool calls: expected one of {markers!r}, got {rest[:80]!r}")


def partial_tool_calls(block: str) -> tuple[list[tuple[str, str, bool]], bool]:
    """Parse a DSML block so far (the text after "\\n\\n<｜DSML｜tool_calls"): [(name, arguments so far, complete)]
    and whether the block is closed. Raises MalformedToolCalls as soon as the text cannot become valid."""
    calls: list[tuple[str, str, bool]] = []
    pos = 0
    while True:
        k = min((i for i in (block.find(m, pos) for m in _NEXT_INVOKE) if i >= 0), default=-1)
        if k < 0:
            _pending(block[pos:], _NEXT_INVOKE)
            return calls, False
        if k != pos:
            raise MalformedToolCalls(f"tool calls: expected '>\\n' then an invoke, got {block[pos:pos + 80]!r}")
        pos += len(_GAP)
        if block.startswith(_CALLS_CLOSE, pos):
            pos += len(_CALLS_CLOSE)
            if block[pos:]:
                raise MalformedToolCalls(f"tool calls: unexpected text after tool calls: {block[pos:pos + 80]!r}")
            return calls, True
        pos += len(_INVOKE_OPEN)
        ends = [i for i in (block.find(_PARAM_OPEN, pos), block.find(_INVOKE_CLOSE, pos)) if i >= 0]
        if not ends:
            return calls, False  # the header is still arriving
        header, pos = block[pos:min(ends)], min(ends)
        name = _HEADER.fullmatch(header)
        if name is None:
            raise MalformedToolCalls(f"tool calls: bad invoke header {header[:80]!r}")
        args, keys = "{", set()
        while block.startswith(_PARAM_OPEN, pos):
            pos += len(_PARAM_OPEN)
            end = block.find(_PARAM_END, pos)
            body = block[pos:] if end < 0 else block[pos:end]
            head = _PARAM_HEAD.match(body)
            if head is None:
                if end < 0:
                    calls.append((name.group(1), args, False))
                    return calls, False
                raise MalformedToolCalls(f"tool calls: bad parameter {body[:80]!r}")
            key, is_str = head.group(1), head.group(2) == "true"
            if key in keys:
                raise MalformedToolCalls(f"tool calls: duplicate parameter {key!r}")
            keys.add(key)
            args += (", " if len(keys) > 1 else "") + _to_json(key) + ": "
            if end < 0:  # the value is still arriving: send what cannot be part of the closing tag
                value = body[head.end():]
                value = value[:len(value) - _holdback(value, _VALUE_ENDS)]
                calls.append((name.group(1), args + (_to_json(value)[:-1] if is_str else value), False))
                return calls, False
            full = _PARAM.fullmatch(body)
            if full is None:
                raise MalformedToolCalls(f"tool calls: bad parameter {body[:80]!r}")
            args += _to_json(full.group(3)) if is_str else full.group(3)
            pos = end + len(_PARAM_END)
            k = min((i for i in (block.find(m, pos) for m in _NEXT_PARAM) if i >= 0), default=-1)
            if k < 0:
                _pending(block[pos:], _NEXT_PARAM)
                calls.append((name.group(1), args, False))
                return calls, False
            if k != pos:
                raise MalformedToolCalls(f"tool calls: expected '>\\n' after a parameter, got {block[pos:pos + 80]!r}")
            pos += len(_GAP)
        calls.append((name.group(1), args + "}", True))
        pos += len(_INVOKE_CLOSE)


def _longest_valid(block: str, lo: int) -> int:
    """The length of the longest prefix of `block` that can still become valid (`block[:lo]` can), by bisection:
    a prefix of a text that can become valid can too."""
    hi = len(block)  # block itself cannot
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            partial_tool_calls(block[:mid])
            lo = mid
        except MalformedToolCalls:
            hi = mid
    return lo


def merge_tool_calls(deltas: list[dict]) -> list[dict]:
    """The tool calls (OpenAI message format, with ids) that `delta.tool_calls` entries add up to."""
    calls: list[dict] = []
    for d in deltas:
        if "id" in d:
            calls.append({"id": d["id"], "type": d["type"], "function": {"name": d["function"]["name"],
                                                                        "arguments": ""}})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return calls


class ToolCallStream:
    """Turns the content text of a streamed reply into deltas: {"content": str} and {"tool_calls": [...]}."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.buf = ""            # content: the held-back tail; after the marker: the DSML block so far
        self.in_block = False
        self.raw = False         # malformed block: everything is content from here on
        self.sent: list[int] = []  # per call: characters of its arguments sent
        self.closed = False      # the block closed: the reply's finish_reason is "tool_calls"
        self.valid = 0           # length of the block's prefix parsed without error so far

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        """Deltas for the next piece of content text; `final` flushes what was held back."""
        if self.raw:
            return [{"content": piece}] if piece else []
        self.buf += piece
        out = []
        if not self.in_block:
            k = self.buf.find(_CALLS_START_IN_COMPLETION)
            if k < 0:
                keep = 0 if final else _holdback(self.buf, (_CALLS_START_IN_COMPLETION,))
                text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return [{"content": text}] if text else []
            if k:
                out.append({"content": self.buf[:k]})
            self.in_block, self.buf = True, self.buf[k + len(_CALLS_START_IN_COMPLETION):]
        try:
            calls, self.closed = partial_tool_calls(self.buf)
            self.valid = len(self.buf)
        except MalformedToolCalls:  # the calls of the longest prefix that can still be valid, then raw text
            self.raw = True
            calls, _ = partial_tool_calls(self.buf[:_longest_valid(self.buf, self.valid)])
            deltas = self._deltas(calls)
            return out + ([{"tool_calls": deltas}] if deltas else []) + [
                {"content": _CALLS_START_IN_COMPLETION + self.buf}]
        deltas = self._deltas(calls)
        if final and not self.closed and not self.sent:  # an unfinished block that sent nothing: content
            self.raw = True
            return out + [{"content": _CALLS_START_IN_COMPLETION + self.buf}]
        return out + ([{"tool_calls": deltas}] if deltas else [])

    def _deltas(self, calls: list[tuple[str, str, bool]]) -> list[dict]:
        """The delta.tool_calls entries for what `calls` holds beyond what was sent."""
        deltas = []
        for i, (name, args, _) in enumerate(calls):
            if i == len(self.sent):
                self.sent.append(0)
                deltas.append({"index": i, "id": self.new_id(), "type": "function",
                               "function": {"name": name, "arguments": ""}})
            if len(args) > self.sent[i]:
                deltas.append({"index": i, "function": {"arguments": args[self.sent[i]:]}})
                self.sent[i] = len(args)
        return deltas

    @property
    def made_calls(self) -> bool:
        """The reply ends as tool calls (finish_reason "tool_calls"): a closed, well-formed block with calls."""
        return self.closed and bool(self.sent) and not self.raw
