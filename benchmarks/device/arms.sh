#!/usr/bin/env bash
# Issue 20's arms side by side on ONE lent GPU (after benchmarks/device/setup.sh put the payload in /tmp/payload and
# the wheels in /tmp/site). Every stage runs exactly as dvc.yaml declares it (run_stages.py), with profiles/gpu.yaml
# and the overrides below; each arm in its own copy of the tree, as a parallel process on the one GPU:
#   P    pretrain on the monolingual classical text (classical-mono-a/b), PRETRAIN_TOKENS tokens
#   A    SFT alone (base -> train -> evaluate)                           [SFT budget 1]
#   B    P -> SFT, same SFT settings as A                                [SFT budget 1]
#   C    P -> SFT with C_OVERRIDES (a second SFT budget: another lr or more epochs)
# then the generation benchmark and beam search on the best arm. Started detached:
#   setsid nohup bash benchmarks/device/arms.sh > /tmp/arms/driver.log 2>&1 &
# and polled by later calls (benchmarks/device/poll.sh copies what is there to $OUT). Where DVC and a GPU are local,
# an arm is `python -m tools.profile gpu -S ...` (the same overrides).
set -uo pipefail
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
payload=${PAYLOAD:-/tmp/payload}
work=${WORK:-/tmp/arms}
RS=${RS:-benchmarks/device/run_stages.py}
SFT=${SFT_OVERRIDES:-"-S train.epochs=1"}
C_OVERRIDES=${C_OVERRIDES:-"-S train.epochs=1 -S train.learning_rate=0.0006"}
PRETRAIN_TOKENS=${PRETRAIN_TOKENS:-40000000}
mkdir -p "$work"
t0=$(date +%s)
note() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$work/timeline.txt"; }
common="--profile gpu -S ingest.sources.classical-modern.path=$payload/classical-modern.tar.xz -S train.model=$(ls $payload/*.gguf)"
mono="-S pretrain.sources.classical-mono-a.path=$payload/classical-mono-a.tar.xz -S pretrain.sources.classical-mono-b.path=$payload/classical-mono-b.tar.xz"
pre_on="-S pretrain.enabled=true $mono -S pretrain.max_tokens=$PRETRAIN_TOKENS"
export PYTHONPATH=$PYTHONPATH:$work/src

# the tree as it was when the run started (later calls re-sync the checkout)
mkdir -p "$work/src"
tar --exclude=./.git --exclude=./.carry --exclude=./.gpu -cf - . | tar -xf - -C "$work/src"
cd "$work/src"
note "data stages"
python3 $RS $common ingest clean split format base > "$work/data.log" 2>&1 || { note "data stages failed"; exit 1; }
note "data done"

stage() {  # stage DIR LOG ARGS...: run stages in DIR; unsloth failing -> the hf backend, same settings
  local dir=$1 log=$2; shift 2
  (cd "$dir" && python3 $RS $common "$@") >> "$log" 2>&1 && return 0
  note "$(basename "$dir"): failed ($*); again with the hf backend"
  (cd "$dir" && python3 $RS $common -S train.backend=hf -S pretrain.backend=hf "$@") >> "$log" 2>&1
}
copy_tree() { mkdir -p "$2" && (cd "$1" && tar --exclude=./models/checkpoints -cf - .) | tar -xf - -C "$2"; }

# base outputs once (all arms share the base model, prompts and sample)
( stage "$work/src" "$work/base.log" -S pretrain.enabled=false evaluate_base && touch "$work/base.done"; note "base outputs done" ) &
for arm in P A; do copy_tree "$work/src" "$work/$arm"; done
( stage "$work/P" "$work/P.log" $pre_on pretrain && touch "$work/P.done"; note "P done" ) &
arm_sft() {  # arm_sft NAME PRETRAIN_ARGS SFT_ARGS
  local name=$1 pre=$2 sft=$3 d=$work/$1
  if [ "$pre" != "off" ]; then
    while [ ! -e "$work/P.done" ]; do sleep 10; done
    copy_tree "$work/src" "$d"; rm -rf "$d/models/pretrain"; cp -a "$work/P/models/pretrain" "$d/models/"
    mkdir -p "$d/reports"; cp -a "$work/P/reports/pretrain" "$d/reports/" 2>/dev/null
    note "$name: train on the pretrained model"; stage "$d" "$work/$name.log" $pre_on $sft train || { note "$name train failed"; return 1; }
  else
    note "$name: train on the base"; stage "$d" "$work/$name.log" -S pretrain.enabled=false $sft pretrain train || { note "$name train failed"; return 1; }
  fi
  note "$name trained"
  while [ ! -e "$work/base.done" ]; do sleep 5; done
  mkdir -p "$d/data/evaluate"; cp "$work/src/data/evaluate/base_outputs.jsonl" "$d/data/evaluate/"
  if [ "$pre" != "off" ]; then stage "$d" "$work/$name.log" $pre_on $sft evaluate; else stage "$d" "$work/$name.log" -S pretrain.enabled=false $sft evaluate; fi
  note "$name evaluated: $(python3 -c "import json;m=json.load(open('$d/reports/metrics.json'));print(m.get('bleu'), m.get('chrf'))" 2>&1 | tail -1)"
  touch "$work/$name.done"
}
arm_sft A off "$SFT" &
arm_sft B on "$SFT" &
arm_sft C on "$C_OVERRIDES" &
wait
note "all arms done"

# the best arm by BLEU: generation benchmark and beam search
best=$(python3 - "$work" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1]); scores = {}
for arm in "ABC":
    f = w / arm / "reports/metrics.json"
    if f.exists():
        m = json.loads(f.read_text()); scores[arm] = m.get("bleu", {}).get("score", -1) if isinstance(m.get("bleu"), dict) else m.get("bleu", -1)
print(max(scores, key=scores.get) if scores else "")
PY
)
note "best arm: $best"
[ -n "$best" ] || exit 1
echo "$best" > "$work/best.txt"
d=$work/$best
mkdir -p "$work/bench"
(cd "$d" && timeout 420 python3 benchmarks/generation_gpu.py --model models/adapter --test data/format/test.jsonl --num 2000 --out "$work/bench") > "$work/bench.log" 2>&1
note "generation benchmark done ($?)"
copy_tree "$d" "$work/beam4"
if [ "$best" = A ]; then pre="-S pretrain.enabled=false"; else pre=$pre_on; fi
sft=$SFT; [ "$best" = C ] && sft=$C_OVERRIDES
( cd "$work/beam4" && python3 $RS $common $pre $sft -S evaluate.num_beams=4 evaluate ) > "$work/beam4.log" 2>&1
note "beam 4 done"
touch "$work/all.done"
