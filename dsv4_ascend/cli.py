"""`dsv4` command line: generate, chat, serve, parity, convert, make-tiny.

Errors: every failure is one line on stderr (`dsv4 CMD: error: ...`) and a non-zero exit: 2 for a bad flag or
input, 1 for a failure while loading or running, 130 for Ctrl-C. `--debug` (or DSV4_DEBUG=1) shows the traceback
instead. Flags, config.json, tokenizer.json and the prompt are checked before any weight is read.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .loading import check_device, load_model, load_model_tokenizer, read_model_config, resolve_model_dir

__all__ = ["main", "UsageError"]

_INT64_MAX = 2**63 - 1


class UsageError(ValueError):
    """A bad flag or input, found before any work: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is in --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="official-format model directory (config.json, "
                   "model.safetensors.index.json, shards, tokenizer.json); default: a tiny random model")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--backend", default="reference", choices=["reference", "ascend"],
                   help="op implementation: plain torch (reference) or torch_npu / its CPU emulator (ascend)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activation dtype")
    from .ops.backend import QUANT_MODES

    p.add_argument("--quant", default="auto", choices=["auto", *QUANT_MODES],
                   help="Ascend GEMM scheme (--backend ascend): auto (default) = what a `convert --target a3` dir "
                        "was written for (w8a8 / w4a8), fp8 for an FP8 checkpoint (official or `convert --target "
                        "950`) with --weights native, else bf16; fp8 = Ascend 950 Hybrid FP8-MXFP4 (FP8 block "
                        "linears, MXFP4 experts with MXFP8 activations); mxfp8 = 950 Hybrid MXFP8-MXFP4 (linears "
                        "re-quantised to MXFP8 at load); bf16 = dequantise per call (A2/A3 without conversion)")
    p.add_argument("--weights", default="native", choices=["native", "bf16"],
                   help="native: keep FP8/FP4 weights packed; bf16: dequantise at load (more memory)")
    p.add_argument("--numerics", default="exact", choices=["exact", "deepseek"],
                   help="exact: no quantisation simulation; deepseek: DeepSeek's FP8 act-quant and QAT sims")
    p.add_argument("--max-seq-len", type=int, default=4096, help="cache capacity per sequence in tokens")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="MTP speculative decoding: drafts verified per step (0 = off; V4 recipes use 1-3)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step: every decoding sequence's token(s), then prefill chunks of as many "
                        "prompts as fit (default max(2048, prefill chunk))")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV-cache page size in tokens, a multiple of every compress ratio (default: 256 rounded up "
                        "to one); also the prefix cache's hit granularity: smaller pages hit more of a shared prompt "
                        "but cut prefill into more chunks when prefix caching is on")
    p.add_argument("--graph", action="store_true",
                   help="decode with captured graphs (torch.compile / torchair), compiled at start")
    p.add_argument("--graph-tuning", default="default", choices=["default", "max"],
                   help="with --graph on CPU: 'max' folds the weights into the graph (MKL-packed copies) and "
                        "autotunes the GEMMs; faster decode, several minutes more compile")
    p.add_argument("--compile-prefill", action="store_true",
                   help="prefill chunks with the per-token backend ops compiled (dynamic shapes; compiles on the "
                        "first chunks)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="maximum number of generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _check_flags(args, sampling: bool = True) -> None:
    """Flag values that can never work, as UsageError naming the flag (nothing is read yet)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UsageError(msg)

    need(args.max_seq_len >= 1, f"--max-seq-len must be >= 1, found {args.max_seq_len}")
    need(args.speculative_tokens >= 0, f"--speculative-tokens must be >= 0, found {args.speculative_tokens}")
    need(getattr(args, "max_num_batched_tokens", None) is None or args.max_num_batched_tokens >= 1,
         f"--max-num-batched-tokens must be >= 1, found {getattr(args, 'max_num_batched_tokens', None)}")
    need(getattr(args, "block_size", None) is None or args.block_size >= 1,
         f"--block-size must be >= 1, found {getattr(args, 'block_size', None)}")
    if hasattr(args, "max_slots"):  # dsv4 serve
        need(args.max_slots >= 1, f"--max-slots must be >= 1 (got {args.max_slots}): no request could ever be "
                                  "served")
    if not sampling:
        return
    need(args.max_tokens >= 1, f"--max-tokens must be >= 1, found {args.max_tokens}")
    need(math.isfinite(args.temperature) and args.temperature >= 0,
         f"--temperature must be a finite number >= 0 (0 = greedy), found {args.temperature}")
    need(args.top_k >= 0, f"--top-k must be >= 0 (0 = off), found {args.top_k}")
    need(0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1 = off), found {args.top_p}")
    need(0 <= args.seed <= _INT64_MAX, f"--seed must be in [0, 2**63 - 1], found {args.seed}")
    need(all(args.stop), "--stop '' (an empty stop string) would stop before the first token; give a non-empty "
                         "string")
    for s in args.stop:
        _utf8(s, "--stop")
    spec = f" + --speculative-tokens {args.speculative_tokens}" if args.speculative_tokens else ""
    need(args.max_tokens + args.speculative_tokens < args.max_seq_len,  # a verify writes n tokens past the last
         f"--max-tokens {args.max_tokens}{spec} leaves no room for a prompt in --max-seq-len {args.max_seq_len}")


def _utf8(text: str, where: str) -> str:
    """`text` if it is valid Unicode text; UsageError naming `where` for lone surrogates (the form invalid UTF-8
    bytes of a command-line argument take in Python)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = (f"invalid UTF-8 byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF
                else f"lone surrogate U+{c:04X}")
        raise UsageError(f"{where}: not valid UTF-8 text ({what} at character {e.start})") from None
    return text


def _read_prompt(args) -> str:
    """The prompt: --prompt, or --prompt-file PATH ('-' = stdin), decoded as strict UTF-8."""
    if args.prompt_file is None:
        return _utf8(args.prompt, "--prompt")
    where = "stdin" if args.prompt_file == "-" else args.prompt_file
    try:
        data = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
    except OSError as e:
        raise UsageError(f"--prompt-file {where}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {where}: not valid UTF-8 (byte 0x{data[e.start]:02X} at offset "
                         f"{e.start})") from None


def _prepare(args, sampling: bool = True):
    """Every check that needs no weights: flags, device, model directory, config.json, tokenizer.json.
    Returns (path, config, tokenizer)."""
    _check_flags(args, sampling)
    check_device(args.device)
    path = resolve_model_dir(args.model)
    cfg = read_model_config(path)
    _check_model_flags(args, cfg, sampling)
    return path, cfg, load_model_tokenizer(path)


def _check_model_flags(args, cfg, sampling: bool) -> None:
    """Flag values the model's config.json rules out (what the engine would refuse after loading the weights)."""
    if sampling and args.top_k > cfg.vocab_size:
        raise UsageError(f"--top-k must be <= the vocabulary size {cfg.vocab_size}, found {args.top_k}")
    if args.max_seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings} (config.json)")
    lcm = math.lcm(*[r for r in cfg.compress_ratios if r] or [1])
    if args.block_size is not None and args.block_size % lcm:
        raise UsageError(f"--block-size must be a multiple of every compress ratio in config.json (lcm {lcm}), "
                         f"found {args.block_size}")
    if args.speculative_tokens and not cfg.num_nextn_predict_layers:
        raise UsageError("--speculative-tokens needs the model's MTP block; config.json has "
                         "num_nextn_predict_layers 0")


def _params(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop))


class _CtrlC:
    """While a reply streams: the first Ctrl-C asks the reply to stop at the next token (the engine stays
    consistent); a second one interrupts at once. Only in the main thread (where Python delivers signals)."""

    def __init__(self) -> None:
        self.hit = False
        self._prev = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._on)
        return self

    def _on(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _stream(engine, tok, prompt_ids: list[int], params, out=sys.stdout) -> tuple[str, int, float, bool]:
    """Run one request, printing text as it decodes; returns (text, tokens, seconds, interrupted by Ctrl-C)."""
    req = engine.add_request(prompt_ids, params)
    dec = tok.stream_decoder(skip_special_tokens=True)
    text, t0 = "", time.perf_counter()
    with _CtrlC() as ctrl_c:
        for r, t in engine.run():
            if ctrl_c.hit and not req.finished:
                engine.abort(req)
            if r is not req or req.finish_reason == "abort":
                continue
            piece = dec.push(t)
            text += piece
            hit = [s for s in params.stop if s in text]
            if hit:
                cut = min(text.index(s) for s in hit)
                piece = piece[: max(0, len(piece) - (len(text) - cut))]
                text = text[:cut]
                engine.abort(req)
            out.write(piece)
            out.flush()
        if ctrl_c.hit and not req.finished:
            engine.abort(req)
    if not params.stop or not any(s in text for s in params.stop):
        rest = dec.flush()
        text += rest
        out.write(rest)
    out.write("\n")
    out.flush()
    return text, len(req.output), time.perf_counter() - t0, ctrl_c.hit


def _engine(model, args, **kw):
    from .engine import Engine

    return Engine(model, max_seq_len=args.max_seq_len, speculative_tokens=args.speculative_tokens,
                  graph=args.graph, graph_tuning=args.graph_tuning, compile_prefill=args.compile_prefill,
                  max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
                  block_size=getattr(args, "block_size", None), **kw)


def _load(args):
    model, _ = load_model(args.model, args.device, args.backend, args.dtype, args.weights, args.numerics,
                          args.quant, progress=sys.stderr.isatty())  # a bar only where a person watches
    return model


def cmd_generate(args) -> int:
    path, _, tok = _prepare(args)
    ids = [tok.bos_id] + tok.encode(_read_prompt(args))
    if len(ids) + args.max_tokens + args.speculative_tokens > args.max_seq_len:  # a verify writes n past the end
        spec = f" + --speculative-tokens {args.speculative_tokens}" if args.speculative_tokens else ""
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-tokens {args.max_tokens}{spec} exceeds --max-seq-len "
                         f"{args.max_seq_len}")
    params = _params(args)
    engine = _engine(_load(args), args, max_slots=1)
    _, n, secs, stopped = _stream(engine, tok, ids, params)
    if stopped:
        print(f"[dsv4] stopped by Ctrl-C after {n} tokens", file=sys.stderr)
        return 130
    print(f"[dsv4] {n} tokens in {secs:.2f} s = {n / secs:.1f} tok/s (prompt {len(ids)} tokens, "
          f"model {path})", file=sys.stderr)
    if engine.spec is not None:
        st = engine.spec_stats()
        print(f"[dsv4] MTP acceptance {st['acceptance_rate']:.1%}, main-model steps per token "
              f"{st['main_steps_per_token']:.2f}", file=sys.stderr)
    return 0


def _assistant_turn(text: str, thinking: bool) -> dict:
    """The reply as DeepSeek's encoder wants it: in thinking mode the reasoning (before </think>) goes to
    reasoning_content and only the answer to content (a reply cut before </think> is all reasoning)."""
    from .chat import THINK_END

    if not thinking:
        return {"role": "assistant", "content": text}
    reasoning, sep, content = text.partition(THINK_END)
    return {"role": "assistant", "reasoning_content": reasoning, "content": content if sep else ""}


def _fit_history(messages: list[dict], tok, args) -> list[int] | None:
    """Prompt ids of the chat so far; drops the oldest turns (never the system prompt) while prompt +
    --max-tokens exceeds --max-seq-len, saying so. None when the newest message alone does not fit (then it is
    removed)."""
    from .chat import encode_messages

    dropped = 0
    while True:
        ids = tok.encode(encode_messages(messages, thinking=args.thinking))
        if len(ids) + args.max_tokens + args.speculative_tokens <= args.max_seq_len:  # as Engine.add_request
            break
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) <= 1:
            print(f"[dsv4] this message needs {len(ids)} prompt tokens; with --max-tokens {args.max_tokens} that "
                  f"exceeds --max-seq-len {args.max_seq_len}: not sent (shorten it or raise --max-seq-len)",
                  file=sys.stderr)
            messages.pop()
            return None
        del messages[users[0]:users[1]]
        dropped += 1
    if dropped:
        print(f"[dsv4] the history outgrew --max-seq-len {args.max_seq_len}: dropped the oldest {dropped} "
              f"turn{'s' if dropped > 1 else ''} (the prompt is now {len(ids)} tokens)", file=sys.stderr)
    return ids


def cmd_chat(args) -> int:
    _, _, tok = _prepare(args)
    system = _utf8(args.system, "--system")
    params = _params(args)
    engine = _engine(_load(args), args, max_slots=1)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad line is reported, not fatal
    print("[dsv4] chat: empty line or Ctrl-D to quit; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not line.strip():
            break
        try:
            _utf8(line, "input")
        except UsageError as e:
            print(f"[dsv4] {e}; line ignored", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit_history(messages, tok, args)
        if ids is None:
            continue
        text, n, secs, stopped = _stream(engine, tok, ids, params)
        messages.append(_assistant_turn(text, args.thinking))
        if stopped:
            print(f"[dsv4] reply stopped by Ctrl-C after {n} tokens (kept in the history)", file=sys.stderr)
        else:
            print(f"[dsv4] {n} tokens, {n / secs:.1f} tok/s", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    if args.nproc_per_node is not None:
        return _serve_launcher(args)
    if _env_world() > 1:  # under torchrun: rank 0 serves HTTP, every rank runs an engine (server.ranks)
        from .server.ranks import serve_ranks_main

        return serve_ranks_main(args, prepare=lambda a: _prepare(a, sampling=False))
    for flag in ("--dist-backend", "--dist-timeout", "--fused-moe"):
        if any(a == flag or a.startswith(flag + "=") for a in args.argv):
            raise UsageError(f"{flag} applies to serving over ranks (torchrun, or --nproc-per-node N)")
    _prepare(args, sampling=False)  # flags, device, config.json, tokenizer.json: before the server loads weights
    from .server import serve_main  # lazy: fastapi/uvicorn are the optional `serve` extra

    return serve_main(args)


def _env_world() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit():
        raise UsageError(f"environment variable WORLD_SIZE={raw!r} is not a positive integer")
    return int(raw)


def _serve_launcher(args) -> int:
    """`dsv4 serve --nproc-per-node N`: start N ranks on this node through torch's own launcher (torchrun)."""
    if "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc-per-node starts the ranks itself; under torchrun leave it out")
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, found {args.nproc_per_node}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    child, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            child.append(a)
    try:
        torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "dsv4_ascend.cli", *child])
    except ChildFailedError as exc:
        print(f"dsv4 serve: a rank failed: {exc}", file=sys.stderr)
        return 1
    except SignalException as exc:  # SIGTERM/SIGINT: torchrun passed it on; rank 0 drained, the others followed
        print(f"dsv4 serve: stopped by signal {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


def cmd_parity(args) -> int:
    from .parity import parity_main

    return parity_main(args)


def cmd_convert(args) -> int:
    from .convert import convert_main

    return convert_main(args)


def _build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dsv4", description="DeepSeek-V4 inference (Ascend NPU and any torch device)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also DSV4_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kw)
        if kw.get("add_help", True):
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of an error (also DSV4_DEBUG=1)")
        return p

    g = command("generate", help="complete a prompt, streaming the text; tokens/s at the end")
    _add_model_flags(g)
    _add_sampling_flags(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The capital of France is", help="text to complete (BOS is prepended)")
    src.add_argument("--prompt-file", default=None, metavar="PATH",
                     help="read the prompt from a UTF-8 file ('-' = stdin); for prompts beyond the command line's "
                          "128 KiB per argument")
    g.set_defaults(fn=cmd_generate)

    c = command("chat", help="interactive chat with history (DeepSeek-V4 chat encoding)")
    _add_model_flags(c)
    _add_sampling_flags(c)
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--thinking", action="store_true", help="thinking mode (the reply opens with <think>)")
    c.set_defaults(fn=cmd_chat)

    v = command("serve", help="OpenAI-compatible HTTP server (continuous batching; needs the serve extra)")
    _add_model_flags(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    v.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV4_API_KEY, else no key)")
    v.add_argument("--served-model-name", default=None, help="model id in the API (default: model directory name)")
    v.add_argument("--max-slots", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    v.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step")
    v.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache budget in GiB (default: every slot can hold max-seq-len tokens)")
    v.add_argument("--kv-fp8", action="store_true", help="store the paged KV cache in FP8")
    v.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off automatic prefix caching (on by default: prompts that start with a cached "
                        "prefix of whole cache pages skip computing it; see docs/design.md, 'Prefix caching')")
    v.add_argument("--max-queue", type=int, default=512, help="requests waiting for a slot before 503s")
    v.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run on after SIGINT/SIGTERM before they are cut")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info: also one access-log line per request)")
    v.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="serve over N ranks on this node (DP attention, EP MoE), started through torch's launcher "
                        "(torchrun --standalone); for several nodes run `torchrun ... -m dsv4_ascend.cli serve` "
                        "instead (scripts/launch.py shows the flags). N must divide n_routed_experts")
    v.add_argument("--dist-backend", default="auto", choices=["auto", "hccl", "nccl", "gloo"],
                   help="with ranks: torch.distributed backend (auto: hccl on NPUs, nccl with CUDA, else gloo)")
    v.add_argument("--dist-timeout", type=float, default=300.0,
                   help="with ranks: seconds a collective waits for a peer before the job fails (a hung rank "
                        "makes the endpoint answer 503 and the job exit after at most this long; default 300)")
    v.add_argument("--fused-moe", action="store_true",
                   help="with ranks: decode MoE layers through torch_npu's MC2 npu_moe_distribute_dispatch/combine "
                        "(--dist-backend hccl; never run on an NPU here), or with --backend ascend on CPU the "
                        "emulator's over gloo; default: padded all-to-alls")
    v.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGINS",
                   help="send CORS headers to these browser origins (comma-separated or repeated, e.g. "
                   "https://app.example.com; '*' for any); default: no CORS headers")
    v.set_defaults(fn=cmd_serve)

    from .convert import add_convert_args
    from .parity import add_parity_args

    r = command("parity", help="Ascend backend (torch_npu or its CPU emulator) vs the reference backend: "
                "per-layer max-abs-diff / cosine, logit top-1 agreement; exit 1 past tolerance")
    add_parity_args(r)
    r.set_defaults(fn=cmd_parity)

    k = command("convert", help="convert an official checkpoint for Atlas A2/A3 (W8A8 int8) or Ascend 950 "
                "(FP8/MXFP4), streaming with progress")
    add_convert_args(k)
    k.set_defaults(fn=cmd_convert)

    t = command("make-tiny", help="write a tiny random model in the official on-disk format", add_help=False)
    t.set_defaults(fn=None)
    return ap


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) if str(e) else ""
    known = isinstance(e, (ValueError, OSError, KeyError)) or type(e).__module__.startswith("dsv4_ascend")
    return msg if msg and known else f"{type(e).__name__}: {msg}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dsv4`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = _build_parser()
    args, rest = ap.parse_known_args(argv)
    args.argv = argv  # `serve --nproc-per-node` hands the same command line to the ranks it starts
    if args.cmd == "make-tiny":
        from .tiny import make_tiny_main

        return make_tiny_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    debug = getattr(args, "debug", False) or os.environ.get("DSV4_DEBUG", "") not in ("", "0")
    prog = f"dsv4 {args.cmd}"
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
