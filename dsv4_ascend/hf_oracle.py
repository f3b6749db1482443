"""transformers' DeepSeek-V4 as an independent oracle for parity tests and benchmarks (needs the `test` extra;
transformers is imported on first use, so importing this module costs nothing).

What this module gives:

- ``TINY_NATIVE_CFG``: our preset ``tiny`` (SWA, CSA and HCA layers, hash-routed and score-routed MoE, one MTP
  entry), unquantised fp32, in the OFFICIAL native config.json names.
- ``hf_config_from_native(cfg)``: the equivalent ``DeepseekV4Config``. transformers 5.23 cannot read a native
  ``compress_ratios`` entry other than 0/4/128 (``configuration_deepseek_v4.py`` looks each ratio up in
  ``_COMPRESS_RATIO_TO_LAYER_TYPE`` -> KeyError), so we pass ``layer_types`` plus
  ``compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": m}`` instead; the modeling
  code reads the HCA ratio only from ``config.compress_rates``.
- ``build_hf_model(cfg, seed, dtype)``: ``DeepseekV4ForCausalLM`` with every weight randomised (seeded) at
  magnitudes that exercise every path, plus the same weights as a state dict in OUR native checkpoint names.
- ``hf_logits`` (full forward, no cache), ``hf_cached_logits`` (prefill / decode in chunks through HF's own
  caches) and ``hf_generate_greedy`` (greedy decode with cache); all run under ``stable_indexer_topk()``, which
  replaces the top-k inside HF's lightning indexer by a stable one (higher score first, then LOWER entry index),
  so the selection no longer depends on how many entries exist (docs/numerics.md, row 7).

HF has no MTP block: the MTP entry of ``compress_ratios`` is dropped and no ``mtp.*`` tensors are produced.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
import sys
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .config import preset

if TYPE_CHECKING:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

__all__ = [
    "TINY_NATIVE_CFG",
    "hf_config_from_native",
    "hf_to_native_names",
    "build_hf_model",
    "stable_indexer_topk",
    "hf_logits",
    "hf_cached_logits",
    "hf_generate_greedy",
]

# Our preset "tiny", unquantised fp32, in the official config.json names.
TINY_NATIVE_CFG: dict[str, Any] = dataclasses.replace(preset("tiny"), quant_method=None, expert_dtype=None,
                                                      torch_dtype="float32").to_dict()


def _transformers():
    """transformers and its DeepSeek-V4 modeling module, imported on first use."""
    import transformers
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    return transformers, modeling_deepseek_v4


_CSA = "compressed_sparse_attention"
_HCA = "heavily_compressed_attention"
_SWA = "sliding_attention"

# Native config keys that DeepseekV4Config does not take as they are (handled explicitly below).
_NATIVE_ONLY_KEYS = {"compress_ratios", "quantization_config", "expert_dtype", "architectures", "torch_dtype",
                     "transformers_version", "topk_method"}


def hf_config_from_native(native_cfg: dict[str, Any]) -> DeepseekV4Config:
    """The transformers config of a model given in the official native config.json names."""
    cfg = copy.deepcopy(native_cfg)  # transformers edits nested dicts (rope_scaling) in place
    if cfg.get("quantization_config") is not None:
        raise ValueError("hf_oracle builds unquantised models; drop 'quantization_config' from the config")
    n_layers = int(cfg["num_hidden_layers"])
    ratios = [int(r) for r in cfg["compress_ratios"]][:n_layers]  # the MTP entries are not modelled by HF
    if len(ratios) != n_layers:
        raise ValueError(f"compress_ratios needs >= {n_layers} entries, found {len(cfg['compress_ratios'])}")
    hca_rates = {r for r in ratios if r not in (0, 4)}
    if len(hca_rates) > 1:
        raise ValueError(f"transformers supports one HCA ratio per model; found {sorted(hca_rates)}")
    layer_types = [_SWA if r == 0 else _CSA if r == 4 else _HCA for r in ratios]
    compress_rates = {_CSA: 4, _HCA: hca_rates.pop() if hca_rates else 128}
    kwargs = {k: v for k, v in cfg.items() if k not in _NATIVE_ONLY_KEYS}
    kwargs.update(layer_types=layer_types, compress_rates=compress_rates, attn_implementation="eager")
    # HF warns that the YaRN factor differs from max_position_embeddings / original_max_position_embeddings; the
    # explicit factor is the one used (as in the reference), so the warning is noise here.
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        hf_cfg = _transformers()[0].DeepseekV4Config(**kwargs)
    finally:
        tf_logger.setLevel(level)
    assert hf_cfg.layer_types == layer_types and hf_cfg.compress_rates == compress_rates
    assert hf_cfg.qk_rope_head_dim == int(cfg.get("qk_rope_head_dim", 64))
    return hf_cfg


# ---- HF <-> native names -------------------------------------------------------------------------------------

# HF leaf (after `model.layers.{i}.`) -> native leaf (after `layers.{i}.`).
_LAYER_LEAVES = {
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_TOP_LEAVES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "lm_head.weight": "head.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_native_names(hf_name: str, n_experts: int) -> list[str] | None:
    """Native name(s) of one HF state-dict entry (several for the merged expert tensors); None if unknown.

    Merged experts: ``mlp.experts.gate_up_proj`` [E, 2I, D] = per expert cat(w1, w3) along dim 1 (rows 0:I are
    w1 = gate, I:2I are w3 = up); ``mlp.experts.down_proj`` [E, D, I] = per expert w2.
    """
    if hf_name in _TOP_LEAVES:
        return [_TOP_LEAVES[hf_name]]
    m = _LAYER_RE.match(hf_name)
    if m is None:
        return None
    i, leaf = m.group(1), m.group(2)
    if leaf in _LAYER_LEAVES:
        return [f"layers.{i}.{_LAYER_LEAVES[leaf]}"]
    if leaf == "mlp.experts.gate_up_proj":
        return [f"layers.{i}.ffn.experts.{e}.{w}.weight" for e in range(n_experts) for w in ("w1", "w3")]
    if leaf == "mlp.experts.down_proj":
        return [f"layers.{i}.ffn.experts.{e}.w2.weight" for e in range(n_experts)]
    return None


# ---- random weights --------------------------------------------------------------------------------------------

def _init_native(name: str, shape: tuple[int, ...], cfg: DeepseekV4Config, gen: torch.Generator) -> torch.Tensor:
    """A random fp32 (int64 for tid2eid) tensor for one native parameter, scaled so every path matters.

    Linear weights ~ N(0, 1/fan_in) keep activations O(1); norm weights ~ U(0.75, 1.25); mHC base ~ N(0, 0.5) and
    scales ~ U(0.5, 1.5) make pre/post/comb clearly non-uniform; sinks ~ N(0, 1) take a visible share of the
    softmax; ape ~ N(0, 0.5); gate bias ~ N(0, 0.25) changes some top-k choices; expert w1/w3 are 4x larger than
    1/sqrt(fan_in) so that the SwiGLU clamps at 10 fire for a few per cent of activations (w2 is 4x smaller to
    keep the block output O(1)).
    """
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float32)

    if name.endswith("tid2eid"):
        vocab, top_k = shape
        scores = torch.rand((vocab, cfg.n_routed_experts), generator=gen)
        return scores.argsort(dim=-1)[:, :top_k].to(torch.int64).contiguous()  # distinct experts per row
    if name == "embed.weight":
        return normal(1.0)
    if name.endswith("norm.weight"):  # attn_norm, ffn_norm, q_norm, kv_norm, compressor norms, final norm
        return uniform(0.75, 1.25)
    if name.endswith("_fn"):  # hc_{attn,ffn,head}_fn: input is RMS-normalised [n*D]
        return normal(1.0 / math.sqrt(shape[-1]))
    if name.endswith("_base"):
        return normal(0.5)
    if name.endswith("_scale"):
        return uniform(0.5, 1.5)
    if name.endswith("attn_sink"):
        return normal(1.0)
    if name.endswith(".ape"):
        return normal(0.5)
    if name.endswith("gate.bias"):
        return normal(0.25)
    if ".experts." in name or ".shared_experts." in name:
        if name.endswith(("w1.weight", "w3.weight")):
            return normal(4.0 / math.sqrt(shape[-1]))
        return normal(0.25 / math.sqrt(shape[-1]))  # w2
    if name.endswith(".weight") and len(shape) == 2:  # every other linear (incl. head)
        return normal(1.0 / math.sqrt(shape[-1]))
    raise KeyError(f"hf_oracle: no init rule for native tensor {name!r} {shape}")


def _native_shapes(hf_name: str, t: torch.Tensor, natives: list[str]) -> list[tuple]:
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        e, two_i, d = t.shape
        return [(two_i // 2, d)] * len(natives)
    if hf_name.endswith("mlp.experts.down_proj"):
        e, d, i = t.shape
        return [(d, i)] * len(natives)
    return [tuple(t.shape)]


def _assemble_hf(hf_name: str, natives: list[str], sd: dict[str, torch.Tensor], n_experts: int) -> torch.Tensor:
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        return torch.stack([torch.cat([sd[natives[2 * e]], sd[natives[2 * e + 1]]], dim=0) for e in range(n_experts)])
    if hf_name.endswith("mlp.experts.down_proj"):
        return torch.stack([sd[n] for n in natives])
    return sd[natives[0]]


def build_hf_model(native_cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
                   ) -> tuple[DeepseekV4ForCausalLM, dict[str, torch.Tensor]]:
    """transformers' model with seeded random weights, and the same weights in our native names (fp32).

    Every entry of the HF state dict (parameters and persistent buffers: tid2eid, e_score_correction_bias) is
    mapped to native names exactly once; an unknown HF entry or a native name produced twice raises.
    The returned native state dict is fp32 (tid2eid int64) whatever ``dtype`` is. For ``dtype`` bf16/fp16 the
    HF model keeps in fp32 what ``from_pretrained`` would keep (``_keep_in_fp32_modules_strict`` patterns).
    """
    cfg = hf_config_from_native(native_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _transformers()[0].DeepseekV4ForCausalLM(cfg)
    hf_sd = model.state_dict()
    n_exp = cfg.n_routed_experts

    unmapped = [k for k in hf_sd if hf_to_native_names(k, n_exp) is None]
    # Tensors outside the state dict must be derived (RoPE tables), never weights.
    unmapped += [f"{n} (non-persistent buffer)" for n, _ in model.named_buffers()
                 if n not in hf_sd and not n.endswith("inv_freq")]
    unmapped += [f"{n} (parameter missing from state_dict)" for n, _ in model.named_parameters() if n not in hf_sd]
    if unmapped:
        raise AssertionError("hf_oracle: HF state-dict entries with no native name (update the map):\n  "
                             + "\n  ".join(unmapped))
    native_sd: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for hf_name, t in hf_sd.items():
        natives = hf_to_native_names(hf_name, n_exp)
        for nat, shape in zip(natives, _native_shapes(hf_name, t, natives)):
            if nat in owner:
                raise AssertionError(f"hf_oracle: native name {nat!r} produced by both {owner[nat]!r} and {hf_name!r}")
            owner[nat] = hf_name
            native_sd[nat] = _init_native(nat, shape, cfg, gen)

    new_hf = {}
    for hf_name, t in hf_sd.items():
        v = _assemble_hf(hf_name, hf_to_native_names(hf_name, n_exp), native_sd, n_exp)
        if v.shape != t.shape:
            raise AssertionError(f"hf_oracle: {hf_name}: assembled {tuple(v.shape)} != HF {tuple(t.shape)}")
        new_hf[hf_name] = v.to(t.dtype)
    missing, unexpected = model.load_state_dict(new_hf, strict=True)
    assert not missing and not unexpected
    # Every parameter must now hold our values (catches tied / aliased tensors silently overwritten).
    for hf_name, t in model.state_dict().items():
        assert torch.equal(t, new_hf[hf_name]), f"hf_oracle: {hf_name} did not keep its value"

    if dtype != torch.float32:
        # RoPE inverse-frequency buffers stay fp32 (as with from_pretrained); .to() would round them to bf16.
        inv_freq = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
        model = model.to(dtype)
        for n, b in model.named_buffers():
            if n in inv_freq:
                b.data = inv_freq[n]
        keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in new_hf and t.is_floating_point() and any(k in name for k in keep):
                t.data = new_hf[name].float().clone()  # exact fp32 values, not bf16-rounded ones
    model.eval()
    return model, native_sd


# ---- deterministic indexer top-k ------------------------------------------------------------------------------

_PATCH = {"depth": 0, "calls": 0, "orig": None, "code": None}  # code: DeepseekV4Indexer.forward's


def _stable_topk(t: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    vals, idx = torch.sort(t, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((vals.narrow(dim, 0, k), idx.narrow(dim, 0, k)))


def _patched_topk(self, k, dim=-1, largest=True, sorted=True, *args, **kwargs):
    if sys._getframe(1).f_code is _PATCH["code"] and not args and not kwargs:
        _PATCH["calls"] += 1
        return _stable_topk(self, k, dim=dim, largest=largest, sorted=sorted)
    return _PATCH["orig"](self, k, dim, largest, sorted, *args, **kwargs)


class _Hits:
    """Number of indexer top-k calls intercepted since the context was entered: ``hits["calls"]``."""

    def __init__(self) -> None:
        self._start = _PATCH["calls"]

    def __getitem__(self, key: str) -> int:
        if key != "calls":
            raise KeyError(key)
        return _PATCH["calls"] - self._start


@contextlib.contextmanager
def stable_indexer_topk() -> Iterator[_Hits]:
    """Inside this (re-entrant) context, the ``.topk`` calls made by HF's ``DeepseekV4Indexer.forward`` (and only
    those) pick higher scores first and break ties by the LOWER entry index (a stable descending sort). -inf
    (non-causal) entries sort last, so HF's -1 replacement of non-admissible picks is unchanged. Yields a counter:
    ``hits["calls"]`` = indexer top-k calls intercepted since entering."""
    if _PATCH["depth"] == 0:
        _PATCH["code"] = _transformers()[1].DeepseekV4Indexer.forward.__code__
        _PATCH["orig"] = torch.Tensor.topk
        torch.Tensor.topk = _patched_topk
    _PATCH["depth"] += 1
    try:
        yield _Hits()
    finally:
        _PATCH["depth"] -= 1
        if _PATCH["depth"] == 0:
            torch.Tensor.topk = _PATCH["orig"]
            _PATCH["orig"] = None


# ---- forward helpers ------------------------------------------------------------------------------------------

def hf_logits(model: DeepseekV4ForCausalLM, input_ids: torch.LongTensor) -> torch.Tensor:
    """fp32 logits [B, S, V] of one full forward without cache (stable indexer top-k)."""
    with torch.no_grad(), stable_indexer_topk():
        out = model(input_ids=input_ids, use_cache=False)
    return out.logits.float()


def hf_cached_logits(model: DeepseekV4ForCausalLM, input_ids: torch.LongTensor,
                     chunks: list[int]) -> torch.Tensor:
    """fp32 logits [B, sum(chunks), V] computed chunk by chunk through HF's own cache (DynamicCache with the
    V4 sliding / CSA / HCA layers): e.g. ``chunks=[20] + [1] * 20`` = prefill 20 tokens, then decode 20."""
    from transformers import DynamicCache

    assert sum(chunks) == input_ids.shape[1], (chunks, input_ids.shape)
    cache = DynamicCache(config=model.config)
    outs, start = [], 0
    with torch.no_grad(), stable_indexer_topk():
        for n in chunks:
            out = model(input_ids=input_ids[:, start:start + n], past_key_values=cache, use_cache=True)
            outs.append(out.logits.float())
            start += n
    return torch.cat(outs, dim=1)


def hf_generate_greedy(model: DeepseekV4ForCausalLM, input_ids: torch.LongTensor,
                       max_new_tokens: int) -> torch.LongTensor:
    """Greedy decode with HF's cache (prefill the prompt, then one token at a time, argmax, no EOS stop).
    Returns prompt + generated tokens, [B, S + max_new_tokens]. Ties in argmax go to the lowest token id."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    seq = input_ids
    step_in = input_ids
    with torch.no_grad(), stable_indexer_topk():
        for _ in range(max_new_tokens):
            logits = model(input_ids=step_in, past_key_values=cache, use_cache=True).logits[:, -1].float()
            nxt = logits.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            step_in = nxt
    return seq
