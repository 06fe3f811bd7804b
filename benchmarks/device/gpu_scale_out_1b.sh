#!/usr/bin/env bash
# Issue 16 on a lent multi-GPU machine (after benchmarks/device/device_setup.sh): a Llama-3.2-1B-shaped model (random
# weights, config in benchmarks/train_ddp.py), LoRA and full fine-tuning, 1 GPU vs N GPUs at the same global
# batch, steps and seed; then the same with FSDP. Writes $OUT/train_ddp_1b{,_fsdp}.{json,md}
# (copy them to reports/benchmarks/). Usage there: OUT=<dir> GPUS=1,2 bash benchmarks/device/gpu_scale_out_1b.sh
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
python3 benchmarks/device/run_stages.py -S ingest.sources.classical-modern.path=/tmp/payload/classical-modern.tar.xz \
  -S "format.system_prompt=${SYSTEM_PROMPT:-你是翻译家。}" ingest clean split format || exit 1
common=(--train data/format/train.jsonl --valid data/format/valid.jsonl --llama-1b --methods lora,full
  --gpus "${GPUS:-1,2}" --warmup-steps 10 -S backend=hf -S batch_tokens="${BATCH_TOKENS:-32768}"
  -S max_steps="${STEPS:-60}" -S max_train_samples=40000 -S learning_rate=0.0002 -S warmup_steps=10
  -S eval_steps=0 -S eval_samples=256 -S logging_steps=5 -S gradient_checkpointing=true)
python3 benchmarks/train_ddp.py --out "$OUT/train_ddp_1b" "${common[@]}"
python3 benchmarks/train_ddp.py --out "$OUT/train_ddp_1b_fsdp" -S fsdp=true "${common[@]}"
echo "total wall: $(( $(date +%s) - start )) s"
