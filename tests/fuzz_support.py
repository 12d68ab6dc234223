"""Structure-aware mutations of real files, and the contract every fuzz case must keep.

A fuzz case takes a valid file (a GGUF model, a GGUF-LoRA, a PEFT directory, a store file or
the store index), applies one to four mutations drawn by hypothesis, and loads the result. The
mutations know where the file's counts, lengths, offsets, types and names are (`gguf_slots`,
`safetensors_slots`, `ela_slots`), so most of them hit the fields a parser trusts:

    truncate     cut the file at any byte
    flip         xor one byte anywhere
    set_int      overwrite one count / length / offset / type field with an "interesting"
                 value (0, 1, 2^31, 2^32-1, 2^40, 2^60, 2^64-1, the file size, ...)
    copy_name    copy one name over another of the same length (duplicate names)
    poke_float   write NaN, +Inf, -Inf or 1e30 into the payload
    splice       delete or duplicate a range of bytes (shifts every later offset)

`check_case` is the contract (issue #17): the load either succeeds or raises an EdgeLoraError
whose message names the file; any other exception fails the test; and the peak of Python and
NumPy allocations (tracemalloc) stays below `factor` x the file size + SLACK_BYTES, so nothing
trusts a header's count before checking it against the file.

The number of cases per format is EDGELORA_FUZZ_EXAMPLES (500 by default: the normal test run;
`tox -e fuzz` sets 10,000), through the hypothesis settings profile FUZZ.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgelora_np.errors import EdgeLoraError

FUZZ_EXAMPLES = int(os.environ.get("EDGELORA_FUZZ_EXAMPLES", "500"))
settings.register_profile(
    "edgelora-fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("edgelora-fuzz")

SLACK_BYTES = 2 << 20      # interpreter noise: regex caches, exception objects, small lists

INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64, 255, 256, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1)


@dataclass(frozen=True)
class Slot:
    """One integer field of a file: where, how wide (bytes), what it means."""

    offset: int
    width: int
    kind: str        # "count", "length", "type", "dim", "offset", "version"


@dataclass(frozen=True)
class Layout:
    ints: tuple[Slot, ...]                 # integer fields
    names: tuple[tuple[int, int], ...]     # (offset, length) of each name / key string
    payload: tuple[int, int]               # (start, end) of the payload bytes


# --- where the fields are ------------------------------------------------------------------------

def gguf_slots(buf: bytes) -> Layout:
    """Walk a valid GGUF header (written independently of the reader under test)."""
    ints, names, pos = [Slot(4, 4, "version")], [], 8
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    ints += [Slot(8, 8, "count"), Slot(16, 8, "count")]
    pos = 24
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos, is_name):
        (n,) = struct.unpack_from("<Q", buf, pos)
        ints.append(Slot(pos, 8, "length"))
        if is_name:
            names.append((pos + 8, n))
        return pos + 8 + n

    def value(pos, vtype):
        if vtype == 8:
            return string(pos, False)
        if vtype == 9:
            (item,) = struct.unpack_from("<I", buf, pos)
            (count,) = struct.unpack_from("<Q", buf, pos + 4)
            ints.extend((Slot(pos, 4, "type"), Slot(pos + 4, 8, "count")))
            pos += 12
            if item in fixed:
                return pos + count * fixed[item]
            for _ in range(count):
                pos = value(pos, item)
            return pos
        return pos + fixed[vtype]

    for _ in range(n_kv):
        pos = string(pos, True)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        ints.append(Slot(pos, 4, "type"))
        pos = value(pos + 4, vtype)
    for _ in range(n_tensors):
        pos = string(pos, True)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ints.append(Slot(pos, 4, "count"))
        pos += 4
        for _ in range(n_dims):
            ints.append(Slot(pos, 8, "dim"))
            pos += 8
        ints += [Slot(pos, 4, "type"), Slot(pos + 4, 8, "offset")]
        pos += 12
    data_start = -(-pos // 32) * 32
    return Layout(tuple(ints), tuple(names), (data_start, len(buf)))


def safetensors_slots(buf: bytes) -> Layout:
    """The 8-byte header length, then numbers inside the JSON header as text."""
    (h_len,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(buf[8:8 + h_len])
    names = []
    text = buf[8:8 + h_len]
    for key in header:
        at = text.find(json.dumps(key).encode())
        if at >= 0:
            names.append((8 + at + 1, len(key.encode())))
    return Layout((Slot(0, 8, "length"),), tuple(names), (8 + h_len, len(buf)))


def ela_slots(buf: bytes) -> Layout:
    """A .ela store file: magic, version, header length, JSON header, payload at 64 bytes."""
    if len(buf) < 16:                       # an earlier mutation cut it: bytes only
        return Layout((), (), (0, len(buf)))
    (h_len,) = struct.unpack_from("<I", buf, 12)
    start = -(-(16 + h_len) // 64) * 64
    return Layout((Slot(8, 4, "version"), Slot(12, 4, "length")), (), (start, len(buf)))


# --- mutations -------------------------------------------------------------------------------------

_FLOATS = (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xca\xf2\x49\xf1",
           b"\x00\x7e", b"\x00\x7c")         # f32 NaN, +Inf, -Inf, -1e30; f16 NaN, +Inf

index = st.integers(0, 2**31)


def mutation():
    return st.one_of(
        st.tuples(st.just("truncate"), index),
        st.tuples(st.just("flip"), index, st.integers(1, 255)),
        st.tuples(st.just("flip_header"), index, st.integers(1, 255)),
        st.tuples(st.just("set_int"), index, st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)),
        st.tuples(st.just("set_int_near_size"), index, st.integers(-64, 64)),
        st.tuples(st.just("copy_name"), index, index),
        st.tuples(st.just("poke_float"), index, st.sampled_from(_FLOATS)),
        st.tuples(st.just("splice"), index, st.integers(1, 64), st.booleans()),
    )


mutations = st.lists(mutation(), min_size=1, max_size=4)


def mutate(buf: bytes, layout: Layout, ops) -> bytes:
    """Apply ops in order; offsets from `layout` are those of the original file."""
    out = bytearray(buf)
    header_end = max(layout.payload[0], 1)
    for op in ops:
        kind = op[0]
        if not out:
            break
        if kind == "truncate":
            del out[op[1] % len(out):]
        elif kind == "flip":
            out[op[1] % len(out)] ^= op[2]
        elif kind == "flip_header":
            out[op[1] % min(header_end, len(out))] ^= op[2]
        elif kind in ("set_int", "set_int_near_size") and layout.ints:
            slot = layout.ints[op[1] % len(layout.ints)]
            value = op[2] if kind == "set_int" else len(buf) + op[2]
            value %= 1 << (8 * slot.width)
            out[slot.offset:slot.offset + slot.width] = value.to_bytes(slot.width, "little")
        elif kind == "copy_name" and len(layout.names) > 1:
            (a, n), (b, m) = layout.names[op[1] % len(layout.names)], layout.names[op[2] % len(layout.names)]
            if n == m and a != b:
                out[b:b + n] = buf[a:a + n]
        elif kind == "poke_float":
            start, end = layout.payload
            if end - start >= len(op[2]):
                at = start + op[1] % (end - start - len(op[2]) + 1)
                at -= (at - start) % len(op[2])
                out[at:at + len(op[2])] = op[2]
        elif kind == "splice":
            at = op[1] % len(out)
            if op[3]:
                out[at:at] = out[at:at + op[2]]
            else:
                del out[at:at + op[2]]
        out = out[:len(buf) * 2]               # splices never grow a file without bound
    return bytes(out)


# --- the contract ----------------------------------------------------------------------------------

def tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def check_case(load, *, names: str, size: int, factor: float) -> str:
    """Run `load()`; returns "ok" or the EdgeLoraError's class name. Fails the test on any other
    exception, on an error message that does not contain `names`, and on a traced allocation
    peak above factor x size + SLACK_BYTES."""
    tracemalloc.start()
    try:
        load()
        outcome = "ok"
    except EdgeLoraError as e:
        assert names in str(e), f"the error does not name {names!r}: {e}"
        outcome = type(e).__name__
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    limit = factor * size + SLACK_BYTES
    assert peak <= limit, f"peak allocation {peak} bytes > {factor} x file size {size} + slack"
    return outcome
