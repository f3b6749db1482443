"""AscendBackend: the Backend ops expressed through torch_npu built-ins and the V4 custom ops.

The operator module is a parameter: `npu` is torch_npu on an NPU and `dsv4_ascend.ops.emulator` elsewhere;
`custom` is the provider of the V4 custom ops (`torch.ops.custom` from cann-recipes-infer's `custom_ops` wheel
on an NPU, the emulator on CPU) or None, in which case the steps it would cover run as the plain composites
AscendBackend inherits from ReferenceBackend (the device version falls back to the plain one by inheritance).
Every op converts the model's layouts (docs/design.md) to the op's documented layouts; the op-by-op map, with
what is built-in, custom or composite, is in docs/ascend.md.

Quantisation (`quant`) is a scheme object that owns its prepared weights (`self.scheme`, None for "bf16"):
- "bf16": linears are plain matmuls in the model dtype (A2/A3 have no FP8; FP8/FP4 checkpoint weights are
  dequantised per call, the conversion step belongs offline).
- "w8a8" / "w4a8": `Int8Scheme` (ops/int8_schemes.py), Atlas A2/A3 per-channel int8 (int4 routed experts for
  "w4a8") after `prepare(model)` or a converted checkpoint's `register_*` calls.
- "fp8" / "mxfp8": `Lowp950Scheme` (ops/schemes_950.py), the Ascend 950's FP8-block / MXFP8 linears and MXFP4
  experts on the official checkpoint as stored.
Attention (indexer, compressor, npu_sparse_attn_sharedkv) is mapped in ops/attention_map.py.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv4_ascend import quant as _quant
from dsv4_ascend import sampling as _sampling
from dsv4_ascend.backend import RunOptions, redirect_skipped_rows
from dsv4_ascend.cache import c8_pack
from dsv4_ascend.reference import ReferenceBackend

from . import emulator
from .attention_map import AttentionMapping
from .int8_schemes import Int8Scheme
from .npu import custom_or_emulated, load_custom_ops, npu_available
from .schemes_950 import Lowp950Scheme

__all__ = ["AscendBackend", "default_npu", "QUANT_MODES"]

# Every `quant` AscendBackend accepts (extend here; __init__ checks against it).
QUANT_MODES: tuple[str, ...] = ("bf16", "w8a8", "fp8", "mxfp8", "w4a8")
_ASC_SCATTER_DTYPES = (torch.bfloat16, torch.float16, torch.int8)  # scatter_nd_update_asc's var dtypes
_ASC_SCATTER_WIDTHS = (1, 128, 512)  # and its only row widths s (CR custom-scatter_nd_update_asc doc)
_SAMPLE_KS_MAX = 1024  # npu_top_k_top_p_sample: largest top_k it applies (larger ones skip the stage)
_dense = _quant.dequantize  # one home for the formats: dsv4_ascend.quant


def default_npu():
    """(npu module, custom provider, reason): torch_npu when it imports and sees an NPU, else the emulator."""
    ok, why = npu_available()
    if ok:
        return importlib.import_module("torch_npu"), load_custom_ops(), "torch_npu"
    return emulator, emulator, f"emulator ({why})"


class AscendBackend(AttentionMapping, ReferenceBackend):
    """Backend ops through torch_npu (or its emulator) and the V4 custom ops; ReferenceBackend where none fits."""

    name = "ascend"

    def __init__(self, npu=None, options: RunOptions | None = None, quant: str = "bf16", custom="auto",
                 nz_weights: bool | None = None) -> None:
        super().__init__(options)
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(map(repr, QUANT_MODES))}, found {quant!r}")
        if npu is None:
            npu, auto_custom, self.provider = default_npu()
        else:
            auto_custom = emulator if npu is emulator else load_custom_ops()
            self.provider = getattr(npu, "__name__", type(npu).__name__)
        self.npu = npu
        self.custom = auto_custom if custom == "auto" else custom
        self.quant = quant
        self.emulated = bool(getattr(npu, "IS_EMULATOR", False))
        # FRACTAL_NZ for int8 weights on A2/A3 (a no-op in the emulator); callers on 950 pass False.
        self.nz_weights = (not self.emulated) if nz_weights is None else nz_weights
        self.scheme: Int8Scheme | Lowp950Scheme | None = None
        if quant in ("w8a8", "w4a8"):
            self.scheme = Int8Scheme(npu, self.custom, int4_experts=quant == "w4a8", nz_weights=self.nz_weights)
        elif quant in ("fp8", "mxfp8"):
            self.scheme = Lowp950Scheme(npu, mx=quant == "mxfp8")
        # The 950 recipe writes C8 (FP8 KV) rows with CR's kv_compress_epilog (quantise + pack + scatter in one op);
        # Transformer.new_cache hands this hook to the cache. None elsewhere: the cache packs, scatter_rows writes.
        self.c8_write = (self._kv_compress_epilog if quant in ("fp8", "mxfp8") and self.custom is not None
                         and hasattr(self.custom, "kv_compress_epilog") else None)

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> "AscendBackend":
        """Let the scheme prepare its weights once (int8 / int4 tables, 950 layouts); nothing to do for "bf16"."""
        if self.scheme is not None:
            self.scheme.prepare(model)
        return self

    # ---- already-quantised A2/A3 weights (`dsv4 convert --target a3`, see dsv4_ascend/convert.py) -------------
    def _int8_scheme(self, int4: bool = False) -> Int8Scheme:
        if not isinstance(self.scheme, Int8Scheme) or (int4 and not self.scheme.int4_experts):
            want = "quant='w4a8'" if int4 else "quant='w8a8' or 'w4a8'"
            raise ValueError(f"{'int4 routed experts' if int4 else 'int8 weights'} need AscendBackend({want}), "
                             f"this one is quant={self.quant!r}")
        return self.scheme

    def register_linear(self, key: Tensor, q_kn: Tensor, scale: Tensor, nz: bool | None = None) -> None:
        """A W8A8 linear: q_kn int8 [K, N], scale fp32 [N]."""
        self._int8_scheme().register_linear(key, q_kn, scale, nz)

    def register_shared(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """The shared expert: w13 int8 [D, 2I] (gate columns, then up), w13_s [2I]; w2 int8 [I, D], w2_s [D]."""
        self._int8_scheme().register_shared(key, w13_kn, w13_s, w2_kn, w2_s, nz)

    def register_routed(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """Routed experts: w13 int8 [E, D, 2I], w13_s [E, 2I]; w2 int8 [E, I, D], w2_s [E, D]."""
        self._int8_scheme().register_routed(key, w13_kn, w13_s, w2_kn, w2_s, nz)

    def register_routed_int4(self, key: Tensor, w13_packed: Tensor, w13_s: Tensor, w13_bias: Tensor,
                             w2_packed: Tensor, w2_s: Tensor, w2_bias: Tensor, nz: bool | None = None) -> None:
        """W4A8 routed experts, already converted (see Int8Scheme.register_routed_int4). Only quant="w4a8"."""
        self._int8_scheme(int4=True).register_routed_int4(key, w13_packed, w13_s, w13_bias, w2_packed, w2_s,
                                                          w2_bias, nz)

    # ---- elementwise ------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        gamma = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
        return self.npu.npu_rms_norm(x, gamma, eps)[0]

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # Model layout: x [..., r], cos/sin [..., r/2] broadcastable. Both ops want 4-D BSND with r1/r2
        # [B,S,1,D]-style full-width (pair-repeated) tables: flatten every leading dim into S.
        r = x.shape[-1]
        lead = x.shape[:-1]
        c = cos.repeat_interleave(2, -1).expand(*lead, r).reshape(1, -1, 1, r)
        s = sin.repeat_interleave(2, -1).expand(*lead, r).reshape(1, -1, 1, r)
        x4 = x.reshape(1, -1, 1, r).clone()
        if self.custom is not None:
            # CR's custom op: in place, fp32 cos/sin with bf16 x allowed (no rounding of the tables).
            self.custom.inplace_partial_rotary_mul(x4, c.float(), s.float(), rotary_mode="interleave",
                                                   partial_slice=[0, r])
            return x4.view(*lead, r)
        # Built-in: r1/r2 must share x's dtype, so the tables are rounded to it.
        y = self.npu.npu_rotary_mul(x4, c.to(x.dtype), s.to(x.dtype), rotary_mode="interleave")
        return y.view(*lead, r)

    # ---- GEMMs -------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        y = None if self.scheme is None else self.scheme.linear(x, weight, scale)
        if y is not None:
            return y
        if scale is None:
            return torch.matmul(x, weight.to(x.dtype).t())
        if self.options.deepseek:  # reference numerics: FP8 act-quant simulation, fp32 GEMM
            return F.linear(self._act_quant_dequant(x), _dense(weight, scale, torch.float32)).to(x.dtype)
        return torch.matmul(x, _dense(weight, scale, x.dtype).t())

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        y = None if self.scheme is None else self.scheme.grouped_linear(x, weight, scale)
        if y is not None:
            return y
        # x [..., G, Kg], weight [G*N, Kg]: npu_transpose_batchmatmul with x as [T, G, Kg] (perm_x1 -> [G, T, Kg]),
        # weight as [G, N, Kg] (perm_x2 -> [G, Kg, N]) and the result [G, T, N] permuted back to [T, G, N].
        g, kg = x.shape[-2], x.shape[-1]
        w = _dense(weight, scale, x.dtype).view(g, -1, kg)
        x3 = x.reshape(-1, g, kg)
        y = self.npu.npu_transpose_batchmatmul(x3, w, perm_x1=(1, 0, 2), perm_x2=(0, 2, 1), perm_y=(1, 0, 2))
        return y.view(*x.shape[:-1], -1)

    # ---- inherited composites ---------------------------------------------------------------------------------
    # No fused op covers these V4 steps at this Backend contract (docs/ascend.md), so ReferenceBackend's plain
    # torch runs them: hc_head (CR runs it in plain fp32 torch too), compress (the pooling step of the composite
    # compressor, used where no custom provider is installed) and sparse_attention (a gathered pool with indices
    # and no positions, which npu_sparse_attn_sharedkv cannot express; `attend` reaches the kernel instead).

    # ---- mHC -------------------------------------------------------------------------------------------------
    def hc_pre(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, norm_eps: float,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[-2]
        if self.custom is not None:
            return self.custom.npu_hc_pre(x, fn, scale, base, hc_mult=n, hc_sinkhorn_iters=iters,
                                          norm_eps=norm_eps, hc_eps=hc_eps)
        return super().hc_pre(x, fn, base, scale, iters, norm_eps, hc_eps)

    def hc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        if self.custom is not None:
            return self.custom.npu_hc_post(f, x, post, comb)
        return super().hc_post(f, x, post, comb)

    # ---- MoE ---------------------------------------------------------------------------------------------------
    def route(self, logits: Tensor, bias: Tensor | None, hash_ids: Tensor | None, k: int,
              route_scale: float) -> tuple[Tensor, Tensor]:
        if self.custom is not None:
            # Hash layers: the op looks up tid2eid[input_ids]; the model already did that lookup, so pass the
            # looked-up rows as the table and 0..T-1 as ids (same result, same kernel path).
            kw = {}
            if hash_ids is not None:
                kw = dict(input_ids=torch.arange(logits.shape[0], device=logits.device),
                          tid2eid=hash_ids.to(torch.int32))
            y, ids, _ = self.custom.npu_moe_gating_top_k(
                logits.float(), k, bias=None if bias is None else bias.float(), k_group=1, group_count=1,
                group_select_mode=1, routed_scaling_factor=route_scale, eps=1e-20, renorm=0, norm_type=2,
                **kw)
            return y.float(), ids.long()
        scores = F.softplus(logits.float()).sqrt()
        if hash_ids is not None:
            ids = hash_ids.long()
        else:
            ids = (scores if bias is None else scores + bias.float()).topk(k, dim=-1).indices
        w = scores.gather(-1, ids)
        return w / (w.sum(-1, keepdim=True) + 1e-20) * route_scale, ids

    def _fused_w13(self, w1: Tensor, w3: Tensor, s1, s3, dt) -> Tensor:
        """[E, D, 2I]: gate columns then up columns (the GMM1 weight layout, x [M, D] @ w [D, 2I])."""
        return torch.cat([_dense(w1, s1, dt), _dense(w3, s3, dt)], 1).transpose(1, 2)

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                s1: Tensor | None, s2: Tensor | None, s3: Tensor | None, limit: float,
                sync_free: bool = False, shared: Tensor | None = None) -> Tensor:
        # init_routing_v2 (sort copies by expert) -> GMM1 (w13) -> clamped SwiGLU -> GMM2 (w2) -> finalize_routing.
        # Every shape is static (T*k rows); group_list is a device tensor, so nothing syncs to the host on the
        # device, and the emulator's ops are tensor code too (graph mode traces them on CPU).
        y = None if self.scheme is None else self.scheme.experts(x, weights, ids, w1, w2, w3, s1, s2, s3, limit,
                                                                     shared)
        if y is not None:
            return y
        t, k = ids.shape
        n_exp = w1.shape[0]
        dt = x.dtype
        xin = x
        if self.options.deepseek and s1 is not None:  # DeepSeek's act-quant in front of FP8/FP4 GEMMs (as linear)
            xin = self._act_quant_dequant(x).to(dt)
        ex, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            xin, ids.to(torch.int32), active_num=t * k, expert_num=n_exp, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, n_exp], row_idx_type=0)
        gmm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        inter = w1.shape[1]
        h = self.npu.npu_grouped_matmul([ex], [self._fused_w13(w1, w3, s1, s3, dt)], **gmm)[0]
        g = h[:, :inter].float().clamp(max=limit)
        u = h[:, inter:].float().clamp(-limit, limit)
        # DeepSeek's order: the routing weight scales the SwiGLU output before the down projection (fp32).
        w_rows = torch.empty(t * k, dtype=torch.float32, device=x.device)
        w_rows[row_idx.long()] = weights.reshape(-1).float()
        hh = (F.silu(g) * u * w_rows.unsqueeze(-1)).to(dt)
        if self.options.deepseek and s2 is not None:
            hh = self._act_quant_dequant(hh).to(dt)
        y = self.npu.npu_grouped_matmul([hh], [_dense(w2, s2, dt).transpose(1, 2)], **gmm)[0]
        # The shared expert's output goes in as skip1: added to the fp32 sum before the one cast (DeepSeek's MoE).
        return self.npu.npu_moe_finalize_routing(y, shared, None, None, None, row_idx, ids.to(torch.int32),
                                                 drop_pad_mode=2, k=k)

    def custom_or_emulated(self, name: str):
        """A custom op from the provider, or the emulator's when none is installed (CPU reference semantics)."""
        return custom_or_emulated(self.custom, name)

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        y = None if self.scheme is None else self.scheme.swiglu_mlp(x, w1, w2, w3, s1, s2, s3, limit)
        if y is not None:
            return y
        g = self.linear(x, w1, s1).float().clamp(max=limit)
        u = self.linear(x, w3, s3).float().clamp(-limit, limit)
        return self.linear((F.silu(g) * u).to(x.dtype), w2, s2)

    # ---- cache writes and sampling ---------------------------------------------------------------------------
    def scatter_rows(self, dst: Tensor, rows: Tensor, src: Tensor) -> None:
        """dst[rows[i]] = src[i] in place, negative rows skipped: CR's `scatter_nd_update_asc` when a provider
        exists and dst fits it (bf16 / fp16 / int8 (uint8 as int8), s in {1, 128, 512}, u <= R), else the built-in
        `npu_scatter_nd_update_` after redirecting skipped rows onto a copy of the last valid write (the built-in
        does not document skipping negative indices); both sync-free."""
        src = src.to(dst.dtype)
        if dst.dtype == torch.uint8:  # C8 fp8 bytes: the ops take int8; same bytes
            dst, src = dst.view(torch.int8), src.view(torch.int8)
        rows = rows.long()
        if (self.custom is not None and hasattr(self.custom, "scatter_nd_update_asc")
                and dst.dtype in _ASC_SCATTER_DTYPES and dst.shape[1] in _ASC_SCATTER_WIDTHS
                and rows.shape[0] <= dst.shape[0] and dst.is_contiguous()):
            self.custom.scatter_nd_update_asc(dst, rows.unsqueeze(1), src.contiguous())
            return
        idx, upd = redirect_skipped_rows(dst, rows, src)
        self.npu.npu_scatter_nd_update_(dst, idx.unsqueeze(1), upd.contiguous())

    def _kv_compress_epilog(self, dst: Tensor, rows: Tensor, values: Tensor, rope_dim: int,
                            dtype: torch.dtype) -> None:
        """C8 rows through CR's `kv_compress_epilog(cache, x, slot_mapping, quant_group_size=64, quant_mode=2,
        round_scale_flag=True)` (950): bf16 x with 64 rope values, the op's only documented split; otherwise the
        cache's own packing (`c8_pack`, the same layout and scale rule) and `scatter_rows`."""
        if rope_dim != 64 or dtype != torch.bfloat16:
            self.scatter_rows(dst, rows, c8_pack(values, rope_dim, dtype))
            return
        self.custom.kv_compress_epilog(dst.view(torch.float8_e4m3fn), values.to(dtype).contiguous(), rows,
                                       quant_group_size=64, quant_mode=2, round_scale_flag=True)

    def sample(self, logits: Tensor, sb: _sampling.SamplingBatch, step: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling through `npu_top_k_top_p_sample` (qSample) with q = -log(u) from the reference's counter-based
        noise, so tokens equal `sampling.sample`'s; sync-free.

        The op takes the temperature-scaled logits and reads q by sorted position, as the reference adds its
        Gumbel noise -log(-log u) by sorted position: argmax(p / E) = argmax(log p - log E). Rows the op cannot
        express take the reference's token (torch.where): greedy (temperature 0), top_k in (1024, V), top-k and
        top-p together (the op renormalises over the top-k before the top-p cut, the reference does not), and
        neither filter (the op then reads q by token id). Logprobs: log-softmax of the raw logits, as the reference.
        """
        logits = logits.float()
        ref_tokens, _ = _sampling.sample(logits, sb, step)
        vocab = logits.shape[-1]
        k, p = sb.top_k, sb.top_p.float()
        k_on, p_on = (k > 0) & (k < vocab), p < 1
        ok = (sb.temperature > 0) & (k_on ^ p_on) & (~k_on | (k <= _SAMPLE_KS_MAX))
        scaled = logits / sb.temperature.clamp(min=1e-5).unsqueeze(1)
        q = (-torch.log(_sampling.uniform_noise(sb.seed, step, vocab))).float()  # Exp(1) noise, > 0
        picked, _ = self.npu.npu_top_k_top_p_sample(
            scaled, torch.where(k_on, k, 0).to(torch.int32), torch.where(p_on, p, 1.0), q=q, eps=0.0,
            is_need_logits=False, ks_max=_SAMPLE_KS_MAX, input_is_logits=True, post_sample="qSample")
        tokens = torch.where(ok, picked.long(), ref_tokens)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(1)).squeeze(1)
