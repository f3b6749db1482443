"""Graph mode with the Ascend backend on CPU (emulated): the decode step traces whole through the emulator's ops.

On an NPU the torch_npu / custom ops are capturable; on CPU the emulator must not break the capture either, so its
decode-path MoE ops (init_routing_v2, grouped matmul, dequant-swiglu-quant, finalize) and lightning indexers
are pure tensor code with no host reads. Traced with `aot_eager` (full dynamo + AOTAutograd capture, no code
generation), as in tests/test_graph_mode.py.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.config import preset
from dsv4_ascend.engine import Engine
from dsv4_ascend.ops import AscendBackend
from dsv4_ascend.ops import emulator as E
from dsv4_ascend.sampling import SamplingParams

from conftest import build_tiny, graph_vs_eager_logits

CFG = preset("tiny")  # SWA, CSA (lightning indexer), HCA, CSA, + the MTP block
# aot_eager runs the traced aten ops, but AOTAutograd may decompose some (e.g. softmax, silu) into other aten ops
# whose fp32 rounding differs by an ulp or so; logits then differ at ~1e-6 relative (same bound as test_graph_mode).
TOL = 1e-4


def _model(quant: str):
    """The tiny model on the emulated Ascend backend: bf16 in fp32, w8a8 prepared (int8 linears, experts and
    indexer) in bf16."""
    be = AscendBackend(E, quant=quant)
    m = build_tiny(cfg=CFG, backend=be, dtype=torch.bfloat16 if quant != "bf16" else torch.float32)
    be.prepare(m)
    return m


# Slow: dynamo traces the whole decode step through the emulator's many small ops; the aot_eager compile of one
# bucket measured 92 s (bf16) on the 2-vCPU CI host. The op-level traces below run in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["bf16", "w8a8"])
def test_ascend_graph_decode_equals_eager(quant):
    torch._dynamo.reset()
    model = _model(quant)
    prompts = [torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 5)]
    params = SamplingParams(temperature=0, max_tokens=6)
    eager = Engine(model, max_slots=2, max_seq_len=24, eos_token_id=-1)
    compiled = Engine(model, max_slots=2, max_seq_len=24, eos_token_id=-1, graph=True, graph_buckets=[2],
                      graph_compiler="aot_eager")
    assert compiled.decoder.compiles == 1  # fullgraph: one graph for the bucket, nothing left to eager
    want = [r.output for r in eager.generate(prompts, params)]
    got = [r.output for r in compiled.generate(prompts, params)]  # batches of 2 and 1 rows (padded to 2)
    assert got == want
    assert compiled.decoder.compiles == 1
    # Logits step by step against eager on an identical copy of the cache.
    for e, g in graph_vs_eager_logits(model, compiled.decoder, prompts, params, max_len=24, steps=5):
        e, g = e.float(), g.float()
        assert (e - g).abs().max().item() <= TOL * max(1.0, e.abs().max().item())
    assert compiled.decoder.compiles == 1


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_moe_ops_trace_without_host_reads():
    # The routed-expert chain with the tensors a decode step produces, compiled fullgraph on its own: a host read
    # (.item(), .tolist(), data-dependent shapes) anywhere in it fails the compile.
    t, k, e, d, inter = 3, 2, 4, 16, 8
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 2], [2, 3], [0, 2]], dtype=torch.int32)
    w13 = torch.randn(e, d, 2 * inter, generator=torch.Generator().manual_seed(1))
    w2 = torch.randn(e, inter, d, generator=torch.Generator().manual_seed(2))

    def chain(x, ids):
        ex, row_idx, counts, _ = E.npu_moe_init_routing_v2(x, ids, active_num=t * k, expert_num=e,
                                                           expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                                           active_expert_range=[0, e])
        gm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        h = E.npu_grouped_matmul([ex], [w13], **gm)[0]
        y = E.npu_grouped_matmul([torch.relu(h[:, :inter])], [w2], **gm)[0]
        return E.npu_moe_finalize_routing(y, None, None, None, torch.ones(t, k), row_idx, ids, drop_pad_mode=2)

    assert torch.allclose(_compiled(chain)(x, ids), chain(x, ids), atol=1e-5)
    # independent check of the chain: per (token, slot) the plain product through its expert, summed per token
    want = torch.stack([sum(torch.relu(x[i] @ w13[ids[i, j], :, :inter]) @ w2[ids[i, j]] for j in range(k))
                        for i in range(t)])
    assert torch.allclose(chain(x, ids), want, atol=1e-4)

    # W8A8: per-row int8 routing, int32 GMM, dequant-swiglu-quant with per-expert scales, int8 GMM to bf16
    w13q = torch.randint(-127, 128, (e, d, 2 * inter), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    w2q = torch.randint(-127, 128, (e, inter, d), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    w13s, w2s = torch.rand(e, 2 * inter) / 100, torch.rand(e, d) / 100

    def chain8(x, ids):
        ex, row_idx, counts, xs = E.npu_moe_init_routing_v2(x, ids, active_num=t * k, expert_num=e,
                                                            expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                                            quant_mode=1, active_expert_range=[0, e])
        gm = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        h = E.npu_grouped_matmul([ex], [w13q], output_dtype=torch.int32, **gm)[0]
        hq, hs = E.npu_dequant_swiglu_clamp_quant(h, weight_scale=w13s, activation_scale=xs, group_index=counts,
                                                  activate_left=True, quant_mode=1, swiglu_mode=1, clamp_limit=7.0,
                                                  glu_alpha=1.0, glu_bias=0.0)
        y = E.npu_grouped_matmul([hq], [w2q], scale=[w2s], per_token_scale=[hs], output_dtype=torch.bfloat16, **gm)[0]
        return E.npu_moe_finalize_routing(y, None, None, None, torch.ones(t, k, dtype=torch.bfloat16), row_idx, ids,
                                          drop_pad_mode=2)

    assert torch.equal(_compiled(chain8)(x, ids), chain8(x, ids))  # integer math, then the same fp32 ops


def test_lightning_indexer_traces_without_host_reads():
    # The TND form AscendBackend uses (one query per batch, per-query key lengths), bf16 and int8.
    t, h, d, n, k = 4, 2, 8, 21, 3
    g = torch.Generator().manual_seed(5)
    q, keys, w = torch.randn(t, h, d, generator=g), torch.randn(2 * 16, 16, 1, d, generator=g), torch.randn(t, h, 1)
    table = torch.arange(2 * 2, dtype=torch.int32).view(2, 2).repeat_interleave(2, 0)  # [T, 2 blocks]
    asl_q, asl_k = torch.arange(1, t + 1, dtype=torch.int32), torch.tensor([0, 5, n, 2], dtype=torch.int32)

    def li(q, asl_k):
        return E.npu_lightning_indexer(q, keys, w, actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k,
                                       block_table=table, layout_query="TND", layout_key="PA_BSND",
                                       sparse_count=k, sparse_mode=3)[0]

    want = li(q, asl_k)
    assert torch.equal(_compiled(li)(q, asl_k), want)
    assert (want >= 0).sum(-1).flatten().tolist() == [0, 3, 3, 2]  # min(k, visible keys) picks, -1 after
    qi = torch.randint(-127, 128, (t, h, d), generator=g, dtype=torch.int8)
    ki = torch.randint(-127, 128, (2 * 16, 16, 1, d), generator=g, dtype=torch.int8)
    qs, ks = torch.rand(t, h).half() + 0.5, torch.rand(2 * 16, 16, 1).half() + 0.5

    def qli(qi, asl_k):
        return E.npu_quant_lightning_indexer(qi, ki, w[..., 0].half(), qs, ks, 0, 0, actual_seq_lengths_query=asl_q,
                                             actual_seq_lengths_key=asl_k, block_table=table, layout_query="TND",
                                             layout_key="PA_BSND", sparse_count=k, sparse_mode=3)

    assert torch.equal(_compiled(qli)(qi, asl_k), qli(qi, asl_k))
