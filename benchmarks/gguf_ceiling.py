"""Benchmark: how many sentences a second llama.cpp can give on this CPU at all, against what translate gets.

    python benchmarks/gguf_ceiling.py --gguf models/export/model-Q8_0.gguf --tokenizer models/export/hf \
        --test data/format/test.jsonl --n 20 --threads 2 --out reports/benchmarks/gguf_ceiling

Issue 22 asks >= 5 sentences/s for 20 test sentences on the default model's Q8_0 file, 2 threads. Whatever the
scheduling, every token of every sentence's own prompt and of its reply goes through the whole model once.
This measures, per GGUF file:

- the throughput curve: seconds of one llama_decode call holding N tokens (N = 1 ... 256, logits for every
  token, as a decode step needs them), as tokens/s: the most this CPU gives at any batch size;
- translate's run (wenyan.gguf.batched_greedy: continuous batching, the shared prompt prefix decoded once)
  on the first --n test sentences, for each --parallel: sentences/s, tokens decoded, calls; on the first file
  also against its alternatives: one KV stream per sequence instead of the unified cache, flash attention forced
  on and off (translate leaves it to llama.cpp);
- the ceiling: the tokens that run had to decode (the prefix once, each sentence's own prompt tokens, its reply)
  at the curve's best tokens/s -> the most sentences/s any scheduling could reach for these sentences on this
  CPU with this file; and the tokens/s the target would need.

The same file, threads and sentences for every row; greedy; budgets and stop tokens as evaluate (params.yaml).
It needs only the GGUF and the tokenizer (no transformers weights), so it runs on any machine with llama.cpp.
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

from wenyan import gguf
from wenyan.files import read_jsonl, write_json, write_text
from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets

SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# translate's settings (unified KV cache, flash attention as llama.cpp picks) against the alternatives, on the first file
VARIANTS = [("a KV stream per sequence", {"unified": False}), ("flash attention on", {"flash_attn": True}),
            ("flash attention off", {"flash_attn": False})]


def cpu_info() -> dict:
    model = platform.processor() or "?"
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass
    flags = gguf.cpu_flags()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16"]
    return {"model": model, "cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def curve(llm, threads: int, sizes, repeats: int = 3) -> dict[int, float]:
    """tokens/s of one llama_decode call of N tokens (one sequence after a 150-token prompt, logits for all):
    the best of `repeats` calls after one warm-up call."""
    import llama_cpp
    from llama_cpp import _internals

    out = {}
    for n in sizes:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = -(-(150 + n * (repeats + 1)) // 256) * 256
        params.n_batch = params.n_ubatch = max(n, 150)
        params.n_seq_max, params.n_threads, params.n_threads_batch = 1, threads, threads
        ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        batch = gguf._Batch(max(n, 150))
        try:
            for k in range(150):
                batch.add(100 + k % 50, k, 0, False)
            llama_cpp.llama_decode(ctx.ctx, batch.raw)
            pos, times = 150, []
            for _ in range(repeats + 1):
                batch.clear()
                for k in range(n):
                    batch.add(200 + k % 50, pos + k, 0, True)
                started = time.perf_counter()
                if llama_cpp.llama_decode(ctx.ctx, batch.raw) != 0:
                    raise RuntimeError(f"llama_decode failed on {n} tokens")
                times.append(time.perf_counter() - started)
                pos += n
        finally:
            batch.free()
            ctx.close()
        out[n] = round(n / min(times[1:]), 1)
    return out


# Long (~75 lines): the benchmark read top to bottom: per file the curve, translate's runs, the ceiling; then the report.
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True, type=Path, action="append", help="a GGUF file (repeat for several)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="the model's tokenizer directory (models/export/hf)")
    parser.add_argument("--test", required=True, type=Path, help="the format stage's test.jsonl")
    parser.add_argument("--n", type=int, default=20, help="the first N test sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, action="append", default=None, help="translate's runs (default: 16 and N)")
    parser.add_argument("--target", type=float, default=5.0, help="sentences/s asked for (issue 22: 5)")
    parser.add_argument("--extra-buffers", choices=["auto", "on", "off"], default="auto",
                        help="llama.cpp's repacked weight buffers (auto: as translate, off on AMX CPUs)")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="the curve's batch sizes")
    parser.add_argument("--no-variants", action="store_true", help="skip the KV-cache and flash-attention variants")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="evaluate's budget settings")
    parser.add_argument("--label", default="", help="a name for this machine in the report")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/gguf_ceiling"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    gguf.quiet_openmp()
    from transformers import AutoTokenizer

    ev = (yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}).get("evaluate", {})
    factor, extra = ev.get("max_new_tokens_factor", 2.0), ev.get("max_new_tokens_extra", 16)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    rows = read_jsonl(args.test)[: args.n]
    prompts = [r["messages"][:-1] for r in rows]
    input_ids = prompt_ids(tokenizer, prompts)
    budgets = token_budgets(tokenizer, [r["source"] for r in rows], factor, extra)
    stops = end_of_turn_ids(tokenizer)
    prefix = gguf.shared_prefix_length(input_ids)
    parallels = args.parallel or sorted({16, len(rows)})
    extra_buffers = {"auto": None, "on": True, "off": False}[args.extra_buffers]

    files = {}
    for path in args.gguf:
        llm = gguf.load_llama(path, n_ctx=512, n_threads=args.threads, extra_buffers=extra_buffers)
        gguf.batched_greedy(llm, input_ids[:2], [2, 2], stops, parallel=2)  # warm-up
        runs = {}
        settings = [(f"parallel {p}", {"parallel": p}) for p in parallels]
        if path == args.gguf[0] and not args.no_variants:
            settings += [(f"parallel {parallels[0]}, {name}", {"parallel": parallels[0], **kw}) for name, kw in VARIANTS]
        for label, kw in settings:
            timings: dict = {}
            started = time.perf_counter()
            outputs = gguf.batched_greedy(llm, input_ids, budgets, stops, timings=timings, **kw)
            seconds = time.perf_counter() - started
            runs[label] = {"seconds": round(seconds, 2), "sentences_per_s": round(len(rows) / seconds, 2),
                              "reply_tokens": sum(map(len, outputs)), "decoded_tokens": timings["batch_tokens"],
                              "decode_calls": timings["decode_calls"], "decode_seconds": timings["decode_seconds"],
                              "hit_budget": sum(len(o) >= b for o, b in zip(outputs, budgets)),
                              "decoded_tokens_per_s": round(timings["batch_tokens"] / timings["decode_seconds"], 1)}
        tps = curve(llm, args.threads, args.sizes)
        llm.close()
        best = max(tps.values())
        fastest = max((r for label, r in runs.items() if label.startswith("parallel") and "," not in label),
                      key=lambda r: r["sentences_per_s"])
        ceiling = len(rows) / (fastest["decoded_tokens"] / best)
        files[path.name] = {"bytes": path.stat().st_size, "curve_tokens_per_s": tps, "best_tokens_per_s": best,
                            "runs": runs, "ceiling_sentences_per_s": round(ceiling, 2),
                            "tokens_per_s_for_target": round(fastest["decoded_tokens"] * args.target / len(rows), 1),
                            "share_of_ceiling": round(fastest["sentences_per_s"] / ceiling, 2)}
        print(path.name, files[path.name], flush=True)

    import llama_cpp

    report = {
        "command": " ".join(["python benchmarks/gguf_ceiling.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "label": args.label, "test": str(args.test), "sentences": len(rows), "threads": args.threads,
        "target_sentences_per_s": args.target, "sizes": args.sizes, "extra_buffers": args.extra_buffers,
        "prompts": {"shared_prefix_tokens": prefix, "own_prompt_tokens": sum(len(i) - prefix for i in input_ids),
                    "budget_tokens": sum(budgets), "reference_tokens": sum(
                        len(tokenizer(r["target"], add_special_tokens=False).input_ids) for r in rows)},
        "files": files, "cpu": cpu_info(),
        "llama_cpp": {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "python": platform.python_version(), "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), render(report))
    print(render(report))


def render(report: dict) -> str:
    p, cpu = report["prompts"], report["cpu"]
    out = [f"# llama.cpp's ceiling on this CPU against translate's run{' (' + report['label'] + ')' if report['label'] else ''}",
           "", f"`{report['command']}`", "",
           f"CPU: {cpu['model']}, {cpu['cpus']} CPUs ({', '.join(cpu['flags'])}); {report['threads']} threads; llama-cpp-python "
           f"{report['llama_cpp']['version']} ({report['llama_cpp']['system_info']}); extra buffers {report['extra_buffers']}; "
           f"OMP_WAIT_POLICY {report['OMP_WAIT_POLICY']}; 1-minute load average at the end {report['loadavg_1min_end']}.", "",
           f"{report['sentences']} test sentences: shared prompt prefix {p['shared_prefix_tokens']} tokens (decoded once), "
           f"their own prompt tokens {p['own_prompt_tokens']}, the references {p['reference_tokens']} tokens, budgets "
           f"{p['budget_tokens']}.", "",
           "Throughput of one llama_decode call of N tokens (tokens/s):", "",
           "| file | MB | " + " | ".join(f"N={n}" for n in report["sizes"]) + " |",
           "|---|---:|" + "---:|" * len(report["sizes"])]
    for name, f in report["files"].items():
        tps = f["curve_tokens_per_s"]
        out.append(f"| {name} | {f['bytes'] / 1e6:.0f} | " + " | ".join(f"{tps.get(n, tps.get(str(n), 0)):.0f}" for n in report["sizes"]) + " |")
    out += ["", "translate's batched run and the ceiling (the same tokens at the curve's best tokens/s):", "",
            "| file | run | sentences/s | decoded tokens (reply tokens) | calls | decoded tokens/s | ceiling sentences/s | "
            f"tokens/s that {report['target_sentences_per_s']:g} sentences/s needs |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in report["files"].items():
        for label, r in f["runs"].items():
            out.append(f"| {name} | {label} | **{r['sentences_per_s']:.2f}** | {r['decoded_tokens']} ({r['reply_tokens']}) | "
                       f"{r['decode_calls']} | {r['decoded_tokens_per_s']:.0f} | {f['ceiling_sentences_per_s']:.2f} | "
                       f"{f['tokens_per_s_for_target']:.0f} (best measured {f['best_tokens_per_s']:.0f}) |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    from wenyan.errors import run_main

    run_main(main)
