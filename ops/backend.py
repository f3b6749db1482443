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
- "w4a8": as "w8a8", except the routed experts: int4 per channel (CR's "Hybrid INT8-INT4" for V4-Pro on A3), run
  through the A8W4 npu_grouped_matmul (int8 activations, int4 weights packed in int32, uint64 scales, assistance
  bias); see "Atlas A2/A3 W4A8 routed experts" below.
- "fp8" (Ascend 950 "Hybrid FP8-MXFP4", the official checkpoint as stored): FP8 linears run as
  npu_dynamic_block_quant (1x128, fp32 scales) + npu_quant_matmul (128x128 weight scales, group_sizes [1,128,128]);
  MXFP4 routed experts as npu_dynamic_mx_quant (MXFP8 activations) + npu_grouped_matmul (float4_e2m1fn_x2 weights,
  e8m0 scale pairs); the FP8 shared expert like the linears. No dequantisation to bf16; prepare() is optional
  (the scale layouts are built on first use). See "Ascend 950 native low precision" below.
- "mxfp8" (950 "Hybrid MXFP8-MXFP4", Huawei's default): as "fp8", but the FP8 linears are re-quantised (lossless)
  to MXFP8 (1x32 e8m0) and run as npu_dynamic_mx_quant + npu_quant_matmul (group_sizes [1,1,32]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv4_ascend import quant as _quant
from dsv4_ascend.attention_view import KVView
from dsv4_ascend import sampling as _sampling
from dsv4_ascend.backend import Backend, RunOptions, redirect_skipped_rows
from dsv4_ascend.reference import ReferenceBackend

from . import emulator
from .npu import load_custom_ops, npu_available

__all__ = ["AscendBackend", "default_npu"]

_ACL_FORMAT_NZ = 29
_LI_BLOCK = 16  # paged-key block size handed to the lightning indexer (device: multiple of 16, <= 1024)
_SAS_TOPK = 512  # npu_sparse_attn_sharedkv's only supported cmp_sparse_indices width (K2)
# Every `quant` AscendBackend accepts (extend here; __init__ checks against it).
QUANT_MODES: tuple[str, ...] = ("bf16", "w8a8", "fp8", "mxfp8", "w4a8")
_A3_INT = ("w8a8", "w4a8")  # Atlas A2/A3 integer schemes: int8 linears + shared expert, int8 / int4 routed
_LOWP_950 = ("fp8", "mxfp8")  # the Ascend 950 native low-precision schemes
_PACKED_FP4 = (torch.int8, torch.uint8)  # how packed e2m1 expert weights are held in the model
_ASC_SCATTER_DTYPES = (torch.bfloat16, torch.float16, torch.int8)  # scatter_nd_update_asc's var dtypes
_ASC_SCATTER_WIDTHS = (1, 128, 512)  # and its only row widths s (spec 3.8)
_SAMPLE_KS_MAX = 1024  # npu_top_k_top_p_sample: largest top_k it applies (larger ones skip the stage)


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
        self._w8: dict[int, tuple[Tensor, Tensor]] = {}       # id(weight) -> (int8 [K, N], fp32 scale [N])
        self._experts8: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # id(w1) -> w13q, w13s, w2q, w2s
        self._shared8: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._experts4: dict[int, tuple[Tensor, ...]] = {}  # id(w1) -> w13, w13 scale, bias, w2, scale, bias (W4A8)
        self._keep: list[Tensor] = []  # keeps prepared source tensors alive so their ids stay unique
        self._lp: dict[int, tuple] = {}  # 950 op layouts, id(weight) -> (weight kept alive, ...) (_linear_plan)

    # ---- preparation (W8A8) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module) -> "AscendBackend":
        """Convert the weights CR quantises on A2/A3 to per-channel int8 (routed experts int4 for quant="w4a8"),
        once; for the 950 schemes build their op layouts. Nothing to do for quant="bf16"."""
        if self.quant in _LOWP_950:
            return self._prepare_950(model)
        if self.quant not in _A3_INT:
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
                (self._prepare_routed_int4 if self.quant == "w4a8" else self._prepare_routed)(mod)
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
        if self.quant not in _A3_INT:
            raise ValueError(f"int8 weights need AscendBackend(quant='w8a8' or 'w4a8'), this one is "
                             f"quant={self.quant!r}")

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

    # ---- Atlas A2/A3 W4A8 routed experts (quant="w4a8", CR's "Hybrid INT8-INT4") ---------------------------------
    # Routed experts only; every other quantised linear is W8A8 as above. Weights: int4 per output channel,
    # symmetric [-7, 7] with CR's clip search (quant.quantize_int4_per_channel, the converter's rule), packed along
    # N by npu_convert_weight_to_int4pack into the A8W4 grouped matmul's [E, K, N/8] int32; scales fp32 per channel,
    # handed to the op as uint64 (quant.a8w4_scale_u64); the op's assistance bias 8 * s * sum_k q
    # (quant.int4_assistance_bias).
    def _prepare_routed_int4(self, mod) -> None:
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

    def register_routed_int4(self, key: Tensor, w13_packed: Tensor, w13_s: Tensor, w13_bias: Tensor,
                             w2_packed: Tensor, w2_s: Tensor, w2_bias: Tensor, nz: bool | None = None) -> None:
        """W4A8 routed experts, already converted: w13 int32 [E, D, 2I/8] (gate columns, then up; int4 packed along
        N), w13_s / w13_bias fp32 [E, 2I]; w2 int32 [E, I, D/8], w2_s / w2_bias fp32 [E, D]. Only quant="w4a8"."""
        if self.quant != "w4a8":
            raise ValueError(f"int4 routed experts need AscendBackend(quant='w4a8'), this one is quant={self.quant!r}")
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
        self._experts4[id(key)] = (self._nz(w13_packed, nz), _quant.a8w4_scale_u64(w13_s).unsqueeze(1),
                                   w13_bias.float().contiguous(), self._nz(w2_packed, nz),
                                   _quant.a8w4_scale_u64(w2_s).unsqueeze(1), w2_bias.float().contiguous())
        self._keep.append(key)

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
        hq, hs = self.custom_or_emulated("npu_dequant_swiglu_clamp_quant")(
            h, group_index=counts, activate_left=True, quant_mode=1, swiglu_mode=1, clamp_limit=limit,
            glu_alpha=1.0, glu_bias=0.0)
        y = self.npu.npu_grouped_matmul([hq], [w2], bias=[w2b], scale=[w2s], per_token_scale=[hs],
                                        output_dtype=out_dt, **gmm)[0]
        skip = None if shared is None else shared.to(out_dt)  # finalize_routing's skip1 has the rows' dtype
        out = self.npu.npu_moe_finalize_routing(y, skip, None, None, weights.to(out_dt), row_idx,
                                                ids.to(torch.int32), drop_pad_mode=2)
        return out.to(dt)

    # ---- Ascend 950 native low precision (quant="fp8" / "mxfp8") ------------------------------------------------
    # Huawei's two 950 schemes (spec section 4) on the official checkpoint as stored: FP8 e4m3 linears with 128x128
    # block scales, MXFP4 routed experts with e8m0 per-32 scales. The ops want other *layouts* of those scales
    # (load-time views / permutes, built once per weight by prepare() or on first use, cached by id(weight)):
    # - FP8 block ("fp8"): weight [N, K] -> [K, N] view; scale [N/128, K/128] -> fp32 [K/128, N/128].
    # - MXFP8 ("mxfp8" linears): the FP8 weight re-quantised per 1x32 along K with the ceil rule (lossless, see
    #   quant.quantize_mxfp8) -> fp8 [K, N] + e8m0 pairs [K/64, N, 2].
    # - MXFP4 experts (both): w1|w3 stacked along N as the GMM1 weight, packed bytes viewed [E, K/2, N]; scales
    #   [E, N, K/32] -> e8m0 pairs [E, K/64, N, 2].
    # - wo_a (grouped_linear, "mxfp8" only, as in CR's MXFP8 recipe): re-quantised (lossless) to MXFP8 along K, K
    #   zero-padded to a multiple of 64, for the MX mode of npu_transpose_quant_batchmatmul (_grouped_plan). In
    #   "fp8" CR dequantises wo_a to bf16 (the op has no 128x128-block mode), and so does this backend.
    # Weights that are bf16 in the checkpoint (or dequantised at load) keep the bf16 paths.
    def _npu_dtype(self, name: str) -> torch.dtype:
        """torch_npu's spelling of a low-precision dtype when it has one (float4_e2m1fn_x2, float8_e8m0fnu)."""
        return getattr(self.npu, name, getattr(emulator, name))

    @torch.no_grad()
    def _prepare_950(self, model: nn.Module) -> "AscendBackend":
        """Build the 950 op layouts of every FP8 linear (wo_a: its MXFP8 form) and every MXFP4 expert stack, once."""
        from dsv4_ascend.model import Attention, Linear, RoutedExperts

        grouped = {id(m.wo_a.weight) for m in model.modules() if isinstance(m, Attention)}
        for mod in model.modules():
            if (isinstance(mod, Linear) and mod.scale is not None and mod.weight.dtype == torch.float8_e4m3fn
                    and id(mod.weight) not in grouped):
                self._linear_plan(mod.weight, mod.scale)
            elif isinstance(mod, Attention) and self.quant == "mxfp8" and mod.wo_a.scale is not None and \
                    mod.wo_a.weight.dtype == torch.float8_e4m3fn:
                self._grouped_plan(mod.wo_a.weight, mod.wo_a.scale)  # wo_a: MXFP8 (grouped_linear)
            elif isinstance(mod, RoutedExperts) and mod.w1_scale is not None and mod.w1.dtype in _PACKED_FP4:
                self._experts_plan(mod.w1, mod.w2, mod.w3, mod.w1_scale, mod.w2_scale, mod.w3_scale)
        return self

    def _linear_plan(self, weight: Tensor, scale: Tensor) -> tuple:
        """(weight, w [K, N] fp8, w scale in the op's layout, is_mx) for an FP8 block-scaled weight [N, K]."""
        plan = self._lp.get(id(weight))
        if plan is not None:
            return plan
        n, k = weight.shape
        if self.quant == "mxfp8":
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
        self._lp[id(weight)] = plan
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

    def _experts_plan(self, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor, s2: Tensor, s3: Tensor) -> tuple:
        """(w1, GMM1 w13 uint8 [E, D/2, 2I], its e8m0 pairs [E, D/64, 2I, 2], GMM2 w2 [E, I/2, D], pairs)."""
        plan = self._lp.get(id(w1))
        if plan is not None:
            return plan
        e8 = torch.float8_e8m0fnu
        as_u8 = (lambda t: t.view(torch.uint8) if t.dtype == torch.int8 else t)
        w13 = torch.cat([as_u8(w1), as_u8(w3)], 1).transpose(1, 2)  # [E, D/2, 2I]: packed along K = D
        s13 = torch.cat([self._e8m0_of(s1, "w1 scale"), self._e8m0_of(s3, "w3 scale")], 1)  # [E, 2I, D/32]
        p13 = _quant.e8m0_pairs(s13.transpose(1, 2), 1).view(e8)  # [E, D/64, 2I, 2]
        p2 = _quant.e8m0_pairs(self._e8m0_of(s2, "w2 scale").transpose(1, 2), 1).view(e8)  # [E, I/64, D, 2]
        plan = (w1, w13, p13, as_u8(w2).transpose(1, 2), p2)
        self._lp[id(w1)] = plan
        return plan

    def _linear_950(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """FP8 linear: npu_dynamic_block_quant (1x128, fp32 scales) or npu_dynamic_mx_quant (1x32, e8m0) of x,
        then npu_quant_matmul (fp32 accumulation, output in x.dtype)."""
        _, w_kn, w_s, mx = self._linear_plan(weight, scale)
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = self._act_quant_950(x2, mx)
        return self._quant_mm(xq, xs, w_kn, w_s, mx, x.dtype).view(*x.shape[:-1], -1)

    def _act_quant_950(self, x2: Tensor, mx: bool) -> tuple[Tensor, Tensor]:
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

    def _swiglu_950(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor, s2: Tensor, s3: Tensor,
                    limit: float) -> Tensor:
        """FP8 / MXFP8 shared expert: x quantised once for w1 and w3, clamped SwiGLU in fp32, then w2."""
        x2 = x.reshape(-1, x.shape[-1])
        _, w1_kn, w1_s, mx = self._linear_plan(w1, s1)
        _, w3_kn, w3_s, _ = self._linear_plan(w3, s3)
        xq, xs = self._act_quant_950(x2, mx)
        g = self._quant_mm(xq, xs, w1_kn, w1_s, mx, x.dtype).float().clamp(max=limit)
        u = self._quant_mm(xq, xs, w3_kn, w3_s, mx, x.dtype).float().clamp(-limit, limit)
        y = self._linear_950((F.silu(g) * u).to(x.dtype), w2, s2)
        return y.view(*x.shape[:-1], -1)

    def _experts_950(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                     s1: Tensor, s2: Tensor, s3: Tensor, limit: float, shared: Tensor | None = None) -> Tensor:
        """MXFP4 experts with MXFP8 activations (the 950's "W4A8 MX"): init_routing_v2 (no quant) ->
        npu_dynamic_mx_quant -> GMM1 (w13) -> clamped SwiGLU x routing weight (fp32, DeepSeek's order) ->
        npu_dynamic_mx_quant -> GMM2 (w2) -> finalize_routing."""
        _, w13, p13, w2t, p2 = self._experts_plan(w1, w2, w3, s1, s2, s3)
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
                                                 drop_pad_mode=2)

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
        q, s = _quant.act_quant(x, 128)
        return (q.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        if self.quant in _LOWP_950 and scale is not None and weight.dtype == torch.float8_e4m3fn:
            return self._linear_950(x, weight, scale)
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

    def _grouped_plan(self, weight: Tensor, scale: Tensor) -> tuple:
        """(weight, MXFP8 w [G, N, Kp] fp8, e8m0 pairs [G, N, Kp/64, 2], Kp) for wo_a's FP8 block-scaled weight
        [G*N, Kg] viewed per group: re-quantised per 1x32 along K with the ceil rule (lossless for power-of-two
        128x128 scales, quant.quantize_mxfp8), K zero-padded to Kp = a multiple of 64 (the op's MX constraint)."""
        plan = self._lp.get(id(weight))
        if plan is not None:
            return plan
        kg = weight.shape[-1]
        kp = -(-kg // 64) * 64
        w = F.pad(_dense(weight, scale, torch.float32), (0, kp - kg))  # zero columns: zero products
        q, s = _quant.quantize_mxfp8(w)  # [G*N, Kp] e4m3, e8m0 [G*N, Kp/32]
        plan = (weight, q, _quant.e8m0_pairs(s, -1), kp)  # groups split off at call time (G = x.shape[-2])
        self._lp[id(weight)] = plan
        return plan

    def _grouped_linear_950(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """wo_a on the 950 (fp8 / mxfp8): npu_dynamic_mx_quant of x [T, G, Kp] (MXFP8, K zero-padded like the
        weight: the padded block has the same amax, so the quantisation is that of x itself) + the MX mode of
        npu_transpose_quant_batchmatmul (x1 (T, G, Kp) perm (1, 0, 2), x2 (G, N, Kp) perm (0, 2, 1)) -> [T, G, N]."""
        _, q, pairs, kp = self._grouped_plan(weight, scale)
        g, kg = x.shape[-2], x.shape[-1]
        x3 = F.pad(x.reshape(-1, g, kg), (0, kp - kg))
        xq, xs = self.npu.npu_dynamic_mx_quant(x3, axis=-1, dst_type=torch.float8_e4m3fn)
        e8 = self._npu_dtype("float8_e8m0fnu")
        y = self.npu.npu_transpose_quant_batchmatmul(
            xq, q.view(g, -1, kp), x.dtype, x1_scale=xs.view(e8), x2_scale=pairs.view(g, -1, kp // 64, 2).view(e8),
            group_sizes=[0, 0, 32], perm_x1=(1, 0, 2), perm_x2=(0, 2, 1), perm_y=(1, 0, 2))
        return y.reshape(*x.shape[:-1], -1)

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        # 950 mxfp8 with the FP8 wo_a: the MX mode of npu_transpose_quant_batchmatmul (its only documented mode
        # that fits V4's shapes; K-C is K = 512 / N = 128 only; no 128x128-block mode, so "fp8" keeps bf16 like
        # CR's FP8 recipe). fp16 / bf16 out only.
        if (self.quant == "mxfp8" and scale is not None and weight.dtype == torch.float8_e4m3fn
                and x.dtype in (torch.bfloat16, torch.float16)):
            return self._grouped_linear_950(x, weight, scale)
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
    # hc_head: CR runs it in plain fp32 torch too. compress: the pooling step of the composite `compressor`
    # (below), used where no custom provider is installed. sparse_attention: a gathered pool with indices and
    # no positions, which npu_sparse_attn_sharedkv cannot express; the model calls `attend` (below), which
    # reaches the kernel through the stores and positions and falls back to this composite where it does not fit.
    _hc_mix = ReferenceBackend._hc_mix
    hc_head = ReferenceBackend.hc_head
    compress = ReferenceBackend.compress
    sparse_attention = ReferenceBackend.sparse_attention

    # ---- KV compressor: the custom `compressor` ----------------------------------------------------------------
    def compressor(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                   state: Tensor, blocks: Tensor, start: Tensor, cos: Tensor, sin: Tensor, ratio: int,
                   used: int | None = None) -> Tensor:
        # CR's fused op (spec 3.7), BSND for decode and prefill alike (every row of a chunk shares S). The state
        # ring [N, R, 2c] is the op's paged state cache with block_size R: a block table that repeats each row's
        # block sends position p to row p % R. start_pos goes in shifted down by a multiple of R (to start % R + R
        # once start >= R): the op uses it only for the window phase, the ape row, the w = 0 rule and the state
        # address, all unchanged by the shift (R is a multiple of the ratio, and >= 2*ratio with overlap, so no
        # window becomes the first), while RoPE comes in per entry; so the table needs only a few columns, fixed
        # by S, instead of max_seq_len / R (verify on the device that nothing else reads start_pos).
        if self.custom is None or not hasattr(self.custom, "compressor"):
            return super().compressor(x, wkv, wgate, ape, norm_weight, norm_eps, state, blocks, start, cos, sin,
                                      ratio, used)
        b, s, _ = x.shape
        ring = state.shape[1]
        coff = wkv.shape[0] // norm_weight.shape[0]
        shifted = torch.where(start >= ring, start % ring + ring, start)
        table = blocks.to(torch.int32).unsqueeze(1).expand(b, (2 * ring + s - 2) // ring + 1).contiguous()
        seqused = None if used is None else torch.full((b,), used, dtype=torch.int32, device=x.device)
        return self.custom.compressor(
            x, wkv.to(x.dtype), wgate.to(x.dtype), state, ape.float(), norm_weight.float(),
            sin.repeat_interleave(2, -1).float(), cos.repeat_interleave(2, -1).float(), 2 * cos.shape[-1], ratio,
            state_block_table=table, seqused=seqused, start_pos=shifted.to(torch.int32), coff=coff,
            norm_eps=norm_eps, rotary_mode=2, cache_mode=1)

    # ---- V4 attention: npu_sparse_attn_sharedkv ----------------------------------------------------------------
    def attend(self, q: Tensor, view: KVView, sink: Tensor, scale: float) -> Tensor:
        """CR's fused shared-KV attention over the stores `view` describes, when a custom provider is installed
        and the kernel can read them; otherwise the composite (`view.gathered()` + sparse_attention).

        TND q (one batch per sequence, cu_seqlens_q); ori_kv = the window ring [slots, win, 1, d] as a paged
        cache of block size win whose block table repeats the row's slot (position p -> block slot, row p % win);
        cmp_kv = the entry pages [pages, block_size/m, 1, d] through the sequence's block table row (entry j in
        page j // (block_size/m)); CSA picks as cmp_sparse_indices (-1 padded to K2 = 512); seqused_kv = last
        position + 1. Prefill chunks are not in the ring yet: a temporary paged window (`_sas_prefill_window`)
        stands in for it. No host reads: decode stays capturable.
        """
        if self._sas_unsupported(q, view):
            return Backend.attend(self, q, view, sink, scale)
        b, s, h, d = q.shape
        win, dev, i32 = view.win, q.device, torch.int32
        if view.chunk is None:  # decode: this step's row is already in the ring
            ori_kv = view.window.data.unsqueeze(2)
            ori_table = view.slots.to(i32).view(b, 1).expand(b, -(-view.max_len // win)).contiguous()
        else:
            ori_kv, ori_table = self._sas_prefill_window(view)
        cu = torch.arange(0, (b + 1) * s, s, device=dev, dtype=i32)  # one TND batch per sequence
        seqused = (view.positions[:, -1] + 1).to(i32)
        kw = dict(cu_seqlens_q=cu, seqused_kv=seqused, cmp_ratio=view.ratio or 1, ori_mask_mode=4, cmp_mask_mode=3,
                  ori_win_left=win - 1, ori_win_right=0, layout_q="TND", layout_kv="PA_ND")
        cmp, cmp_topk = {}, 0
        if view.ratio:
            cmp = dict(cmp_kv=view.entries.data.unsqueeze(2), cmp_block_table=view.block_table.to(i32))
            if view.picks is not None:
                picks = F.pad(view.picks, (0, _SAS_TOPK - view.picks.shape[-1]), value=-1)
                cmp["cmp_sparse_indices"] = picks.reshape(b * s, 1, _SAS_TOPK).to(i32)
                cmp_topk = _SAS_TOPK
        meta = self.custom.npu_sparse_attn_sharedkv_metadata(
            h, 1, d, batch_size=b, max_seqlen_q=s, max_seqlen_kv=view.max_len, ori_topk=0, cmp_topk=cmp_topk,
            has_ori_kv=True, has_cmp_kv=bool(view.ratio), device=str(dev), **kw)
        out, _ = self.custom.npu_sparse_attn_sharedkv(
            q.reshape(b * s, h, d), ori_kv=ori_kv, ori_block_table=ori_table, sinks=sink.float(), metadata=meta,
            softmax_scale=scale, **cmp, **kw)
        return out.view(b, s, h, d)

    def _sas_unsupported(self, q: Tensor, view: KVView) -> str:
        """Why npu_sparse_attn_sharedkv cannot run this view ('' when it can); decided from host-known facts."""
        if self.custom is None or not hasattr(self.custom, "npu_sparse_attn_sharedkv"):
            return "no custom-op provider"
        stores = [view.window] + ([view.entries] if view.ratio else [])
        if any(st.fp8 for st in stores):
            return "C8 (kv_fp8) cache: npu_kv_quant_sparse_attn_sharedkv's row layout differs from ours"
        if any(st.dtype != q.dtype for st in stores):
            return "cache dtype differs from q's (the kernel takes one dtype)"
        if view.ratio and not view.entries_in_store:
            return "deferred prefill: the chunk's entries are not in the pages yet"
        if view.picks is not None and view.picks.shape[-1] > _SAS_TOPK:
            return f"more than {_SAS_TOPK} picks per query"
        return ""

    def _sas_prefill_window(self, view: KVView) -> tuple[Tensor, Tensor]:
        """A temporary paged window for a prefill chunk: ring rows of positions [start-win, start) then the chunk,
        in position order, front-aligned to the block size (= win). Returns (cache [B*nblk, win, 1, d], table)."""
        b, s, d = view.chunk.shape
        win, s0, dev = view.win, view.start, view.chunk.device
        first = max(s0 - win, 0) // win  # first block held; earlier columns are never read unmasked
        nblk = -(-(s0 + s) // win) - first
        p = first * win + torch.arange(nblk * win, device=dev)  # positions held
        src = torch.where(p < s0, p % win, torch.where(p < s0 + s, win + p - s0, win + s))  # ring | chunk | zero
        rows = torch.cat([view.window.read(view.slots), view.chunk.to(view.window.dtype),
                          view.chunk.new_zeros(b, 1, d, dtype=view.window.dtype)], 1)
        cache = rows.index_select(1, src).view(b * nblk, win, 1, d)
        col = (torch.arange(first + nblk, device=dev) - first).clamp(min=0)
        table = (torch.arange(b, device=dev).unsqueeze(1) * nblk + col).to(torch.int32)
        return cache, table

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
        if self.quant in _A3_INT:
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
                sync_free: bool = False, shared: Tensor | None = None) -> Tensor:
        # init_routing_v2 (sort copies by expert) -> GMM1 (w13) -> clamped SwiGLU -> GMM2 (w2) -> finalize_routing.
        # Every shape is static (T*k rows); group_list is a device tensor, so nothing syncs to the host on the
        # device, and the emulator's ops are tensor code too (graph mode traces them on CPU).
        t, k = ids.shape
        n_exp = w1.shape[0]
        dt = x.dtype
        if self.quant in _LOWP_950 and s1 is not None and w1.dtype in _PACKED_FP4:
            return self._experts_950(x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared)
        int4 = self._experts4.get(id(w1))
        if int4 is not None:
            return self._experts_w4a8(x, weights, ids, int4, limit, shared)
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
        return self.npu.npu_moe_finalize_routing(y, shared, None, None, scales, row_idx, ids.to(torch.int32),
                                                 drop_pad_mode=2)

    def custom_or_emulated(self, name: str):
        """A custom op from the provider, or the emulator's when none is installed (CPU reference semantics)."""
        if self.custom is not None and hasattr(self.custom, name):
            return getattr(self.custom, name)
        return getattr(emulator, name)

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        if self.quant in _LOWP_950 and s1 is not None and w1.dtype == torch.float8_e4m3fn:
            return self._swiglu_950(x, w1, w2, w3, s1, s2, s3, limit)
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
