"""Cross-implementation parity: our reference backend vs transformers' DeepseekV4ForCausalLM (tiny, fp32)."""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.config import ConfigError, ModelConfig
from dsv4_ascend.hf_oracle import TINY_NATIVE_CFG, build_hf_model, hf_cached_logits, hf_generate_greedy, hf_logits
from dsv4_ascend.engine import Engine
from dsv4_ascend.model import Transformer
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.sampling import SamplingParams
from dsv4_ascend.weights import assign_tensors

# fp32 on both sides, same weights, same math; the implementations differ only in op order (e.g. HF normalises
# the mHC input before the fn projection, we scale after), which moves logits by ~1e-6. 1e-4 is the bar.
TOL = 1e-4


def _pair(seed: int = 0):
    hf, sd = build_hf_model(TINY_NATIVE_CFG, seed=seed)
    cfg = ModelConfig.from_dict(TINY_NATIVE_CFG)
    ours = Transformer(cfg, ReferenceBackend(), torch.float32, n_mtp=0)  # HF has no MTP block
    assign_tensors(ours, sd.items(), source="transformers state dict")
    return hf, ours


def test_config_has_every_layer_and_moe_kind():
    cfg = ModelConfig.from_dict(TINY_NATIVE_CFG)
    assert set(cfg.layer_ratios) == {0, 4, 8}
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers


def test_full_forward_logits_match_transformers():
    hf, ours = _pair(0)
    # 70 tokens: window 8, CSA ratio 4 (17 entries, top-4 selected), HCA ratio 8 (8 entries): many boundaries.
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))
    diff = (hf_logits(hf, ids) - ours(ids)).abs().max().item()
    assert diff <= TOL, diff


def test_greedy_generation_matches_transformers():
    hf, ours = _pair(1)
    prompt = torch.randint(2, 512, (1, 11), generator=torch.Generator().manual_seed(5))
    want = hf_generate_greedy(hf, prompt, max_new_tokens=30)[0, 11:].tolist()
    eng = Engine(ours, max_slots=1, max_seq_len=64, eos_token_id=-1)
    got = eng.generate([prompt[0].tolist()], SamplingParams(temperature=0, max_tokens=30))[0].output
    assert got == want


def _pair_from(native: dict, ours_cfg: dict | None = None, seed: int = 0):
    """transformers' model of `native` and ours built from `ours_cfg` (default: the same dict), same weights."""
    hf, sd = build_hf_model(native, seed=seed)
    ours = Transformer(ModelConfig.from_dict(ours_cfg or native), ReferenceBackend(), torch.float32, n_mtp=0)
    assign_tensors(ours, sd.items(), source="transformers state dict")
    return hf, ours


def test_config_without_rope_scaling_is_plain_rope_as_in_transformers():
    """No `rope_scaling` in config.json: transformers uses plain RoPE on the compress table; we applied the
    released models' YaRN (factor 16) anyway, and logits differed by ~0.1."""
    native = {k: v for k, v in TINY_NATIVE_CFG.items() if k != "rope_scaling"}
    assert ModelConfig.from_dict(native).rope_factor == 1.0
    hf, ours = _pair_from(native)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max().item() <= TOL


def test_config_saved_by_transformers_reads_back():
    """A config.json written by transformers (folded `layer_types` / `rope_parameters` names), with and without
    YaRN, builds the same model as the native one: logits equal transformers'."""
    from dsv4_ascend.hf_oracle import hf_config_from_native

    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    for native in (TINY_NATIVE_CFG, {k: v for k, v in TINY_NATIVE_CFG.items() if k != "rope_scaling"}):
        saved = hf_config_from_native(native).to_dict()
        assert "compress_ratios" not in saved and "rope_parameters" in saved
        mine, theirs = ModelConfig.from_dict(native), ModelConfig.from_dict(saved)
        assert (theirs.compress_ratios[:theirs.num_hidden_layers], theirs.num_hash_layers, theirs.rope_factor,
                theirs.rope_original_max_position, theirs.qk_rope_head_dim) == \
            (mine.layer_ratios, mine.num_hash_layers, mine.rope_factor, mine.rope_original_max_position,
             mine.qk_rope_head_dim)
        hf, ours = _pair_from(native, saved)
        assert (hf_logits(hf, ids) - ours(ids)).abs().max().item() <= TOL


# Seeded random tiny configs (a bounded sample of /work-style fuzzing, kept small for the default suite): layer
# mixes incl. all-SWA / all-CSA / HCA-only, hash layers 0..n, hc_mult 1/2, index_topk above the entry count,
# windows shorter and longer than the prompt; a ragged batch (rows of different lengths) prefilled together, then
# decoded together across compression boundaries, each row against transformers' cached run of that row alone.
FUZZ = [
    dict(num_hidden_layers=2, compress_ratios=[0, 0, 0], num_hash_layers=0, hc_mult=1, sliding_window=4),
    dict(num_hidden_layers=2, compress_ratios=[4, 4, 0], num_hash_layers=2, hc_mult=2, index_topk=64,
         sliding_window=16, o_groups=1),
    dict(num_hidden_layers=3, compress_ratios=[8, 4, 8, 0], num_hash_layers=1, hc_mult=2, index_topk=1,
         sliding_window=128, num_experts_per_tok=1),
]


# Case 0 runs by default (10 s at load 16 on a 2-core box); cases 1-2 took 5-6x longer there: slow.
@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, len(FUZZ)))])
def test_seeded_random_configs_ragged_prefill_then_decode_match_transformers(case):
    native = {**TINY_NATIVE_CFG, "num_attention_heads": 4, **FUZZ[case]}
    hf, ours = _pair_from(native, seed=case)
    lengths, steps = [13, 6, 9][: case + 2], 10
    g = torch.Generator().manual_seed(case)
    rows = [torch.randint(2, 512, (1, n + steps), generator=g) for n in lengths]
    want = [hf_cached_logits(hf, r, [n] + [1] * steps)[0] for r, n in zip(rows, lengths)]
    b = len(rows)
    cache, slots = ours.new_cache(b, max(lengths) + steps), torch.arange(b)
    ids = torch.zeros(b, max(lengths), dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = r[0, :n]
    logits, _, _ = ours.prefill(ids, cache, slots, [0] * b, lengths=lengths)
    for i, n in enumerate(lengths):
        assert (logits[i, :n] - want[i][:n]).abs().max().item() <= TOL, (case, i)
    for t in range(steps):
        tok = torch.stack([r[0, n + t] for r, n in zip(rows, lengths)]).view(b, 1)
        out = ours.decode(tok, torch.tensor([n + t for n in lengths]), cache, slots)[:, 0]
        for i, n in enumerate(lengths):
            assert (out[i] - want[i][n + t]).abs().max().item() <= TOL, (case, i, t)


def test_transformers_save_pretrained_directory_loads_and_matches(tmp_path):
    """What `DeepseekV4ForCausalLM.save_pretrained` writes loads as is: its config (folded names, "dtype": null, no
    rope_scaling here), its tensor names (`model.` prefix, native leaves, but the attention's kv_norm saved as
    `attn.norm`: transformers' inverse of its `.norm.` -> `.kv_norm.` rename) and no MTP block (transformers has
    none). Was: 'model.layers.0.attn.norm.weight' is unexpected, then 53 missing mtp.* tensors."""
    from dsv4_ascend.loading import load_model

    native = {k: v for k, v in TINY_NATIVE_CFG.items() if k != "rope_scaling"}
    hf, _ = build_hf_model(native, seed=2)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), dtype="float32", progress=False)
    assert len(ours.mtp) == 0
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(6))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max().item() <= TOL


# Config keys that transformers (and DeepSeek's inference code) read differently from what we would do: each was
# accepted and ignored (or read another way than transformers), so the model silently differed; now each is
# refused with the key named. E.g. "hidden_act": "gelu" moved transformers' logits by 1.7 against ours.
_RS = TINY_NATIVE_CFG["rope_scaling"]
_LAYERS = TINY_NATIVE_CFG["num_hidden_layers"]
REFUSED = {
    "hidden_act": ({"hidden_act": "gelu"}, "config key 'hidden_act'"),
    "mlp_bias": ({"mlp_bias": True}, "config key 'mlp_bias'"),
    "norm_topk_prob": ({"norm_topk_prob": False}, "config key 'norm_topk_prob'"),
    "tie_word_embeddings": ({"tie_word_embeddings": True}, "config key 'tie_word_embeddings'"),
    "attention_factor": ({"rope_scaling": {**_RS, "attention_factor": 1.3}}, "'rope_scaling.attention_factor'"),
    "truncate": ({"rope_scaling": {**_RS, "truncate": False}}, "'rope_scaling.truncate'"),
    "layer_types_vs_ratios": ({"layer_types": ["sliding_attention"] * _LAYERS},
                              "'compress_ratios' and 'layer_types'/'compress_rates' disagree"),
    "compress_rates_vs_ratios": ({"compress_ratios": [0, 4, 128, 4, 0],
                                 "compress_rates": {"heavily_compressed_attention": 16}},
                                "'compress_ratios' and 'layer_types'/'compress_rates' disagree"),
    "csa_rate": ({"compress_rates": {"compressed_sparse_attention": 8}},
                 "'compress_rates.compressed_sparse_attention'"),
    "hash_not_first": ({"mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * (_LAYERS - 2)},
                       "'mlp_layer_types': hash-routed layers must come first"),
    "hash_count": ({"mlp_layer_types": ["hash_moe"] + ["moe"] * (_LAYERS - 1)},
                   "'num_hash_layers' (2) and 'mlp_layer_types' (1 hash_moe layers) disagree"),
    "partial_rotary_factor": ({"partial_rotary_factor": 0.25},
                              "'qk_rope_head_dim' (64) and 'partial_rotary_factor' (x head_dim 128 = 32) disagree"),
    "no_qk_rope_head_dim": ({"qk_rope_head_dim": None}, "config key 'qk_rope_head_dim': missing"),
    "no_layer_schedule": ({"compress_ratios": None}, "config key 'compress_ratios': missing"),
    "fp8_block": ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
                  "config key 'quantization_config.weight_block_size': only [128, 128]"),
    "fp8_format": ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}},
                   "config key 'quantization_config.fmt': only \"e4m3\""),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_config_keys_transformers_reads_differently_are_refused_by_name(case):
    change, want = REFUSED[case]
    raw = {**TINY_NATIVE_CFG, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert want in str(e.value), str(e.value)


def test_folded_keys_read_as_transformers_reads_them():
    """Accepted and matching transformers: its un-nested `rope_parameters` (the compress table's YaRN; was read as
    the released models' default YaRN, factor 16 over 65,536), `mlp_layer_types` alone, `partial_rotary_factor`
    alone, and the released config's fixed keys at their values."""
    base = {k: v for k, v in TINY_NATIVE_CFG.items() if k not in ("rope_scaling", "num_hash_layers",
                                                                   "qk_rope_head_dim")}
    native = {**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                          "beta_fast": 16, "beta_slow": 2},
              "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"], "partial_rotary_factor": 0.5,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "num_key_value_heads": 1}
    cfg = ModelConfig.from_dict(native)
    assert (cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow,
            cfg.num_hash_layers, cfg.qk_rope_head_dim) == (4.0, 32, 16, 2, 1, 64)
    hf, ours = _pair_from({**native, "qk_rope_head_dim": 64})  # hf_oracle checks the rope width against this key
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(8))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max().item() <= TOL
