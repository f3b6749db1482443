"""The V4 KV cache: one design for every layer type, allocated once as static buffers.

Per layer (see docs/design.md): a sliding-window ring of raw kv, the compressed entries (CSA, HCA), the indexer's
compressed keys (CSA) and the unfinished-window state of each compressor. A sequence owns one slot (a row of
every buffer). Nothing needs resetting when a slot is reused: every read is masked by the sequence's position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig

__all__ = ["CompressorState", "LayerCache", "KVCache"]


@dataclass
class CompressorState:
    """Raw (kv, score) rows of the unfinished window ("pend") and, for overlapping CSA, the previous window."""

    kv_pend: Tensor     # [slots, m, c] fp32
    score_pend: Tensor  # [slots, m, c] fp32 (gate logits + position bias)
    kv_prev: Tensor | None     # [slots, m, c] fp32 (CSA only)
    score_prev: Tensor | None

    @classmethod
    def allocate(cls, slots: int, ratio: int, width: int, overlap: bool, device) -> "CompressorState":
        c = 2 * width if overlap else width

        def z() -> Tensor:
            return torch.zeros(slots, ratio, c, dtype=torch.float32, device=device)

        return cls(z(), z(), z() if overlap else None, z() if overlap else None)


@dataclass
class LayerCache:
    """All decode state of one attention layer."""

    ratio: int
    window: Tensor                      # [slots, sliding_window, head_dim]
    entries: Tensor | None = None       # [slots, max_seq_len // ratio, head_dim]
    comp: CompressorState | None = None
    index_keys: Tensor | None = None    # [slots, max_seq_len // 4, index_head_dim]
    index_comp: CompressorState | None = None

    def tensors(self) -> list[Tensor]:
        out = [self.window]
        for s in (self.comp, self.index_comp):
            if s is not None:
                out += [t for t in (s.kv_pend, s.score_pend, s.kv_prev, s.score_prev) if t is not None]
        out += [t for t in (self.entries, self.index_keys) if t is not None]
        return out


class KVCache:
    """Static cache for `max_slots` sequences of up to `max_seq_len` tokens, main layers then MTP blocks."""

    def __init__(self, cfg: ModelConfig, max_slots: int, max_seq_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", n_mtp: int | None = None) -> None:
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds config max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        self.max_slots, self.max_seq_len, self.dtype = max_slots, max_seq_len, dtype
        n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
        ratios = cfg.layer_ratios + cfg.mtp_ratios[:n_mtp]
        d, di = cfg.head_dim, cfg.index_head_dim
        self.layers: list[LayerCache] = []
        for m in ratios:
            lc = LayerCache(m, torch.zeros(max_slots, cfg.sliding_window, d, dtype=dtype, device=device))
            if m:
                lc.entries = torch.zeros(max_slots, max_seq_len // m, d, dtype=dtype, device=device)
                lc.comp = CompressorState.allocate(max_slots, m, d, m == 4, device)
            if m == 4:
                lc.index_keys = torch.zeros(max_slots, max_seq_len // 4, di, dtype=dtype, device=device)
                lc.index_comp = CompressorState.allocate(max_slots, 4, di, True, device)
            self.layers.append(lc)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())
