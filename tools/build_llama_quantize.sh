#!/usr/bin/env bash
# Build llama.cpp's llama-quantize from the llama-cpp-python 0.3.36 source on PyPI, once, into
# ~/.cache/edgelora_np/llama-quantize-0.3.36/ (or $EDGELORA_CACHE/...). The quant fidelity tests
# (tests/llama_quantized.py) have it write the files they compare against llama.cpp's logits.
#
# GGML_NATIVE=OFF: no -march=native, so the quantizers' float arithmetic (and the bytes they
# write) do not depend on the machine's vector extensions. Static libraries: one binary.
# Needs cmake (`pip install cmake` if missing) and a C++ compiler; about 3 minutes on 2 cores.
set -euo pipefail
version=0.3.36
cache="${EDGELORA_CACHE:-$HOME/.cache/edgelora_np}"
dest="$cache/llama-quantize-$version"
if [ -x "$dest/llama-quantize" ]; then
    echo "$dest/llama-quantize"
    exit 0
fi
command -v cmake >/dev/null || python -m pip install --quiet cmake
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >"$work/configure.log" \
    || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" --target llama-quantize -j "$(nproc)" >"$work/build.log" \
    || { tail -50 "$work/build.log"; exit 1; }
mkdir -p "$dest.partial"
cp "$work/build/bin/llama-quantize" "$dest.partial/"
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "$dest/llama-quantize"
