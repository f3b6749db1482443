"""Ascend 950 native low-precision schemes on the official checkpoint as stored: "fp8" (Hybrid FP8-MXFP4) and
"mxfp8" (Hybrid MXFP8-MXFP4, Huawei's default in cann-recipes-infer).

FP8 e4m3 linears with 128x128 block scales and MXFP4 routed experts with e8m0 per-32 scales; the ops want other
*layouts* of those scales (load-time views / permutes, built once per weight by prepare() or on first use and owned
by the `Lowp950Scheme` object):
- FP8 block ("fp8"): weight [N, K] -> [K, N] view; scale [N/128, K/128] -> fp32 [K/128, N/128].
- MXFP8 ("mxfp8" linears): the FP8 weight re-quantised per 1x32 along K with the ceil rule (lossless, see
  quant.quantize_mxfp8) -> fp8 [K, N] + e8m0 pairs [K/64, N, 2].
- MXFP4 experts (both): w1|w3 stacked along N as the GMM1 weight, packed bytes viewed [E, K/2, N]; scales
  [E, N, K/32] -> e8m0 pairs [E, K/64, N, 2].
- wo_a (grouped_linear, "mxfp8" only, as in CR's MXFP8 recipe): re-quantised (lossless) to MXFP8 along K, K
  zero-padded to a multiple of 64, for the MX mode of npu_transpose_quant_batchmatmul. In "fp8" CR dequantises wo_a
  to bf16 (the op has no 128x128-block mode), and so does this backend.
Weights that are bf16 in the checkpoint (or dequantised at load) keep the bf16 paths (each op returns None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv4_ascend import quant as _quant

from . import emulator

__all__ = ["Lowp950Scheme", "PACKED_FP4"]

PACKED_FP4 = (torch.int8, torch.uint8)  # how packed e2m1 expert weights are held in the model
_dense = _quant.dequantize


class Lowp950Scheme:
    """FP8-block ("fp8", mx=False) or MXFP8 ("mxfp8", mx=True) linears and MXFP4 experts; owns the op layouts."""

    int8_indexer = False  # the 950 quantises the lightning indexer to FP8 instead (AttentionMapping.indexer_topk)
    fp8_indexer = True

    def __init__(self, npu, mx: bool) -> None:
        self.npu = npu
        self.mx = mx
        self.plans: dict[int, tuple] = {}  # id(weight) -> (weight kept alive, layouts...)

    def _npu_dtype(self, name: str) -> torch.dtype:
        """torch_npu's spelling of a low-precision dtype when it has one (float4_e2m1fn_x2, float8_e8m0fnu)."""
        return getattr(self.npu, name, getattr(emulator, name))

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Build the op layouts of every FP8 linear (wo_a: its MXFP8 form) and every MXFP4 expert stack, once."""
        from dsv4_ascend.model import Attention, Linear, RoutedExperts

        grouped = {id(m.wo_a.weight) for m in model.modules() if isinstance(m, Attention)}
        for mod in model.modules():
            if (isinstance(mod, Linear) and mod.scale is not None and mod.weight.dtype == torch.float8_e4m3fn
                    and id(mod.weight) not in grouped):
                self.linear_plan(mod.weight, mod.scale)
            elif isinstance(mod, Attention) and self.mx and mod.wo_a.scale is not None and \
                    mod.wo_a.weight.dtype == torch.float8_e4m3fn:
                self.grouped_plan(mod.wo_a.weight, mod.wo_a.scale)  # wo_a: MXFP8 (grouped_linear)
            elif isinstance(mod, RoutedExperts) and mod.w1_scale is not None and mod.w1.dtype in PACKED_FP4:
                self.experts_plan(mod.w1, mod.w2, mod.w3, mod.w1_scale, mod.w2_scale, mod.w3_scale)

    # ---- layouts -----------------------------------------------------------------------------------------------
    def linear_plan(self, weight: Tensor, scale: Tensor) -> tuple:
        """(weight, w [K, N] fp8, w scale in the op's layout, is_mx) for an FP8 block-scaled weight [N, K]."""
        plan = self.plans.get(id(weight))
        if plan is not None:
            return plan
        n, k = weight.shape
        if self.mx:
            if k % _quant.MX_BLOCK:
                raise ValueError(f"quant='mxfp8': weight {tuple(weight.shape)} needs in_features % 32 == 0 for "
                                 "1x32 MX blocks")
            q, s = _quant.quantize_mxfp8(_dense(weight, scale, torch.float32))  # [N, K], e8m0 [N, K/32]
            plan = (weight, q.t(), _quant.e8m0_pairs(s.t(), 0), True)  # [K, N], [K/64, N, 2]
        else:
            s = _quant.e8m0_to_float(scale) if scale.dtype == torch.float8_e8m0fnu else scale.float()
            expect = (-(-n // _quant.FP8_BLOCK), -(-k // _quant.FP8_BLOCK))
            if tuple(s.shape) != expect:
                raise ValueError(f"FP8 weight {tuple(weight.shape)}: expected a 128x128 block scale {expect}, "
                                 f"found {tuple(scale.shape)}")
            plan = (weight, weight.t(), s.t().contiguous(), False)
        self.plans[id(weight)] = plan
        return plan

    @staticmethod
    def _e8m0_of(scale: Tensor, what: str) -> Tensor:
        """e8m0 bytes of an expert scale stored as float8_e8m0fnu, or as float values that are powers of two."""
        if scale.dtype == torch.float8_e8m0fnu:
            return scale.view(torch.uint8)
        b = _quant.float_to_e8m0(scale).view(torch.uint8)
        if not torch.equal(_quant.e8m0_to_float(b), scale.float()):
            raise ValueError(f"{what}: MXFP4 scales must be powers of two (e8m0) for the 950 MX path, found "
                             f"{scale.dtype} values that are not")
        return b

    def experts_plan(self, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor, s2: Tensor, s3: Tensor) -> tuple:
        """(w1, GMM1 w13 uint8 [E, D/2, 2I], its e8m0 pairs [E, D/64, 2I, 2], GMM2 w2 [E, I/2, D], pairs)."""
        plan = self.plans.get(id(w1))
        if plan is not None:
            return plan
        e8 = torch.float8_e8m0fnu
        as_u8 = (lambda t: t.view(torch.uint8) if t.dtype == torch.int8 else t)
        w13 = torch.cat([as_u8(w1), as_u8(w3)], 1).transpose(1, 2)  # [E, D/2, 2I]: packed along K = D
        s13 = torch.cat([self._e8m0_of(s1, "w1 scale"), self._e8m0_of(s3, "w3 scale")], 1)  # [E, 2I, D/32]
        p13 = _quant.e8m0_pairs(s13.transpose(1, 2), 1).view(e8)  # [E, D/64, 2I, 2]
        p2 = _quant.e8m0_pairs(self._e8m0_of(s2, "w2 scale").transpose(1, 2), 1).view(e8)  # [E, I/64, D, 2]
        plan = (w1, w13, p13, as_u8(w2).transpose(1, 2), p2)
        self.plans[id(w1)] = plan
        return plan

    def grouped_plan(self, weight: Tensor, scale: Tensor) -> tuple:
        """(weight, MXFP8 w [G, N, Kp] fp8, e8m0 pairs [G, N, Kp/64, 2], Kp) for wo_a's FP8 block-scaled weight
        [G*N, Kg] viewed per group: re-quantised per 1x32 along K with the ceil rule (lossless for power-of-two
        128x128 scales, quant.quantize_mxfp8), K zero-padded to Kp = a multiple of 64 (the op's MX constraint)."""
        plan = self.plans.get(id(weight))
        if plan is not None:
            return plan
        kg = weight.shape[-1]
        kp = -(-kg // 64) * 64
        w = F.pad(_dense(weight, scale, torch.float32), (0, kp - kg))  # zero columns: zero products
        q, s = _quant.quantize_mxfp8(w)  # [G*N, Kp] e4m3, e8m0 [G*N, Kp/32]
        plan = (weight, q, _quant.e8m0_pairs(s, -1), kp)  # groups split off at call time (G = x.shape[-2])
        self.plans[id(weight)] = plan
        return plan

    # ---- ops (None: not an FP8 / MXFP4 weight of this scheme) -------------------------------------------------
    def _act_quant(self, x2: Tensor, mx: bool) -> tuple[Tensor, Tensor]:
        """Dynamic FP8 e4m3 activation quant: MX (1x32, e8m0 pairs) or block (1x128, fp32 scales)."""
        if mx:
            return self.npu.npu_dynamic_mx_quant(x2, axis=-1, dst_type=torch.float8_e4m3fn)
        return self.npu.npu_dynamic_block_quant(x2, dst_type=torch.float8_e4m3fn, row_block_size=1,
                                                col_block_size=_quant.FP8_BLOCK)

    def _quant_mm(self, xq: Tensor, xs: Tensor, w_kn: Tensor, w_s: Tensor, mx: bool, dt: torch.dtype) -> Tensor:
        """npu_quant_matmul of quantised x [M, K] with an FP8 weight [K, N]: MXFP8 or FP8-block scales."""
        if mx:
            e8 = self._npu_dtype("float8_e8m0fnu")
            return self.npu.npu_quant_matmul(xq, w_kn, w_s, pertoken_scale=xs, output_dtype=dt, scale_dtype=e8,
                                             pertoken_scale_dtype=e8, group_sizes=[1, 1, _quant.MX_BLOCK])
        return self.npu.npu_quant_matmul(xq, w_kn, w_s, pertoken_scale=xs, output_dtype=dt,
                                         group_sizes=[1, _quant.FP8_BLOCK, _quant.FP8_BLOCK])

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
        """FP8 linear: npu_dynamic_block_quant (1x128, fp32 scales) or npu_dynamic_mx_quant (1x32, e8m0) of x,
        then npu_quant_matmul (fp32 accumulation, output in x.dtype)."""
        if scale is None or weight.dtype != torch.float8_e4m3fn:
            return None
        _, w_kn, w_s, mx = self.linear_plan(weight, scale)
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = self._act_quant(x2, mx)
        return self._quant_mm(xq, xs, w_kn, w_s, mx, x.dtype).view(*x.shape[:-1], -1)

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
        """wo_a in "mxfp8" with the FP8 weight and bf16 / fp16 x: npu_dynamic_mx_quant of x [T, G, Kp] (MXFP8, K
        zero-padded like the weight: the padded block has the same amax, so the quantisation is that of x itself)
        + the MX mode of npu_transpose_quant_batchmatmul (x1 (T, G, Kp) perm (1, 0, 2), x2 (G, N, Kp) perm
        (0, 2, 1)) -> [T, G, N]. Its only documented mode that fits V4's shapes (K-C is K = 512 / N = 128 only;
        no 128x128-block mode, so "fp8" keeps bf16 like CR's FP8 recipe)."""
        if not (self.mx and scale is not None and weight.dtype == torch.float8_e4m3fn
                and x.dtype in (torch.bfloat16, torch.float16)):
            return None
        _, q, pairs, kp = self.grouped_plan(weight, scale)
        g, kg = x.shape[-2], x.shape[-1]
        x3 = F.pad(x.reshape(-1, g, kg), (0, kp - kg))
        xq, xs = self.npu.npu_dynamic_mx_quant(x3, axis=-1, dst_type=torch.float8_e4m3fn)
        e8 = self._npu_dtype("float8_e8m0fnu")
        y = self.npu.npu_transpose_quant_batchmatmul(
            xq, q.view(g, -1, kp), x.dtype, x1_scale=xs.view(e8), x2_scale=pairs.view(g, -1, kp // 64, 2).view(e8),
            group_sizes=[0, 0, 32], perm_x1=(1, 0, 2), perm_x2=(0, 2, 1), perm_y=(1, 0, 2))
        return y.reshape(*x.shape[:-1], -1)

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1, s2, s3, limit: float) -> Tensor | None:
        """FP8 / MXFP8 shared expert: x quantised once for w1 and w3, clamped SwiGLU in fp32, then w2."""
        if s1 is None or w1.dtype != torch.float8_e4m3fn:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        _, w1_kn, w1_s, mx = self.linear_plan(w1, s1)
        _, w3_kn, w3_s, _ = self.linear_plan(w3, s3)
        xq, xs = self._act_quant(x2, mx)
        g = self._quant_mm(xq, xs, w1_kn, w1_s, mx, x.dtype).float().clamp(max=limit)
        u = self._quant_mm(xq, xs, w3_kn, w3_s, mx, x.dtype).float().clamp(-limit, limit)
        y = self.linear((F.silu(g) * u).to(x.dtype), w2, s2)
        return y.view(*x.shape[:-1], -1)

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1, s2, s3,
                limit: float, shared: Tensor | None = None) -> Tensor | None:
        """MXFP4 experts with MXFP8 activations (the 950's "W4A8 MX"): init_routing_v2 (no quant) ->
        npu_dynamic_mx_quant -> GMM1 (w13) -> clamped SwiGLU x routing weight (fp32, DeepSeek's order) ->
        npu_dynamic_mx_quant -> GMM2 (w2) -> finalize_routing."""
        if s1 is None or w1.dtype not in PACKED_FP4:
            return None
        _, w13, p13, w2t, p2 = self.experts_plan(w1, w2, w3, s1, s2, s3)
        t, k = ids.shape
        n_exp, dt = w13.shape[0], x.dtype
        ex, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            x, ids.to(torch.int32), active_num=t * k, expert_num=n_exp, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, n_exp], row_idx_type=0)
        gmm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0, output_dtype=dt,
                   weight_dtype=self._npu_dtype("float4_e2m1fn_x2"),
                   per_token_scale_dtype=self._npu_dtype("float8_e8m0fnu"), tuning_config=[0])
        xq, xs = self.npu.npu_dynamic_mx_quant(ex, axis=-1, dst_type=torch.float8_e4m3fn)
        h = self.npu.npu_grouped_matmul([xq], [w13], antiquant_scale=[p13], per_token_scale=[xs], **gmm)[0]
        inter = h.shape[-1] // 2
        g = h[:, :inter].float().clamp(max=limit)
        u = h[:, inter:].float().clamp(-limit, limit)
        w_rows = torch.empty(t * k, dtype=torch.float32, device=x.device)
        w_rows[row_idx.long()] = weights.reshape(-1).float()
        hq, hs = self.npu.npu_dynamic_mx_quant((F.silu(g) * u * w_rows.unsqueeze(-1)).to(dt), axis=-1,
                                               dst_type=torch.float8_e4m3fn)
        y = self.npu.npu_grouped_matmul([hq], [w2t], antiquant_scale=[p2], per_token_scale=[hs], **gmm)[0]
        return self.npu.npu_moe_finalize_routing(y, shared, None, None, None, row_idx, ids.to(torch.int32),
                                                 drop_pad_mode=2, k=k)
