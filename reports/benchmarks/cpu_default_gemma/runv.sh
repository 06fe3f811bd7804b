name=$1; params=$2; fmt=$3
rm -rf v_$name; mkdir -p v_$name
python -m stages.train --train $fmt/train.jsonl --valid $fmt/valid.jsonl --base pre --out v_$name/adapter --checkpoints v_$name/ckpt --reports v_$name/reports --params $params > v_$name/train.log 2>&1
python -m stages.evaluate_base --test $fmt/test.jsonl --base /work/main/models/base --out v_$name/base.jsonl --params $params > v_$name/base.log 2>&1
python -m stages.evaluate --test $fmt/test.jsonl --model v_$name/adapter --metrics v_$name/metrics.json --out-dir v_$name/eval --hypotheses v_$name/hyp.jsonl --base-outputs v_$name/base.jsonl --params $params > v_$name/eval.log 2>&1
echo "$name $(python -c "import json;m=json.load(open('v_$name/metrics.json'));print(m['bleu'],m['chrf'],m['baselines'])")" >> variants.txt
