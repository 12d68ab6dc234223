"""An adapter in the engine's own layout: one flat byte payload the LoRA kernels read in place.

`pack(adapter, cfg)` turns a loaded adapter (adapters/formats.py: PEFT or GGUF-LoRA, already
permuted to GGUF row order) into a PackedAdapter. Its payload is what the adapter store writes
to disk and what the pool copies, unchanged, into its arena: a cold load is one memcpy.

Per projection group g (q|k|v, o, gate|up, down; see `projection_groups`) with rank r_p for
each part p (its largest rank over the layers), over the n layers the group adapts at all
(`layers`; others take no bytes), the payload holds three sections, each starting on a 64-byte
boundary:
    A  [n, R, K]   fp16 bits     R = sum of r_p; row j of the i-th layer is a rank row of A
    B  [n, Pb]     fp16 bits     per part p, r_p rows of that projection's width, concatenated
    S  [n, R]      float32       per-row scale: alpha / r x the user's scale (0: row unused)
Groups the adapter does not touch take no bytes. The layout of one adapter is described by
its `groups` map (ranks and section offsets), which the store keeps in the file's header.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from edgelora_np.errors import AdapterError
from edgelora_np.model.config import LlamaConfig

ALIGN = 64


@dataclass(frozen=True)
class Group:
    """Projections sharing one input, with their output column ranges in the group's output."""

    name: str
    n_in: int
    parts: tuple[tuple[str, int, int], ...]    # (projection, first column, width)

    @property
    def n_out(self) -> int:
        return self.parts[-1][1] + self.parts[-1][2]


def projection_groups(cfg: LlamaConfig) -> dict[str, Group]:
    D, KVD, F = cfg.dim, cfg.kv_dim, cfg.ffn_dim
    return {g.name: g for g in (
        Group("qkv", D, (("attn_q", 0, D), ("attn_k", D, KVD), ("attn_v", D + KVD, KVD))),
        Group("o", D, (("attn_output", 0, D),)),
        Group("gate_up", D, (("ffn_gate", 0, F), ("ffn_up", F, F))),
        Group("down", F, (("ffn_down", 0, D),)),
    )}


@dataclass(frozen=True)
class GroupLayout:
    """Where one group's sections sit in a payload (byte offsets) and the rank of each part."""

    ranks: tuple[int, ...]
    layers: tuple[int, ...]       # the layers with sections, ascending
    a: int
    b: int
    s: int

    @property
    def rows(self) -> int:
        return sum(self.ranks)

    def to_json(self) -> dict:
        return {"ranks": list(self.ranks), "layers": list(self.layers), "a": self.a, "b": self.b,
                "s": self.s}

    @classmethod
    def from_json(cls, d: dict) -> GroupLayout:
        return cls(tuple(int(r) for r in d["ranks"]), tuple(int(x) for x in d["layers"]),
                   int(d["a"]), int(d["b"]), int(d["s"]))


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout_for(cfg: LlamaConfig, ranks: dict[str, tuple[int, ...]],
               layers: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, GroupLayout], int]:
    """Section offsets for the given ranks (and adapted layers, default all) per group;
    returns (layouts, payload bytes)."""
    groups, at, out = projection_groups(cfg), 0, {}
    for name, g in groups.items():
        r = tuple(ranks.get(name, (0,) * len(g.parts)))
        if len(r) != len(g.parts) or any(x < 0 for x in r):
            raise AdapterError(f"ranks {r} do not fit projection group {name!r} ({len(g.parts)} parts)")
        active = tuple(sorted(set(range(cfg.n_layers) if layers is None else layers.get(name, ()))))
        if sum(r) == 0 or not active:
            continue
        if active[0] < 0 or active[-1] >= cfg.n_layers:
            raise AdapterError(f"layers {active} outside the model's {cfg.n_layers} layers")
        L, R = len(active), sum(r)
        pb = sum(rp * w for rp, (_, _, w) in zip(r, g.parts))
        a = at
        b = _align(a + 2 * L * R * g.n_in)
        s = _align(b + 2 * L * pb)
        at = _align(s + 4 * L * R)
        out[name] = GroupLayout(r, active, a, b, s)
    return out, at


@dataclass(frozen=True)
class PackedAdapter:
    groups: dict[str, GroupLayout]
    payload: np.ndarray                # uint8, a multiple of ALIGN bytes

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)

    def copy_into(self, dst: np.ndarray) -> None:
        dst[:] = self.payload

    @functools.cached_property
    def fingerprint(self) -> str:
        """The content's identity: a hash of the packed payload (layout, weights, scales)."""
        h = hashlib.sha256(repr(sorted((n, g.to_json()) for n, g in self.groups.items())).encode())
        h.update(self.payload)
        return "packed-sha256:" + h.hexdigest()[:32]

    def ranks(self) -> dict[str, list[int]]:
        return {name: list(g.ranks) for name, g in self.groups.items()}

    def sections(self, cfg: LlamaConfig, group: str):
        """(A [n, R, K] uint16, B [n, Pb] uint16, S [n, R] float32) views of one group, over
        its n adapted layers (self.groups[group].layers)."""
        g, lay = projection_groups(cfg)[group], self.groups[group]
        L = len(lay.layers)
        R = lay.rows
        pb = sum(r * w for r, (_, _, w) in zip(lay.ranks, g.parts))
        p = self.payload
        a = p[lay.a:lay.a + 2 * L * R * g.n_in].view(np.uint16).reshape(L, R, g.n_in)
        b = p[lay.b:lay.b + 2 * L * pb].view(np.uint16).reshape(L, pb)
        s = p[lay.s:lay.s + 4 * L * R].view(np.float32).reshape(L, R)
        return a, b, s


def pack(adapter, cfg: LlamaConfig) -> PackedAdapter:
    """Lay out a loaded adapter (its `pairs` {(layer, proj): a [r, in], b [out, r], scale})."""
    groups = projection_groups(cfg)
    ranks, layers = {}, {}
    for name, g in groups.items():
        parts = {part for part, _, _ in g.parts}
        ranks[name] = tuple(max((pair.a.shape[0] for (_, proj), pair in adapter.pairs.items()
                                 if proj == part), default=0) for part, _, _ in g.parts)
        layers[name] = tuple(sorted({layer for layer, proj in adapter.pairs if proj in parts}))
    layouts, n_bytes = layout_for(cfg, ranks, layers)
    packed = PackedAdapter(layouts, np.zeros(n_bytes, np.uint8))
    for name, lay in layouts.items():
        a, b, s = packed.sections(cfg, name)
        row, col = 0, 0
        for r_max, (proj, _, w) in zip(lay.ranks, groups[name].parts):
            for i, layer in enumerate(lay.layers):
                pair = adapter.pairs.get((layer, proj))
                if pair is None:
                    continue
                r = pair.a.shape[0]
                a16 = _fp16(adapter, layer, proj, "A", pair.a)                      # [r, in]
                rows_b = _fp16(adapter, layer, proj, "B", np.asarray(pair.b).T)      # [r, w]
                a[i, row:row + r] = a16.view(np.uint16)
                s[i, row:row + r] = pair.scale
                b[i, col:col + r * w] = rows_b.reshape(-1).view(np.uint16)
            row += r_max
            col += r_max * w
    packed.payload.flags.writeable = False
    return packed


def _fp16(adapter, layer: int, proj: str, half: str, x: np.ndarray) -> np.ndarray:
    """float32 weights as the fp16 the kernels read; a value beyond fp16's range (65504) would
    become Inf and every output NaN, so it is refused here, at import."""
    with np.errstate(over="ignore"):
        x16 = np.asarray(x, np.float32).astype(np.float16)
    if not np.isfinite(x16).all():
        big = float(np.abs(np.asarray(x, np.float32)).max())
        raise AdapterError(f"{adapter.path}: lora_{half} of blk.{layer}.{proj} holds a value of "
                           f"magnitude {big:.3g}, beyond fp16's range (65504) the kernels use")
    return x16


def check_layout(cfg: LlamaConfig, groups: dict, nbytes: int, where: str) -> None:
    """A stored layout (a .ela header, an index row) must be the one `layout_for` gives its ranks
    and layers: the kernels read the arena at these offsets without bounds checks."""
    known = projection_groups(cfg)
    unknown = set(groups) - set(known)
    if unknown:
        raise AdapterError(f"{where}: unknown projection groups {sorted(unknown)}")
    try:
        ranks = {g: tuple(lay.ranks) for g, lay in groups.items()}
        layers = {g: tuple(lay.layers) for g, lay in groups.items()}
        want, want_bytes = layout_for(cfg, ranks, layers)
    except (AdapterError, TypeError, ValueError) as e:
        raise AdapterError(f"{where}: layout does not fit the model: {e}") from None
    if want != groups or want_bytes != nbytes:
        raise AdapterError(f"{where}: layout {({g: lay.to_json() for g, lay in groups.items()})} "
                           f"and {nbytes} payload bytes are not what its ranks and layers take "
                           f"for this model ({want_bytes} bytes)")
