#!/usr/bin/env bash
# The baseline a user would run: llama.cpp's own llama-server, built from the llama.cpp vendored
# in the llama-cpp-python 0.3.36 source distribution on PyPI (the same llama.cpp the oracle and
# bench envs use through llama-cpp-python). About 5 minutes on 2 cores; cached afterwards.
#
#     tools/build_llama_server.sh          # prints the path of the llama-server binary
#
# Cache: $EDGELORA_CACHE, else $XDG_CACHE_HOME/edgelora_np, else ~/.cache/edgelora_np.
set -euo pipefail

VERSION=0.3.36
cache="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora_np}/llama-server-$VERSION"
binary="$cache/build/bin/llama-server"
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi
mkdir -p "$cache"
cd "$cache"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
    python -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d . >&2
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
# Native code (llama.cpp's default, -march=native) without AMX: some x86 VMs advertise AMX in
# cpuid while their kernel does not enable its tile state, and llama.cpp's AMX matmul then dies of
# SIGILL on the first token (seen 2026-12-01 on a 2-core Xeon VM). The boards it stands in for
# have none. GCC keeps an explicit -mno-* over what -march=native implies.
no_amx=()
if [ "$(uname -m)" = x86_64 ]; then
    amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    no_amx=(-DCMAKE_C_FLAGS="$amx" -DCMAKE_CXX_FLAGS="$amx")
fi
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B build -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_TYPE=Release ${no_amx[@]+"${no_amx[@]}"} >&2
cmake --build build --target llama-server -j2 >&2
echo "$binary"
