#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/device/README.md): reassemble the payload that travelled in
# parts (.carry/blob.*: wheels for unsloth/bitsandbytes/trl/datasets/dvc/dvclive/gguf/opencc, the
# SmolLM2 GGUF and the corpus archive), then install the wheels into /tmp/site.
# Usage there: bash benchmarks/device_setup.sh   (after every part was copied to /tmp/blob)
set -euo pipefail
mkdir -p /tmp/payload
cat /tmp/blob/blob.* | tar -xf - -C /tmp/payload
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/payload/a/*.whl /tmp/payload/b/*.whl /tmp/payload/c/*.whl
ls -la /tmp/payload
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
