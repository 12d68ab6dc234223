"""The resident adapters of a model, laid out for the batched LoRA kernels (kernels/lora.py).

A LoraBank holds up to `max_slots` adapters. Each has a slot index, which is what a batch's
`adapters` array carries per token. For each projection group (q|k|v, o, gate|up, down) the
bank keeps one set of flat arrays shared by all resident adapters; see kernels/lora.py.

An adapter takes, per group, the rows of its ranks: r_q + r_k + r_v rows for q|k|v, where r_p
is the adapter's largest rank for projection p over the layers (rank_pattern may vary it), and
its B columns. Layers it does not adapt keep zero scale in its rows.

Changing the set of resident adapters rebuilds the group arrays (a copy of the resident bytes);
the adapter arena (a later piece) replaces this with a bounded pool and pin/evict accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora_np.errors import AdapterError, CapacityError
from edgelora_np.kernels.bits import f16_bits
from edgelora_np.kernels.lora import lora_bgmv, lora_sgmv, segments
from edgelora_np.model.config import LlamaConfig


@dataclass(frozen=True)
class Group:
    """Projections sharing one input, with their output column ranges in the group's output."""

    name: str
    n_in: int
    parts: tuple[tuple[str, int, int], ...]    # (projection, first column, width)


def projection_groups(cfg: LlamaConfig) -> dict[str, Group]:
    D, KVD, F = cfg.dim, cfg.kv_dim, cfg.ffn_dim
    return {g.name: g for g in (
        Group("qkv", D, (("attn_q", 0, D), ("attn_k", D, KVD), ("attn_v", D + KVD, KVD))),
        Group("o", D, (("attn_output", 0, D),)),
        Group("gate_up", D, (("ffn_gate", 0, F), ("ffn_up", F, F))),
        Group("down", F, (("ffn_down", 0, D),)),
    )}


@dataclass
class _Block:
    """One adapter's contribution to one group: its rows, ready to concatenate."""

    a: np.ndarray          # [L, r, K] uint16
    b: np.ndarray          # [L, P] uint16
    scale: np.ndarray      # [L, r] float32
    col0: np.ndarray       # [r] int32
    width: np.ndarray      # [r] int32
    bstart: np.ndarray     # [r] int64, relative to the block's pool start


@dataclass
class GroupArrays:
    """The concatenation of all resident blocks of a group (the kernels' arguments)."""

    a: np.ndarray
    b: np.ndarray
    scale: np.ndarray
    col0: np.ndarray
    width: np.ndarray
    bstart: np.ndarray
    slot_row0: np.ndarray  # [S] int32
    slot_nrows: np.ndarray  # [S] int32


class LoraBank:
    def __init__(self, cfg: LlamaConfig, max_slots: int = 64):
        self.cfg = cfg
        self.max_slots = max_slots
        self.groups = projection_groups(cfg)
        self._names: list[str | None] = [None] * max_slots
        self._blocks: dict[int, dict[str, _Block]] = {}
        self.arrays: dict[str, GroupArrays] = {}
        self._rebuild()

    # --- membership ----------------------------------------------------------------------

    def slot(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise AdapterError(f"adapter {name!r} is not loaded") from None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def names(self) -> list[str]:
        return [n for n in self._names if n is not None]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for g in self.arrays.values()
                   for x in (g.a, g.b, g.scale, g.col0, g.width, g.bstart))

    def add(self, name: str, adapter) -> int:
        """Make `adapter` (an adapters.formats.LoraAdapter) resident; returns its slot."""
        if name in self._names:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        try:
            slot = self._names.index(None)
        except ValueError:
            raise CapacityError(f"all {self.max_slots} adapter slots are in use") from None
        self._blocks[slot] = {g.name: self._block(g, adapter) for g in self.groups.values()}
        self._names[slot] = name
        self._rebuild()
        return slot

    def remove(self, name: str) -> None:
        slot = self.slot(name)
        self._names[slot] = None
        del self._blocks[slot]
        self._rebuild()

    def _block(self, group: Group, adapter) -> _Block:
        L, K = self.cfg.n_layers, group.n_in
        ranks = [max((pair.a.shape[0] for (layer, proj), pair in adapter.pairs.items()
                      if proj == name), default=0) for name, _, _ in group.parts]
        n_rows = sum(ranks)
        a = np.zeros((L, n_rows, K), np.float32)
        scale = np.zeros((L, n_rows), np.float32)
        col0, width, bstart = [], [], []
        pool = sum(r * w for r, (_, _, w) in zip(ranks, group.parts))
        b = np.zeros((L, pool), np.float32)
        row, offset = 0, 0
        for r_max, (proj, c0, w) in zip(ranks, group.parts):
            for j in range(r_max):
                col0.append(c0)
                width.append(w)
                bstart.append(offset + j * w)
            for layer in range(L):
                pair = adapter.pairs.get((layer, proj))
                if pair is None:
                    continue
                r = pair.a.shape[0]
                a[layer, row:row + r] = pair.a                                  # [r, K]
                scale[layer, row:row + r] = pair.scale
                b[layer, offset:offset + r * w] = pair.b.T.reshape(-1)          # [r, w] rows
            row += r_max
            offset += r_max * w
        return _Block(f16_bits(a), f16_bits(b), scale, np.array(col0, np.int32),
                      np.array(width, np.int32), np.array(bstart, np.int64))

    def _rebuild(self) -> None:
        L = self.cfg.n_layers
        for g in self.groups.values():
            blocks = [(s, self._blocks[s][g.name]) for s in sorted(self._blocks)]
            slot_row0 = np.zeros(self.max_slots, np.int32)
            slot_nrows = np.zeros(self.max_slots, np.int32)
            row, pool = 0, 0
            bstarts = []
            for s, blk in blocks:
                slot_row0[s], slot_nrows[s] = row, len(blk.col0)
                bstarts.append(blk.bstart + pool)
                row += len(blk.col0)
                pool += blk.b.shape[1]

            def cat(arrays, axis, empty_shape, dtype):
                return (np.ascontiguousarray(np.concatenate(arrays, axis=axis)) if arrays
                        else np.zeros(empty_shape, dtype))

            self.arrays[g.name] = GroupArrays(
                a=cat([b.a for _, b in blocks], 1, (L, 0, g.n_in), np.uint16),
                b=cat([b.b for _, b in blocks], 1, (L, 0), np.uint16),
                scale=cat([b.scale for _, b in blocks], 1, (L, 0), np.float32),
                col0=cat([b.col0 for _, b in blocks], 0, (0,), np.int32),
                width=cat([b.width for _, b in blocks], 0, (0,), np.int32),
                bstart=cat(bstarts, 0, (0,), np.int64),
                slot_row0=slot_row0, slot_nrows=slot_nrows)


class LoraBatch:
    """How one batch's tokens map onto the bank: computed once per forward, used per layer.

    Runs of >= 2 tokens with the same adapter (prefill chunks) go to the segment kernel,
    the remaining tokens (decode steps, one per sequence) to the gather kernel.
    """

    def __init__(self, bank: LoraBank, token_slot: np.ndarray):
        self.bank = bank
        token_slot = np.ascontiguousarray(token_slot, dtype=np.int32)
        begin, end, slot = segments(token_slot)
        long = (end - begin >= 2) & (slot >= 0)
        self.seg_begin, self.seg_end, self.seg_slot = begin[long], end[long], slot[long]
        gather = token_slot.copy()
        for b0, b1 in zip(self.seg_begin.tolist(), self.seg_end.tolist()):
            gather[b0:b1] = -1
        self.gather_slot = gather
        self.any_gather = bool((gather >= 0).any())
        self.active = self.any_gather or len(self.seg_slot) > 0

    def apply(self, group: str, layer: int, x: np.ndarray, y: np.ndarray) -> None:
        """y [B, N] += the LoRA corrections of `group` at `layer` for every token."""
        g = self.bank.arrays[group]
        if g.a.shape[1] == 0:
            return
        args = (g.a[layer], g.b[layer], g.scale[layer], g.col0, g.width, g.bstart,
                g.slot_row0, g.slot_nrows)
        if self.any_gather:
            lora_bgmv(x, y, self.gather_slot, *args)
        if len(self.seg_slot):
            lora_sgmv(x, y, self.seg_begin, self.seg_end, self.seg_slot, *args)
