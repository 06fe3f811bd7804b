#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/device/README.md): reassemble the payload that travelled in
# parts (.carry/blob.*: wheels for unsloth/bitsandbytes/trl/datasets/dvc/dvclive/gguf/opencc, the
# SmolLM2 GGUF and the corpus archive), then install the wheels into /tmp/site.
# Build the parts here with benchmarks/build_gpu_payload.sh (ignored folders; each call moves at most 64 MiB), i.e.:
#   ../shared/device/gpu-wheels.sh .gpu                    # .gpu/a, .gpu/b
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .gpu/c dvc dvclive gguf peft ...
#   (the exact names and versions of the dvc/dvclive closure: in build_gpu_payload.sh)
#   tar of .gpu/a .gpu/b .gpu/c <SmolLM2 .gguf> <classical-modern.tar.xz> | split -b 56M -d - .carry/blob.
# Run the code from a snapshot of a commit (git archive HEAD stages wenyan tools benchmarks dvc.yaml params.yaml
# pyproject.toml into .carry/src, carried in each call and copied to /tmp/src there: a carried .carry/src
# does not survive the next call's carry of another .carry path), so uncommitted edits don't travel.
# Then one device call per part: `mkdir -p /tmp/blob && cp .carry/blob.NN /tmp/blob/` (carry: .carry/blob.NN),
# chained without pause (the machine goes back after 30 s idle), and in the last call:
# Usage there: bash benchmarks/device_setup.sh   (after every part was copied to /tmp/blob)
# Never delete .git there: the tool's next sync fails and the machine is lost.
set -euo pipefail
mkdir -p /tmp/payload
cat /tmp/blob/blob.* | tar -xf - -C /tmp/payload
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/payload/a/*.whl /tmp/payload/b/*.whl /tmp/payload/c/*.whl
ls -la /tmp/payload
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
