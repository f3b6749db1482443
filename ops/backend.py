"""AscendBackend: the Backend ops expressed through torch_npu built-ins and the V4 custom ops.

The operator module is a parameter: `npu` is torch_npu on an NPU and `dsv4_ascend.ops.emulator` elsewhere;
`custom` is the provider of the V4 custom ops (`torch.ops.custom` from cann-recipes-infer's `custom_ops` wheel
on an NPU, the emulator on CPU) or None, in which case the steps it would cover run as composites of
built-in/aten ops. Every op converts the model's layouts (docs/design.md) to the op's documented layouts.
The op-by-op map, with what is built-in, custom or composite, is in docs/ascend.md.

Quantisation (`quant`):
- "bf16": linears are plain matmuls in the model dtype (A2/A3 have no FP8; FP8/FP4 checkpoint weights are
  dequantised per call, the conversion step belongs offline).
- "w8a8": after `prepare(model)`, the linears Huawei quantises on A2/A3 (q_b, o_b, indexer q_b, shared and routed
  experts) hold per-channel int8 weights (s = rowmax|w|/127, q = clamp(rint(w/s), +-127)) and run as
  npu_dynamic_quant (per-token int8) + npu_quant_matmul / npu_grouped_matmul with int32 accumulation; the rest
  stays bf16, as in CR's W8A8C16 scheme. Without prepare() every linear stays bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv4_ascend import quant as _quant
from dsv4_ascend.backend import Backend, RunOptions
from dsv4_ascend.reference import ReferenceBackend

from . import emulator
from .npu import load_custom_ops, npu_available

__all__ = ["AscendBackend", "default_npu"]

_ACL_FORMAT_NZ = 29
_LI_BLOCK = 16  # paged-key block size handed to the lightning indexer (device: multiple of 16, <= 1024)


def default_npu():
    """(npu module, custom provider, reason): torch_npu when it imports and sees an NPU, else the emulator."""
    ok, why = npu_available()
    if ok:
        import importlib

        return importlib.import_module("torch_npu"), load_custom_ops(), "torch_npu"
    return emulator, emulator, f"emulator ({why})"


def _quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of w [..., N, K]: (int8 [..., N, K], fp32 scale [..., N])."""
    wf = w.float()
    s = wf.abs().amax(-1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wf / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, s


_dense = _quant.dequantize  # one home for the formats: dsv4_ascend.quant


class AscendBackend(Backend):
    """Backend ops through torch_npu (or its emulator) and the V4 custom ops."""

    name = "ascend"

    def __init__(self, npu=None, options: RunOptions | None = None, quant: str = "bf16", custom="auto",
                 nz_weights: bool | None = None) -> None:
        super().__init__(options)
        if quant not in ("bf16", "w8a8"):
            raise ValueError(f"quant must be 'bf16' or 'w8a8', found {quant!r}")
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
        self._w8: dict[int, tuple[Tensor, Tensor]] = {}       # id(weight) -> (int8 [K, N], fp32 scale [N])
        self._experts8: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # id(w1) -> w13q, w13s, w2q, w2s
        self._shared8: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._keep: list[Tensor] = []  # keeps prepared source tensors alive so their ids stay unique

    # ---- preparation (W8A8) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module) -> "AscendBackend":
        """Convert the weights CR quantises on A2/A3 to per-channel int8, once. Only for quant="w8a8"."""
        if self.quant != "w8a8":
            return self
        from dsv4_ascend.model import Attention, Expert, Indexer, RoutedExperts

        for mod in model.modules():
            if isinstance(mod, Attention):
                for lin in (mod.wq_b, mod.wo_b):
                    self._prepare_linear(lin.weight, lin.scale)
            elif isinstance(mod, Indexer):
                self._prepare_linear(mod.wq_b.weight, mod.wq_b.scale)
            elif isinstance(mod, Expert):
                self._prepare_shared(mod)
            elif isinstance(mod, RoutedExperts):
                self._prepare_routed(mod)
        return self

    def _nz(self, t: Tensor, nz: bool | None = None) -> Tensor:
        return self.npu.npu_format_cast(t, _ACL_FORMAT_NZ) if (self.nz_weights if nz is None else nz) else t

    def _prepare_linear(self, weight: Tensor, scale: Tensor | None) -> None:
        q, s = _quantize_per_channel(_dense(weight, scale, torch.float32))
        self.register_linear(weight, q.t().contiguous(), s)

    def _prepare_shared(self, mod) -> None:
        w1 = _dense(mod.w1.weight, mod.w1.scale, torch.float32)
        w3 = _dense(mod.w3.weight, mod.w3.scale, torch.float32)
        w13q, w13s = _quantize_per_channel(torch.cat([w1, w3], 0))  # [2I, D]
        w2q, w2s = _quantize_per_channel(_dense(mod.w2.weight, mod.w2.scale, torch.float32))  # [D, I]
        self.register_shared(mod.w1.weight, w13q.t().contiguous(), w13s, w2q.t().contiguous(), w2s)

    def _prepare_routed(self, mod) -> None:
        w1 = _dense(mod.w1, mod.w1_scale, torch.float32)  # [E, I, D]
        w3 = _dense(mod.w3, mod.w3_scale, torch.float32)
        w13q, w13s = _quantize_per_channel(torch.cat([w1, w3], 1))  # [E, 2I, D], [E, 2I]
        w2q, w2s = _quantize_per_channel(_dense(mod.w2, mod.w2_scale, torch.float32))  # [E, D, I], [E, D]
        self.register_routed(mod.w1, w13q.transpose(1, 2).contiguous(), w13s, w2q.transpose(1, 2).contiguous(),
                             w2s)

    # Already-quantised W8A8 weights (prepare() above, or a checkpoint written by `dsv4 convert --target a3`,
    # see dsv4_ascend/convert.py). `key` is the model parameter the model passes to the op (w1 for experts);
    # weights are int8 in the op's [K, N] layout, scales fp32 per output channel. nz=None: self.nz_weights.
    def _check_w8a8(self) -> None:
        if self.quant != "w8a8":
            raise ValueError("int8 weights need AscendBackend(quant='w8a8')")

    def register_linear(self, key: Tensor, q_kn: Tensor, scale: Tensor, nz: bool | None = None) -> None:
        """A W8A8 linear: q_kn int8 [K, N], scale fp32 [N]."""
        self._check_w8a8()
        self._w8[id(key)] = (self._nz(q_kn, nz), scale.float().reshape(-1))
        self._keep.append(key)

    def register_shared(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """The shared expert: w13 int8 [D, 2I] (gate columns, then up), w13_s [2I]; w2 int8 [I, D], w2_s [D]."""
        self._check_w8a8()
        self._shared8[id(key)] = (self._nz(w13_kn, nz), w13_s.float().reshape(-1), self._nz(w2_kn, nz),
                                  w2_s.float().reshape(-1))
        self._keep.append(key)

    def register_routed(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """Routed experts: w13 int8 [E, D, 2I], w13_s [E, 2I]; w2 int8 [E, I, D], w2_s [E, D]."""
        self._check_w8a8()
        self._experts8[id(key)] = (self._nz(w13_kn, nz), w13_s.float(), self._nz(w2_kn, nz), w2_s.float())
        self._keep.append(key)

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
    def _act_quant_sim(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 128:
            return x.float()
        q, s = _quant.act_quant(x, 128)
        return (q.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        w8 = self._w8.get(id(weight))
        if w8 is not None:
            k = x.shape[-1]
            xq, xs = self.npu.npu_dynamic_quant(x.reshape(-1, k))
            y = self.npu.npu_quant_matmul(xq, w8[0], w8[1], pertoken_scale=xs, output_dtype=x.dtype)
            return y.view(*x.shape[:-1], -1)
        if scale is None:
            return torch.matmul(x, weight.to(x.dtype).t())
        if self.options.deepseek:  # reference numerics: FP8 act-quant simulation, fp32 GEMM
            return F.linear(self._act_quant_sim(x), _dense(weight, scale, torch.float32)).to(x.dtype)
        return torch.matmul(x, _dense(weight, scale, x.dtype).t())

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        # x [..., G, Kg], weight [G*N, Kg]: npu_transpose_batchmatmul with x as [T, G, Kg] (perm_x1 -> [G, T, Kg]),
        # weight as [G, N, Kg] (perm_x2 -> [G, Kg, N]) and the result [G, T, N] permuted back to [T, G, N].
        g, kg = x.shape[-2], x.shape[-1]
        w = _dense(weight, scale, x.dtype).view(g, -1, kg)
        x3 = x.reshape(-1, g, kg)
        y = self.npu.npu_transpose_batchmatmul(x3, w, perm_x1=(1, 0, 2), perm_x2=(0, 2, 1), perm_y=(1, 0, 2))
        return y.view(*x.shape[:-1], -1)

    # ---- composites ------------------------------------------------------------------------------------------
    # No fused op covers these V4 steps at this Backend contract (see docs/ascend.md), so the composite of
    # built-in ops is exactly the reference's plain-torch code: one implementation, shared.
    # hc_head: CR runs it in plain fp32 torch too. compress: the custom `compressor` op fuses projection, state,
    # norm and RoPE (a coarser step). sparse_attention: the contract hands one gathered pool with indices and no
    # positions, which npu_sparse_attn_sharedkv cannot express (it needs positions and K2 = 512).
    _hc_mix = ReferenceBackend._hc_mix
    hc_head = ReferenceBackend.hc_head
    compress = ReferenceBackend.compress
    sparse_attention = ReferenceBackend.sparse_attention

    # ---- mHC -------------------------------------------------------------------------------------------------
    def hc_pre(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, norm_eps: float,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[-2]
        if self.custom is not None:
            return self.custom.npu_hc_pre(x, fn, scale, base, hc_mult=n, hc_sinkhorn_iters=iters,
                                          norm_eps=norm_eps, hc_eps=hc_eps)
        return ReferenceBackend.hc_pre(self, x, fn, base, scale, iters, norm_eps, hc_eps)

    def hc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        if self.custom is not None:
            return self.custom.npu_hc_post(f, x, post, comb)
        return ReferenceBackend.hc_post(self, f, x, post, comb)

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, n_visible: Tensor, k: int) -> Tensor:
        # Every query becomes its own batch of one token (TND, actual_seq_lengths_query = 1..T) whose key length
        # is its n_visible compressed entries: with cmp_ratio 1 and sparse_mode 3 the op's right-down causal
        # mask is then exactly "entry w < n_visible[t]", for any n_visible (prefill or decode), without host syncs.
        b, s, h, di = q.shape
        n = keys.shape[1]
        kk = min(k, n)
        if n == 0:
            return torch.full((b, s, 0), -1, dtype=torch.long, device=q.device)
        nblk = -(-n // _LI_BLOCK)
        t = b * s
        dev = q.device
        table = (torch.arange(b, device=dev) * nblk).unsqueeze(1) + torch.arange(nblk, device=dev)
        table = table.repeat_interleave(s, 0).to(torch.int32)  # [T, nblk]
        asl_q = torch.arange(1, t + 1, device=dev, dtype=torch.int32)
        asl_k = n_visible.reshape(t).clamp(0, n).to(torch.int32)
        pad = nblk * _LI_BLOCK - n
        if self.quant == "w8a8":
            qi, qs = self.npu.npu_dynamic_quant(q.reshape(t, h, di))  # per token-head
            ki, ks = self.npu.npu_dynamic_quant(keys)  # per key
            kcache = F.pad(ki, (0, 0, 0, pad)).view(b * nblk, _LI_BLOCK, 1, di)
            kscale = F.pad(ks, (0, pad)).view(b * nblk, _LI_BLOCK, 1).to(torch.float16)
            idx, _ = self.npu.npu_quant_lightning_indexer(
                qi, kcache, weights.reshape(t, h).to(torch.float16), qs.to(torch.float16), kscale,
                actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k, block_table=table,
                query_quant_mode=0, key_quant_mode=0, layout_query="TND", layout_key="PA_BSND",
                sparse_count=kk, sparse_mode=3)
        else:
            kcache = F.pad(keys.to(q.dtype), (0, 0, 0, pad)).view(b * nblk, _LI_BLOCK, 1, di)
            idx = self.npu.npu_lightning_indexer(
                q.reshape(t, h, di), kcache, weights.reshape(t, h, 1).to(q.dtype),
                actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k, block_table=table,
                layout_query="TND", layout_key="PA_BSND", sparse_count=kk, sparse_mode=3)
        return idx.view(b, s, kk).long()

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
                routed_scaling_factor=route_scale, eps=1e-20, renorm=0, norm_type=2, **kw)
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
                sync_free: bool = False) -> Tensor:
        # init_routing_v2 (sort copies by expert) -> GMM1 (w13) -> clamped SwiGLU -> GMM2 (w2) -> finalize_routing.
        # Every shape is static (T*k rows); group_list is a device tensor, so nothing syncs to the host on the
        # device. (The emulator's grouped matmul reads group_list on the host, like any CPU loop.)
        t, k = ids.shape
        n_exp = w1.shape[0]
        dt = x.dtype
        prepared = self._experts8.get(id(w1))
        ex, row_idx, counts, ex_scale = self.npu.npu_moe_init_routing_v2(
            x, ids.to(torch.int32), active_num=t * k, expert_num=n_exp, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=1 if prepared is not None else -1,
            active_expert_range=[0, n_exp], row_idx_type=0)
        gmm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        if prepared is not None:
            w13q, w13s, w2q, w2s = prepared
            h32 = self.npu.npu_grouped_matmul([ex], [w13q], output_dtype=torch.int32, **gmm)[0]
            hq, hs = self.custom_or_emulated("npu_dequant_swiglu_clamp_quant")(
                h32, weight_scale=w13s, activation_scale=ex_scale, group_index=counts, activate_left=True,
                quant_mode=1, swiglu_mode=1, clamp_limit=limit, glu_alpha=1.0, glu_bias=0.0)
            y = self.npu.npu_grouped_matmul([hq], [w2q], scale=[w2s], per_token_scale=[hs], output_dtype=dt,
                                            **gmm)[0]
            scales = weights.to(dt)
        else:
            inter = w1.shape[1]
            h = self.npu.npu_grouped_matmul([ex], [self._fused_w13(w1, w3, s1, s3, dt)], **gmm)[0]
            g = h[:, :inter].float().clamp(max=limit)
            u = h[:, inter:].float().clamp(-limit, limit)
            # DeepSeek's order: the routing weight scales the SwiGLU output before the down projection (fp32).
            w_rows = torch.empty(t * k, dtype=torch.float32, device=x.device)
            w_rows[row_idx.long()] = weights.reshape(-1).float()
            hh = (F.silu(g) * u * w_rows.unsqueeze(-1)).to(dt)
            y = self.npu.npu_grouped_matmul([hh], [_dense(w2, s2, dt).transpose(1, 2)], **gmm)[0]
            scales = None
        return self.npu.npu_moe_finalize_routing(y, None, None, None, scales, row_idx, ids.to(torch.int32),
                                                 drop_pad_mode=2)

    def custom_or_emulated(self, name: str):
        """A custom op from the provider, or the emulator's when none is installed (CPU reference semantics)."""
        if self.custom is not None and hasattr(self.custom, name):
            return getattr(self.custom, name)
        return getattr(emulator, name)

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        prepared = self._shared8.get(id(w1))
        if prepared is not None:
            w13q, w13s, w2q, w2s = prepared
            x2 = x.reshape(-1, x.shape[-1])
            xq, xs = self.npu.npu_dynamic_quant(x2)
            h32 = self.npu.npu_quant_matmul(xq, w13q, w13s, pertoken_scale=xs, output_dtype=torch.int32)
            hq, hs = self.custom_or_emulated("npu_dequant_swiglu_clamp_quant")(
                h32, weight_scale=w13s, activation_scale=xs, activate_left=True, quant_mode=1, swiglu_mode=1,
                clamp_limit=limit, glu_alpha=1.0, glu_bias=0.0)
            y = self.npu.npu_quant_matmul(hq, w2q, w2s, pertoken_scale=hs, output_dtype=x.dtype)
            return y.view(*x.shape[:-1], -1)
        g = self.linear(x, w1, s1).float().clamp(max=limit)
        u = self.linear(x, w3, s3).float().clamp(-limit, limit)
        return self.linear((F.silu(g) * u).to(x.dtype), w2, s2)
