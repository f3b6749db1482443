"""`dsv4` command line: generate, chat, serve, make-tiny (and the Ascend tools when present)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "load_model", "default_model_dir"]


def default_model_dir() -> Path:
    """The embedded default: a tiny random model in the official format, created on first use."""
    root = Path(os.environ.get("DSV4_HOME", Path.home() / ".cache" / "dsv4-ascend"))
    d = root / "tiny-seed0"
    if not (d / "config.json").exists() or not (d / "model.safetensors.index.json").exists():
        from .tiny import write_tiny_checkpoint

        print(f"[dsv4] creating the tiny random default model in {d}", file=sys.stderr)
        write_tiny_checkpoint(d, seed=0)
    return d


def make_backend(name: str, numerics: str, quant: str = "bf16"):
    """The Backend named on the command line (`quant`: the Ascend weight format, w8a8 / w4a8 for converted A3
    dirs)."""
    from .backend import RunOptions

    opts = RunOptions(numerics)
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(opts)
    if name == "ascend":
        from .ops import AscendBackend

        return AscendBackend(options=opts, quant=quant)
    raise SystemExit(f"unknown --backend {name!r}; allowed: reference, ascend")


def auto_quant(qc: dict, backend: str, weights: str, implied: str = "bf16") -> str:
    """The Ascend quant mode a checkpoint implies for `--quant auto`: what `implied` says for converted A2/A3
    dirs, "fp8" (the 950's native FP8 + MXFP4 path) for an FP8 checkpoint kept native on --backend ascend (the
    official one or a `dsv4 convert --target 950` copy), else "bf16"."""
    if implied == "bf16" and backend == "ascend" and weights == "native" and qc.get("quant_method") == "fp8":
        return "fp8"
    return implied


def load_model(model_dir: str | None, device: str = "cpu", backend: str = "reference", dtype: str = "bfloat16",
               weights: str = "native", numerics: str = "exact", quant: str = "auto"):
    """Model from an official-format directory (or the tiny default) on `device` with the chosen backend.

    `quant` (Ascend only): "auto" picks it from the checkpoint (`auto_quant`), or one of AscendBackend's modes.
    """
    from .checkpoint import load_checkpoint

    import json

    path = Path(model_dir) if model_dir else default_model_dir()
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {} \
        if (path / "config.json").exists() else {}
    implied = "bf16"
    if qc.get("quant_method") == "w8a8_int8":  # written by `dsv4 convert --target a3`: int8, experts int8 or int4
        implied = "w4a8" if qc.get("experts") == "w4a8" else "w8a8"
    if quant == "auto":
        quant = auto_quant(qc, backend, weights, implied)
    elif backend != "ascend" and quant != "bf16":
        raise SystemExit(f"--quant {quant} needs --backend ascend (the reference backend runs the checkpoint as "
                         "stored, dequantising per call)")
    model = load_checkpoint(path, backend=make_backend(backend, numerics, quant), dtype=getattr(torch, dtype),
                            weights=weights, device=device)
    if quant in ("fp8", "mxfp8"):
        model.backend.prepare(model)  # the 950 scale layouts once, before the first request or a graph capture
    return model, path


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
    p.add_argument("--graph", action="store_true",
                   help="decode with captured graphs (torch.compile / torchair), compiled at start")
    p.add_argument("--graph-tuning", default="default", choices=["default", "max"],
                   help="with --graph on CPU: 'max' folds the weights into the graph (MKL-packed copies) and "
                        "autotunes the GEMMs; faster decode, several minutes more compile")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="maximum number of generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop))


def _stream(engine, tok, prompt_ids: list[int], params, out=sys.stdout) -> tuple[str, int, float]:
    """Run one request, printing text as it decodes; returns (text, tokens, seconds)."""
    req = engine.add_request(prompt_ids, params)
    dec = tok.stream_decoder(skip_special_tokens=True)
    text, t0 = "", time.perf_counter()
    for r, t in engine.run():
        if r is not req:
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
    if not params.stop or not any(s in text for s in params.stop):
        rest = dec.flush()
        text += rest
        out.write(rest)
    out.write("\n")
    return text, len(req.output), time.perf_counter() - t0


def _engine(model, args, **kw):
    from .engine import Engine

    return Engine(model, max_seq_len=args.max_seq_len, speculative_tokens=args.speculative_tokens,
                  graph=args.graph, graph_tuning=args.graph_tuning, **kw)


def cmd_generate(args) -> int:
    from .tokenizer import load_tokenizer

    model, path = load_model(args.model, args.device, args.backend, args.dtype, args.weights, args.numerics,
                             args.quant)
    tok = load_tokenizer(path)
    engine = _engine(model, args, max_slots=1)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    _, n, secs = _stream(engine, tok, ids, _params(args))
    print(f"[dsv4] {n} tokens in {secs:.2f} s = {n / secs:.1f} tok/s (prompt {len(ids)} tokens, "
          f"model {path})", file=sys.stderr)
    if engine.spec is not None:
        st = engine.spec_stats()
        print(f"[dsv4] MTP acceptance {st['acceptance_rate']:.1%}, main-model steps per token "
              f"{st['main_steps_per_token']:.2f}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import encode_messages
    from .tokenizer import load_tokenizer

    model, path = load_model(args.model, args.device, args.backend, args.dtype, args.weights, args.numerics,
                             args.quant)
    tok = load_tokenizer(path)
    engine = _engine(model, args, max_slots=1)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("[dsv4] chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = tok.encode(encode_messages(messages, thinking=args.thinking))
        text, n, secs = _stream(engine, tok, ids, _params(args))
        messages.append({"role": "assistant", "content": text})
        print(f"[dsv4] {n} tokens, {n / secs:.1f} tok/s", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .server import serve_main  # lazy: fastapi/uvicorn are the optional `serve` extra

    return serve_main(args)


def cmd_parity(args) -> int:
    from .parity import parity_main

    return parity_main(args)


def cmd_convert(args) -> int:
    from .convert import convert_main

    return convert_main(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 inference (Ascend NPU and any torch device)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="complete a prompt, streaming the text; tokens/s at the end")
    _add_model_flags(g)
    _add_sampling_flags(g)
    g.add_argument("--prompt", default="The capital of France is", help="text to complete (BOS is prepended)")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with history (DeepSeek-V4 chat encoding)")
    _add_model_flags(c)
    _add_sampling_flags(c)
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--thinking", action="store_true", help="thinking mode (the reply opens with <think>)")
    c.set_defaults(fn=cmd_chat)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching; needs the serve extra)")
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
    v.add_argument("--max-queue", type=int, default=512, help="requests waiting for a slot before 503s")
    v.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run on after SIGINT/SIGTERM before they are cut")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.set_defaults(fn=cmd_serve)

    from .convert import add_convert_args
    from .parity import add_parity_args

    r = sub.add_parser("parity", help="Ascend backend (torch_npu or its CPU emulator) vs the reference backend: "
                       "per-layer max-abs-diff / cosine, logit top-1 agreement; exit 1 past tolerance")
    add_parity_args(r)
    r.set_defaults(fn=cmd_parity)

    k = sub.add_parser("convert", help="convert an official checkpoint for Atlas A2/A3 (W8A8 int8) or Ascend 950 "
                       "(FP8/MXFP4), streaming with progress")
    add_convert_args(k)
    k.set_defaults(fn=cmd_convert)

    t = sub.add_parser("make-tiny", help="write a tiny random model in the official on-disk format",
                       add_help=False)
    t.set_defaults(fn=None)

    args, rest = ap.parse_known_args(argv)
    if args.cmd == "make-tiny":
        from .tiny import make_tiny_main

        return make_tiny_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
