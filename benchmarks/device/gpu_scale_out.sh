#!/usr/bin/env bash
# Issue 8 on a lent 2-GPU machine, after benchmarks/device/device_setup.sh: the data stages on the full NiuTrans
# archive, then benchmarks/train_ddp.py (the train stage on 1 GPU vs 2 GPUs, same global batch and steps).
# unsloth first; if its 2-GPU run fails, the same comparison with the hf backend.
# Usage there: OUT=<dir> bash benchmarks/device/gpu_scale_out.sh
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
GGUF=/tmp/payload/SmolLM2-135M-Instruct.Q4_1.gguf
start=$(date +%s)
python3 benchmarks/device/run_stages.py -S ingest.sources.classical-modern.path=/tmp/payload/classical-modern.tar.xz \
  -S "format.system_prompt=${SYSTEM_PROMPT:-你是翻译家。}" ingest clean split format || exit 1
common=(--train data/format/train.jsonl --valid data/format/valid.jsonl --gpus 1,2 --warmup-steps 10
  -S model=$GGUF -S method="${METHOD:-full}" -S batch_tokens=32768 -S max_steps="${STEPS:-60}"
  -S max_train_samples=40000 -S learning_rate="${LR:-0.0003}" -S warmup_steps=10 -S eval_steps=0
  -S eval_samples=512 -S logging_steps=5)
python3 benchmarks/train_ddp.py --out "$OUT/train_ddp" -S backend=unsloth "${common[@]}"
if grep -q '"error"' "$OUT/train_ddp.json"; then
  mv "$OUT/train_ddp.json" "$OUT/train_ddp_unsloth.json"; mv "$OUT/train_ddp.md" "$OUT/train_ddp_unsloth.md"
  python3 benchmarks/train_ddp.py --out "$OUT/train_ddp" -S backend=hf "${common[@]}"
fi
echo "total wall: $(( $(date +%s) - start )) s"
