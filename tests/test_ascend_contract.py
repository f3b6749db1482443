"""The emulator against the real op contracts: torch_npu's wheel (schemas + meta functions) and CR's custom schemas.

For every op the emulator provides under a torch_npu name, read from the pinned torch-npu wheels themselves (fetched
with `pip download --no-deps`, cached, never installed): the op exists in
`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`; argument names, order, defaults and keyword-only markers
equal the schema (`torch_npu.X` is `torch.ops.npu.X`, so the schema is the Python signature); and the outputs the
emulator returns for representative inputs have the arity, shapes and dtypes the wheel's meta function
(`torch_npu/op_plugin/meta/_meta_registrations.py`) computes. The meta functions are *evaluated*, not re-derived:
their source is executed with a stub `torch_npu` namespace (only the names the file imports) and called on meta
tensors. Ops the emulator provides under CR's custom names are checked against the schema strings recorded in
tests/data/ascend_custom_op_schemas.json (origin inside the file); CR's meta functions are C++, so for those
the check is the signature and the output arity / types the schema declares.

Keyword-only arguments are compared as a name -> default mapping (Python and the dispatcher bind them by name);
positional ones in order. A wheel that cannot be downloaded fails the test (no skip).
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from dsv4_ascend.ops import emulator as E

TORCH_NPU_VERSIONS = ("2.13.0", "2.14.0")  # the pinned wheels (same schemas for every op emulated here)
CACHE = Path(os.environ.get("DSV4_WHEEL_CACHE", Path.home() / ".cache" / "dsv4-ascend" / "torch-npu-wheels"))
SCHEMAS_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
META_PY = "torch_npu/op_plugin/meta/_meta_registrations.py"
CUSTOM = json.loads((Path(__file__).parent / "data" / "ascend_custom_op_schemas.json").read_text())
# Which contract each emulated op is checked against. "builtin": torch_npu's schema and meta function; "custom":
# CR's schema; "both": an op of the same name in both namespaces whose signatures the emulator satisfies together.
CONTRACT = {
    "npu_rms_norm": "builtin", "npu_rotary_mul": "builtin", "npu_format_cast": "builtin",
    "npu_transpose_batchmatmul": "builtin", "npu_transpose_quant_batchmatmul": "builtin",
    "npu_dynamic_quant": "builtin", "npu_dynamic_block_quant": "builtin", "npu_dynamic_mx_quant": "builtin",
    "npu_quant_matmul": "builtin", "npu_grouped_matmul": "builtin", "npu_convert_weight_to_int4pack": "builtin",
    "npu_moe_init_routing_v2": "builtin", "npu_moe_finalize_routing": "builtin", "npu_scatter_nd_update_": "builtin",
    "npu_top_k_top_p_sample": "builtin", "npu_lightning_indexer": "builtin", "npu_quant_lightning_indexer": "builtin",
    "npu_moe_gating_top_k": "both", "npu_moe_distribute_dispatch": "builtin", "npu_moe_distribute_combine": "builtin",
    "inplace_partial_rotary_mul": "custom", "npu_hc_pre": "custom", "npu_hc_post": "custom", "compressor": "custom",
    "scatter_nd_update_asc": "custom", "npu_dequant_swiglu_clamp_quant": "custom",
    "npu_sparse_attn_sharedkv": "custom", "npu_sparse_attn_sharedkv_metadata": "custom",
    "npu_quant_lightning_indexer_metadata": "custom",
    "npu_kv_quant_sparse_attn_sharedkv": "custom", "npu_kv_quant_sparse_attn_sharedkv_metadata": "custom",
    "kv_compress_epilog": "custom", "indexer_compress_epilog": "custom",
}


# ---- the wheel ---------------------------------------------------------------------------------------------------
def _wheel(version: str) -> Path:
    """The cached torch-npu wheel of `version`, downloaded once (`pip download --no-deps`, never installed)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"torch_npu-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"torch-npu=={version}", "-d", str(CACHE),
           "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "311"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(CACHE.glob(f"torch_npu-{version}-*.whl"))
    if run.returncode or not found:
        pytest.fail(f"could not download the torch-npu {version} wheel ({' '.join(cmd)}), so the emulator's "
                    f"contract cannot be checked: exit {run.returncode}\n{run.stderr[-2000:]}", pytrace=False)
    return found[0]


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets / quotes."""
    out, depth, cur, quote = [], 0, "", None
    for ch in s:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in out + [cur] if p.strip()]


def _default(text: str):
    t = text.strip()
    if t == "None":
        return None
    if t in ("True", "False"):
        return t == "True"
    if t[0] in "'\"":
        return t[1:-1]
    if t.startswith("["):
        return [int(v) for v in _split_top(t[1:-1])]
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t  # an enum-like default (e.g. `Mean`): compared as its spelling


def parse_schema(schema: str) -> dict:
    """'name(args) -> ret' -> {name, params: [(name, default or REQUIRED, keyword_only)], returns: n outputs}."""
    m = re.fullmatch(r"\s*([\w.]+)\((.*)\)\s*->\s*(.+?)\s*", schema, re.S)
    assert m, schema
    params, types_, kw = [], {}, False
    for a in _split_top(m.group(2)):
        if a == "*":
            kw = True
            continue
        decl, _, dflt = a.partition("=")
        params.append((decl.split()[-1], _default(dflt) if dflt else inspect.Parameter.empty, kw))
        types_[decl.split()[-1]] = decl.split()[0]
    ret = m.group(3).strip()
    n_out = 0 if ret == "()" else len(_split_top(ret[1:-1])) if ret.startswith("(") else 1
    list_out = ret == "Tensor[]"
    return {"name": m.group(1), "params": params, "types": types_, "returns": n_out, "list": list_out}


def builtin_schemas(whl: Path) -> dict[str, dict]:
    """Every `func:` of the wheel's codegen yaml without an overload name, parsed."""
    text = zipfile.ZipFile(whl).read(SCHEMAS_YAML).decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*-?\s*func:\s*(\w+)\((.*)$", line)
        if m and m.group(1) in CONTRACT:
            out[m.group(1)] = parse_schema(line.split("func:", 1)[1])
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return a == b and type(a) is type(b) or (a is inspect.Parameter.empty and b is inspect.Parameter.empty)


def signature_mismatches(fn, schema: dict, strict_kw_order: bool = False) -> list[str]:
    """Differences between a Python function's signature and a parsed schema ([] = same contract)."""
    got = [(p.name, p.default, p.kind == p.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()]
    want = schema["params"]
    bad = []
    pos_g, pos_w = [g for g in got if not g[2]], [w for w in want if not w[2]]
    if [g[0] for g in pos_g] != [w[0] for w in pos_w]:
        bad.append(f"positional arguments {[g[0] for g in pos_g]} != schema {[w[0] for w in pos_w]}")
    kw_g, kw_w = {g[0]: g[1] for g in got if g[2]}, {w[0]: w[1] for w in want if w[2]}
    if set(kw_g) != set(kw_w):
        bad.append(f"keyword-only arguments differ: extra {sorted(set(kw_g) - set(kw_w))}, missing "
                   f"{sorted(set(kw_w) - set(kw_g))}")
    if strict_kw_order and [g[0] for g in got if g[2]] != [w[0] for w in want if w[2]]:
        bad.append("keyword-only order differs")
    for name, dflt, _ in want:
        mine = {g[0]: g[1] for g in got}.get(name, "<absent>")
        if mine != "<absent>" and not _same(mine, dflt):
            bad.append(f"{name}: default {mine!r} != schema {dflt!r}")
    return bad


# ---- the meta functions, evaluated with a stub torch_npu ---------------------------------------------------------
class _Sentinel:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch_npu.{self.name}"


def meta_functions(whl: Path) -> dict:
    """op name -> the wheel's Python meta function, executed against real torch and a stub torch_npu namespace."""
    source = zipfile.ZipFile(whl).read(META_PY).decode()
    registry: dict = {}

    def impl(_lib, name, *a, **k):
        def deco(fn):
            registry.setdefault(name, fn)
            return fn
        return deco

    stub = types.ModuleType("torch_npu_stub")
    stub.__getattr__ = lambda name: _Sentinel(name)  # dtype codes the file compares against (int4, hifloat8, ...)
    errcode = types.SimpleNamespace(VALUE="", TYPE="", PARAM="", NOT_SUPPORT="", INTERNAL="")
    ns = {"torch": torch, "torch_npu": stub, "math": math, "os": os, "warnings": __import__("warnings"),
          "impl": impl, "Library": lambda *a, **k: None, "has_side_effect": lambda *a, **k: None,
          "ErrCode": errcode, "ops_error": lambda *a, **k: "", "get_cann_version": lambda: "9.0.0",
          "get_soc_version": lambda: 0, "__name__": "meta_stub"}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        try:
            exec(compile(ast.Module([node], []), META_PY, "exec"), ns)  # noqa: S102 - the wheel's own file
        except Exception:  # noqa: BLE001 - statements needing a real NPU stack; their ops are not ours
            continue
    codes: dict = {}
    for code, dt in sorted(ns["TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP"].items(), reverse=True):
        codes[dt] = code  # the lowest code wins: c10's own ScalarType numbers (uint8 0, not torch_npu's 285)
    registry["<dtype codes>"] = codes
    return registry


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return type(v)(t.to("meta") for t in v)
    return v


def _outputs(r) -> list:
    return list(r) if isinstance(r, (tuple, list)) else [r]


# ---- representative calls (the forms AscendBackend uses) ---------------------------------------------------------
def _g(seed):
    return torch.Generator().manual_seed(seed)


def _cases() -> dict[str, list[tuple[tuple, dict]]]:
    bf = torch.bfloat16
    x = torch.randn(6, 64, generator=_g(0)).to(bf)
    ids = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 1], [2, 3]], dtype=torch.int32)
    t, k, e = 6, 2, 4
    xq, xs = E.npu_dynamic_quant(x)
    w8 = torch.randint(-127, 128, (64, 32), generator=_g(1), dtype=torch.int8)
    w8e = torch.randint(-127, 128, (e, 64, 32), generator=_g(2), dtype=torch.int8)
    ex, row_idx, counts, _ = E.npu_moe_init_routing_v2(x, ids, active_num=t * k, expert_num=e,
                                                       expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                                       active_expert_range=[0, e])
    fp8x, fp8s = E.npu_dynamic_block_quant(x.float(), dst_type=torch.float8_e4m3fn, row_block_size=1,
                                           col_block_size=128)
    fp8w = torch.randn(64, 32, generator=_g(3)).to(torch.float8_e4m3fn)
    nblk, d, h = 3, 16, 4
    keys = torch.randn(nblk, 16, 1, d, generator=_g(4)).to(bf)
    table = torch.arange(nblk, dtype=torch.int32).view(1, nblk).expand(2, nblk).contiguous()
    asl_q, asl_k = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([20, 40], dtype=torch.int32)
    q = torch.randn(2, h, d, generator=_g(5)).to(bf)
    qi = torch.randint(-127, 128, (2, h, d), generator=_g(6), dtype=torch.int8)
    ki = torch.randint(-127, 128, (nblk, 16, 1, d), generator=_g(7), dtype=torch.int8)
    li = dict(actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k, block_table=table, layout_query="TND",
              layout_key="PA_BSND", sparse_count=8, sparse_mode=3)
    logits = torch.randn(3, 50, generator=_g(8))
    int4 = torch.randint(-8, 8, (64, 32), generator=_g(9), dtype=torch.int32)
    return {
        "npu_rms_norm": [((x, torch.ones(64, dtype=bf), 1e-6), {})],
        "npu_rotary_mul": [((x.view(1, 6, 1, 64), x.view(1, 6, 1, 64), x.view(1, 6, 1, 64)),
                            {"rotary_mode": "interleave"})],
        "npu_transpose_batchmatmul": [((x.view(6, 2, 32), torch.randn(2, 16, 32, generator=_g(10)).to(bf)),
                                       dict(perm_x1=[1, 0, 2], perm_x2=[0, 2, 1], perm_y=[1, 0, 2]))],
        "npu_dynamic_quant": [((x,), {})],
        "npu_format_cast": [((w8, 29), {})],
        "npu_dynamic_block_quant": [((x.float(),), dict(dst_type=torch.float8_e4m3fn, row_block_size=1,
                                                        col_block_size=128))],
        "npu_dynamic_mx_quant": [((x,), dict(axis=-1, dst_type=torch.float8_e4m3fn))],
        "npu_quant_matmul": [((xq, w8, torch.rand(32)), dict(pertoken_scale=xs, output_dtype=bf)),
                             ((xq, w8, torch.rand(32)), dict(pertoken_scale=xs, output_dtype=torch.int32)),
                             ((fp8x, fp8w, torch.ones(1, 1)), dict(pertoken_scale=fp8s, output_dtype=bf,
                                                                  group_sizes=[1, 128, 128]))],
        "npu_grouped_matmul": [(([ex], [torch.randn(e, 64, 32, generator=_g(11)).to(bf)]),
                                dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)),
                               (([E.npu_dynamic_quant(ex)[0]], [w8e]),
                                dict(group_list=counts, group_list_type=1, split_item=3, group_type=0,
                                     output_dtype=torch.int32))],
        "npu_convert_weight_to_int4pack": [((int4,), {})],
        "npu_moe_init_routing_v2": [((x, ids), dict(active_num=t * k, expert_num=e, expert_tokens_num_type=1,
                                                    expert_tokens_num_flag=True, quant_mode=q_mode,
                                                    active_expert_range=[0, e], row_idx_type=0))
                                    for q_mode in (-1, 1)],
        "npu_moe_finalize_routing": [((ex, None, None, None, torch.rand(t, k).to(bf), row_idx, ids), dict(
                                         drop_pad_mode=2)),
                                     ((ex, None, None, None, None, row_idx, ids), dict(drop_pad_mode=2, k=k))],
        "npu_moe_gating_top_k": [((logits, 4), dict(k_group=1, group_count=1, group_select_mode=1, renorm=0,
                                                    norm_type=2, routed_scaling_factor=1.5, eps=1e-20))],
        "npu_scatter_nd_update_": [((torch.zeros(8, 16, dtype=bf), torch.tensor([[1], [5]]),
                                     torch.ones(2, 16, dtype=bf)), {})],
        "npu_top_k_top_p_sample": [((logits, torch.tensor([5, 0, 9], dtype=torch.int32), torch.ones(3)),
                                    dict(q=torch.rand(3, 50, generator=_g(12)) + 0.1, eps=0.0, ks_max=1024,
                                         input_is_logits=True, post_sample="qSample"))],
        "npu_lightning_indexer": [((q, keys, torch.randn(2, h, generator=_g(13)).to(bf)), li),
                                  ((q, keys, torch.randn(2, h, generator=_g(13)).to(bf)), dict(li, return_value=True))],
        "npu_quant_lightning_indexer": [((qi, ki, torch.rand(2, h).half(), torch.rand(2, h).half(),
                                          torch.rand(nblk, 16, 1).half(), 0, 0), li)],
    }


# Ops whose meta function is not in the wheel's Python file: outputs as their torch_npu op docs state them.
REDERIVED = {
    # "int32 [k, n] -> int32 (k, n/8)" (npu_convert_weight_to_int4pack doc)
    "npu_convert_weight_to_int4pack": lambda w, *a, **k: [((w.shape[0], w.shape[1] // 8), torch.int32)],
    # logits_select_idx int64 [B]; logits_top_kp_select float32 of logits' size when is_need_logits, else "the
    # empty tensor" (read as [0]; verify) (npu_top_k_top_p_sample doc)
    "npu_top_k_top_p_sample": lambda logits, *a, **k: [
        ((logits.shape[0],), torch.int64),
        (tuple(logits.shape) if k.get("is_need_logits") else (0,), torch.float32)],
    # FRACTAL_NZ / ND change the device tiling only: the logical tensor is unchanged (npu_format_cast doc)
    "npu_format_cast": lambda x, *a, **k: [(tuple(x.shape), x.dtype)],
}


@pytest.fixture(scope="module", params=TORCH_NPU_VERSIONS)
def wheel(request):
    whl = _wheel(request.param)
    return request.param, builtin_schemas(whl), meta_functions(whl)


def test_every_emulated_op_has_a_contract():
    provided = [n for n in E.__all__ if callable(getattr(E, n)) and (n.startswith("npu_") or n in CONTRACT)
                and n not in ("hf32", "round_half_even")]
    assert sorted(provided) == sorted(CONTRACT), "an emulated op without a recorded contract (or a stale entry)"


def test_builtin_signatures_match_the_wheel(wheel):
    version, schemas, _ = wheel
    bad = {}
    for op, kind in CONTRACT.items():
        if kind in ("builtin", "both"):
            if op not in schemas:
                bad[op] = [f"not in torch_npu {version}'s schema list"]
                continue
            diff = signature_mismatches(getattr(E, op), schemas[op])
            if diff:
                bad[op] = diff
    assert not bad, f"torch_npu {version}: " + json.dumps(bad, indent=1)


def test_custom_signatures_match_cr_schemas():
    bad = {}
    for op, kind in CONTRACT.items():
        if kind in ("custom", "both"):
            diff = signature_mismatches(getattr(E, op), parse_schema(CUSTOM["schemas"][op]))
            if diff:
                bad[op] = diff
    assert not bad, json.dumps(bad, indent=1)


def test_quant_indexer_contracts_differ_as_documented(wheel):
    """The built-in returns the indices only; CR's custom op returns (indices, values): the emulator is the
    built-in, and AscendBackend accepts either (docs/ascend.md)."""
    _, schemas, _ = wheel
    assert schemas["npu_quant_lightning_indexer"]["returns"] == 1
    assert parse_schema(CUSTOM["schemas"]["npu_quant_lightning_indexer"])["returns"] == 2
    assert schemas["npu_lightning_indexer"]["returns"] == 2


def test_outputs_match_the_meta_functions(wheel):
    version, schemas, metas = wheel
    cases = _cases()
    bad, checked = {}, []
    for op, calls in cases.items():
        meta = metas.get(op)
        assert meta is not None or op in REDERIVED, f"torch_npu {version} has no meta function for {op}"
        for args, kwargs in calls:
            got = _outputs(getattr(E, op)(*args, **kwargs))
            if meta is None:  # no Python meta in the wheel: the output contract of the op doc, re-derived
                want = [torch.empty(s, dtype=d, device="meta") for s, d in REDERIVED[op](*args, **kwargs)]
                checked.append(op)
                if [(tuple(g.shape), g.dtype) for g in got] != [(tuple(w.shape), w.dtype) for w in want]:
                    bad.setdefault(op, []).append(f"{[(tuple(g.shape), g.dtype) for g in got]} != op doc "
                                                  f"{[(tuple(w.shape), w.dtype) for w in want]}")
                continue
            # as the dispatcher calls a Python kernel: the schema's positional arguments positionally (defaults
            # filled in), keyword-only ones by name (the meta functions spell some positional names differently)
            bound = inspect.signature(getattr(E, op)).bind(*args, **kwargs)
            bound.apply_defaults()
            # an `int` dtype argument reaches a Python kernel as its ScalarType number, as the dispatcher converts
            codes, ty = metas["<dtype codes>"], schemas[op]["types"]

            def arg(n):
                v = bound.arguments[n]
                return codes.get(v, v) if ty[n].startswith("int") and isinstance(v, torch.dtype) else _to_meta(v)

            pos = [arg(n) for n, _, kw in schemas[op]["params"] if not kw]
            kws = {n: arg(n) for n, _, kw in schemas[op]["params"] if kw}
            want = _outputs(meta(*pos, **kws))
            checked.append(op)
            if len(got) != len(want):
                bad.setdefault(op, []).append(f"{len(got)} outputs, meta {len(want)}")
                continue
            for i, (g, w) in enumerate(zip(got, want)):
                if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
                    bad.setdefault(op, []).append(f"output {i}: {tuple(g.shape)} {g.dtype}, meta {tuple(w.shape)} "
                                                  f"{w.dtype} ({kwargs})")
    assert not bad, f"torch_npu {version}: " + json.dumps(bad, indent=1)
    assert set(checked) == set(cases)


def test_custom_outputs_have_the_schema_arity():
    """CR's meta functions are C++: check what its schemas declare (output count; `-> ()` returns None)."""
    bf = torch.bfloat16
    x = torch.randn(2, 3, 1, 8).to(bf)
    cases = {
        "npu_hc_post": ((torch.randn(2, 8), torch.randn(2, 4, 8), torch.rand(2, 4), torch.rand(2, 4, 4)), {}),
        "scatter_nd_update_asc": ((torch.zeros(4, 128, dtype=bf), torch.tensor([[1]]), torch.ones(1, 128, dtype=bf)),
                                  {}),
        "inplace_partial_rotary_mul": ((x, torch.ones(2, 3, 1, 8), torch.zeros(2, 3, 1, 8)),
                                       dict(rotary_mode="interleave", partial_slice=[0, 8])),
        "npu_moe_gating_top_k": ((torch.randn(3, 8), 2), dict(norm_type=2, group_select_mode=1)),
        "npu_quant_lightning_indexer_metadata": ((64, 1, 128, 0, 0), {}),
        "npu_sparse_attn_sharedkv_metadata": ((64, 1, 512), {}),
        "npu_kv_quant_sparse_attn_sharedkv_metadata": ((64, 1, 512, 1), {}),
        "kv_compress_epilog": ((torch.zeros(2, 640, dtype=torch.float8_e4m3fn), torch.randn(1, 512).to(bf),
                                torch.tensor([1])), {}),
        "indexer_compress_epilog": ((torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(2, 1),
                                     torch.randn(1, 128).to(bf), torch.tensor([1], dtype=torch.int32)), {}),
    }
    for op, (args, kwargs) in cases.items():
        n = parse_schema(CUSTOM["schemas"][op])["returns"]
        r = getattr(E, op)(*args, **kwargs)
        if n == 0:
            assert r is None, op
        else:
            assert len(_outputs(r)) == n and all(isinstance(o, torch.Tensor) for o in _outputs(r)), op
