#!/usr/bin/env python3
"""Device checks: the points the CPU emulator (dsv4_ascend.ops.emulator) cannot settle ("(verify)" in its docstrings,
listed in docs/ascend.md "Device checks"), each run once on an Atlas A3 / Ascend 950 NPU and once in the emulator
on the same inputs. Prints every op's result against the emulator's; exit 1 on a mismatch.

    python scripts/npu_check.py [--chip a3|950] [--only NAME ...] [--list]

Needs torch_npu with a visible NPU (exit 2 otherwise, with the reason) and, for the custom-op checks, CR's custom_ops
wheel (cann-recipes-infer ops/ascendc; those checks are reported as skipped without it). Exit: 0 every check run
matches; 1 at least one mismatch (or an op raised); 2 no usable NPU / bad usage.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from dsv4_ascend.cache import c8_pack
from dsv4_ascend.ops import emulator as E
from dsv4_ascend.ops.npu import load_custom_ops, npu_available


@dataclass
class Check:
    name: str
    chips: tuple[str, ...]  # where the op exists ("a3" covers A2/A3)
    custom: bool            # a torch.ops.custom op (CR's wheel)
    settles: str            # the "(verify)" point(s) this run decides
    run: Callable           # run(ctx) -> list of (label, device output, emulator output, how)


class Ctx:
    """Where the ops come from: `npu` / `custom` are torch_npu / torch.ops.custom on a device (the emulator in
    --self-test), `dev` the device the inputs go to."""

    def __init__(self, npu, custom, dev: str) -> None:
        self.npu, self.custom, self.dev = npu, custom, dev

    def both(self, op: str, args: tuple, kw: dict | None = None, custom: bool = False, mutate: int | None = None):
        """(device result, emulator result) of `op` on the same inputs; `mutate`: index of an in-place argument
        whose final value is the result."""
        kw = kw or {}
        ns = self.custom if custom else self.npu
        d_args, d_kw = _to(args, self.dev), _to(kw, self.dev)
        e_args, e_kw = _to(args, "cpu"), _to(kw, "cpu")
        got = getattr(ns, op)(*d_args, **d_kw)
        want = getattr(E, op)(*e_args, **e_kw)
        if mutate is not None:
            return _to(d_args[mutate], "cpu"), e_args[mutate]
        return _to(got, "cpu"), want


def _to(x, dev: str):
    if isinstance(x, torch.Tensor):  # always a copy: in-place ops must not see the other side's writes
        return x.detach().to(dev, copy=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int32)


# ---- the checks -------------------------------------------------------------------------------------------------
def _dynamic_quant(c: Ctx):
    x = torch.randn(4, 256, generator=_g(0)).bfloat16()
    x[1] = 0  # the 0/0 row
    x[2, :8] = torch.tensor([127.0, -127.0, 0.5, 1.5, 2.5, -0.5, 63.5, 126.5]).bfloat16()  # x.5 ties after scaling
    (dq, ds), (eq, es) = c.both("npu_dynamic_quant", (x,))
    return [("int8 values", dq, eq, "exact"), ("scales", ds, es, "exact")]


def _rotary_bf16(c: Ctx):
    x = torch.randn(1, 6, 2, 64, generator=_g(1)).bfloat16()
    ang = torch.randn(1, 6, 1, 32, generator=_g(2)).repeat_interleave(2, -1)
    got, want = c.both("npu_rotary_mul", (x, ang.cos().bfloat16(), ang.sin().bfloat16()), dict(rotary_mode="interleave"))
    return [("bf16 interleave", got, want, "exact")]


def _scatter_duplicates(c: Ctx):
    var = torch.zeros(6, 128, dtype=torch.bfloat16)
    idx = torch.tensor([[1], [3], [1], [5]])
    upd = torch.randn(4, 128, generator=_g(3)).bfloat16()
    out = [("built-in, duplicate row 1", *c.both("npu_scatter_nd_update_", (var, idx, upd), mutate=0), "exact")]
    if c.custom is not None:
        idx2 = torch.tensor([[1], [-1], [1], [5]])
        out.append(("custom asc, duplicate + negative",
                    *c.both("scatter_nd_update_asc", (var, idx2, upd), custom=True, mutate=0), "exact"))
    return out


def _li_padding(c: Ctx):
    t, h, d, n = 3, 4, 128, 20
    q = torch.randn(t, h, d, generator=_g(4)).bfloat16()
    keys = torch.randn(2, 16, 1, d, generator=_g(5)).bfloat16()
    w = torch.randn(t, h, generator=_g(6)).bfloat16()
    kw = dict(actual_seq_lengths_query=_i32([1, 2, 3]), actual_seq_lengths_key=_i32([3, n, 9]),
              block_table=_i32([[0, 1]] * 3), layout_query="TND", layout_key="PA_BSND", sparse_count=16,
              sparse_mode=3, return_value=True)
    (di, dv), (ei, ev) = c.both("npu_lightning_indexer", (q, keys, w), kw)
    return [("indices (sets, -1 tail)", di, ei, "rowsets"), ("values at -1 slots", dv.float(), ev.float(), "tail")]


def _quant_li_int8(c: Ctx):
    t, h, d = 3, 4, 128
    q = torch.randint(-127, 128, (t, h, d), generator=_g(7), dtype=torch.int8)
    k = torch.randint(-127, 128, (2, 16, 1, d), generator=_g(8), dtype=torch.int8)
    w = (torch.rand(t, h, generator=_g(9)) * 3).half()
    qs = (torch.rand(t, h, generator=_g(10)) / 100 + 1e-3).half()  # w * qs lands between fp16 steps
    ks = (torch.rand(2, 16, 1, generator=_g(11)) / 100 + 1e-3).half()
    kw = dict(actual_seq_lengths_query=_i32([1, 2, 3]), actual_seq_lengths_key=_i32([30, 32, 17]),
              block_table=_i32([[0, 1]] * 3), layout_query="TND", layout_key="PA_BSND", sparse_count=8,
              sparse_mode=3)
    got, want = c.both("npu_quant_lightning_indexer", (q, k, w, qs, ks, 0, 0), kw)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return [("int8 indices (sets)", got, want, "rowsets")]


def _quant_li_fp8(c: Ctx):
    t, h, d = 3, 4, 128
    qf, qs = E.npu_dynamic_block_quant(torch.randn(t * h, d, generator=_g(12)), dst_type=torch.float8_e4m3fn)
    kf, ks = E.npu_dynamic_block_quant(torch.randn(32, d, generator=_g(13)), dst_type=torch.float8_e4m3fn)
    kw = dict(actual_seq_lengths_query=_i32([1, 2, 3]), actual_seq_lengths_key=_i32([30, 32, 17]),
              block_table=_i32([[0, 1]] * 3), layout_query="TND", layout_key="PA_BSND", sparse_count=8,
              sparse_mode=3)
    args = (qf.view(t, h, d), kf.view(2, 16, 1, d), torch.randn(t, h, generator=_g(14)), qs.view(t, h),
            ks.view(2, 16, 1))
    got, want = c.both("npu_quant_lightning_indexer", args + (0, 0), kw, custom=True)
    got = got[0] if isinstance(got, (tuple, list)) else got
    want = want[0] if isinstance(want, (tuple, list)) else want
    return [("FP8 indices (sets)", got, want, "rowsets")]


def _sas_inputs(k2: int, repeat: bool):
    """One TND batch of 3 queries at positions 4397..4399 (ring of 128 in blocks of 128, 1100 CSA entries visible):
    k2 distinct picks, or k2 / 2 picks listed twice (repeat)."""
    h, d, t, seq = 64, 512, 3, 4400
    q = (torch.randn(t, h, d, generator=_g(15)) / 8).bfloat16()
    ori = (torch.randn(35, 128, 1, d, generator=_g(16)) / 8).bfloat16()  # positions 0..4479
    cmp = (torch.randn(9, 128, 1, d, generator=_g(17)) / 8).bfloat16()  # entries 0..1151
    n = k2 // 2 if repeat else k2
    picks = torch.stack([torch.randperm(seq // 4, generator=_g(18 + r))[:n] for r in range(t)])
    picks = (torch.cat([picks, picks], -1) if repeat else picks).int().view(t, 1, k2)
    kw = dict(ori_kv=ori, cmp_kv=cmp, cmp_sparse_indices=picks, ori_block_table=torch.arange(35).int().view(1, 35),
              cmp_block_table=torch.arange(9).int().view(1, 9), cu_seqlens_q=_i32([0, t]), seqused_kv=_i32([seq]),
              sinks=torch.randn(h, generator=_g(19)), softmax_scale=d ** -0.5, cmp_ratio=4, ori_mask_mode=4,
              cmp_mask_mode=3, ori_win_left=127, ori_win_right=0, layout_q="TND", layout_kv="PA_ND")
    meta = dict(batch_size=1, max_seqlen_q=t, max_seqlen_kv=4480, cmp_topk=k2, cmp_ratio=4, cu_seqlens_q=_i32([0, t]),
                seqused_kv=_i32([seq]), layout_q="TND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True)
    return q, kw, meta


def _sas(c: Ctx, k2: int, repeat: bool):
    q, kw, meta = _sas_inputs(k2, repeat)
    kw["metadata"] = c.custom.npu_sparse_attn_sharedkv_metadata(64, 1, 512, device=str(c.dev), **_to(meta, c.dev))
    (got, _), (want, _) = c.both("npu_sparse_attn_sharedkv", (q,), kw, custom=True)
    return [(f"K2={k2}{' repeated picks' if repeat else ''}", got.float(), want.float(), "bf16")]


def _kv_quant_sas(c: Ctx):
    q, kw, meta = _sas_inputs(512, False)
    for key in ("ori_kv", "cmp_kv"):  # the same keys as C8 rows written by the cache's packing
        kv = kw[key]
        kw[key] = c8_pack(kv.float(), 64, torch.bfloat16).view(torch.float8_e4m3fn)
    kw.update(tile_size=64, rope_head_dim=64)
    kw["metadata"] = c.custom.npu_kv_quant_sparse_attn_sharedkv_metadata(
        64, 1, 512, 1, tile_size=64, rope_head_dim=64, device=str(c.dev), **_to(meta, c.dev))
    (got, _), (want, _) = c.both("npu_kv_quant_sparse_attn_sharedkv", (q, 1), kw, custom=True)
    return [("C8 rows (rope first, e8m0 scales)", got.float(), want.float(), "bf16")]


def _kv_compress_epilog(c: Ctx):
    x = (torch.randn(6, 512, generator=_g(20)) * torch.logspace(-5, 2, 6).unsqueeze(1)).bfloat16()
    cache = torch.zeros(8, 640, dtype=torch.float8_e4m3fn)
    got, want = c.both("kv_compress_epilog", (cache, x, torch.tensor([3, -1, 0, 7, 2, 5])), custom=True, mutate=0)
    return [("640-byte rows", got.view(torch.uint8), want.view(torch.uint8), "exact")]


def _indexer_compress_epilog(c: Ctx):
    x = torch.randn(5, 128, generator=_g(21)).bfloat16()
    x[2] = 0
    cache, scale = torch.zeros(8, 128, dtype=torch.float8_e4m3fn), torch.zeros(8, 1)
    args = (cache, scale, x, _i32([4, -1, 0, 6, 1]))
    got_c, want_c = c.both("indexer_compress_epilog", args, dict(quant_mode=1), custom=True, mutate=0)
    got_s, want_s = c.both("indexer_compress_epilog", args, dict(quant_mode=1), custom=True, mutate=1)
    return [("fp8 values", got_c.view(torch.uint8), want_c.view(torch.uint8), "exact"),
            ("fp32 scales", got_s, want_s, "exact")]


def _compressor(c: Ctx):
    """The start_pos shift AscendBackend applies (start % R + R) must not change the output, and bf16 rounding
    of the pooled entry before the norm (the emulator does it) shows in the comparison."""
    b, s, hdim, d, ratio = 1, 8, 1024, 512, 4
    ring = 2 * ratio
    x = torch.randn(b, s, hdim, generator=_g(22)).bfloat16()
    wkv = (torch.randn(2 * d, hdim, generator=_g(23)) / 32).bfloat16()
    wg = (torch.randn(2 * d, hdim, generator=_g(24)) / 32).bfloat16()
    state = torch.randn(2, ring, 4 * d, generator=_g(25))
    ape = torch.randn(ratio, 2 * d, generator=_g(26))
    nw = torch.rand(d, generator=_g(27)) + 0.5
    ang = torch.randn(b, s // ratio, 32, generator=_g(28)).repeat_interleave(2, -1)
    out = []
    for start in (1000, 1000 % ring + ring):  # every column repeats block 1: position p -> row p % ring
        table = torch.ones(b, (start + s) // ring + 2, dtype=torch.int32)
        kw = dict(state_block_table=table, start_pos=_i32([start]), coff=2, norm_eps=1e-6, rotary_mode=2,
                  cache_mode=1)
        got, want = c.both("compressor", (x, wkv, wg, state, ape, nw, ang.sin(), ang.cos(), 64, ratio), kw,
                           custom=True)
        out.append((f"start_pos {start}", got.float(), want.float(), "bf16"))
    return out


def _gating_norm2(c: Ctx):
    x = torch.randn(5, 16, generator=_g(29))
    bias = torch.randn(16, generator=_g(30)) / 4
    kw = dict(bias=bias, k_group=1, group_count=1, group_select_mode=1, renorm=0, norm_type=2,
              routed_scaling_factor=1.5, eps=1e-20)
    (dy, di, _), (ey, ei, _) = c.both("npu_moe_gating_top_k", (x, 4), kw)
    return [("built-in norm_type=2 ids", di, ei, "exact"), ("weights", dy, ey, "fp32")]


def _init_routing_ties(c: Ctx):
    x = torch.randn(6, 32, generator=_g(31)).bfloat16()
    ids = _i32([[2, 0], [0, 2], [1, 2], [2, 1], [0, 1], [2, 0]])  # many copies per expert: tie order
    kw = dict(active_num=12, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
              active_expert_range=[0, 3], row_idx_type=0)
    got, want = c.both("npu_moe_init_routing_v2", (x, ids), kw)
    return [(f"output {i}", g, w, "exact") for i, (g, w) in enumerate(zip(got[:3], want[:3]))]


def _finalize(c: Ctx):
    rows = torch.randn(12, 32, generator=_g(32)).bfloat16()
    ids = _i32([[2, 0], [0, 2], [1, 2], [2, 1], [0, 1], [2, 0]])
    _, row_idx, _, _ = E.npu_moe_init_routing_v2(torch.zeros(6, 32).bfloat16(), ids, active_num=12, expert_num=3,
                                                 expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                                 active_expert_range=[0, 3])
    got, want = c.both("npu_moe_finalize_routing", (rows, None, None, None, torch.rand(6, 2, generator=_g(33)),
                                                    row_idx, ids), dict(drop_pad_mode=2, k=2))
    return [("drop_pad_mode=2", got.float(), want.float(), "bf16")]


def _hc_pre(c: Ctx):
    n, d = 4, 4096
    x = torch.randn(3, n, d, generator=_g(34)).bfloat16()
    fn = torch.randn((2 + n) * n, n * d, generator=_g(35)) / 64
    out = []
    for mode in ("fp32", "hf32"):
        E.v4_custom.HC_PRE_MATMUL = mode
        got, want = c.both("npu_hc_pre", (x, fn, torch.rand(3, generator=_g(36)) + 0.5,
                                          torch.randn((2 + n) * n, generator=_g(37))),
                           dict(hc_mult=n, hc_sinkhorn_iters=20, norm_eps=1e-6, hc_eps=1e-6), custom=True)
        out += [(f"{mode} emulation, output {i}", g.float(), w.float(), "fp32") for i, (g, w) in enumerate(zip(got, want))]
    E.v4_custom.HC_PRE_MATMUL = "fp32"
    return out


def _sample_eps0(c: Ctx):
    logits = torch.randn(4, 2000, generator=_g(38))
    q = -torch.log(torch.rand(4, 2000, generator=_g(39)))
    kw = dict(q=q, eps=0.0, is_need_logits=False, ks_max=1024, input_is_logits=True, post_sample="qSample")
    (got, gl), (want, wl) = c.both("npu_top_k_top_p_sample", (logits, _i32([5, 0, 1024, 0]),
                                                              torch.tensor([1.0, 0.7, 1.0, 0.95])), kw)
    return [("tokens (eps=0)", got, want, "exact"), ("logits output shape", torch.tensor(gl.shape),
                                                      torch.tensor(wl.shape), "exact")]


def _block_quant(c: Ctx):
    x = torch.randn(4, 256, generator=_g(40)).bfloat16()
    x[0, 3], x[1, 5] = float("inf"), float("nan")
    (dy, ds), (ey, es) = c.both("npu_dynamic_block_quant", (x,), dict(dst_type=torch.float8_e4m3fn))
    return [("FP8 values (inf/NaN zeroed?)", dy.view(torch.uint8), ey.view(torch.uint8), "exact"),
            ("scales", ds, es, "exact")]


def _mx_quant(c: Ctx):
    x = torch.randn(4, 256, generator=_g(41)).bfloat16()
    x[:, 0] = 511.0  # |x / scale| past 448 under the floor rule
    (dy, ds), (ey, es) = c.both("npu_dynamic_mx_quant", (x,), dict(dst_type=torch.float8_e4m3fn, block_size=32))
    return [("MXFP8 values (saturation)", dy.view(torch.uint8), ey.view(torch.uint8), "exact"),
            ("e8m0 pairs", ds.view(torch.uint8), es.view(torch.uint8), "exact")]


CHECKS = [
    Check("dynamic_quant", ("a3", "950"), False, "npu_dynamic_quant int8 rounding mode and the all-zero row",
          _dynamic_quant),
    Check("rotary_mul_bf16", ("a3", "950"), False, "npu_rotary_mul internal precision for bf16", _rotary_bf16),
    Check("scatter_duplicates", ("a3", "950"), False, "which duplicate row wins in npu_scatter_nd_update_ and "
          "scatter_nd_update_asc (emulator: the last); negative rows skipped by the custom op", _scatter_duplicates),
    Check("lightning_indexer_padding", ("a3", "950"), False, "-1 tail and -inf values when fewer keys than "
          "sparse_count are visible; bf16 score accumulation", _li_padding),
    Check("quant_lightning_indexer_int8", ("a3",), False, "fp16 rounding point of w * q_scale (int8 LI)",
          _quant_li_int8),
    Check("quant_lightning_indexer_fp8", ("950",), True, "the 950 FP8 LI (CR custom op) with fp32 weights / scales",
          _quant_li_fp8),
    Check("sparse_attn_sharedkv_k2_1024", ("a3", "950"), True, "K2 = 1024 picks in one call (V4-Pro; the doc lists "
          "512 only, CR's recipe passes cmp_topk = index_topk)", lambda c: _sas(c, 1024, False)),
    Check("sparse_attn_sharedkv_repeats", ("a3", "950"), True, "a repeated cmp index counts once per listing",
          lambda c: _sas(c, 512, True)),
    Check("kv_quant_sparse_attn_sharedkv", ("950",), True, "C8 row layout read by the FP8-KV kernel (rope bytes "
          "first, e4m3 nope, e8m0 tile scales) and its dequantisation", _kv_quant_sas),
    Check("kv_compress_epilog", ("950",), True, "C8 row bytes (CR golden quant_mode 2) incl. untouched padding",
          _kv_compress_epilog),
    Check("indexer_compress_epilog", ("950",), True, "FP8 + fp32 scale per 128 values, all-zero row",
          _indexer_compress_epilog),
    Check("compressor_start_pos", ("a3", "950"), True, "start_pos shifted to start % R + R gives the same entries; "
          "bf16 rounding before the norm; state block_size 8 accepted", _compressor),
    Check("moe_gating_norm_type_2", ("a3", "950"), False, "built-in npu_moe_gating_top_k with norm_type=2",
          _gating_norm2),
    Check("moe_init_routing_ties", ("a3", "950"), False, "stable tie order of npu_moe_init_routing_v2",
          _init_routing_ties),
    Check("moe_finalize_drop_pad_2", ("a3", "950"), False, "npu_moe_finalize_routing drop_pad_mode=2 index "
          "convention", _finalize),
    Check("hc_pre_hf32", ("a3", "950"), True, "whether npu_hc_pre's Cube matmul is HF32 (compare to both "
          "emulations)", _hc_pre),
    Check("top_k_top_p_sample_eps0", ("a3", "950"), False, "eps=0 accepted; empty logits output without "
          "is_need_logits; top-p boundary", _sample_eps0),
    Check("dynamic_block_quant", ("950",), False, "inf/NaN zeroing and x / scale ties in npu_dynamic_block_quant",
          _block_quant),
    Check("dynamic_mx_quant_saturation", ("950",), False, "saturation (not NaN) past 448 and e8m0 pair layout",
          _mx_quant),
]


def _compare(got: torch.Tensor, want: torch.Tensor, how: str) -> tuple[bool, str]:
    """(match, one-line summary) of a device output against the emulator's."""
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} vs emulator {tuple(want.shape)}"
    if how == "exact":
        ok = torch.equal(got, want)
        return ok, "identical" if ok else f"{int((got != want).sum())} of {got.numel()} elements differ"
    if how == "rowsets":
        g, w = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
        bad = [r for r in range(g.shape[0]) if sorted(g[r].tolist()) != sorted(w[r].tolist())]
        return not bad, "same index sets" if not bad else f"rows {bad} differ"
    if how == "tail":  # values where the emulator has -inf: -1 slots
        mask = torch.isinf(want)
        ok = torch.equal(torch.isinf(got), mask)
        return ok, f"-inf at {int(mask.sum())} slots" + ("" if ok else " (device differs)")
    # bf16 outputs: one rounding of fp32 math (2^-8 relative) plus summation order; fp32: order only
    rtol = {"bf16": 2 ** -7, "fp32": 1e-4}[how]
    err = ((got - want).abs() / (want.abs() + 1e-6)).max().item() if got.numel() else 0.0
    ok = torch.allclose(got, want, rtol=rtol, atol=1e-5)
    return ok, f"max rel diff {err:.2e} (bound {rtol:.1e})"


def run_checks(ctx: Ctx, chip: str, only: list[str] | None = None, out=sys.stdout) -> tuple[int, int, int]:
    """Run the checks for `chip`; print one line per compared output. Returns (matched, mismatched, skipped)."""
    good = bad = skipped = 0
    for chk in CHECKS:
        if (only and chk.name not in only) or chip not in chk.chips:
            continue
        if chk.custom and ctx.custom is None:
            print(f"SKIP  {chk.name}: CR's custom_ops wheel not installed ({chk.settles})", file=out)
            skipped += 1
            continue
        try:
            results = chk.run(ctx)
        except Exception as e:  # noqa: BLE001 - a failing op is a finding, reported and counted
            print(f"FAIL  {chk.name}: raised {type(e).__name__}: {e}", file=out)
            bad += 1
            continue
        for label, got, want, how in results:
            ok, msg = _compare(got, want, how)
            print(f"{'OK  ' if ok else 'FAIL'}  {chk.name} [{label}]: {msg}", file=out)
            if not ok:
                print(f"        settles: {chk.settles}\n        device:   {got.flatten()[:8].tolist()}\n"
                      f"        emulator: {want.flatten()[:8].tolist()}", file=out)
        if all(_compare(g, w, h)[0] for _, g, w, h in results):
            good += 1
        else:
            bad += 1
    return good, bad, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chip", choices=("a3", "950"), default="a3", help="which checks to run (default a3; A2 too)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    ap.add_argument("--list", action="store_true", help="list the checks and what each settles, then exit")
    args = ap.parse_args(argv)
    if args.list:
        for chk in CHECKS:
            print(f"{chk.name:32} {'/'.join(chk.chips):7} {'custom' if chk.custom else 'built-in':8} {chk.settles}")
        return 0
    unknown = sorted(set(args.only or ()) - {c.name for c in CHECKS})
    if unknown:
        print(f"npu_check: unknown check(s) {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    ok, why = npu_available()
    if not ok:
        print(f"npu_check: needs torch_npu and a visible Ascend NPU ({why}). These checks compare the device with "
              "the CPU emulator; there is nothing to compare on this machine.", file=sys.stderr)
        return 2
    import torch_npu  # noqa: F401 - registers torch.npu

    ctx = Ctx(torch_npu, load_custom_ops(), "npu")
    print(f"torch_npu {getattr(torch_npu, '__version__', '?')}, custom ops: "
          f"{'torch.ops.custom' if ctx.custom is not None else 'not installed'}, chip {args.chip}")
    good, bad, skipped = run_checks(ctx, args.chip, args.only)
    print(f"{good} checks match the emulator, {bad} differ, {skipped} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
