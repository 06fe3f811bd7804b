#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/device/README.md): reassemble the payload that travelled in
# parts (.carry/blob.*: wheels for unsloth/bitsandbytes/trl/datasets/dvc/dvclive/gguf/opencc, the
# SmolLM2 GGUF and the corpus archive), then install the wheels into /tmp/site.
# Build the parts here (ignored folders; each call moves at most 64 MiB):
#   ../shared/device/gpu-wheels.sh .gpu                    # .gpu/a, .gpu/b
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .gpu/c dvc dvclive gguf peft ...
#   (the exact names and versions of the dvc/dvclive closure: see the issue #5 closing note)
#   mkdir -p /tmp/blobsrc && cp -r .gpu/a .gpu/b .gpu/c <SmolLM2 .gguf> <classical-modern.tar.xz> /tmp/blobsrc/
#   tar -cf - -C /tmp/blobsrc . | split -b 45M -d - .carry/blob.
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
