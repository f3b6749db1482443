"""Whole-model emulated parity (`dsv4 parity`, dsv4_ascend/parity.py) on a V4-Pro-shaped tiny checkpoint with a
prompt long enough for V4-Pro's 1024 CSA picks (2200 tokens: 550 compressed entries > 512), in bf16, with C8 (FP8)
KV caches, and on the 950 path (FP8 linears, FP8 indexer, C8 through kv_compress_epilog). Slow (~3 min).

Bounds are derived in the test from the formats' own error, measured on the reference: `floor` = the reference in
the format against the reference in a finer one on the same prompt. The Ascend side rounds in the same format as
the reference (different sites and order), so both are about `floor` away from the finer result; by the triangle
inequality on the unit-vector distance sqrt(2 (1 - cos)), Ascend-vs-reference is at most twice that distance:
1 - cos <= 4 (1 - cos_floor); a top-1 disagreement needs one of the two to disagree with the finer result:
1 - top1 <= 2 (1 - top1_floor).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv4_ascend.backend import RunOptions
from dsv4_ascend.config import preset
from dsv4_ascend.loading import load_checkpoint
from dsv4_ascend.ops import emulator as E
from dsv4_ascend.parity import format_report, run_parity
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.slow
PRO_TINY = dataclasses.replace(preset("tiny"), index_topk=1024, compress_ratios=[8, 4, 8, 4, 0])
TOKENS, STEPS = 2200, 8


@pytest.fixture(scope="module")
def pro_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pro-tiny")
    write_tiny_checkpoint(d, PRO_TINY, seed=0)
    return d


def _floor(path, fine: tuple, coarse: tuple, kv_fp8: bool) -> tuple[float, float]:
    """(cosine, top-1) of the reference in the coarse (dtype, numerics) against the fine one: the format's error."""
    ids = torch.randint(0, PRO_TINY.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    out = []
    for dt, numerics in (fine, coarse):
        m = load_checkpoint(path, backend=ReferenceBackend(RunOptions(numerics)), dtype=dt)
        out.append(m(ids, m.new_cache(1, TOKENS, kv_fp8=kv_fp8), torch.arange(1), 0)[0].float())
    a, b = out
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
    return cos, (a.argmax(-1) == b.argmax(-1)).double().mean().item()


@pytest.mark.parametrize("mode", ["bf16", "c8", "950"])
def test_pro_shaped_parity_long_prompt(pro_dir, mode, monkeypatch, capsys):
    kv_fp8, quant = mode != "bf16", "fp8" if mode == "950" else "bf16"
    if mode == "950":  # the FP8 format's error: DeepSeek's FP8 activation simulation against exact bf16
        cos_f, top_f = _floor(pro_dir, (torch.bfloat16, "exact"), (torch.bfloat16, "deepseek"), kv_fp8)
    else:  # bf16's error: the bf16 reference against the fp32 one
        cos_f, top_f = _floor(pro_dir, (torch.float32, "exact"), (torch.bfloat16, "exact"), kv_fp8)
    k2 = []
    name = "npu_kv_quant_sparse_attn_sharedkv" if kv_fp8 else "npu_sparse_attn_sharedkv"
    real = getattr(E, name)

    def counting(*a, **kw):
        idx = kw.get("cmp_sparse_indices")
        k2.append(0 if idx is None else idx.shape[-1])
        return real(*a, **kw)

    monkeypatch.setattr(E, name, counting)
    r = run_parity(pro_dir, quant=quant, tokens=TOKENS, decode_steps=STEPS, npu=E, kv_fp8=kv_fp8,
                   min_cosine=1 - 4 * (1 - cos_f), min_top1=1 - 2 * (1 - top_f))
    with capsys.disabled():
        print(f"\n[{mode}] floor cosine {cos_f:.6f} top-1 {top_f:.2%}\n" + format_report(r))
    assert set(k2) == {0, 1024}  # HCA (no picks) and CSA with 1024 picks: the 2200-token prefill and every decode
    assert len(k2) == len(PRO_TINY.layer_ratios) * (1 + STEPS)  # every layer of every step on the kernel
    assert r.passed, r.failures
