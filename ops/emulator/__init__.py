"""CPU emulator of the torch_npu built-ins and V4 custom ops that `AscendBackend` calls.

Pass this package as `npu=` (it doubles as the `custom=` provider, standing in for `torch.ops.custom`). Every
function keeps the name, argument names, argument order, keyword-only markers and defaults of the op it emulates
(checked against the real schemas by tests/test_ascend_contract.py) and implements its documented semantics:
layouts, accumulation and output dtypes, rounding, saturation, group_list meaning, -1 padding. Nothing here is
fast; it is the executable statement of the contract the backend relies on. Sources (read for facts only):

- TNPU: torch_npu's op schemas (`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`), meta functions
  (`torch_npu/op_plugin/meta/_meta_registrations.py`) and op docs (hiascend.com "torch_npu.npu_*" pages).
- CR: Huawei's hicann/cann-recipes-infer: custom-op schemas (`ops/ascendc/torch_ops_extension/custom_ops/csrc/
  ops_def_registration.cpp`), op docs (`ops/ascendc/docs/custom-npu_*.md`) and their example goldens.
- OT: hicann/ops-transformer (kernel READMEs / sources, e.g. the moe_init_routing_v2 gather-out kernel).

One module per op family: norm_rope, gemm, moe, moe_distribute (MC2 EP dispatch/combine over torch.distributed),
cache_sampling, v4_custom (mHC, compressor), attention (indexers, shared-KV sparse attention), fp8_kv (the 950's
FP8 KV-cache epilogues and FP8-KV sparse attention), lowp_950 (FP8 / MX paths); numerics holds their shared
rounding helpers.
Points no document settles are marked "(verify)" in the docstrings and listed in docs/ascend.md; only a run on
an NPU can settle them. Unsupported argument combinations raise NotImplementedError instead of guessing.
"""
from .attention import (npu_lightning_indexer, npu_quant_lightning_indexer, npu_quant_lightning_indexer_metadata,
                        npu_sparse_attn_sharedkv, npu_sparse_attn_sharedkv_metadata)
from .fp8_kv import (indexer_compress_epilog, kv_compress_epilog, npu_kv_quant_sparse_attn_sharedkv,
                     npu_kv_quant_sparse_attn_sharedkv_metadata)
from .cache_sampling import npu_scatter_nd_update_, npu_top_k_top_p_sample, scatter_nd_update_asc
from .gemm import (npu_convert_weight_to_int4pack, npu_dynamic_quant, npu_grouped_matmul, npu_quant_matmul,
                   npu_transpose_batchmatmul, npu_transpose_quant_batchmatmul)
from .lowp_950 import npu_dynamic_block_quant, npu_dynamic_mx_quant
from .moe_distribute import npu_moe_distribute_combine, npu_moe_distribute_dispatch
from .moe import (npu_dequant_swiglu_clamp_quant, npu_moe_finalize_routing, npu_moe_gating_top_k,
                  npu_moe_init_routing_v2)
from .norm_rope import inplace_partial_rotary_mul, npu_format_cast, npu_rms_norm, npu_rotary_mul
from .numerics import float4_e2m1fn_x2, float8_e8m0fnu, hf32, round_half_even
from .v4_custom import compressor, npu_hc_post, npu_hc_pre

__all__ = [
    "npu_rms_norm",
    "npu_rotary_mul",
    "inplace_partial_rotary_mul",
    "npu_format_cast",
    "npu_transpose_batchmatmul",
    "npu_transpose_quant_batchmatmul",
    "npu_dynamic_quant",
    "npu_dynamic_block_quant",
    "npu_dynamic_mx_quant",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "npu_quant_matmul",
    "npu_grouped_matmul",
    "npu_convert_weight_to_int4pack",
    "npu_moe_init_routing_v2",
    "npu_moe_finalize_routing",
    "npu_moe_gating_top_k",
    "npu_moe_distribute_dispatch",
    "npu_moe_distribute_combine",
    "scatter_nd_update_asc",
    "npu_scatter_nd_update_",
    "npu_top_k_top_p_sample",
    "npu_dequant_swiglu_clamp_quant",
    "npu_hc_pre",
    "npu_hc_post",
    "compressor",
    "npu_lightning_indexer",
    "npu_quant_lightning_indexer",
    "npu_quant_lightning_indexer_metadata",
    "npu_sparse_attn_sharedkv",
    "npu_sparse_attn_sharedkv_metadata",
    "npu_kv_quant_sparse_attn_sharedkv",
    "npu_kv_quant_sparse_attn_sharedkv_metadata",
    "kv_compress_epilog",
    "indexer_compress_epilog",
    "hf32",
    "round_half_even",
]

IS_EMULATOR = True
