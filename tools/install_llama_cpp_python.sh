#!/usr/bin/env bash
# llama-cpp-python for `tox -e bench`: built from source as pip builds it (llama.cpp's default,
# -march=native), the version whose llama.cpp tools/build_llama_server.sh builds, and like it
# without AMX on x86-64: some x86 VMs advertise AMX in cpuid while their kernel does not enable
# its tile state, and llama.cpp's AMX matmul then dies of SIGILL on the first token.
set -euo pipefail

VERSION=0.3.36
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi
if [ "$(uname -m)" = x86_64 ]; then
    amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$amx' -DCMAKE_CXX_FLAGS='$amx'"
fi
python -m pip install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
