"""Static-graph MTP verify: every decoding row's [pending, d_1..d_n] through the main model, one compiled graph
per batch bucket (bucket rows x (n+1) tokens; rows that pad a batch sit on the reserved pad slot, as in
`GraphDecoder`).

The verify is a prefill of n+1 tokens per row at the row's own start (a ragged batch whose starts are a tensor)
run without host reads: the decode path's MoE (`Step.sync_free`: no host read of expert counts) and entry pools
read up to the cache's max_seq_len (static shapes; a decode bucket reads every page the same way). The eager
verify defers its cache writes and commits the accepted prefix; a graph cannot wait for the host's acceptance,
so this one writes every position's state, after copying what those writes overwrite: per main layer, the n+1
window-ring rows and compressor rows ([kv | score], `cache.CompressorState`) of the positions start..start+n.
`rollback(k)` puts back the copies of the rejected positions (j >= k[b]), which leaves the cache as the eager
commit of k tokens would. Compressed entries (and indexer keys) that only rejected tokens closed stay written:
entry w is read only by positions at or past its window's last token, and the token there writes entry w again
before attending (decode, prefill and the eager verify alike), as the decode step's row written for a still
open window is.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor, nn

from dsv4_ascend.cache import KVCache
from dsv4_ascend.model import Step, Transformer

from .decoder import BucketGraphs, bucket_for

__all__ = ["GraphVerifier"]


class _Verify(nn.Module):
    """The verify forward as a module (`functional_call` swaps the e8m0 scale views in, see GraphDecoder)."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, ids: Tensor, start: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        s = ids.shape[1]
        positions = start.unsqueeze(1) + torch.arange(s, device=ids.device)
        step = Step(ids, positions, slots, self.cache, start, used=torch.full_like(start, s),
                    end=self.cache.max_seq_len, sync_free=True)
        x = self.model.hidden_streams(ids, step)
        return self.model.logits(x), x


class GraphVerifier:
    """`verify(ids, start, slots)` = the main model over ids [B, n+1] at positions start[b].. (cache writes done,
    undone for rejected positions by the returned `rollback`); one compiled graph per bucket, `compiles` counts."""

    def __init__(self, model: Transformer, cache: KVCache, pad_slot: int, buckets: list[int], n_tokens: int,
                 compiler: str | Callable | None = None, cpp_wrapper: bool = True, tuning: str = "default") -> None:
        if not 0 <= pad_slot < cache.max_slots:
            raise ValueError(f"pad_slot {pad_slot} is not a slot of the cache (max_slots {cache.max_slots})")
        self.layers = cache.layers[:model.cfg.num_hidden_layers]
        rings = [("sliding_window", self.layers[0].window.size)]
        rings += [(f"compressor ring of layer {i}", st.state.shape[1]) for i, lc in enumerate(self.layers)
                  for st in (lc.comp, lc.index_comp) if st is not None]
        small = [(name, size) for name, size in rings if size < n_tokens + 1]
        if small:  # the n+1 positions must land on distinct ring rows, or a copy would be of a row written twice
            raise ValueError(f"a captured verify of {n_tokens} speculative tokens needs rings of at least "
                             f"{n_tokens + 1} rows; {small[0][0]} has {small[0][1]}")
        self.model = model
        self.cache = cache
        self.pad_slot = pad_slot
        self.n = n_tokens
        self.buckets = sorted(set(buckets))
        self.device = model.embed.weight.device
        self._verify = _Verify(model, cache)
        self.graphs = BucketGraphs(self._step, model, len(self.buckets), compiler, cpp_wrapper, True, tuning)

    @property
    def compiles(self) -> int:
        return self.graphs.compiles

    def _places(self, start: Tensor, slots: Tensor) -> list[tuple[Tensor, tuple[Tensor, Tensor]]]:
        """(buffer, index [B, n+1]) of every ring row that positions start[b]..start[b]+n of slots[b] write."""
        pos = start.unsqueeze(1) + torch.arange(self.n + 1, device=start.device)
        out = []
        for lc in self.layers:
            out.append((lc.window.data, (slots.unsqueeze(1), lc.window.row(pos))))
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    out.append((st.state, (st.blocks(slots).unsqueeze(1), pos % st.state.shape[1])))
        return out

    def _step(self, ids: Tensor, start: Tensor, slots: Tensor, scales: dict[str, Tensor]
              ) -> tuple[Tensor, Tensor, list[Tensor]]:
        saved = [buf[index] for buf, index in self._places(start, slots)]  # before the forward overwrites them
        e8m0 = {f"model.{name}": b.view(torch.float8_e8m0fnu) for name, b in scales.items()}
        logits, x = torch.func.functional_call(self._verify, e8m0, (ids, start, slots))
        return logits, x, saved

    def verify(self, ids: Tensor, start: Tensor, slots: Tensor
               ) -> tuple[Tensor, Tensor, Callable[[Tensor], None]]:
        """(logits [B, n+1, V], streams [B, n+1, n_hc, D], rollback): ids [B, n+1] of cache slots `slots` [B] at
        positions start[b].., written to the cache; `rollback(k)` with k [B] (tokens kept per row, 1..n+1) undoes
        the writes of the rest."""
        b = ids.shape[0]
        if ids.shape[1] != self.n + 1:
            raise ValueError(f"a captured verify takes {self.n + 1} tokens per row, found {ids.shape[1]}")
        bucket = bucket_for(self.buckets, b)
        pad = bucket - b

        def padded(t: Tensor, fill: int) -> Tensor:
            if not pad:
                return t.contiguous()
            return torch.cat([t, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])

        start, slots = padded(start, 0), padded(slots, self.pad_slot)
        logits, x, saved = self.graphs(bucket, padded(ids, 0), start, slots, self.graphs.scale_bytes)

        def rollback(keep: Tensor) -> None:
            keep = padded(keep, self.n + 1)  # padding rows keep everything: nothing of theirs is put back
            undo = (torch.arange(self.n + 1, device=keep.device) >= keep.unsqueeze(1)).unsqueeze(-1)
            for (buf, index), old in zip(self._places(start, slots), saved):
                buf[index] = torch.where(undo, old, buf[index])

        return logits[:b], x[:b], rollback

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket now (rows on the pad slot), so serving never stalls on a compile."""
        for i, b in enumerate(self.buckets):
            if progress:
                print(f"[dsv4] compiling MTP verify graph for batch {b} ({i + 1}/{len(self.buckets)})",
                      file=sys.stderr, flush=True)
            z = torch.zeros(b, dtype=torch.int64, device=self.device)
            ids = torch.zeros(b, self.n + 1, dtype=torch.int64, device=self.device)
            _, _, rollback = self.verify(ids, z, torch.full((b,), self.pad_slot, device=self.device))
            rollback(z + self.n + 1)
