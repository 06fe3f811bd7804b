#!/usr/bin/env bash
# The first real result (issue 5), on the lent GPU machine after benchmarks/device/device_setup.sh:
# the whole pipeline on the full NiuTrans archive, unsloth backend, exactly as dvc.yaml runs each stage.
# Equivalent with DVC where the archive and GPU are local:
#   dvc exp run -S ingest.sources.classical-modern.path=classical-modern.tar.xz -S train.backend=unsloth \
#     -S train.lora_r=64 -S train.lora_alpha=64 -S train.batch_tokens=32768 -S train.max_steps=600 \
#     -S train.warmup_steps=30 -S train.learning_rate=0.0005 -S train.max_train_samples=120000 \
#     -S train.eval_steps=100 -S train.save_steps=300 -S train.logging_steps=10 \
#     -S evaluate.num_samples=4000 -S evaluate.batch_size=128
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
python3 benchmarks/device/run_stages.py \
  -S ingest.sources.classical-modern.path=/tmp/payload/classical-modern.tar.xz \
  -S train.model=/tmp/payload/SmolLM2-135M-Instruct.Q4_1.gguf -S train.backend=unsloth \
  -S train.lora_r=64 -S train.lora_alpha=64 -S train.batch_tokens=32768 -S train.max_steps="${STEPS:-600}" \
  -S train.warmup_steps=30 -S train.learning_rate=0.0005 -S train.max_train_samples=120000 \
  -S train.eval_steps=100 -S train.save_steps=300 -S train.logging_steps=10 \
  -S evaluate.num_samples="${EVAL_N:-4000}" -S evaluate.batch_size=128 \
  "$@"
echo "total wall: $(( $(date +%s) - start )) s"
