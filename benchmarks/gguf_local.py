"""Benchmark: local deployment with llama.cpp (GGUF f16, Q8_0, Q4_K_M) against transformers, same sentences, same cores.

    PYTHONPATH=. python benchmarks/gguf_local.py --model models/export/hf --test data/format/test.jsonl --n 40
    PYTHONPATH=. python benchmarks/gguf_local.py --model models/base/SmolLM2-135M-Instruct.Q4_1 --test data/format/test.jsonl
      -> reports/benchmarks/gguf_local.json and gguf_local.md   (GGUF files under models/gguf-bench/, git-ignored)

Needs the gguf extra (see wenyan/gguf.py). The model directory is converted with llama.cpp's converter to f16,
which is quantised to the other types with llama.cpp's quantizer. Every sentence's prompt is the test row's
system + user messages rendered by the model's chat template; the same token ids go to both engines. Both
decode greedily, one sentence at a time, to the end-of-turn token or the evaluate stage's budget
(evaluate.max_new_tokens_factor x source tokens + extra), on the same number of threads. "Identical" counts
outputs equal to transformers' (fp32) text; BLEU is sacrebleu's corpus BLEU with tokenize='zh' on the raw outputs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

from wenyan import gguf
from wenyan.errors import PipelineError
from wenyan.files import read_jsonl, write_json, write_text


def select(rows: list[dict], n: int) -> list[dict]:
    """The first n rows of the test file (file order: chapters of the test split)."""
    if not rows or "messages" not in rows[0] or "target" not in rows[0]:
        raise PipelineError("the test file needs rows with messages, source and target (data/format/test.jsonl)")
    return rows[:n] if n else rows


def hf_translate(model_dir: Path, tokenizer, prompts, budgets, threads: int) -> dict:
    """transformers (fp32), greedy, one sentence at a time, the same prompt ids as llama.cpp gets."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = gguf.stop_ids(tokenizer)

    def run(some_prompts, some_budgets):
        texts, token_ids = [], []
        for messages, budget in zip(some_prompts, some_budgets):
            ids = torch.tensor([gguf.prompt_ids(tokenizer, messages)])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
            token_ids.append(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return texts, token_ids

    run(prompts[:1], [4])  # warm-up
    started = time.perf_counter()
    texts, token_ids = run(prompts, budgets)
    seconds = time.perf_counter() - started
    return {"texts": texts, "token_ids": token_ids, "seconds": round(seconds, 2), "sentences_per_s": round(len(prompts) / seconds, 3)}


def llama_translate(path: Path, tokenizer, prompts, budgets, threads: int) -> dict:
    n_ctx = max(len(gguf.prompt_ids(tokenizer, p)) + b for p, b in zip(prompts, budgets)) + 8
    llm = gguf.load_llama(path, n_ctx=n_ctx, n_threads=threads)
    gguf.translate(llm, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up
    result = gguf.translate(llm, tokenizer, prompts, max_new_tokens=budgets)
    llm.close()
    return result


def summarise(result: dict, reference: dict | None, references: list[str], size: int) -> dict:
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU(tokenize="zh")
    score = bleu.corpus_score(result["texts"], [references])
    tokens = sum(len(ids) for ids in result["token_ids"])
    out = {"bytes": size, "seconds": result["seconds"], "sentences_per_s": result["sentences_per_s"],
           "output_tokens": tokens, "output_tokens_per_s": round(tokens / result["seconds"], 1),
           "bleu": round(score.score, 2), "bleu_signature": str(bleu.get_signature())}
    if reference is not None:
        n = len(result["texts"])
        out["identical_to_transformers"] = round(sum(a == b for a, b in zip(result["texts"], reference["texts"])) / n, 3)
        out["same_first_token"] = round(sum(a[:1] == b[:1] for a, b in zip(result["token_ids"], reference["token_ids"])) / n, 3)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a transformers model directory (models/export/hf)")
    parser.add_argument("--test", required=True, type=Path, help="the format stage's test.jsonl")
    parser.add_argument("--n", type=int, default=40, help="the first N test sentences (0 = all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both engines")
    parser.add_argument("--quant", action="append", default=None, help="llama.cpp types after f16 (default: Q8_0, Q4_K_M)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="evaluate's budget settings")
    parser.add_argument("--work", type=Path, default=Path("models/gguf-bench"), help="where the GGUF files go")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/gguf_local"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    ev = (yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}).get("evaluate", {})
    factor, extra = ev.get("max_new_tokens_factor", 2.0), ev.get("max_new_tokens_extra", 16)
    rows = select(read_jsonl(args.test), args.n)
    prompts = [r["messages"][:-1] for r in rows]
    references = [r["target"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    budgets = [math.ceil(factor * len(tokenizer(r["source"], add_special_tokens=False).input_ids)) + extra for r in rows]

    files = {"f16": gguf.convert(args.model, args.work / "model-f16.gguf", "f16")}
    for q in args.quant or ["Q8_0", "Q4_K_M"]:
        files[q] = gguf.quantize(args.work / "model-f16.gguf", args.work / f"model-{q}.gguf", q, threads=args.threads)

    hf_bytes = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    hf = hf_translate(args.model, tokenizer, prompts, budgets, args.threads)
    runs = {"transformers (fp32)": summarise(hf, None, references, hf_bytes)}
    outputs = {"transformers (fp32)": hf["texts"]}
    for name, info in files.items():
        result = llama_translate(Path(info["path"]), tokenizer, prompts, budgets, args.threads)
        runs[f"llama.cpp {name}"] = summarise(result, hf, references, info["bytes"])
        runs[f"llama.cpp {name}"]["convert_or_quantize_seconds"] = info["seconds"]
        outputs[f"llama.cpp {name}"] = result["texts"]

    import llama_cpp
    import torch
    import transformers

    report = {
        "command": " ".join(["PYTHONPATH=. python benchmarks/gguf_local.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "model": str(args.model), "test": str(args.test), "sentences": len(rows),
        "decoding": {"greedy": True, "one_at_a_time": True, "threads": args.threads,
                     "max_new_tokens": f"ceil({factor} x source tokens) + {extra}", "budget_tokens_total": sum(budgets)},
        "tokenizer_pre": files["f16"]["tokenizer_pre"],
        "runs": runs,
        "examples": [{"source": r["source"], "reference": r["target"], **{k: v[i] for k, v in outputs.items()}}
                     for i, r in enumerate(rows[:3])],
        "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min_end": round(os.getloadavg()[0], 2)},
    }
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), render(report))
    print(render(report))


def render(report: dict) -> str:
    d = report["decoding"]
    out = [
        "# Local deployment: llama.cpp (GGUF) against transformers on CPU",
        "",
        f"`{report['command']}`",
        "",
        f"{report['sentences']} sentences of {report['test']}, model {report['model']}; greedy, one sentence at a time, "
        f"{d['threads']} threads for both engines, budget {d['max_new_tokens']} tokens ({d['budget_tokens_total']} in all), "
        f"stop at the end-of-turn token. Same prompt token ids for both (the chat template rendered by the HF tokenizer). "
        f"GGUF pre-tokenizer: {report['tokenizer_pre']}.",
        "",
        "| engine | file MB | sentences/s | output tokens/s | identical to transformers | same first token | BLEU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["runs"].items():
        same = f"{r['identical_to_transformers']:.0%}" if "identical_to_transformers" in r else "-"
        first = f"{r['same_first_token']:.0%}" if "same_first_token" in r else "-"
        out.append(f"| {name} | {r['bytes'] / 1e6:.0f} | {r['sentences_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
                   f"{same} | {first} | {r['bleu']:.2f} |")
    sig = next(iter(report["runs"].values()))["bleu_signature"]
    v, m = report["versions"], report["machine"]
    out += ["", f"BLEU: {sig}, raw outputs against the references. transformers' file size: its safetensors.",
            "", f"llama-cpp-python {v['llama_cpp_python']}, torch {v['torch']}, transformers {v['transformers']}, "
            f"Python {v['python']}; {m['cpu_count']} CPUs, 1-minute load average at the end {m['loadavg_1min_end']} "
            "(other processes shared the CPUs when it is above the thread count).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    from wenyan.errors import run_main

    run_main(main)
