"""The device seam: the short list of ops whose best implementation differs per device.

The model calls only these (plus plain torch glue). `reference.ReferenceBackend` is the plain-torch truth;
`ops.AscendBackend` maps them onto torch_npu fused operators. Shapes are documented in docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Backend", "RunOptions"]


@dataclass(frozen=True)
class RunOptions:
    """Numerics switches shared by every backend.

    numerics="exact": no quantisation simulation (matches transformers in fp32).
    numerics="deepseek": DeepSeek's reference numerics: FP8 act-quant before FP8/FP4 GEMMs, FP8 simulation of
    the kv nope dims, Hadamard + FP4 simulation in the indexer.
    """

    numerics: str = "exact"

    def __post_init__(self) -> None:
        if self.numerics not in ("exact", "deepseek"):
            raise ValueError(f"numerics must be 'exact' or 'deepseek', found {self.numerics!r}")

    @property
    def deepseek(self) -> bool:
        return self.numerics == "deepseek"


class Backend:
    """Abstract op set. Every method documents its contract; subclasses implement all of them."""

    name = "abstract"

    def __init__(self, options: RunOptions | None = None) -> None:
        self.options = options or RunOptions()

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        """RMSNorm over the last dim in fp32, optional weight, result in x.dtype."""
        raise NotImplementedError

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate interleaved pairs (x[2k], x[2k+1]) by the angle with cos/sin [..., r/2] (broadcast)."""
        raise NotImplementedError

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """x @ W^T for a plain, FP8-block-scaled or packed-MXFP4 weight; output in x.dtype."""
        raise NotImplementedError

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """Per-group projection (the grouped output projection wo_a): x [..., G, Kg], weight [G*N, Kg] -> [..., G, N]."""
        raise NotImplementedError

    def hc_pre(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, norm_eps: float,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """mHC pre: collapse [B,S,n,D] streams to [B,S,D]; also return post [B,S,n] and comb [B,S,n,n]."""
        raise NotImplementedError

    def hc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """mHC post: out[...,j,:] = post_j * f + sum_i comb[i, j] * x[..., i, :]."""
        raise NotImplementedError

    def hc_head(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float,
                hc_eps: float) -> Tensor:
        """Final mHC collapse of [B,S,n,D] streams with sigmoid weights only."""
        raise NotImplementedError

    def compress(self, kv: Tensor, score: Tensor, ratio: int, overlap: bool) -> Tensor:
        """Softmax-pool complete windows of rows [B,L,c] (score already includes the position bias).

        Plain: L = W*ratio, c = d. Overlap (CSA): L = (W+1)*ratio, c = 2d; the first `ratio` rows belong to the
        window before the first one; entry w pools the first-half channels of window w-1 with the second-half
        channels of window w (one joint softmax over 2*ratio slots). Returns [B,W,d] in fp32.
        """
        raise NotImplementedError

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, n_visible: Tensor, k: int) -> Tensor:
        """Lightning indexer: score[t,w] = sum_h weights[t,h] relu(q[t,h].keys[w]); top-k over w < n_visible[t].

        Ties break by lower entry index; picks past n_visible are -1. Returns int64 [B,S,k].
        """
        raise NotImplementedError

    def sparse_attention(self, q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        """Shared-KV attention of q [B,S,H,d] over kv[b, idx[b,s,:]] (K = V; -1 = masked), sink logits [H]."""
        raise NotImplementedError

    def route(self, logits: Tensor, bias: Tensor | None, hash_ids: Tensor | None, k: int,
              route_scale: float) -> tuple[Tensor, Tensor]:
        """sqrt-softplus routing: (weights [T,k] fp32, expert ids [T,k] int64)."""
        raise NotImplementedError

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                s1: Tensor | None, s2: Tensor | None, s3: Tensor | None, limit: float,
                sync_free: bool = False) -> Tensor:
        """sum_j weights[t,j] * SwiGLU_{ids[t,j]}(x[t]) with stacked expert weights [E, ...].

        sync_free=True (decode) forbids host reads of routing results, so the step stays capturable.
        """
        raise NotImplementedError

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        """One clamped SwiGLU MLP (the shared expert)."""
        raise NotImplementedError

    def lm_head(self, x: Tensor, weight: Tensor) -> Tensor:
        """Vocabulary logits in fp32."""
        return torch.nn.functional.linear(x.float(), weight.float())
