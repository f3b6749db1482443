"""Sanity of the transformers oracle (dsv4_ascend/hf_oracle.py): seeds, name map, tie-break patch, cached paths."""
from __future__ import annotations

import os

import pytest
import torch

from dsv4_ascend.hf_oracle import (
    TINY_NATIVE_CFG,
    build_hf_model,
    hf_cached_logits,
    hf_generate_greedy,
    hf_logits,
    stable_indexer_topk,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: one thread is fastest and immune to the shared-core slowdowns seen on these machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(_one_thread):
    return build_hf_model(TINY_NATIVE_CFG, seed=0)


def _ids(b: int, s: int, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, TINY_NATIVE_CFG["vocab_size"], (b, s), generator=torch.Generator().manual_seed(seed))


def test_cached_prefill_decode_matches_full_forward(tiny):
    """HF full forward on 40 tokens == HF cached prefill(20) + 20 single-token decodes, with the stable indexer
    top-k. Without the patch the two differ by ~0.3 (exact-zero index scores tie, torch.topk breaks them by
    tensor length), so this also proves the patch reaches HF's indexer."""
    model, _ = tiny
    ids = _ids(2, 40)
    with stable_indexer_topk() as hits:
        full = hf_logits(model, ids)
        assert hits["calls"] > 0, "the indexer top-k patch never fired"
    cached = hf_cached_logits(model, ids, [20] + [1] * 20)
    assert full.shape == (2, 40, TINY_NATIVE_CFG["vocab_size"]) and full.dtype == torch.float32
    assert full.std() > 0.3  # logits are not degenerate
    torch.testing.assert_close(cached, full, rtol=0, atol=2e-5)
    # Uneven chunks (window / compression boundaries mid-chunk) agree as well.
    chunked = hf_cached_logits(model, ids, [3, 5, 11, 1, 1, 19])
    torch.testing.assert_close(chunked, full, rtol=0, atol=2e-5)


def test_greedy_generate_consistent_with_full_forward(tiny):
    model, _ = tiny
    prompt = _ids(2, 20, seed=2)
    seq = hf_generate_greedy(model, prompt, 12)
    assert seq.shape == (2, 32) and torch.equal(seq[:, :20], prompt)
    logits = hf_logits(model, seq)
    assert torch.equal(logits[:, 19:-1].argmax(-1), seq[:, 20:])


def test_seeded_and_complete_native_state_dict(tiny):
    model, sd = tiny
    cfg = TINY_NATIVE_CFG
    _, sd2 = build_hf_model(cfg, seed=0)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    _, sd3 = build_hf_model(cfg, seed=1)
    assert not torch.equal(sd["layers.1.attn.wq_a.weight"], sd3["layers.1.attn.wq_a.weight"])

    D, H, hd, G, R = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["o_groups"], cfg["o_lora_rank"]
    E, I, k = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    assert not any(n.endswith(".scale") and "hc_" not in n for n in sd)  # unquantised: no FP8/FP4 scales
    assert all(v.dtype == (torch.int64 if n.endswith("tid2eid") else torch.float32) for n, v in sd.items())
    # Expected native names, derived independently of the HF map.
    expect = {"embed.weight", "norm.weight", "head.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    for i, r in enumerate(cfg["compress_ratios"][: cfg["num_hidden_layers"]]):
        p = f"layers.{i}."
        expect |= {p + s for s in ("hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base",
                                   "hc_ffn_scale", "attn_norm.weight", "ffn_norm.weight", "attn.attn_sink")}
        expect |= {p + f"attn.{w}.weight" for w in ("wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b")}
        if r:
            expect |= {p + f"attn.compressor.{w}" for w in ("wkv.weight", "wgate.weight", "ape", "norm.weight")}
        if r == 4:
            expect |= {p + f"attn.indexer.{w}" for w in ("wq_b.weight", "weights_proj.weight",
                                                         "compressor.wkv.weight", "compressor.wgate.weight",
                                                         "compressor.ape", "compressor.norm.weight")}
        expect.add(p + ("ffn.gate.tid2eid" if i < cfg["num_hash_layers"] else "ffn.gate.bias"))
        expect.add(p + "ffn.gate.weight")
        expect |= {p + f"ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")}
        expect |= {p + f"ffn.experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")}
    assert set(sd) == expect, (sorted(set(sd) - expect), sorted(expect - set(sd)))

    assert sd["layers.0.attn.wo_a.weight"].shape == (G * R, H * hd // G)
    assert sd["layers.2.ffn.experts.5.w1.weight"].shape == (I, D)
    assert sd["layers.2.ffn.experts.5.w2.weight"].shape == (D, I)
    # HCA ratio 8 really is in the model (transformers defaults to 128).
    assert sd["layers.2.attn.compressor.ape"].shape == (8, hd)
    assert model.model.layers[2].self_attn.compressor.compress_rate == 8
    assert sd["layers.1.attn.compressor.ape"].shape == (4, 2 * hd)
    # tid2eid: a valid table of distinct experts per token.
    t = sd["layers.0.ffn.gate.tid2eid"]
    assert t.shape == (cfg["vocab_size"], k) and t.min() >= 0 and t.max() < E
    assert (t.sort(-1).values.diff(dim=-1) != 0).all()
    # Randomised where HF would have initialised zeros / ones.
    for n in ("layers.3.ffn.gate.bias", "layers.0.attn.attn_sink", "layers.1.attn.compressor.ape", "hc_head_base"):
        assert sd[n].abs().min() > 0, n
    for n in ("norm.weight", "layers.1.attn.kv_norm.weight", "layers.0.hc_attn_scale"):
        assert (sd[n] - 1).abs().max() > 0.05, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_state_dict_loads_through_transformers_conversion(tiny, tmp_path, dtype):
    """Our native names, loaded by transformers' own checkpoint conversion (conversion_mapping.py: renames and
    expert merging), rebuild exactly the oracle's HF model: the name map agrees with transformers'. In bf16 the
    oracle also keeps the same tensors in fp32 (norms, mHC, sinks, ape, gate bias) with the same values."""
    from safetensors.torch import save_file
    from transformers import DeepseekV4ForCausalLM

    model, sd = tiny if dtype == torch.float32 else build_hf_model(TINY_NATIVE_CFG, seed=0, dtype=dtype)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp_path, "model.safetensors"))
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = dict(model.named_parameters()) | dict(model.named_buffers())
    got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert ref.keys() == got.keys()
    assert [k for k in ref if ref[k].dtype != got[k].dtype or not torch.equal(ref[k], got[k])] == []


def test_tiny_cfg_matches_our_tiny_preset():
    # TINY_NATIVE_CFG is written from the preset (to_dict); this checks that it reads back (from_dict) unchanged.
    from dsv4_ascend import config

    ours = config.preset("tiny")
    mine = config.ModelConfig.from_dict(TINY_NATIVE_CFG)
    skip = {"quant_method", "expert_dtype", "torch_dtype"}  # the oracle is unquantised fp32 by design
    diff = {f: (getattr(mine, f), getattr(ours, f)) for f in vars(ours) if f not in skip
            and getattr(mine, f) != getattr(ours, f)}
    assert diff == {}, diff
