"""Cross-implementation parity: our reference backend vs transformers' DeepseekV4ForCausalLM (tiny, fp32)."""
from __future__ import annotations

import torch

from dsv4_ascend.config import ModelConfig
from dsv4_ascend.hf_oracle import TINY_NATIVE_CFG, build_hf_model, hf_generate_greedy, hf_logits
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
