"""Tensor names: DeepSeek's native checkpoint names and transformers' spelling of the same tensors.

The official files use native names (`layers.3.attn.wq_a.weight`, `.scale`); transformers' DeepSeek-V4 port
(5.23, `conversion_mapping`) renames them (`model.layers.3.self_attn.q_a_proj.weight`, `.weight_scale_inv`, ...).
`native_name` maps every 1:1 rename back; `hf_name` is its inverse.
"""
from __future__ import annotations

import re

__all__ = ["native_name", "hf_name", "BLOCK_RE", "MERGED_EXPERTS_RE"]

# transformers (HF) module path -> native module path, after `model.layers.{i}.` / `layers.{i}.`
# (from transformers 5.23's deepseek_v4 conversion mapping; see docs/checkpoint-format.md §1).
_HF_MODULES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_a_norm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_proj": "attn.wkv",
    "self_attn.kv_norm": "attn.kv_norm",
    "self_attn.o_a_proj": "attn.wo_a",
    "self_attn.o_b_proj": "attn.wo_b",
    "self_attn.compressor.kv_proj": "attn.compressor.wkv",
    "self_attn.compressor.gate_proj": "attn.compressor.wgate",
    "self_attn.compressor.kv_norm": "attn.compressor.norm",
    "self_attn.compressor.indexer.q_b_proj": "attn.indexer.wq_b",
    "self_attn.compressor.indexer.scorer.weights_proj": "attn.indexer.weights_proj",
    "self_attn.compressor.indexer.kv_proj": "attn.indexer.compressor.wkv",
    "self_attn.compressor.indexer.gate_proj": "attn.indexer.compressor.wgate",
    "self_attn.compressor.indexer.kv_norm": "attn.indexer.compressor.norm",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
}
# HF parameter leaf -> native parameter leaf (same prefix).
_HF_LEAVES = {
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
}
_HF_TOP = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_HF_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT_HF_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
MERGED_EXPERTS_RE = re.compile(r"(^|\.)(mlp|ffn)\.experts\.(gate_up_proj|down_proj)")


def native_name(key: str) -> str:
    """The native (official) name of a stored tensor name; native names map to themselves.

    Only 1:1 renames: `model.` prefix, transformers' module names, `weight_scale_inv` -> `scale`,
    `e_score_correction_bias` -> `bias`, per-expert `mlp.experts.E.{gate,up,down}_proj` -> `ffn.experts.E.w{1,3,2}`,
    and DeepSeek converter-style `self_attn` -> `attn`, `mlp` -> `ffn`.
    """
    n = key
    if n.endswith(".weight_scale_inv"):
        n = n[: -len("weight_scale_inv")] + "scale"
    if n.startswith("model."):
        n = n[len("model."):]
    if n in _HF_TOP:
        return _HF_TOP[n]
    m = BLOCK_RE.match(n)
    if not m:
        return n
    kind, i, leaf = m.groups()
    if leaf in _HF_LEAVES:
        leaf = _HF_LEAVES[leaf]
    else:
        for hf in sorted(_HF_MODULES, key=len, reverse=True):
            if leaf.startswith(hf + "."):
                leaf = _HF_MODULES[hf] + leaf[len(hf):]
                break
        else:
            e = _EXPERT_HF_RE.match(leaf)
            if e:
                leaf = f"ffn.experts.{e.group(1)}.{_HF_EXPERT[e.group(2)]}.{e.group(3)}"
    if leaf.startswith("self_attn."):
        leaf = "attn." + leaf[len("self_attn."):]
    if leaf.startswith("mlp."):
        leaf = "ffn." + leaf[len("mlp."):]
    if leaf.endswith(".e_score_correction_bias"):
        leaf = leaf[: -len("e_score_correction_bias")] + "bias"
    if leaf.startswith("attn.norm."):
        # transformers' save_pretrained writes self_attn.kv_norm as `attn.norm` (its inverse of the `.norm.` ->
        # `.kv_norm.` rename); no native tensor has that name.
        leaf = "attn.kv_norm." + leaf[len("attn.norm."):]
    return f"{kind}.{i}.{leaf}"


def hf_name(native: str) -> str:
    """transformers' spelling of a native name (inverse of `native_name`; `.scale` -> `.weight_scale_inv`).

    MTP blocks have no transformers names: they keep their native names under a `model.` prefix. Routed experts
    get the per-expert spelling `mlp.experts.E.{gate,up,down}_proj` (transformers itself merges them).
    """
    n = native
    if n.endswith(".scale"):  # a linear's scale (mHC scales are `hc_*_scale`, no dot)
        n = n[: -len("scale")] + "weight_scale_inv"
    if n == "head.weight":
        return "lm_head.weight"
    top = {v: k for k, v in _HF_TOP.items()}
    if n in top:
        return "model." + top[n]
    m = BLOCK_RE.match(n)
    if not m or m.group(1) == "mtp":
        return "model." + n
    i, leaf = m.group(2), m.group(3)
    leaves = {v: k for k, v in _HF_LEAVES.items()}
    mods = {v: k for k, v in _HF_MODULES.items()}
    e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])\.(.+)$", leaf)
    if leaf in leaves:
        leaf = leaves[leaf]
    elif e:
        proj = {v: k for k, v in _HF_EXPERT.items()}[e.group(2)]
        leaf = f"mlp.experts.{e.group(1)}.{proj}.{e.group(3)}"
    else:
        for nat in sorted(mods, key=len, reverse=True):
            if leaf.startswith(nat + "."):
                leaf = mods[nat] + leaf[len(nat):]
                break
        else:
            if leaf.startswith("ffn."):
                leaf = "mlp." + leaf[len("ffn."):]
    return f"model.layers.{i}.{leaf}"
