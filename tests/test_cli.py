"""The real `dsv4` entry point on bad input: one line on stderr, no traceback, a non-zero exit; flags, config.json,
tokenizer.json and the prompt are checked before any weight is read. Plus Ctrl-C, --prompt-file and chat history.

"No weight was read" is shown with a model directory that holds config.json, the index, tokenizer.json but no
shards: reading any weight would fail with "points at missing shard" instead of the expected message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4_ascend.chat import THINK_END, encode_messages
from dsv4_ascend.cli import _assistant_turn, _fit_history
from dsv4_ascend.loading import load_model_tokenizer
from dsv4_ascend.tiny import write_tiny_checkpoint

DSV4 = shutil.which("dsv4", path=str(Path(sys.executable).parent)) or shutil.which("dsv4")
pytestmark = pytest.mark.skipif(DSV4 is None, reason="the dsv4 entry point is not installed")
TIMEOUT = 120  # a subprocess start imports torch (~2 s, far more on a loaded machine)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", seed=0)


@pytest.fixture()
def no_weights(ckpt, tmp_path) -> Path:
    """config.json, index, tokenizer files; no shards."""
    d = tmp_path / "no-weights"
    d.mkdir()
    for f in ckpt.glob("*.json"):
        shutil.copy(f, d / f.name)
    return d


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DSV4_DEBUG"}
    env.update(DSV4_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", **extra)
    return env


def run(tmp_path: Path, *args, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([DSV4, *args], input=stdin if stdin is not None else b"", capture_output=True,
                          env=_env(tmp_path, **env), timeout=TIMEOUT, cwd=tmp_path)


def one_error(p: subprocess.CompletedProcess, cmd: str = "generate") -> str:
    """The single stderr line of a failed run (asserts no traceback and a non-zero exit)."""
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dsv4 {cmd}: error: "), err
    return lines[0]


# ---- flags and tokenizer: before any weight --------------------------------------------------------------------

FLAG_CASES = [
    (["--max-tokens", "-1"], "--max-tokens must be >= 1, found -1"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--max-seq-len", "0"], "--max-seq-len must be >= 1, found 0"),
    (["--stop", ""], "--stop ''"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top-k", "1000000"], "--top-k must be <= the vocabulary size"),
    (["--seed", str(2**63)], "--seed must be in [0, 2**63 - 1]"),
    (["--max-tokens", "abc"], "argument --max-tokens: invalid int value: 'abc'"),
    (["--speculative-tokens", "-2"], "--speculative-tokens must be >= 0"),
    (["--max-tokens", "4096"], "--max-tokens 4096 leaves no room for a prompt in --max-seq-len 4096"),
    # Values config.json rules out; were refused by the engine only after every weight had loaded, the first two
    # without naming the flag ("block_size 6 must be ...", "max_seq_len=8192 exceeds ...").
    (["--block-size", "6"], "--block-size must be a multiple of every compress ratio in config.json (lcm 8), found 6"),
    (["--max-seq-len", "8192"], "--max-seq-len 8192 exceeds the model's max_position_embeddings 4096"),
    (["--speculative-tokens", "5000"], "--max-tokens 64 + --speculative-tokens 5000 leaves no room for a prompt"),
    (["--speculative-tokens", "3", "--max-tokens", "60", "--max-seq-len", "64"],
     "prompt (6 tokens) + --max-tokens 60 + --speculative-tokens 3 exceeds --max-seq-len 64"),
]


@pytest.mark.parametrize("flags,want", FLAG_CASES, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_bad_flag_is_one_line_before_any_weight(no_weights, tmp_path, flags, want):
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), *flags))
    assert want in line and "shard" not in line, line


def test_chat_and_serve_check_flags_too(no_weights, tmp_path):
    line = one_error(run(tmp_path, "chat", "--model", str(no_weights), "--top-p", "0"), "chat")
    assert "--top-p must be in (0, 1]" in line
    line = one_error(run(tmp_path, "serve", "--model", str(no_weights), "--max-seq-len", "0"), "serve")
    assert "--max-seq-len must be >= 1" in line
    line = one_error(run(tmp_path, "serve", "--model", str(no_weights), "--block-size", "12"), "serve")
    assert "--block-size must be a multiple of every compress ratio" in line and "shard" not in line


def test_speculative_tokens_without_an_mtp_block_is_refused_before_any_weight(no_weights, tmp_path):
    raw = json.loads((no_weights / "config.json").read_text())
    raw["num_nextn_predict_layers"], raw["compress_ratios"] = 0, raw["compress_ratios"][:raw["num_hidden_layers"]]
    (no_weights / "config.json").write_text(json.dumps(raw))
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), "--speculative-tokens", "2"))
    assert "--speculative-tokens needs the model's MTP block" in line and "shard" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(no_weights, tmp_path):
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), "--device", "cuda"))
    assert "--device cuda:" in line and "CUDA" in line and "shard" not in line


def test_device_npu_without_torch_npu(no_weights, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), "--device", "npu"))
    assert "--device npu needs torch_npu" in line and "CANN" in line


def test_tokenizer_missing_or_broken_before_any_weight(no_weights, tmp_path):
    tok = no_weights / "tokenizer.json"
    tok.write_text('{"model": ')
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights)))
    assert f"{tok}: not a usable tokenizer" in line and "shard" not in line
    tok.unlink()
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights)))
    assert f"{tok}: missing" in line and "use_default" not in line and "shard" not in line


@pytest.mark.parametrize("content,want", [
    ("nope", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object, found a JSON list"),
    (None, "is a directory"),
    ({"rope_theta": "abc"}, "config key 'rope_theta': must be a finite number, found 'abc'"),
    ({"rms_norm_eps": 0}, "config key 'rms_norm_eps': must be > 0"),
    ({"rope_theta": -10000.0}, "config key 'rope_theta': must be > 0"),
], ids=["not-json", "list", "directory", "rope-theta-str", "eps-zero", "rope-theta-neg"])
def test_config_json_errors_name_the_file(no_weights, tmp_path, content, want):
    cfg = no_weights / "config.json"
    if content is None:
        cfg.unlink()
        cfg.mkdir()
    elif isinstance(content, dict):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **content}))
    else:
        cfg.write_text(content)
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights)))
    assert f"{cfg}: " in line and want in line, line


def test_bad_paths(ckpt, tmp_path):
    line = one_error(run(tmp_path, "generate", "--model", str(tmp_path / "nowhere")))
    assert "nowhere: no such model directory" in line
    line = one_error(run(tmp_path, "generate", "--model", str(ckpt / "config.json")))
    assert "config.json: not a directory" in line
    line = one_error(run(tmp_path, "generate", "--model", str(ckpt), "--prompt-file", str(tmp_path / "none.txt")))
    assert "--prompt-file" in line and "none.txt: cannot read" in line


def test_invalid_utf8_prompt(no_weights, tmp_path):
    # Invalid UTF-8 bytes in argv reach Python as lone surrogates (surrogateescape).
    p = subprocess.run([DSV4.encode(), b"generate", b"--model", str(no_weights).encode(), b"--prompt",
                        b"abc\xff\xed\xa0\x80"], capture_output=True, env=_env(tmp_path), timeout=TIMEOUT)
    line = one_error(p)
    assert "--prompt: not valid UTF-8 text (invalid UTF-8 byte 0xFF at character 3)" in line
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xc3\x28")
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), "--prompt-file", str(bad)))
    assert "not valid UTF-8 (byte 0xC3 at offset 6)" in line
    line = one_error(run(tmp_path, "generate", "--model", str(no_weights), "--prompt-file", "-",
                         stdin=b"\xed\xa0\x80 lone surrogate"))
    assert "--prompt-file stdin: not valid UTF-8 (byte 0xED at offset 0)" in line


def test_debug_shows_the_traceback(tmp_path):
    for args, env in ((["--debug", "generate"], {}), (["generate", "--debug"], {}), (["generate"], {"DSV4_DEBUG": "1"})):
        p = run(tmp_path, *args, "--model", str(tmp_path / "nowhere"), **env)
        err = p.stderr.decode()
        assert p.returncode != 0 and "Traceback" in err and "LoadError" in err, (args, err)


# ---- damaged checkpoints and capacity (these read weights) -----------------------------------------------------

def _poke(d: Path, name: str, byte: int) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    f = d / index[name]
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k).clone() for k in h.keys()}
    tensors[name].view(torch.uint8).view(-1)[0] = byte
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["nan-scale", "nan-fp8", "truncated", "wrong-shard"])
def test_damaged_checkpoint_is_one_line(ckpt, tmp_path, damage):
    d = tmp_path / "damaged"
    shutil.copytree(ckpt, d)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if damage == "nan-scale":
        _poke(d, "layers.1.attn.wq_b.scale", 0xFF)  # e8m0 NaN
        want = "tensor 'layers.1.attn.wq_b.scale' (float8_e8m0fnu"
    elif damage == "nan-fp8":
        _poke(d, "layers.2.attn.wkv.weight", 0x7F)  # e4m3fn NaN
        want = "tensor 'layers.2.attn.wkv.weight' (float8_e4m3fn"
    elif damage == "truncated":
        shard = d / index["weight_map"]["embed.weight"]
        shard.write_bytes(shard.read_bytes()[:-100])
        want = "truncated safetensors file"
    else:
        actual = index["weight_map"]["embed.weight"]
        other = next(f for f in sorted(set(index["weight_map"].values())) if f != actual)
        index["weight_map"]["embed.weight"] = other
        index_path.write_text(json.dumps(index))
        want = f"says tensor 'embed.weight' is in {other}, but"
    line = one_error(run(tmp_path, "generate", "--model", str(d), "--max-tokens", "2"))
    assert want in line, line
    if damage.startswith("nan"):
        assert "NaN/inf" in line


def test_capacity_error_is_one_line(ckpt, tmp_path):
    line = one_error(run(tmp_path, "generate", "--model", str(ckpt), "--max-seq-len", "16", "--max-tokens", "8",
                         "--prompt", "word " * 40))
    assert "exceeds --max-seq-len 16" in line
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    p = run(tmp_path, "serve", "--model", str(ckpt), "--port", "0", "--kv-cache-gib", "0.000001")
    # CapacityError from the engine's cache planning, after the server loaded the weights (with its own loading
    # lines on stderr): the error is still one line, the last.
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]], err
    assert err.splitlines()[-1].startswith("dsv4 serve: error: ") and "KV-cache budget" in err


# ---- prompts from a file / stdin ----------------------------------------------------------------------------------

def test_prompt_file_and_stdin_equal_the_argument(ckpt, tmp_path):
    text = "The quick brown fox"
    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    common = ["generate", "--model", str(ckpt), "--max-tokens", "4"]
    outs = [run(tmp_path, *common, "--prompt", text), run(tmp_path, *common, "--prompt-file", str(f)),
            run(tmp_path, *common, "--prompt-file", "-", stdin=text.encode())]
    assert all(p.returncode == 0 for p in outs), [p.stderr.decode() for p in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout  # greedy: same prompt ids, same tokens


# ---- Ctrl-C -------------------------------------------------------------------------------------------------------

class _Proc:
    """A dsv4 process whose stdout/stderr are collected by threads, to wait for text while it runs."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.p = subprocess.Popen([DSV4, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=_env(tmp_path))
        self.out, self.err = bytearray(), bytearray()
        for src, dst in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst: bytearray) -> None:
        while chunk := src.read1(4096):
            dst.extend(chunk)

    def wait_for(self, pred, what: str, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert self.p.poll() is None, f"exited early waiting for {what}: {self.err.decode()}"
            assert time.monotonic() < end, f"timed out waiting for {what}: {self.err.decode()}"
            time.sleep(0.05)

    def send(self, text: str) -> None:
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        rc = self.p.wait(TIMEOUT)
        time.sleep(0.1)
        return rc, self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace")


def test_ctrl_c_stops_generate_and_keeps_the_text(ckpt, tmp_path):
    proc = _Proc(tmp_path, "generate", "--model", str(ckpt), "--max-tokens", "3000", "--max-seq-len", "4096")
    proc.wait_for(lambda: len(proc.out) > 20, "generated text")
    seen = bytes(proc.out)
    proc.p.send_signal(signal.SIGINT)
    rc, _, err = proc.finish()
    assert rc == 130 and "Traceback" not in err, err
    assert "[dsv4] stopped by Ctrl-C after" in err and bytes(proc.out).startswith(seen)  # what was printed stays
    assert err.count("\n") == 1  # one line: no bar (not a TTY), no second message


def test_ctrl_c_in_chat_stops_the_reply_keeps_the_session_and_exits_at_the_prompt(ckpt, tmp_path):
    proc = _Proc(tmp_path, "chat", "--model", str(ckpt), "--max-tokens", "3000", "--max-seq-len", "4096")
    proc.wait_for(lambda: b"chat:" in proc.err, "the chat banner")
    proc.send("Hello\n")
    proc.wait_for(lambda: len(proc.out) > 20, "the first reply")
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for(lambda: b"reply stopped by Ctrl-C" in proc.err, "the stopped reply")
    mark = len(proc.out)
    proc.send("Again\n")  # the session goes on
    proc.wait_for(lambda: len(proc.out) > mark + 20, "the second reply")
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for(lambda: proc.err.count(b"reply stopped by Ctrl-C") == 2, "the second stop")
    proc.wait_for(lambda: proc.out.endswith(b"> "), "the prompt")
    proc.p.send_signal(signal.SIGINT)  # at the prompt: leave
    rc, out, err = proc.finish()
    assert rc == 0 and "Traceback" not in err, err


# ---- chat history ---------------------------------------------------------------------------------------------------

def test_thinking_turn_is_stored_as_reasoning_and_content(ckpt):
    turn = _assistant_turn(f"Let me think.{THINK_END}Hello!", thinking=True)
    assert turn == {"role": "assistant", "reasoning_content": "Let me think.", "content": "Hello!"}
    msgs = [{"role": "user", "content": "Hi"}, turn, {"role": "user", "content": "And?"}]
    text = encode_messages(msgs, thinking=True)
    assert f"{THINK_END}Let me think.{THINK_END}" not in text and text.count("Hello!") == 1
    # a reply cut before </think> is all reasoning; chat mode keeps the text as content
    assert _assistant_turn("still thinking", True) == {"role": "assistant", "reasoning_content": "still thinking",
                                                       "content": ""}
    assert _assistant_turn("Hi", False) == {"role": "assistant", "content": "Hi"}


def test_history_that_outgrows_max_seq_len_drops_the_oldest_turns(ckpt, capsys):
    tok = load_model_tokenizer(ckpt)
    args = Namespace(thinking=False, max_tokens=8, max_seq_len=80, speculative_tokens=0)
    long = "The quick brown fox jumps over the lazy dog"
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"{long} {i}"}, {"role": "assistant", "content": long}]
    msgs.append({"role": "user", "content": "last"})
    ids = _fit_history(msgs, tok, args)
    assert ids is not None and len(ids) + 8 <= 80
    assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "last" and len(msgs) < 10
    assert "dropped the oldest" in capsys.readouterr().err
    msgs = [{"role": "user", "content": long * 5}]  # alone too long: not sent, the session continues
    assert _fit_history(msgs, tok, args) is None and msgs == []
    assert "not sent" in capsys.readouterr().err


def test_history_fit_leaves_room_for_the_speculative_tokens(ckpt):
    """With --speculative-tokens N the engine needs prompt + max_tokens + N <= max_seq_len; the chat history was fit
    to prompt + max_tokens only, so a history near the limit failed the whole session with a CapacityError."""
    tok = load_model_tokenizer(ckpt)
    long = "The quick brown fox jumps over the lazy dog"
    msgs = [{"role": "user", "content": f"{long} {i}"} if i % 2 == 0 else {"role": "assistant", "content": long}
            for i in range(9)]
    whole = len(tok.encode(encode_messages(msgs, thinking=False)))
    args = Namespace(thinking=False, max_tokens=8, max_seq_len=whole + 10, speculative_tokens=3)  # 1 token short
    ids = _fit_history(msgs, tok, args)
    assert ids is not None and whole > len(ids) and len(ids) + 8 + 3 <= whole + 10


def test_chat_says_when_it_drops_turns(ckpt, tmp_path):
    lines = "\n".join(["The quick brown fox jumps over the lazy dog"] * 3 + ["\udcff bad"]) + "\n"
    p = run(tmp_path, "chat", "--model", str(ckpt), "--max-tokens", "4", "--max-seq-len", "48",
            stdin=lines.encode("utf-8", "surrogateescape"))
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "dropped the oldest" in err and "input: not valid UTF-8 text" in err


def test_every_flag_of_every_subcommand_has_help():
    """`dsv4 CMD --help` explains every flag (was: serve's --log-level had none); make-tiny has its own parser."""
    import argparse

    from dsv4_ascend.cli import _build_parser

    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{cmd} {a.option_strings or a.dest}" for cmd, p in sub.choices.items() for a in p._actions
            if a.help in (None, "", argparse.SUPPRESS) and cmd != "make-tiny"]
    assert not bare, bare
