#!/usr/bin/env bash
# Issue 35's arms on ONE lent GPU, Gemma 3 270M (after benchmarks/device/device_setup.sh put the payload in /tmp/payload:
# the wheels, gemma-3-270m-q4_k_m.gguf, classical-modern.tar.xz; build it with
# MODEL_GGUF=~/.cache/wenyan-mt/gguf/gemma-3-270m-q4_k_m.gguf bash benchmarks/device/build_gpu_payload.sh).
# Every stage runs exactly as dvc.yaml declares it (run_stages.py) with profiles/gpu.yaml and the overrides below, each
# arm in its own copy of the tree:
#   speed  N: the full 262,144-token vocabulary, 16384 x 4 tokens a step (as the issue's run), SPEED_STEPS steps
#          T: the same with train.trim_vocab auto
#   (SPEED_ARMS="N T" runs them; default none: measured in reports/runs/h100-gemma-trim-speed/)
#   then one SFT epoch on the whole train split, scored on the 2,000-sentence chapter test and the 4 held-out books
#   (greedy): M1 the profile (trimmed, 65536 x 1, lr 1e-4) and M2 (lr M2_LR, default 3e-4; M2_LR= skips it) side by
#   side on the one GPU, the base's outputs beside them (SEQUENTIAL=1: M1 alone first, for its clean tokens/s)
# The code is a committed snapshot (SRC_TAR, from `git archive HEAD`), so uncommitted edits never travel.
# Started detached:  setsid nohup bash benchmarks/device/gemma_arms.sh > /tmp/arms/driver.log 2>&1 &
# and polled by later calls (benchmarks/device/poll.sh copies what is there to $OUT). Where DVC and a GPU are local, an
# arm is `python -m tools.profile gpu -S ...` (the same overrides).
set -uo pipefail
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
payload=${PAYLOAD:-/tmp/payload}
work=${WORK:-/tmp/arms}
RS=${RS:-benchmarks/device/run_stages.py}
SPEED_STEPS=${SPEED_STEPS:-20}
SPEED_ARMS=${SPEED_ARMS-}
M2_LR=${M2_LR-0.0003}
SEQUENTIAL=${SEQUENTIAL:-0}
SRC_TAR=${SRC_TAR:-}
rm -f "$work"/*.done "$work/timeline.txt"; mkdir -p "$work"
t0=$(date +%s)
note() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$work/timeline.txt"; }
EXTRA=${EXTRA:-}  # more -S overrides for every stage, e.g. "-S train.eval_steps=0"
common="$EXTRA --profile gpu -S ingest.sources.classical-modern.path=$payload/classical-modern.tar.xz -S train.model=$(ls $payload/*.gguf)"
export PYTHONPATH=$PYTHONPATH:$work/src
mkdir -p "$work/src"
if [ -n "$SRC_TAR" ]; then tar -xf "$SRC_TAR" -C "$work/src"
else tar --exclude=./.git --exclude=./.carry --exclude=./.gpu -cf - . | tar -xf - -C "$work/src"; fi
cd "$work/src"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$work/gpu.txt"
note "data stages + base"
data="ingest clean split format base"
[ -e data/format/test.jsonl ] && [ -e models/base/base.json ] && data=""  # a rerun on the same machine: data kept
python3 $RS $common $data pretrain > "$work/data.log" 2>&1 || { note "data stages failed"; touch "$work/all.done"; exit 1; }
note "data done: $(python3 -c "import json;r=json.load(open('reports/data/split.json'));print({s: v['pairs'] for s, v in r['splits'].items()})")"
cp reports/data/*.json "$work/" 2>/dev/null

stage() {  # stage DIR LOG ARGS...: run stages in DIR; unsloth failing -> the hf backend, same settings
  local dir=$1 log=$2; shift 2
  (cd "$dir" && python3 $RS $common "$@") >> "$log" 2>&1 && return 0
  note "$(basename "$dir"): failed ($*); again with the hf backend"
  (cd "$dir" && python3 $RS $common -S train.backend=hf "$@") >> "$log" 2>&1
}
copy_tree() { mkdir -p "$2" && (cd "$1" && tar --exclude=./models/checkpoints -cf - .) | tar -xf - -C "$2"; }
tps() { python3 -c "import json;m=json.load(open('$1/reports/timings/train.json'));print(m.get('tokens_per_s'), 'tok/s', m.get('peak_memory_mib'), 'MiB', m.get('train_time_s'), 's', m.get('device'))" 2>&1 | tail -1; }

# speed arms, one at a time (clean timings): the same batch shape with and without trimming
short="-S train.max_steps=$SPEED_STEPS -S train.warmup_steps=5 -S train.eval_steps=0 -S train.eval_samples=0 -S train.logging_steps=5"
for arm in $SPEED_ARMS; do
  case $arm in
    N) extra="-S train.trim_vocab=none -S train.batch_tokens=16384 -S train.gradient_accumulation_steps=4";;
    T) extra="-S train.batch_tokens=16384 -S train.gradient_accumulation_steps=4";;
  esac
  copy_tree "$work/src" "$work/$arm"
  stage "$work/$arm" "$work/$arm.log" $short $extra train && note "speed $arm: $(tps "$work/$arm")" || note "speed $arm failed"
done

evaluate_arm() {  # evaluate_arm NAME ARGS...: the base outputs (once), then the arm's evaluate
  local name=$1 d=$work/$1; shift
  while [ ! -e "$work/base.done" ]; do sleep 5; done
  mkdir -p "$d/data/evaluate"; cp "$work/src/data/evaluate/base_outputs.jsonl" "$d/data/evaluate/"
  stage "$d" "$work/$name.log" "$@" evaluate
  note "$name evaluated: $(python3 -c "import json;m=json.load(open('$d/reports/metrics.json'));u=m.get('unseen_books',{});print('dev', m.get('bleu'), m.get('chrf'), m.get('baselines'), '| unseen', u.get('bleu'), u.get('chrf'), u.get('baselines'))" 2>&1 | tail -1)"
  touch "$work/$name.done"
}
train_arm() {  # train_arm NAME ARGS... (its tree copied before)
  local name=$1 d=$work/$1; shift
  note "$name: train"; stage "$d" "$work/$name.log" "$@" train || { note "$name train failed"; return 1; }
  note "$name trained: $(tps "$d")"
}
copy_tree "$work/src" "$work/M1"; [ -n "$M2_LR" ] && copy_tree "$work/src" "$work/M2"
# base outputs beside the arms' training (generation on the base model: small next to two trainings)
( stage "$work/src" "$work/base.log" evaluate_base && touch "$work/base.done"; note "base outputs done" ) &
if [ "$SEQUENTIAL" = 1 ]; then train_arm M1; ( evaluate_arm M1 ) &
else ( train_arm M1 && evaluate_arm M1 ) & fi
[ -n "$M2_LR" ] && ( train_arm M2 -S train.learning_rate=$M2_LR && evaluate_arm M2 -S train.learning_rate=$M2_LR ) &
wait
note "all arms done"
touch "$work/all.done"
