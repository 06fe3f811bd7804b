"""Benchmark: `translate --model x.gguf` on CPU: where the time goes, llama.cpp one sentence at a time (before) vs
batched decoding with the shared prompt prefix computed once (after), and transformers on the same sentences.

    python benchmarks/gguf_local.py --model models/export/hf --test data/format/test.jsonl --n 20 --threads 2
      -> reports/benchmarks/gguf_local.json and gguf_local.md   (GGUF files under --work, default models/gguf-bench/)

Needs the gguf extra (setup.sh). The model directory (a transformers model; `training_config.json` is not needed) is
converted with llama.cpp's converter to f16, which is quantised to the other types with llama.cpp's quantizer.
Every sentence's prompt is the test row's system + user messages rendered by the model's chat template
(prompt_ids, as translate and evaluate build them); every engine gets the same token ids, the same
budgets (evaluate.max_new_tokens_factor x source tokens + extra, from --params) and stop tokens, decodes greedily,
on the same threads. Measured in one run, side by side, so that a busy machine slows all of them alike:

- load: seconds to load each GGUF (llama_cpp.Llama);
- before: gguf.generate(parallel=1), the runner as it was: one sentence after the other through Llama.generate
  (which already reuses the KV of the prefix a prompt shares with the previous one), llama.cpp's own counters
  splitting the time into prompt evaluation, token-by-token evaluation and the rest (sampling, Python);
- the context size (n_ctx) and thread count of that path, on the first --n-small sentences;
- after: gguf.batched_greedy (what translate runs now): one llama_batch per step holding one token of each of
  `parallel` sentences (continuous batching), the prompts' shared prefix (system prompt, template head) decoded
  once and shared by llama_memory_seq_cp; for several `parallel` values, with and without sharing the prefix,
  and on 1 thread;
- transformers (fp32), generation.generate as translate runs it (the stage's batched greedy loop, batch 16).

"identical" is the fraction of outputs whose text equals transformers' (and the one-at-a-time llama.cpp's);
BLEU is sacrebleu's corpus BLEU with tokenize='zh' on the outputs against the references.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

from wenyan import generation, gguf
from wenyan.errors import PipelineError
from wenyan.files import read_jsonl, write_json, write_text
from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets


def select(rows: list[dict], n: int) -> list[dict]:
    """The first n rows of the test file (file order: chapters of the test split)."""
    if not rows or "messages" not in rows[0] or "target" not in rows[0]:
        raise PipelineError("the test file needs rows with messages, source and target (data/format/test.jsonl)")
    return rows[:n] if n else rows


class Case:
    """The sentences, their prompt ids, budgets and stop tokens: the same for every engine."""

    def __init__(self, tokenizer, rows: list[dict], factor: float, extra: int):
        self.tokenizer = tokenizer
        self.prompts = [r["messages"][:-1] for r in rows]
        self.sources = [r["source"] for r in rows]
        self.references = [r["target"] for r in rows]
        self.input_ids = prompt_ids(tokenizer, self.prompts)
        self.budgets = token_budgets(tokenizer, self.sources, factor, extra)
        self.stops = end_of_turn_ids(tokenizer)

    def head(self, n: int) -> "Case":
        other = object.__new__(Case)
        other.__dict__ = {k: (v[:n] if isinstance(v, list) and k != "stops" else v) for k, v in self.__dict__.items()}
        return other

    def texts(self, outputs: list[list[int]]) -> list[str]:
        return [gguf.reply_text(self.tokenizer, new, b)[0] for new, b in zip(outputs, self.budgets)]


def perf(llm) -> dict:
    import llama_cpp

    data = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {"prompt_ms": data.t_p_eval_ms, "prompt_tokens": data.n_p_eval, "eval_ms": data.t_eval_ms, "eval_tokens": data.n_eval}


def sequential(llm, case: Case) -> dict:
    """The runner before: one sentence after the other through Llama.generate."""
    import llama_cpp

    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    started = time.perf_counter()
    outputs = [gguf.greedy(llm, ids, case.stops, budget) for ids, budget in zip(case.input_ids, case.budgets)]
    seconds = time.perf_counter() - started
    p = perf(llm)
    split = {"prompt_eval_s": round(p["prompt_ms"] / 1000, 2), "prompt_eval_tokens": p["prompt_tokens"],
             "token_eval_s": round(p["eval_ms"] / 1000, 2), "token_eval_calls": p["eval_tokens"],
             "other_s": round(seconds - (p["prompt_ms"] + p["eval_ms"]) / 1000, 2)}
    return {"outputs": outputs, "seconds": seconds, "split": split}


def batched(llm, case: Case, parallel: int, share_prefix: bool = True) -> dict:
    timings: dict = {}
    started = time.perf_counter()
    outputs = gguf.batched_greedy(llm, case.input_ids, case.budgets, case.stops, parallel=parallel, timings=timings,
                                  share_prefix=share_prefix)
    seconds = time.perf_counter() - started
    split = {"context_s": timings["context_seconds"], "prefix_s": timings["prefix_seconds"],
             "decode_s": round(timings["decode_seconds"], 2), "decode_calls": timings["decode_calls"],
             "batch_tokens": timings["batch_tokens"], "n_ctx": timings["n_ctx"],
             "other_s": round(seconds - timings["decode_seconds"] - timings["context_seconds"], 2)}
    return {"outputs": outputs, "seconds": seconds, "split": split}


def hf(model_dir: Path, case: Case, threads: int) -> dict:
    """transformers fp32, generation.generate as translate runs it (batched, the stage's greedy loop)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    generation.generate(model, case.tokenizer, case.prompts[:1], case.sources[:1], batch_size=1, factor=0.1, extra=1,
                      eos_token_ids=case.stops, desc="warm-up")
    started = time.perf_counter()
    texts, _ = generation.generate(model, case.tokenizer, case.prompts, case.sources, batch_size=16, factor=case.factor,
                                 extra=case.extra, eos_token_ids=case.stops, desc="transformers")
    seconds = time.perf_counter() - started
    ids = [case.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return {"texts": texts, "seconds": seconds, "load_s": round(load, 2), "output_tokens_approx": sum(map(len, ids))}


def score(texts: list[str], case: Case, seconds: float, tokens: int | None, *against: tuple[str, list[str]]) -> dict:
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU(tokenize="zh")
    out = {"sentences_per_s": round(len(texts) / seconds, 3), "seconds": round(seconds, 2),
           "bleu": round(bleu.corpus_score(texts, [case.references]).score, 2)}
    if tokens is not None:
        out["output_tokens"] = tokens
        out["output_tokens_per_s"] = round(tokens / seconds, 1)
    for name, other in against:
        out[f"identical_to_{name}"] = round(sum(a == b for a, b in zip(texts, other)) / len(texts), 3)
    return out


# Long (~100 lines): the benchmark read top to bottom: the engines one after another on the same sentences, then the report.
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a transformers model directory (models/export/hf)")
    parser.add_argument("--test", required=True, type=Path, help="the format stage's test.jsonl")
    parser.add_argument("--n", type=int, default=20, help="the first N test sentences (0 = all)")
    parser.add_argument("--n-small", type=int, default=5, help="sentences for the context-size and thread runs of the old path")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every engine")
    parser.add_argument("--quant", action="append", default=None, help="llama.cpp types after f16 (default: Q8_0, Q4_K_M)")
    parser.add_argument("--main", default="Q8_0", help="the file the where-the-time-goes runs use (default Q8_0)")
    parser.add_argument("--parallel", type=int, action="append", default=None, help="batched runs (default: 1 4 8 16)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="evaluate's budget settings")
    parser.add_argument("--work", type=Path, default=Path("models/gguf-bench"), help="where the GGUF files go")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/gguf_local"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    ev = (yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}).get("evaluate", {})
    factor, extra = ev.get("max_new_tokens_factor", 2.0), ev.get("max_new_tokens_extra", 16)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    case = Case(tokenizer, select(read_jsonl(args.test), args.n), factor, extra)
    case.factor, case.extra = factor, extra
    parallels = args.parallel or [1, 4, 8, 16]
    quants = args.quant or ["Q8_0", "Q4_K_M"]
    if args.main != "f16" and args.main not in quants:
        raise PipelineError(f"--main {args.main} is not among the files: f16, {', '.join(quants)}")

    files = {"f16": gguf.convert(args.model, args.work / "model-f16.gguf", "f16")}
    for q in quants:
        files[q] = gguf.quantize(args.work / "model-f16.gguf", args.work / f"model-{q}.gguf", q, threads=args.threads)

    ref = hf(args.model, case, args.threads)
    report_runs = {"transformers fp32 (generation.generate, batch 16)": {
        **score(ref["texts"], case, ref["seconds"], None), "load_s": ref["load_s"]}}
    where, per_file = {}, {}
    for name, info in files.items():
        path = Path(info["path"])
        n_ctx = max(len(ids) + b for ids, b in zip(case.input_ids, case.budgets)) + 8
        started = time.perf_counter()
        llm = gguf.load_llama(path, n_ctx=n_ctx, n_threads=args.threads)
        load_s = time.perf_counter() - started
        gguf.greedy(llm, case.input_ids[0], case.stops, 2)  # warm-up (first-call allocations)
        before = sequential(llm, case)
        before_texts = case.texts(before["outputs"])
        after = batched(llm, case, 16)
        after_texts = case.texts(after["outputs"])
        tok = lambda outs: sum(map(len, outs))  # noqa: E731
        per_file[name] = {
            "bytes": info["bytes"], "load_s": round(load_s, 2), "convert_or_quantize_s": info["seconds"],
            "before (one at a time)": score(before_texts, case, before["seconds"], tok(before["outputs"]),
                                            ("transformers", ref["texts"])),
            "after (batched, parallel 16)": score(after_texts, case, after["seconds"], tok(after["outputs"]),
                                                  ("transformers", ref["texts"]), ("one_at_a_time", before_texts)),
        }
        per_file[name]["speed-up"] = round(before["seconds"] / after["seconds"], 2)
        if name == args.main:
            where = {"load_s": round(load_s, 2), "before": before["split"], "after": after["split"],
                     "before_seconds": round(before["seconds"], 2), "after_seconds": round(after["seconds"], 2)}
            small = case.head(args.n_small)
            runs = {}
            runs["one at a time, n_ctx fitted"] = sequential(llm, small)
            llm.close()
            big = gguf.load_llama(path, n_ctx=8192, n_threads=args.threads)
            runs["one at a time, n_ctx 8192"] = sequential(big, small)
            big.close()
            one = gguf.load_llama(path, n_ctx=n_ctx, n_threads=1)
            runs["one at a time, 1 thread"] = sequential(one, small)
            runs["batched parallel 16, 1 thread"] = batched(one, case, 16)
            one.close()
            llm = gguf.load_llama(path, n_ctx=n_ctx, n_threads=args.threads)
            for parallel in parallels:
                runs[f"batched parallel {parallel}"] = batched(llm, case, parallel)
            runs["batched parallel 16, prefix not shared"] = batched(llm, case, 16, share_prefix=False)
            where["variants"] = {}
            for label, run in runs.items():
                sub = small if label.startswith("one at a time") else case
                texts = sub.texts(run["outputs"])
                where["variants"][label] = {
                    "sentences": len(texts), **score(texts, sub, run["seconds"], tok(run["outputs"]),
                                                     ("transformers", ref["texts"][:len(texts)]),
                                                     ("one_at_a_time", before_texts[:len(texts)])),
                    **run["split"]}
        llm.close()

    prefix = gguf.shared_prefix_length(case.input_ids)
    import llama_cpp
    import torch
    import transformers

    report = {
        "command": " ".join(["python benchmarks/gguf_local.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "model": str(args.model), "test": str(args.test), "sentences": len(case.prompts), "threads": args.threads,
        "prompts": {"mean_tokens": round(sum(map(len, case.input_ids)) / len(case.input_ids), 1),
                    "shared_prefix_tokens": prefix,
                    "max_new_tokens": f"ceil({factor} x source tokens) + {extra}", "budget_tokens_total": sum(case.budgets)},
        "tokenizer_pre": files["f16"]["tokenizer_pre"], "main_file": args.main,
        "transformers": report_runs, "files": per_file, "where_the_time_goes": where,
        "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min_end": round(os.getloadavg()[0], 2),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")},
    }
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), render(report))
    print(render(report))


def render(report: dict) -> str:
    p = report["prompts"]
    out = [
        "# `translate --model x.gguf` on CPU: llama.cpp one at a time (before) vs batched (after), and transformers",
        "",
        f"`{report['command']}`",
        "",
        f"{report['sentences']} sentences of {report['test']}, model {report['model']}, {report['threads']} threads for "
        f"every engine; greedy; budget {p['max_new_tokens']} tokens; stop at the end-of-turn token; the same prompt token "
        f"ids for all (mean {p['mean_tokens']} tokens, of which {p['shared_prefix_tokens']} are the prefix every prompt "
        f"shares: system prompt and template head). GGUF pre-tokenizer: {report['tokenizer_pre']}. Measured side by "
        f"side in one run (the machine's cores are shared; the ratios are what to read).",
        "",
        "| engine | file MB | load s | sentences/s | output tokens/s | identical to transformers | identical to one-at-a-time | BLEU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["transformers"].items():
        out.append(f"| {name} | - | {r['load_s']} | {r['sentences_per_s']:.3f} | - | - | - | {r['bleu']:.2f} |")
    for name, f in report["files"].items():
        for label in ("before (one at a time)", "after (batched, parallel 16)"):
            r = f[label]
            same = f"{r['identical_to_one_at_a_time']:.0%}" if "identical_to_one_at_a_time" in r else "-"
            out.append(f"| llama.cpp {name}, {label} | {f['bytes'] / 1e6:.0f} | {f['load_s']} | {r['sentences_per_s']:.3f} | "
                       f"{r['output_tokens_per_s']:.1f} | {r['identical_to_transformers']:.0%} | {same} | {r['bleu']:.2f} |")
    out += ["", "Speed-up, batched over one at a time: " + ", ".join(
        f"{name} {f['speed-up']}x" for name, f in report["files"].items()) + "."]
    w = report["where_the_time_goes"]
    if w:
        b, a = w["before"], w["after"]
        out += ["", f"## Where the time goes ({report['main_file']})", "",
                f"- load: {w['load_s']} s (once per process; the web page keeps the model loaded).",
                f"- before, {w['before_seconds']} s: prompt evaluation {b['prompt_eval_s']} s ({b['prompt_eval_tokens']} "
                f"prompt tokens: only what differs from the previous prompt), token-by-token evaluation {b['token_eval_s']} s "
                f"({b['token_eval_calls']} llama_decode calls of one token), sampling and Python {b['other_s']} s.",
                f"- after, {w['after_seconds']} s: context {a['context_s']} s, shared prefix once {a['prefix_s']} s, "
                f"llama_decode {a['decode_s']} s ({a['decode_calls']} calls, {a['batch_tokens']} tokens, context "
                f"{a['n_ctx']}), argmax and Python {a['other_s']} s.",
                "", "| variant | sentences | sentences/s | output tokens/s | decode calls | identical to transformers | "
                "identical to one-at-a-time |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in w["variants"].items():
            calls = r.get("decode_calls", r.get("token_eval_calls", "-"))
            out.append(f"| {label} | {r['sentences']} | {r['sentences_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | {calls} | "
                       f"{r['identical_to_transformers']:.0%} | {r['identical_to_one_at_a_time']:.0%} |")
    v, m = report["versions"], report["machine"]
    out += ["", "BLEU: sacrebleu, tokenize=zh, corpus BLEU of the outputs against the references.",
            "", f"llama-cpp-python {v['llama_cpp_python']}, torch {v['torch']}, transformers {v['transformers']}, "
            f"Python {v['python']}; OMP_WAIT_POLICY {m['OMP_WAIT_POLICY']}; {m['cpu_count']} CPUs, 1-minute load average at the end "
            f"{m['loadavg_1min_end']} "
            "(other processes shared the CPUs when it is above the thread count).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    from wenyan.errors import run_main

    run_main(main)
