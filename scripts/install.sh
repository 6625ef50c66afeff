#!/usr/bin/env bash
# Install Fireside into .venv (idempotent); arguments are the extras ("test").
#
# llama-cpp-python compiles llama.cpp for this CPU (-march=native) on first install
# (~10 min on 2 cores; pip caches the wheel). llama.cpp's AMX kernels, which
# -march=native turns on for Intel CPUs with AMX (Sapphire Rapids and later),
# crash in ggml_backend_amx_mul_mat on the first batch of more than one token on
# the virtual machines this project runs on, so the build leaves AMX out; AVX-512
# and VNNI stay. A wheel built before (pip's cache, another machine) is checked by
# decoding a short batch in a child process; if that crashes, the wheel leaves pip's
# cache and is built again (then cached: later installs are fast again).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if echo | gcc -mno-amx-tile -E - >/dev/null 2>&1; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='${no_amx}' -DCMAKE_CXX_FLAGS='${no_amx}'"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
if ! .venv/bin/python scripts/check_llama.py; then
    echo "llama.cpp crashed on a test batch; rebuilding llama-cpp-python" >&2
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
    .venv/bin/pip cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
    .venv/bin/pip install -q --force-reinstall --no-deps "llama-cpp-python==${version}"
    .venv/bin/python scripts/check_llama.py
fi
