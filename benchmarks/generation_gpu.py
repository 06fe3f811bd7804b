"""Greedy generation on one GPU, side by side: what transformers already offers against plain batched generate().

    python benchmarks/generation_gpu.py --model models/adapter --test data/format/test.jsonl --num 2000

Methods (all greedy, each sentence with the evaluate stage's budget = ceil(factor x source tokens) + extra):
  generate-bN     transformers' generate(), left-padded batches of N prompts sorted by length (evaluate's GPU path
                  before this benchmark used N = 128)
  static-bN       the same with cache_implementation="static" (transformers then compiles the decoding step)
  continuous      transformers' continuous batching: model.generate_batch() (paged KV cache, CUDA graphs,
                  prefix sharing), one max_new_tokens for all, each output then cut at its own budget
The first method listed is the reference for "identical": the fraction of outputs token-for-token equal to it.
Writes reports/benchmarks/generation_gpu.{json,md} (or --out PREFIX). Runs on CPU too (slowly: a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(model_dir: str, device: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


def stop_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", tokenizer.eos_token):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def encode(tokenizer, rows, factor: float, extra: int):
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    budgets = [math.ceil(factor * len(tokenizer(r["source"], add_special_tokens=False).input_ids)) + extra for r in rows]
    return ids, budgets


def cut(tokens: list[int], budget: int, eos: set[int]) -> list[int]:
    tokens = tokens[:budget]
    end = next((k for k, t in enumerate(tokens) if t in eos), None)
    return tokens if end is None else tokens[:end]


def run_generate(model, ids, budgets, eos_ids, pad_id, batch: int, static: bool):
    import torch

    eos = set(eos_ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out: list[list[int] | None] = [None] * len(ids)
    device = next(model.parameters()).device
    extra = {"cache_implementation": "static"} if static else {}
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        width = max(len(ids[i]) for i in part)
        x = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(part):
            x[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                                 max_new_tokens=max(budgets[i] for i in part), eos_token_id=eos_ids,
                                 pad_token_id=pad_id, **extra)
        for row, i in enumerate(part):
            out[i] = cut(gen[row, width:].tolist(), budgets[i], eos)
    return out


def run_continuous(model, ids, budgets, eos_ids, pad_id):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), eos_token_id=eos_ids, pad_token_id=pad_id)
    results = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
    eos = set(eos_ids)
    by_request = {}
    for request_id, result in results.items():
        by_request[request_id] = list(result.generated_tokens)
    # request ids are "req_<index>" in submission order
    keys = sorted(by_request, key=lambda k: int(str(k).rsplit("_", 1)[-1]))
    return [cut(by_request[k], budgets[i], eos) for i, k in enumerate(keys)]


def main(argv=None) -> None:
    import torch
    import sacrebleu

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a model directory (full fine-tune or merged), with its tokenizer")
    ap.add_argument("--test", default="data/format/test.jsonl")
    ap.add_argument("--num", type=int, default=2000, help="test sentences (the evaluate stage's selection, seed 0)")
    ap.add_argument("--methods", default="generate-b128,generate-b512,static-b512,continuous")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--extra", type=int, default=16)
    ap.add_argument("--out", default="reports/benchmarks/generation_gpu")
    args = ap.parse_args(argv)

    from wenyan.files import read_jsonl
    from wenyan.metrics import select_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(args.model, device, args.dtype if device == "cuda" else "fp32")
    rows = select_rows(read_jsonl(args.test), args.num, 0)
    ids, budgets = encode(tokenizer, rows, args.factor, args.extra)
    eos_ids = stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    refs = [r["target"] for r in rows]

    results, reference = [], None
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        try:
            if method == "continuous":
                outs = run_continuous(model, ids, budgets, eos_ids, pad_id)
            else:
                kind, b = method.split("-b")
                outs = run_generate(model, ids, budgets, eos_ids, pad_id, int(b), static=kind == "static")
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        except Exception as exc:  # a method that fails is reported, the others still run
            results.append({"method": method, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"{method}: failed: {exc}", flush=True)
            continue
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        if reference is None:
            reference = outs
        same = sum(a == b for a, b in zip(outs, reference))
        row = {
            "method": method,
            "seconds": round(seconds, 2),
            "sentences_per_s": round(len(ids) / seconds, 1),
            "new_tokens": sum(len(o) for o in outs),
            "identical_to_reference": same,
            "identical_fraction": round(same / len(ids), 4),
            "bleu": round(sacrebleu.corpus_bleu(texts, [refs], tokenize="zh").score, 2),
        }
        results.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)

    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype if device == "cuda" else "fp32",
        "sentences": len(ids),
        "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1),
        "reference_method": args.methods.split(",")[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Greedy generation on {report['device']} ({report['dtype']}), {len(ids)} test sentences", "",
             f"`{report['command']}`", "",
             "| method | sentences/s | seconds | identical to first row | BLEU (zh) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | |")
        else:
            lines.append(f"| {r['method']} | {r['sentences_per_s']} | {r['seconds']} | "
                         f"{r['identical_to_reference']}/{len(ids)} | {r['bleu']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
