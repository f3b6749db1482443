"""Typed DeepSeek-V4 model configuration.

Reads a `config.json` written with the official (native HF-hub) field names or with transformers' folded names
(`layer_types`, `mlp_layer_types`, `rope_parameters`, `compress_rates`), validates it, and offers presets for the
released models plus tiny random test models.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "preset", "load_config", "read_config_json"]


class ConfigError(ValueError):
    """A config value is missing or out of range; the message names the key and what is allowed."""


# Keys whose values must be integers / positive finite numbers (validate() checks the types before the ranges).
_INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim",
             "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim",
             "index_topk", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
             "num_hash_layers", "hc_mult", "hc_sinkhorn_iters", "rope_original_max_position",
             "max_position_embeddings", "num_nextn_predict_layers", "bos_token_id", "eos_token_id")
_FLOAT_KEYS = ("routed_scaling_factor", "swiglu_limit", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
               "rope_factor", "rope_beta_fast", "rope_beta_slow")

# transformers' layer_types <-> native compress ratios.
_LAYER_TYPE_TO_RATIO = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}


@dataclass
class ModelConfig:
    """Every hyper-parameter of a DeepSeek-V4 model, in the official config.json names."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One ratio per layer plus one for each MTP block: 0 = sliding window only, 4 = CSA, other (128) = HCA.
    compress_ratios: list[int] = field(default_factory=list)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # YaRN for the compress RoPE table (CSA/HCA layers); sliding-window layers use plain RoPE.
    rope_factor: float = 16.0
    rope_original_max_position: int = 65536
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    # A config.json `eos_token_id` list: its first id is `eos_token_id`, the others end a sequence too (as
    # transformers' generate stops on any of them).
    extra_eos_token_ids: list[int] = field(default_factory=list)
    tie_word_embeddings: bool = False
    # Checkpoint storage: "fp8" = block-scaled e4m3 linears; None = unquantised (bf16/fp32) weights.
    quant_method: str | None = "fp8"
    # Routed-expert storage: "fp4" (MXFP4), "fp8" or None (same as the other linears).
    expert_dtype: str | None = "fp4"
    torch_dtype: str = "bfloat16"

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a sequence: `eos_token_id`, then the config list's others."""
        return [self.eos_token_id, *self.extra_eos_token_ids]

    @property
    def layer_ratios(self) -> list[int]:
        """Compress ratio of each main-model layer (MTP entries excluded)."""
        return self.compress_ratios[: self.num_hidden_layers]

    @property
    def mtp_ratios(self) -> list[int]:
        """Compress ratio of each MTP block (always 0: sliding window only)."""
        return self.compress_ratios[self.num_hidden_layers :]

    def __post_init__(self) -> None:
        if not isinstance(self.compress_ratios, list) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in self.compress_ratios):
            raise ConfigError(f"config key 'compress_ratios': must be a list of integers, found "
                              f"{self.compress_ratios!r}"[:300])
        if not self.compress_ratios and isinstance(self.num_hidden_layers, int) and \
                isinstance(self.num_nextn_predict_layers, int):
            self.compress_ratios = [0] * (self.num_hidden_layers + self.num_nextn_predict_layers)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the offending key when a value is impossible."""

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config key '{key}': {msg}")

        # Types first, so the range checks below never compare a string with a number.
        for key in _INT_KEYS:
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool), key, f"must be an integer, found {v!r}")
        for key in _FLOAT_KEYS:
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), key,
                 f"must be a finite number, found {v!r}")
            need(v > 0, key, f"must be > 0 (a non-positive value makes the model meaningless), found {v!r}")
        extra = self.extra_eos_token_ids
        need(isinstance(extra, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in extra),
             "eos_token_id", f"must be an integer or a list of integers, found extra ids {extra!r}"[:300])
        for key in ("norm_topk_prob", "tie_word_embeddings"):
            need(isinstance(getattr(self, key), bool), key, f"must be true or false, found {getattr(self, key)!r}")
        # Fixed in V4 (DeepSeek's inference code and transformers): the top-k weights are always renormalised, and
        # the output head is its own tensor. Accepting the other value would ignore it.
        need(self.norm_topk_prob, "norm_topk_prob", "only true is implemented (V4 renormalises the routed top-k "
                                                    "weights); found false")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "only false is implemented (V4's output head is "
                                                                  "a separate tensor); found true")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                    "index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, key,
                 f"must be a positive integer, found {v!r}")
        need(len(self.compress_ratios) in (self.num_hidden_layers,
                                           self.num_hidden_layers + self.num_nextn_predict_layers),
             "compress_ratios",
             f"needs num_hidden_layers (+ num_nextn_predict_layers) = {self.num_hidden_layers}"
             f" (+{self.num_nextn_predict_layers}) entries, found {len(self.compress_ratios)}")
        if len(self.compress_ratios) == self.num_hidden_layers:
            self.compress_ratios = self.compress_ratios + [0] * self.num_nextn_predict_layers
        for i, r in enumerate(self.compress_ratios):
            need(r == 0 or r == 4 or (r > 4 and r % 2 == 0), f"compress_ratios[{i}]",
                 f"allowed values are 0 (sliding window), 4 (CSA) or an even ratio > 4 (HCA, 128 in the "
                 f"released models); found {r}")
        for i, r in enumerate(self.mtp_ratios):
            need(r == 0, f"compress_ratios[{self.num_hidden_layers + i}]",
                 f"MTP blocks use sliding-window attention only (0); found {r}")
        need(0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}); found {self.qk_rope_head_dim}")
        need(self.qk_rope_head_dim < self.index_head_dim, "index_head_dim",
             f"must exceed qk_rope_head_dim={self.qk_rope_head_dim}; found {self.index_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"must divide num_attention_heads={self.num_attention_heads}; found {self.o_groups}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts={self.n_routed_experts}; found {self.num_experts_per_tok}")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]; found {self.num_hash_layers}")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func",
             f"allowed values: 'sqrtsoftplus'; found {self.scoring_func!r}")
        need(self.n_shared_experts in (0, 1), "n_shared_experts", f"allowed values: 0, 1; found {self.n_shared_experts}")
        need(self.quant_method in (None, "fp8"), "quantization_config.quant_method",
             f"allowed values: 'fp8' or absent; found {self.quant_method!r}")
        need(self.expert_dtype in (None, "fp4", "fp8"), "expert_dtype",
             f"allowed values: 'fp4', 'fp8' or absent; found {self.expert_dtype!r}")
        need(self.torch_dtype in ("bfloat16", "float32", "float16"), "torch_dtype",
             f"allowed values: 'bfloat16', 'float32', 'float16'; found {self.torch_dtype!r}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")

    # ---- io ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict in native or transformers names; unknown keys are ignored."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object, found {type(raw).__name__}")
        try:
            return cls._from_dict(raw)
        except (TypeError, ValueError, AttributeError) as e:  # a folded key of the wrong type (ConfigError passes)
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        d = dict(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        _refuse_unimplemented(d)
        n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
        # transformers' folded layer description. When the native `compress_ratios` is there too, transformers
        # reads the folded keys and DeepSeek's code the native one: they must agree.
        if "layer_types" in d or "compress_rates" in d:
            folded = _folded_ratios(d, n_layers)
            if "compress_ratios" not in d:
                out["compress_ratios"] = folded + [0] * int(d.get("num_nextn_predict_layers", 1))
            elif isinstance(d["compress_ratios"], list) and folded != d["compress_ratios"][:len(folded)]:
                raise ConfigError(f"config keys 'compress_ratios' and 'layer_types'/'compress_rates' disagree: "
                                  f"{d['compress_ratios'][:len(folded)]} vs {folded} (transformers reads the "
                                  "folded keys, DeepSeek's code compress_ratios)"[:400])
        elif "compress_ratios" not in d:
            raise ConfigError("config key 'compress_ratios': missing (one compress ratio per layer, as the released "
                              "config.json has; or transformers' 'layer_types')")
        mlt = d.get("mlp_layer_types")
        if mlt is not None:
            n_hash = _hash_prefix(mlt, n_layers)
            if "num_hash_layers" in d and d["num_hash_layers"] != n_hash:
                raise ConfigError(f"config keys 'num_hash_layers' ({d['num_hash_layers']!r}) and 'mlp_layer_types' "
                                  f"({n_hash} hash_moe layers) disagree")
            out["num_hash_layers"] = n_hash
        # RoPE width: transformers takes head_dim * partial_rotary_factor (default 64/512), DeepSeek's code
        # qk_rope_head_dim (default 64); where both readings exist they must agree.
        head_dim = d.get("head_dim", cls.head_dim)
        prf = d.get("partial_rotary_factor")
        if prf is not None:
            rope = int(head_dim * prf)
            if "qk_rope_head_dim" in d and d["qk_rope_head_dim"] != rope:
                raise ConfigError(f"config keys 'qk_rope_head_dim' ({d['qk_rope_head_dim']!r}) and "
                                  f"'partial_rotary_factor' (x head_dim {head_dim} = {rope}) disagree")
            out["qk_rope_head_dim"] = rope
        elif "qk_rope_head_dim" not in d and head_dim != cls.head_dim:
            raise ConfigError(f"config key 'qk_rope_head_dim': missing, and with head_dim {head_dim} its defaults "
                              f"differ (DeepSeek's code: 64, transformers: head_dim / 8 = {head_dim // 8}); give it")
        # No YaRN unless the config asks for it: a config.json without `rope_scaling` (or transformers' folded
        # `rope_parameters` whose "compress" entry has rope_type "default") means plain RoPE on the compress table,
        # as transformers reads it; factor 1 is exactly that (rope.rope_inv_freq). The dataclass default (16) is
        # the released models' value, for configs built in code.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "main" in rp:
            out.setdefault("rope_theta", rp["main"].get("rope_theta", 10000.0))
            c = rp.get("compress", {})
            if "rope_theta" in c:
                out["compress_rope_theta"] = c["rope_theta"]
            _yarn_into(out, c, "rope_parameters.compress", default_type="default")
        elif isinstance(rp, dict) and d.get("rope_scaling") is None:
            # transformers' un-nested form: the YaRN (or default) parameters of the compress table
            _yarn_into(out, rp, "rope_parameters", default_type="default")
        elif "rope_parameters" not in d and d.get("rope_scaling") is None:
            out["rope_factor"] = 1.0
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise ConfigError(f"config key 'rope_scaling': must be an object (or null), found {rs!r}"[:300])
        if isinstance(rs, dict):
            _yarn_into(out, rs, "rope_scaling", default_type="yarn")
        qc = d.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ConfigError(f"config key 'quantization_config': must be an object (or absent), found {qc!r}"[:300])
        if qc is None:
            out["quant_method"] = None
            if "expert_dtype" not in d:
                out["expert_dtype"] = None
        else:
            out["quant_method"] = qc.get("quant_method")
            for key, want in _FIXED_QUANT.items():  # the released format; the loader and kernels assume it
                if key in qc and qc[key] != want:
                    raise ConfigError(f"config key 'quantization_config.{key}': only {json.dumps(want)} is "
                                      f"implemented (the released FP8 format); found {qc[key]!r}"[:300])
            if "expert_dtype" not in d and "expert_dtype" in qc:
                out["expert_dtype"] = qc["expert_dtype"]
        if d.get("dtype") is not None and "torch_dtype" not in d:  # transformers writes "dtype": null when unset
            out["torch_dtype"] = d["dtype"]
        for k, v in d.items():
            if k in names and k not in out:
                out[k] = v
        eos = out.get("eos_token_id")
        if isinstance(eos, list):
            if not eos or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
                raise ConfigError(f"config key 'eos_token_id': must be an integer or a non-empty list of integers, "
                                  f"found {eos!r}"[:300])
            out["eos_token_id"], out["extra_eos_token_ids"] = eos[0], [t for t in dict.fromkeys(eos[1:])
                                                                       if t != eos[0]]
        try:
            return cls(**out)
        except TypeError as e:  # wrong value types
            raise ConfigError(f"invalid config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Official native config.json layout (what the released checkpoints ship)."""
        d = dataclasses.asdict(self)
        if d.pop("extra_eos_token_ids"):
            d["eos_token_id"] = self.eos_ids
        for k in ("rope_factor", "rope_original_max_position", "rope_beta_fast", "rope_beta_slow", "quant_method"):
            d.pop(k)
        if self.rope_factor > 1:  # else plain RoPE: no rope_scaling key (from_dict reads that back as factor 1)
            d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.rope_beta_fast,
                                 "beta_slow": self.rope_beta_slow,
                                 "original_max_position_embeddings": self.rope_original_max_position}
        if self.quant_method is not None:
            d["quantization_config"] = {"quant_method": self.quant_method, "fmt": "e4m3",
                                        "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                                        "weight_block_size": [128, 128]}
        if self.expert_dtype is None:
            d.pop("expert_dtype")
        d.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", num_key_value_heads=1,
                 hidden_act="silu", topk_method="noaux_tc")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Keys of the released config.json (or transformers' config) that this model does not read because it implements
# exactly one value of each (DeepSeek's inference code and transformers' DeepseekV4 model); any other value would
# change the math, so it is refused rather than ignored.
_FIXED_KEYS = {"hidden_act": "silu", "mlp_bias": False, "attention_bias": False, "num_key_value_heads": 1}
_FIXED_QUANT = {"fmt": "e4m3", "weight_block_size": [128, 128]}  # what the FP8 weights are; the loader assumes it


def _refuse_unimplemented(d: dict[str, Any]) -> None:
    for key, want in _FIXED_KEYS.items():
        if key in d and d[key] != want:
            raise ConfigError(f"config key '{key}': only {json.dumps(want)} is implemented (DeepSeek-V4's value); "
                              f"found {d[key]!r}"[:300])


def _folded_ratios(d: dict[str, Any], n_layers: int) -> list[int]:
    """Per-layer compress ratios from transformers' `layer_types` + `compress_rates` (or, without `layer_types`,
    the native `compress_ratios` re-rated by `compress_rates`, as transformers reads it)."""
    rates = d.get("compress_rates") or {}
    if not isinstance(rates, dict):
        raise ConfigError(f"config key 'compress_rates': must be an object, found {rates!r}"[:300])
    for t, want in (("compressed_sparse_attention", lambda r: r == 4), ("heavily_compressed_attention",
                                                                        lambda r: r != 4)):
        if t in rates and not (isinstance(rates[t], int) and want(rates[t])):
            raise ConfigError(f"config key 'compress_rates.{t}': the layer kind is its ratio here (4 = CSA, an "
                              f"even ratio > 4 = HCA); found {rates[t]!r}"[:300])
    types = d.get("layer_types")
    if types is None:  # native ratios, re-rated by compress_rates where transformers maps them to a kind
        native = d.get("compress_ratios")
        if not isinstance(native, list):
            raise ConfigError("config key 'layer_types': required when 'compress_ratios' is absent")
        kind = {4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
        return [int(rates.get(kind[r], r)) if r in kind else r for r in native[:n_layers]]
    if not isinstance(types, list):
        raise ConfigError(f"config key 'layer_types': must be a list, found {types!r}"[:300])
    ratios = []
    for i, t in enumerate(types):
        if t not in _LAYER_TYPE_TO_RATIO:
            raise ConfigError(f"config key 'layer_types[{i}]': allowed values {sorted(_LAYER_TYPE_TO_RATIO)}; "
                              f"found {t!r}")
        ratios.append(int(rates.get(t, _LAYER_TYPE_TO_RATIO[t])) if t != "sliding_attention" else 0)
    return ratios


def _hash_prefix(types: Any, n_layers: int) -> int:
    """Number of hash-routed layers in transformers' `mlp_layer_types` (they must come first, as in V4)."""
    if not isinstance(types, list) or any(t not in ("hash_moe", "moe") for t in types) or len(types) != n_layers:
        raise ConfigError(f"config key 'mlp_layer_types': must list 'hash_moe' / 'moe' for each of the "
                          f"num_hidden_layers={n_layers} layers; found {types!r}"[:300])
    n = types.count("hash_moe")
    if types[:n] != ["hash_moe"] * n:
        raise ConfigError(f"config key 'mlp_layer_types': hash-routed layers must come first (DeepSeek-V4 hashes "
                          f"the first num_hash_layers layers); found {types!r}"[:300])
    return n


def _yarn_into(out: dict[str, Any], rs: dict[str, Any], key: str, default_type: str) -> None:
    """The compress table's RoPE scaling from `rs` (rope_scaling, or transformers' rope_parameters entry) into
    `out`: YaRN's factor / original length / betas, or factor 1 for plain RoPE. Settings that change YaRN in
    transformers but that DeepSeek-V4 does not use (an attention factor other than 1, truncate=false) are refused."""
    kind = rs.get("type", rs.get("rope_type", default_type))
    if kind not in ("yarn", "default"):
        raise ConfigError(f"config key '{key}.type': allowed values ['yarn', 'default']; found {kind!r}")
    if kind == "default":
        out["rope_factor"] = 1.0
        return
    if rs.get("attention_factor", 1.0) != 1.0:  # V4 scales neither cos/sin nor the logits by a YaRN mscale
        raise ConfigError(f"config key '{key}.attention_factor': only 1.0 is implemented (DeepSeek-V4 applies no "
                          f"YaRN attention scaling); found {rs['attention_factor']!r}"[:300])
    if rs.get("truncate", True) is not True:  # DeepSeek's correction range is floored / ceiled
        raise ConfigError(f"config key '{key}.truncate': only true is implemented (DeepSeek-V4 rounds YaRN's "
                          f"correction range); found {rs['truncate']!r}"[:300])
    for src, dst in (("factor", "rope_factor"), ("original_max_position_embeddings", "rope_original_max_position"),
                     ("beta_fast", "rope_beta_fast"), ("beta_slow", "rope_beta_slow")):
        if src in rs:
            out[dst] = rs[src]


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in a config.json file; ConfigError naming the file when it is missing, a directory, not
    UTF-8 / JSON, or not a JSON object."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: missing (a model directory holds config.json next to its safetensors shards)") \
            from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config.json file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: must hold a JSON object, found a JSON {type(raw).__name__}")
    return raw


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a directory holding one); ConfigError names the file and, for a bad value, the key."""
    p = Path(path)
    if p.is_dir() and not p.name == "config.json":
        p = p / "config.json"
    raw = read_config_json(p)
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _flash() -> ModelConfig:
    # Matches config.json of the official Hugging Face repo deepseek-ai/DeepSeek-V4-Flash.
    return ModelConfig(compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0])


def _pro() -> ModelConfig:
    # Matches config.json of the official Hugging Face repo deepseek-ai/DeepSeek-V4-Pro.
    return ModelConfig(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                       o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, index_topk=1024,
                       routed_scaling_factor=2.5, compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0])


def _tiny() -> ModelConfig:
    """All three layer types, both MoE kinds, small windows so short prompts cross many boundaries."""
    # Whole 128x128 blocks wherever DeepSeek's format and kernels need them: every FP8 linear's K and N (hidden,
    # q_lora_rank, head_dim, heads * head_dim, o_groups * o_lora_rank, heads * head_dim / o_groups, index heads *
    # index_head_dim, moe_intermediate_size) and the routed experts' K (FP8 act-quant asserts K % 128 == 0;
    # DeepSeek's convert.py reshapes the FP8 weights into 128x128 tiles). head_dim - rope = 64 and index_head_dim
    # 128: whole blocks for the FP8 (64) and FP4 (32) simulations and a 128-point indexer Hadamard, as released.
    return ModelConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
                       qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=8,
                       compress_ratios=[0, 4, 8, 4, 0], index_n_heads=2, index_head_dim=128, index_topk=4,
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=2,
                       rope_original_max_position=64, max_position_embeddings=4096)


def _small() -> ModelConfig:
    """Benchmark size: big enough that matmuls dominate, small enough for 2 CPU cores."""
    # head_dim - rope = 128 and index_head_dim 128: whole blocks for the FP8 (64) and FP4 (32) simulations.
    return ModelConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, head_dim=192,
                       qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=64,
                       compress_ratios=[0, 4, 16, 4, 0], index_n_heads=4, index_head_dim=128, index_topk=32,
                       n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, num_hash_layers=1,
                       rope_original_max_position=1024, max_position_embeddings=65536)


def _long() -> ModelConfig:
    """V4's real context settings (window 128, CSA ratio 4 with V4-Flash's index_topk 512, HCA ratio 128, YaRN over
    65,536 x 16 = 1,048,576 positions) with widths narrow enough to prefill 1M tokens on a CPU."""
    # head_dim - rope = 64 and index_head_dim 32: whole blocks for the FP8 (64) / FP4 (32) simulations.
    return ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, head_dim=80,
                       qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=128,
                       compress_ratios=[0, 4, 128, 0], index_n_heads=2, index_head_dim=32, index_topk=512,
                       n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
                       rope_factor=16.0, rope_original_max_position=65536, max_position_embeddings=1048576)


PRESETS = {"v4-flash": _flash, "v4-pro": _pro, "tiny": _tiny, "small": _small, "long": _long}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
