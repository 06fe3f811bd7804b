# variant NAME key=value...
name=$1; shift
python - "$name" "$@" <<'PY'
import yaml, sys
p=yaml.safe_load(open("params_gemma_copy.yaml"))
for kv in sys.argv[2:]:
    k,v=kv.split("="); sec,key=k.split("."); p[sec][key]=yaml.safe_load(v)
yaml.safe_dump(p, open(f"params_{sys.argv[1]}.yaml","w"), allow_unicode=True, sort_keys=False)
PY
rm -rf v_$name; mkdir -p v_$name
python -m stages.train --train format/train.jsonl --valid format/valid.jsonl --base pre --out v_$name/adapter --checkpoints v_$name/ckpt --reports v_$name/reports --params params_$name.yaml > v_$name/train.log 2>&1
python -m stages.evaluate --test format/test.jsonl --model v_$name/adapter --metrics v_$name/metrics.json --out-dir v_$name/eval --hypotheses v_$name/hyp.jsonl --params params_$name.yaml > v_$name/eval.log 2>&1
echo "$name $* $(python -c "import json;m=json.load(open('v_$name/metrics.json'));print(m['bleu'],m['chrf'],m['baselines'])")" >> variants.txt
