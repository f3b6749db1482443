"""Generated text as the handlers build it: incremental detokenisation, stop strings, the thinking split, a chat
choice's message (streamed as deltas or whole), and per-token text and bytes for logprobs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..chat import THINK_END
from ..dsml_stream import ToolCallStream, merge_tool_calls

__all__ = ["TokenText", "Output", "ThinkSplit", "ChatReply"]

def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2): byte -> printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """Per-token strings and raw bytes (for logprobs), cached."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tok.decode([token_id])
            raw = self.tok.id_to_token(token_id) or ""
            if raw and all(c in _BYTE_OF_CHAR for c in raw):
                data = [_BYTE_OF_CHAR[c] for c in raw]
            else:  # added/special tokens are stored as plain text
                data = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, data)
        return hit


def _holdback(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class Output:
    """A request's generated text as the handler builds it: incremental detokenization with stop strings."""

    def __init__(self, tok, stops: tuple[str, ...], keep: int | None = None, min_tokens: int = 0) -> None:
        self.dec = tok.stream_decoder(skip_special_tokens=True)
        self.keep = keep        # tokens kept at most (None: all; 0: completions' echo-only max_tokens 0)
        self.min_tokens = min_tokens  # stop strings are looked for once this many tokens are out (as vLLM does)
        self.stops = stops
        self.maxstop = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.tokens: list[tuple[int, float, dict | None]] = []
        self.finish: str | None = None
        self.stop_hit = False
        self.prompt_logprobs: list | None = None  # [None | (logprob, rank, top)] when the request asked for them
        self.prompt_index = 0   # which prompt of the request this sequence completes
        self.cached_tokens = 0  # its prompt tokens served from the prefix cache

    def push(self, token: int, logprob: float, top: dict | None) -> bool:
        """Add a generated token; False when it is not kept (finished, or over `keep`)."""
        if self.finish is not None or (self.keep is not None and len(self.tokens) >= self.keep):
            return False
        self.tokens.append((token, logprob, top))
        self._add(self.dec.push(token))
        return True

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self.maxstop + 1)
        self.text += piece
        if len(self.tokens) < self.min_tokens:
            return
        hits = [k for k in (self.text.find(s, start) for s in self.stops) if k >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish, self.stop_hit = "stop", True

    def end(self, reason: str) -> None:
        if self.finish is None:
            self._add(self.dec.flush())
        if self.finish is None:
            self.finish = reason

    def take(self) -> str:
        """New text safe to send (text that might start a stop string is held back until resolved)."""
        safe = len(self.text) if self.finish else len(self.text) - _holdback(self.text, self.stops)
        piece = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece


class ThinkSplit:
    """Routes text to reasoning until `</think>` (thinking mode), then to content; holds back partial markers."""

    def __init__(self, thinking: bool) -> None:
        self.reasoning = thinking
        self.buf = ""

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        if not self.reasoning:
            return "", piece
        self.buf += piece
        k = self.buf.find(THINK_END)
        if k >= 0:
            self.reasoning = False
            r, c, self.buf = self.buf[:k], self.buf[k + len(THINK_END):], ""
            return r, c
        keep = 0 if final else _holdback(self.buf, (THINK_END,))
        r, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return r, ""



class ChatReply:
    """One chat choice's text as OpenAI message deltas: reasoning until </think> (thinking mode), then content, with
    DeepSeek's DSML tool calls as `tool_calls` when the request has tools (the first only with `single`). The
    non-streamed message is the same deltas for the whole text at once, so both answers have the same final
    structure (dsml_stream)."""

    def __init__(self, thinking: bool, tools: bool, new_id: Callable[[], str], single: bool = False) -> None:
        self.thinking = thinking
        self.split = ThinkSplit(thinking)
        self.calls = ToolCallStream(new_id) if tools else None
        self.single = single  # parallel_tool_calls false: calls after the first are dropped (as vLLM does)

    def delta(self, piece: str, final: bool) -> dict[str, Any]:
        """The message delta for the next piece of text ({} when it holds nothing yet); `final` flushes."""
        r, c = self.split.feed(piece, final)
        d: dict[str, Any] = {}
        if r:
            d["reasoning_content"] = r
        if self.calls is None:
            if c:
                d["content"] = c
            return d
        for part in self.calls.feed(c, final):
            if "content" in part:
                d["content"] = d.get("content", "") + part["content"]
            else:
                kept = [c for c in part["tool_calls"] if not self.single or c["index"] == 0]
                if kept:
                    d.setdefault("tool_calls", []).extend(kept)
        return d

    def finish_reason(self, reason: str) -> str:
        """"tool_calls" when the reply ended as tool calls, else the engine's reason."""
        return "tool_calls" if self.calls is not None and self.calls.made_calls else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole reply `text` as a non-streamed assistant message."""
        d = self.delta(text, True)
        msg: dict[str, Any] = {"role": "assistant", "content": d.get("content", "")}
        if self.thinking:
            msg["reasoning_content"] = d.get("reasoning_content", "")
        if d.get("tool_calls"):
            msg["tool_calls"] = merge_tool_calls(d["tool_calls"])
        return msg
