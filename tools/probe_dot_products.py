"""What LLVM makes of integer dot products, on x86 and on AArch64, from target-independent IR.

    python tools/probe_dot_products.py

Our kernels are Numba, so their instructions are whatever LLVM selects for generic IR; x86 or
ARM intrinsics are ruled out. This compiles a few one-step dot-product forms, written as small
IR functions, with llvmlite's LLVM for three CPUs (this VM's Zen 5; the Raspberry Pi 5's
Cortex-A76, which has the dot-product extension; the Pi 4's Cortex-A72, which has not) and
prints the vector instructions each form becomes. Recorded in docs/benchmarks.md (issue #15).

Forms (all exact integer arithmetic):
  partial-reduce s8 x s8   llvm.vector.partial.reduce.add of 16 (or 64) byte products into
                           4 (16) int32 lanes: how LLVM's loop vectorizer spells a dot product
  partial-reduce u8 x s8   the same, the weights unsigned (a q4 nibble), the activations signed
  pair i16 -> i32          even/odd int16 lanes times a broadcast pair of activations, summed
                           into int32 (what `vpdpwssd`/`pmaddwd` compute)
  pair u8 x s8 -> i16       even and odd bytes widened, multiplied, each pair added, clamped
                           to int16: the shape of kernels/bytedot.py (x86's `pmaddubsw`)
  i16 mul-add              the other kernels: int16 products added in int16 lanes
And one that is not a dot product:
  16-entry lookup          a 16-byte table indexed lane by lane by a vector of codes
                           (kernels/lookup.py, the IQ4 levels): a byte shuffle if LLVM sees it
"""

from __future__ import annotations

from collections import Counter

import llvmlite.binding as llvm

TARGETS = [("x86_64-unknown-linux-gnu", "znver5", ""),
           ("aarch64-unknown-linux-gnu", "cortex-a76", "+dotprod"),
           ("aarch64-unknown-linux-gnu", "cortex-a72", "")]


def partial_reduce(n: int, wext: str) -> str:
    a = n // 4
    return f"""
define <{a} x i32> @f(<{a} x i32> %acc, <{n} x i8> %w, <{n} x i8> %x) {{
  %a = {wext} <{n} x i8> %w to <{n} x i32>
  %b = sext <{n} x i8> %x to <{n} x i32>
  %m = mul <{n} x i32> %a, %b
  %r = call <{a} x i32> @llvm.vector.partial.reduce.add.v{a}i32.v{n}i32(<{a} x i32> %acc, <{n} x i32> %m)
  ret <{a} x i32> %r
}}
declare <{a} x i32> @llvm.vector.partial.reduce.add.v{a}i32.v{n}i32(<{a} x i32>, <{n} x i32>)
"""


def pair_i16(n: int = 16) -> str:
    even = ", ".join(f"i32 {2 * i}" for i in range(n))
    odd = ", ".join(f"i32 {2 * i + 1}" for i in range(n))
    return f"""
define <{n} x i32> @f(<{n} x i32> %acc, <{2 * n} x i16> %w, i32 %pair) {{
  %i0 = insertelement <{n} x i32> poison, i32 %pair, i32 0
  %sp = shufflevector <{n} x i32> %i0, <{n} x i32> poison, <{n} x i32> zeroinitializer
  %xv = bitcast <{n} x i32> %sp to <{2 * n} x i16>
  %we = shufflevector <{2 * n} x i16> %w, <{2 * n} x i16> poison, <{n} x i32> <{even}>
  %wo = shufflevector <{2 * n} x i16> %w, <{2 * n} x i16> poison, <{n} x i32> <{odd}>
  %xe = shufflevector <{2 * n} x i16> %xv, <{2 * n} x i16> poison, <{n} x i32> <{even}>
  %xo = shufflevector <{2 * n} x i16> %xv, <{2 * n} x i16> poison, <{n} x i32> <{odd}>
  %a = sext <{n} x i16> %we to <{n} x i32>
  %b = sext <{n} x i16> %wo to <{n} x i32>
  %c = sext <{n} x i16> %xe to <{n} x i32>
  %d = sext <{n} x i16> %xo to <{n} x i32>
  %m0 = mul <{n} x i32> %a, %c
  %m1 = mul <{n} x i32> %b, %d
  %s = add <{n} x i32> %m0, %m1
  %r = add <{n} x i32> %acc, %s
  ret <{n} x i32> %r
}}
"""


def pair_u8s8(n: int = 32) -> str:
    even = ", ".join(f"i32 {2 * i}" for i in range(n))
    odd = ", ".join(f"i32 {2 * i + 1}" for i in range(n))
    return f"""
define <{n} x i16> @f(<{n} x i16> %acc, <{2 * n} x i8> %w, <{2 * n} x i8> %x) {{
  %we = shufflevector <{2 * n} x i8> %w, <{2 * n} x i8> poison, <{n} x i32> <{even}>
  %wo = shufflevector <{2 * n} x i8> %w, <{2 * n} x i8> poison, <{n} x i32> <{odd}>
  %xe = shufflevector <{2 * n} x i8> %x, <{2 * n} x i8> poison, <{n} x i32> <{even}>
  %xo = shufflevector <{2 * n} x i8> %x, <{2 * n} x i8> poison, <{n} x i32> <{odd}>
  %a = zext <{n} x i8> %we to <{n} x i32>
  %b = zext <{n} x i8> %wo to <{n} x i32>
  %c = sext <{n} x i8> %xe to <{n} x i32>
  %d = sext <{n} x i8> %xo to <{n} x i32>
  %m0 = mul <{n} x i32> %a, %c
  %m1 = mul <{n} x i32> %b, %d
  %s = add <{n} x i32> %m0, %m1
  %lo = call <{n} x i32> @llvm.smax.v{n}i32(<{n} x i32> %s, <{n} x i32> splat (i32 -32768))
  %hi = call <{n} x i32> @llvm.smin.v{n}i32(<{n} x i32> %lo, <{n} x i32> splat (i32 32767))
  %t = trunc <{n} x i32> %hi to <{n} x i16>
  %r = add <{n} x i16> %acc, %t
  ret <{n} x i16> %r
}}
declare <{n} x i32> @llvm.smax.v{n}i32(<{n} x i32>, <{n} x i32>)
declare <{n} x i32> @llvm.smin.v{n}i32(<{n} x i32>, <{n} x i32>)
"""


def mul_add_i16(n: int = 32) -> str:
    return f"""
define <{n} x i16> @f(<{n} x i16> %acc, <{n} x i16> %w, i16 %x) {{
  %i0 = insertelement <{n} x i16> poison, i16 %x, i32 0
  %xs = shufflevector <{n} x i16> %i0, <{n} x i16> poison, <{n} x i32> zeroinitializer
  %m = mul <{n} x i16> %w, %xs
  %r = add <{n} x i16> %acc, %m
  ret <{n} x i16> %r
}}
"""


def lookup16(n: int = 16) -> str:
    """kernels/lookup.py's shape: n lanes, each extracted from a 16-byte table at the index in
    the same lane of the codes (the IQ4 levels; a "variable permute" to LLVM)."""
    from edgelora_np.gguf.quants import IQ4_NL_VALUES

    table = ", ".join(f"i8 {v}" for v in IQ4_NL_VALUES)
    body, prev = [], "poison"
    for i in range(n):
        body.append(f"  %c{i} = extractelement <{n} x i8> %q, i32 {i}")
        body.append(f"  %l{i} = extractelement <16 x i8> <{table}>, i8 %c{i}")
        body.append(f"  %r{i} = insertelement <{n} x i8> {prev}, i8 %l{i}, i32 {i}")
        prev = f"%r{i}"
    lines = "\n".join(body)
    return f"""
define <{n} x i8> @f(<{n} x i8> %codes) {{
  %q = and <{n} x i8> %codes, splat (i8 15)
{lines}
  ret <{n} x i8> {prev}
}}
"""


FORMS = {
    "partial-reduce s8 x s8, 16 bytes": partial_reduce(16, "sext"),
    "partial-reduce s8 x s8, 64 bytes": partial_reduce(64, "sext"),
    "partial-reduce u8 x s8, 64 bytes": partial_reduce(64, "zext"),
    "pair i16 -> i32, 32 products": pair_i16(),
    "pair u8 x s8 -> i16, 64 products": pair_u8s8(),
    "i16 mul-add, 32 products": mul_add_i16(),
    "16-entry lookup, 16 codes": lookup16(),
}


def vector_instructions(ir_text: str, triple: str, cpu: str, features: str) -> Counter:
    module = llvm.parse_assembly(ir_text)
    module.verify()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features,
                                                                   opt=3)
    asm = machine.emit_assembly(module)
    return Counter(line.split()[0] for line in asm.splitlines()
                   if line.startswith("\t") and not line.startswith("\t.")
                   and line.split()[0] not in ("ret", "retq", "vzeroupper"))


def main() -> None:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    print(f"LLVM {'.'.join(map(str, llvm.llvm_version_info))}\n")
    for name, text in FORMS.items():
        print(name)
        for triple, cpu, features in TARGETS:
            counts = vector_instructions(text, triple, cpu, features)
            listing = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(counts.items()))
            print(f"  {cpu:<11} {sum(counts.values()):>3} instructions: {listing}")
        print()


if __name__ == "__main__":
    main()
