"""Atlas A2/A3 integer schemes: CR's W8A8C16 ("w8a8") and Hybrid INT8-INT4 ("w4a8", int4 routed experts).

One `Int8Scheme` object per AscendBackend owns the prepared weights (vLLM's quant-method pattern): per-channel int8
linears in the op's [K, N] layout (q_b, o_b, indexer q_b: cann-recipes-infer's W8A8C16 set), the shared expert,
and the routed experts (int8, or int4 packed for the A8W4 grouped matmul). Weights are found by the identity of
the model parameter the Backend op receives (the Backend seam passes tensors, not modules); the scheme keeps those
parameters alive so the identities stay unique. Each op method returns None for a weight it does not own, and
AscendBackend then runs its bf16 path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dsv4_ascend import quant as _quant

from .npu import custom_or_emulated

__all__ = ["Int8Scheme"]

_ACL_FORMAT_NZ = 29  # FRACTAL_NZ (torch_npu.npu_format_cast acl_format)
_dense = _quant.dequantize


def _unit_smooth(shape, device) -> Tensor:
    """All-ones smooth scales for npu_dequant_swiglu_clamp_quant's `quant_scale` ([I] or [E, I]): this scheme's int8
    weights carry no SmoothQuant factors, and Huawei's V4 port always passes the argument (x * 1 is exact)."""
    return torch.ones(tuple(shape), dtype=torch.float32, device=device)


class Int8Scheme:
    """Per-channel int8 linears + shared expert; routed experts int8 (W8A8) or int4 (W4A8, `int4_experts`)."""

    int8_indexer = True  # the lightning indexer runs int8 (npu_quant_lightning_indexer) in these schemes

    def __init__(self, npu, custom, int4_experts: bool, nz_weights: bool) -> None:
        self.npu = npu
        self.custom = custom
        self.int4_experts = int4_experts
        self.nz_weights = nz_weights
        self.linears: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (int8 [K, N], fp32 scale [N])
        self.shared: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # id(w1) -> w13q, w13s, w2q, w2s
        self.routed: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # id(w1) -> w13q, w13s, w2q, w2s
        self.routed_int4: dict[int, tuple[Tensor, ...]] = {}  # id(w1) -> w13, scale, bias, w2, scale, bias
        self._keep: list[Tensor] = []  # the model parameters used as keys, kept alive so their ids stay unique

    @property
    def n_prepared(self) -> int:
        """How many weights (linears, shared and routed expert stacks) this scheme holds prepared."""
        return len(self.linears) + len(self.shared) + len(self.routed) + len(self.routed_int4)

    # ---- preparation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Quantise the weights CR quantises on A2/A3, once (routed experts int4 when `int4_experts`)."""
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
                (self.prepare_routed_int4 if self.int4_experts else self._prepare_routed)(mod)

    def _nz(self, t: Tensor, nz: bool | None = None) -> Tensor:
        return self.npu.npu_format_cast(t, _ACL_FORMAT_NZ) if (self.nz_weights if nz is None else nz) else t

    def _prepare_linear(self, weight: Tensor, scale: Tensor | None) -> None:
        q, s = _quant.quantize_int8_per_channel(_dense(weight, scale, torch.float32))
        self.register_linear(weight, q.t().contiguous(), s)

    def _prepare_shared(self, mod) -> None:
        w1 = _dense(mod.w1.weight, mod.w1.scale, torch.float32)
        w3 = _dense(mod.w3.weight, mod.w3.scale, torch.float32)
        w13q, w13s = _quant.quantize_int8_per_channel(torch.cat([w1, w3], 0))  # [2I, D]
        w2q, w2s = _quant.quantize_int8_per_channel(_dense(mod.w2.weight, mod.w2.scale, torch.float32))  # [D, I]
        self.register_shared(mod.w1.weight, w13q.t().contiguous(), w13s, w2q.t().contiguous(), w2s)

    def _prepare_routed(self, mod) -> None:
        w1 = _dense(mod.w1, mod.w1_scale, torch.float32)  # [E, I, D]
        w3 = _dense(mod.w3, mod.w3_scale, torch.float32)
        w13q, w13s = _quant.quantize_int8_per_channel(torch.cat([w1, w3], 1))  # [E, 2I, D], [E, 2I]
        w2q, w2s = _quant.quantize_int8_per_channel(_dense(mod.w2, mod.w2_scale, torch.float32))  # [E, D, I]
        self.register_routed(mod.w1, w13q.transpose(1, 2).contiguous(), w13s, w2q.transpose(1, 2).contiguous(),
                             w2s)

    def prepare_routed_int4(self, mod) -> None:
        """Quantise one RoutedExperts stack to int4, expert by expert and weight by weight (as the converter does,
        so the result is bit-identical to a `dsv4 convert --experts w4a8` checkpoint), and register it."""
        parts: dict[str, list[tuple[Tensor, Tensor]]] = {"w1": [], "w2": [], "w3": []}
        for name in parts:
            w, s = getattr(mod, name), getattr(mod, f"{name}_scale")
            for e in range(w.shape[0]):
                parts[name].append(_quant.quantize_int4_per_channel(_dense(w[e], None if s is None else s[e],
                                                                           torch.float32)))
        q13 = torch.stack([torch.cat([a[0], b[0]], 0) for a, b in zip(parts["w1"], parts["w3"])])  # [E, 2I, D]
        s13 = torch.stack([torch.cat([a[1], b[1]], 0) for a, b in zip(parts["w1"], parts["w3"])])  # [E, 2I]
        q2 = torch.stack([q for q, _ in parts["w2"]])  # [E, D, I]
        s2 = torch.stack([s for _, s in parts["w2"]])  # [E, D]
        self.register_routed_int4(mod.w1, self._int4pack(q13), s13, _quant.int4_assistance_bias(q13, s13),
                                  self._int4pack(q2), s2, _quant.int4_assistance_bias(q2, s2))

    def _int4pack(self, q_nk: Tensor) -> Tensor:
        """int4 values int8 [E, N, K] -> the A8W4 GMM weight int32 [E, K, N/8] via npu_convert_weight_to_int4pack."""
        e, n, k = q_nk.shape
        kn = q_nk.transpose(1, 2).reshape(e * k, n).to(torch.int32).contiguous()
        return self.npu.npu_convert_weight_to_int4pack(kn).view(e, k, n // 8)

    # ---- already-quantised weights (prepare() above, or `dsv4 convert --target a3`) ----------------------------
    # `key` is the model parameter the model passes to the op (w1 for experts); int8 weights in the op's [K, N]
    # layout, fp32 scales per output channel. nz=None: self.nz_weights.
    def register_linear(self, key: Tensor, q_kn: Tensor, scale: Tensor, nz: bool | None = None) -> None:
        """A W8A8 linear: q_kn int8 [K, N], scale fp32 [N]."""
        self.linears[id(key)] = (self._nz(q_kn, nz), scale.float().reshape(-1))
        self._keep.append(key)

    def register_shared(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """The shared expert: w13 int8 [D, 2I] (gate columns, then up), w13_s [2I]; w2 int8 [I, D], w2_s [D]."""
        self.shared[id(key)] = (self._nz(w13_kn, nz), w13_s.float().reshape(-1), self._nz(w2_kn, nz),
                                w2_s.float().reshape(-1))
        self._keep.append(key)

    def register_routed(self, key: Tensor, w13_kn: Tensor, w13_s: Tensor, w2_kn: Tensor, w2_s: Tensor,
                        nz: bool | None = None) -> None:
        """Routed experts: w13 int8 [E, D, 2I], w13_s [E, 2I]; w2 int8 [E, I, D], w2_s [E, D]."""
        self.routed[id(key)] = (self._nz(w13_kn, nz), w13_s.float(), self._nz(w2_kn, nz), w2_s.float())
        self._keep.append(key)

    def register_routed_int4(self, key: Tensor, w13_packed: Tensor, w13_s: Tensor, w13_bias: Tensor,
                             w2_packed: Tensor, w2_s: Tensor, w2_bias: Tensor, nz: bool | None = None) -> None:
        """W4A8 routed experts, already converted: w13 int32 [E, D, 2I/8] (gate columns, then up; int4 packed along
        N), w13_s / w13_bias fp32 [E, 2I]; w2 int32 [E, I, D/8], w2_s / w2_bias fp32 [E, D]."""
        for what, p, s, b in (("w13", w13_packed, w13_s, w13_bias), ("w2", w2_packed, w2_s, w2_bias)):
            if p.dtype != torch.int32 or p.dim() != 3:
                raise ValueError(f"register_routed_int4: {what} must be int32 [E, K, N/8] (int4 packed along N), "
                                 f"found {p.dtype} {tuple(p.shape)}")
            want = (p.shape[0], 8 * p.shape[2])
            if tuple(s.shape) != want or tuple(b.shape) != want:
                raise ValueError(f"register_routed_int4: {what} scale and bias must be [E, N] = {list(want)}, found "
                                 f"{list(s.shape)} and {list(b.shape)}")
        if w13_packed.shape[0] != w2_packed.shape[0] or w2_packed.shape[1] * 2 != 8 * w13_packed.shape[2] or \
                w13_packed.shape[1] != 8 * w2_packed.shape[2]:
            raise ValueError(f"register_routed_int4: w13 {tuple(w13_packed.shape)} and w2 {tuple(w2_packed.shape)} "
                             "are not [E, D, 2I/8] and [E, I, D/8] of one expert stack")
        # uint64 scales as CR passes them: [E, 1, N] (one group along K = per channel)
        self.routed_int4[id(key)] = (self._nz(w13_packed, nz), _quant.a8w4_scale_u64(w13_s).unsqueeze(1),
                                     w13_bias.float().contiguous(), self._nz(w2_packed, nz),
                                     _quant.a8w4_scale_u64(w2_s).unsqueeze(1), w2_bias.float().contiguous())
        self._keep.append(key)

    # ---- ops (None: not this scheme's weight) ------------------------------------------------------------------
    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
        """npu_dynamic_quant (per-token int8) + npu_quant_matmul (int32 accumulation, output in x.dtype)."""
        w8 = self.linears.get(id(weight))
        if w8 is None:
            return None
        k = x.shape[-1]
        xq, xs = self.npu.npu_dynamic_quant(x.reshape(-1, k))
        y = self.npu.npu_quant_matmul(xq, w8[0], w8[1], pertoken_scale=xs, output_dtype=x.dtype)
        return y.view(*x.shape[:-1], -1)

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
        return None  # wo_a stays bf16 in CR's A2/A3 schemes

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1, s2, s3, limit: float) -> Tensor | None:
        """Shared expert: npu_quant_matmul (int32 out) -> npu_dequant_swiglu_clamp_quant -> npu_quant_matmul."""
        prepared = self.shared.get(id(w1))
        if prepared is None:
            return None
        w13q, w13s, w2q, w2s = prepared
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = self.npu.npu_dynamic_quant(x2)
        h32 = self.npu.npu_quant_matmul(xq, w13q, w13s, pertoken_scale=xs, output_dtype=torch.int32)
        hq, hs = custom_or_emulated(self.custom, "npu_dequant_swiglu_clamp_quant")(
            h32, weight_scale=w13s, activation_scale=xs, quant_scale=_unit_smooth(w2q.shape[:-1], x.device),
            activate_left=True, quant_mode=1, swiglu_mode=1, clamp_limit=limit, glu_alpha=1.0, glu_bias=0.0)
        y = self.npu.npu_quant_matmul(hq, w2q, w2s, pertoken_scale=hs, output_dtype=x.dtype)
        return y.view(*x.shape[:-1], -1)

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1, s2, s3,
                limit: float, shared: Tensor | None = None) -> Tensor | None:
        """Routed experts: init_routing_v2 with per-row int8 -> int8 or A8W4 grouped matmuls -> finalize (`shared`:
        the shared expert's output, finalize_routing's skip1)."""
        int4 = self.routed_int4.get(id(w1))
        if int4 is not None:
            return self._experts_w4a8(x, weights, ids, int4, limit, shared)
        prepared = self.routed.get(id(w1))
        if prepared is None:
            return None
        t, k = ids.shape
        w13q, w13s, w2q, w2s = prepared
        n_exp, dt = w13q.shape[0], x.dtype
        ex, row_idx, counts, ex_scale = self.npu.npu_moe_init_routing_v2(
            x, ids.to(torch.int32), active_num=t * k, expert_num=n_exp, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=1, active_expert_range=[0, n_exp], row_idx_type=0)
        gmm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        h32 = self.npu.npu_grouped_matmul([ex], [w13q], output_dtype=torch.int32, **gmm)[0]
        hq, hs = custom_or_emulated(self.custom, "npu_dequant_swiglu_clamp_quant")(
            h32, weight_scale=w13s, activation_scale=ex_scale, quant_scale=_unit_smooth(w2q.shape[:-1], x.device),
            group_index=counts, activate_left=True, quant_mode=1, swiglu_mode=1, clamp_limit=limit, glu_alpha=1.0,
            glu_bias=0.0)
        y = self.npu.npu_grouped_matmul([hq], [w2q], scale=[w2s], per_token_scale=[hs], output_dtype=dt, **gmm)[0]
        return self.npu.npu_moe_finalize_routing(y, shared, None, None, weights.to(dt), row_idx, ids.to(torch.int32),
                                                 drop_pad_mode=2, k=k)

    def _experts_w4a8(self, x: Tensor, weights: Tensor, ids: Tensor, packed: tuple, limit: float,
                      shared: Tensor | None = None) -> Tensor:
        """init_routing_v2 (per-row int8) -> GMM1 A8W4 (bf16 out, scales applied: the A8W4 kernel has no int32
        output) -> npu_dequant_swiglu_clamp_quant on bf16 (clamped SwiGLU + per-row int8) -> GMM2 A8W4 ->
        finalize_routing with the routing weights (CR's order, as in the W8A8 path)."""
        w13, w13s, w13b, w2, w2s, w2b = packed
        t, k = ids.shape
        n_exp, dt = w13.shape[0], x.dtype
        out_dt = dt if dt in (torch.bfloat16, torch.float16) else torch.bfloat16  # the A8W4 GMM outputs bf16/fp16
        ex, row_idx, counts, ex_scale = self.npu.npu_moe_init_routing_v2(
            x, ids.to(torch.int32), active_num=t * k, expert_num=n_exp, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=1, active_expert_range=[0, n_exp], row_idx_type=0)
        gmm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        h = self.npu.npu_grouped_matmul([ex], [w13], bias=[w13b], scale=[w13s], per_token_scale=[ex_scale],
                                        output_dtype=out_dt, **gmm)[0]
        hq, hs = custom_or_emulated(self.custom, "npu_dequant_swiglu_clamp_quant")(
            h, quant_scale=_unit_smooth(w2.shape[:-1], x.device), group_index=counts, activate_left=True,
            quant_mode=1, swiglu_mode=1, clamp_limit=limit, glu_alpha=1.0, glu_bias=0.0)
        y = self.npu.npu_grouped_matmul([hq], [w2], bias=[w2b], scale=[w2s], per_token_scale=[hs],
                                        output_dtype=out_dt, **gmm)[0]
        skip = None if shared is None else shared.to(out_dt)  # finalize_routing's skip1 has the rows' dtype
        out = self.npu.npu_moe_finalize_routing(y, skip, None, None, weights.to(out_dt), row_idx,
                                                ids.to(torch.int32), drop_pad_mode=2, k=k)
        return out.to(dt)
