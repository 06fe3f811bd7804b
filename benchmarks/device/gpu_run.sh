#!/usr/bin/env bash
# The gpu profile's run (issue 13) on the lent GPU machine, after benchmarks/device/device_setup.sh: every stage exactly
# as dvc.yaml runs it (benchmarks/device/run_stages.py), with profiles/gpu.yaml, on the full NiuTrans archive; then the
# generation benchmark on the trained model. Where DVC, the corpus and a GPU are local, the same run is:
#   python -m tools.profile gpu -S ingest.sources.classical-modern.path=/data/classical-modern.tar.xz
# Writes everything under reports/ (and $OUT/ when set) and logs each stage's wall time.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
payload=${PAYLOAD:-/tmp/payload}
start=$(date +%s)
stages() { python3 benchmarks/device/run_stages.py --profile gpu -S ingest.sources.classical-modern.path=$payload/classical-modern.tar.xz \
  -S train.model=$payload/SmolLM2-135M-Instruct.Q4_1.gguf "$@"; }
stages ingest clean split format base || exit 1
if ! stages train; then  # unsloth's full fine-tuning failed: the transformers backend, same settings
  echo "==> train with unsloth failed; again with train.backend=hf"
  stages -S train.backend=hf train || exit 1
fi
stages evaluate_base evaluate || exit 1
echo "pipeline wall: $(( $(date +%s) - start )) s"
python3 benchmarks/generation_gpu.py --model models/adapter --test data/format/test.jsonl --num 2000 \
  --methods "${GEN_METHODS:-generate-b128,generate-b512,continuous,static-b256}"
echo "total wall: $(( $(date +%s) - start )) s"
