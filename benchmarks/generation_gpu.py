"""Greedy generation on one GPU: plain transformers generate() against the library's slot loop and the evaluate stage.

    python benchmarks/generation_gpu.py --model models/adapter --test data/format/test.jsonl --num 2000 \
        --out reports/benchmarks
    python benchmarks/generation_gpu.py --smoke --out /tmp/smoke     # every method, a tiny random model, seconds

One process, one model (bf16 on CUDA, as the evaluate stage loads it), the evaluate stage's sentence selection
(seed 0), prompts (the test rows' messages) and budgets (evaluate.max_new_tokens_factor x source tokens + extra).
Methods (--methods, in this order by default):
  generate-bN        transformers' generate(), left-padded batches of N length-sorted prompts: the reference
                     (the first method listed); N = the gpu profile's evaluate.batch_size (512)
  slot-bN            generation.generate's GPU path (wenyan/generation.py slot_greedy): N slots, a sentence leaves its
                     slot when it ends and a waiting one joins; static KV cache per batch shape; shared prefix once
  slot-bN-graph      the same with the decode step as CUDA graphs
  evaluate           the evaluate stage end to end (stages.evaluate.main in this process: loading, generation,
                     BLEU with its bootstrap CI, breakdowns, writing), with the gpu profile's evaluate params and
                     the copy baseline; its generation time is reported apart
  fp32-nK            exactness: plain generate() and the slot loop on K sentences with fp32 weights (TF32 off),
                     identical fraction between the two
  generate-bN (a second one, e.g. generate-b256): how far plain generate() moves between batch sizes in bf16
  continuous         transformers' own continuous batching, model.generate_batch() (paged KV cache, CUDA graphs),
                     max_new_tokens = the largest budget, each output then cut at its own budget
Columns: sentences/s, output tokens/s (outputs re-tokenized, end-of-turn not counted), seconds, peak GPU memory
(torch.cuda.max_memory_allocated), identical outputs to the reference (decoded text), BLEU (zh, after the evaluate
stage's normalisation and OpenCC), hit budget. The report (OUT/NAME.json and .md) is rewritten after every method,
so a run that is stopped keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = ("generate-b512,slot-b256,slot-b512,slot-b1024,evaluate,fp32-n256,generate-b256,slot-b512-graph,"
                   "slot-b1024-graph,continuous")  # the riskier ones (CUDA graph capture, generate_batch) last


def tiny_setup(workdir: Path):
    """A random 2-layer Llama with a character tokenizer (ChatML), a model directory as the train stage writes it,
    and a test.jsonl of 16 rows: everything --smoke needs, built here."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from wenyan.prompt import CHAT_TEMPLATES

    sources = ["学而时习之不亦说乎", "有朋自远方来", "人不知而不愠不亦君子乎", "吾日三省吾身", "温故而知新可以为师矣",
               "三人行必有我师焉", "知之为知之不知为不知是知也", "君子坦荡荡小人长戚戚", "逝者如斯夫不舍昼夜",
               "己所不欲勿施于人", "朝闻道夕死可矣", "德不孤必有邻", "岁寒然后知松柏之后凋也", "工欲善其事必先利其器",
               "道不同不相为谋", "欲速则不达"]
    targets = [s[::-1] for s in sources]
    fmt = {"system_prompt": "你是翻译家。", "user_template": "翻译：\n{classical}", "context_sentences": 0,
           "context_template": "上文：{context}\n"}
    text = "".join(sources + targets) + fmt["system_prompt"] + fmt["user_template"] + "systemuserassistant\n"
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(text + string.ascii_letters)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "training_config.json").write_text(json.dumps(
        {"model": "tiny-random-llama", "backend": "hf", "prompt": {"format": fmt, "opencc": "none"}}), encoding="utf-8")
    rows = []
    for i, (s, t) in enumerate(zip(sources, targets)):
        user = fmt["user_template"].format(classical=s)
        rows.append({"id": f"smoke:{i}", "book": "论语", "chapter": "smoke", "line": i, "source": s, "target": t,
                     "messages": [{"role": "system", "content": fmt["system_prompt"]},
                                  {"role": "user", "content": user}, {"role": "assistant", "content": t}]})
    test = workdir / "test.jsonl"
    test.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return model_dir, test


def evaluate_params(workdir: Path, num: int, smoke: bool) -> Path:
    """params.yaml's evaluate section with the gpu profile's values, greedy (the profile's num_beams is for its own
    evaluation), baselines copy only (base needs the evaluate_base stage's outputs)."""
    import yaml

    from wenyan.params import read_yaml_file

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    section = dict(params["evaluate"])
    for key, value in (read_yaml_file(repo / "profiles" / "gpu.yaml", "profile") or {}).items():
        if key.startswith("evaluate."):
            section[key.split(".", 1)[1]] = value
    section.update(num_samples=num, baselines=["copy"], num_gpus=1, num_beams=1)  # greedy, like every other row
    if smoke:
        section.update(bootstrap_resamples=10, batch_size=8)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": section}, allow_unicode=True), encoding="utf-8")
    return path


# Long (~130 lines): one benchmark run read top to bottom: set-up, warm-up, then one block a method, report rewritten after each.
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model directory the train stage wrote (models/adapter)")
    ap.add_argument("--test", help="data/format/test.jsonl")
    ap.add_argument("--num", type=int, default=2000, help="test sentences (the evaluate stage's selection, seed 0)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--out", default="reports/benchmarks", help="directory of the report")
    ap.add_argument("--name", default="generation_gpu", help="report file names: OUT/NAME.json and OUT/NAME.md")
    ap.add_argument("--smoke", action="store_true", help="every method on 16 sentences of a tiny random model built "
                    "here (no files needed): checks the script, measures nothing")
    args = ap.parse_args(argv)
    if not args.smoke and not (args.model and args.test):
        ap.error("--model and --test are needed (or --smoke)")

    import torch

    from stages import evaluate
    from wenyan import generation, metrics, models, prompt
    from wenyan.files import read_jsonl
    from wenyan.params import load_params

    workdir = Path(tempfile.mkdtemp(prefix="generation_gpu_"))
    if args.smoke:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # tiny tensors: threads only spin (30 s instead of 2 on a shared 2-core machine)
        model_dir, test = tiny_setup(workdir)
        num = 16
        methods = ["generate-b8", "slot-b4", "slot-b8", "evaluate", "fp32-n8", "generate-b4", "slot-b8-graph",
                   "continuous"]
        if args.methods != DEFAULT_METHODS:
            methods = args.methods.split(",")
    else:
        model_dir, test, num, methods = Path(args.model), Path(args.test), args.num, args.methods.split(",")
    cuda = torch.cuda.is_available()
    params_file = evaluate_params(workdir, num, args.smoke)
    ev = evaluate.check_evaluate_params(load_params("evaluate", params_file))
    factor, extra = ev["max_new_tokens_factor"], ev["max_new_tokens_extra"]

    rows = metrics.select_rows(read_jsonl(test), num, ev["seed"])
    metrics.check_test_rows(rows, test)
    prompts, sources, refs = [r["messages"][:-1] for r in rows], [r["source"] for r in rows], [r["target"] for r in rows]
    started = time.perf_counter()
    trained = models.load_trained(model_dir)  # bf16 on CUDA, fp32 on CPU (generation.device_and_dtype)
    load_seconds = time.perf_counter() - started
    model, tokenizer = trained.model, trained.tokenizer
    opencc = trained.prompt["opencc"]
    eos_ids = prompt.end_of_turn_ids(tokenizer)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"{len(rows)} sentences, model {model_dir} ({dtype} on {'cuda' if cuda else 'cpu'}), loaded in "
          f"{load_seconds:.1f} s; methods: {', '.join(methods)}", flush=True)

    def run(m, loop, batch, n=len(rows), graph=False):
        return generation.generate(m, tokenizer, prompts[:n], sources[:n], batch_size=batch, factor=factor, extra=extra,
                                 eos_token_ids=eos_ids, loop=loop, cuda_graph=graph, desc=f"{loop} b{batch}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm-up (CUDA context, cuBLAS, kernels) of both loops, not timed
    for loop in ("hf", "slot"):
        run(model, loop, 4, n=min(8, len(rows)))
    sync()

    out_dir = Path(args.out)
    report = {
        "command": " ".join(["python benchmarks/generation_gpu.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "model": str(model_dir), "smoke": args.smoke, "sentences": len(rows), "dtype": dtype,
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "budget": f"ceil({factor} x source tokens) + {extra}", "load_seconds": round(load_seconds, 1),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "reference": methods[0], "results": [],
    }
    texts_of: dict[str, list[str]] = {}

    def record(method, seconds, texts, hit, peak, **extra_fields):
        reference = texts_of.get(methods[0])
        n = len(texts)
        tokens = sum(len(t) for t in tokenizer(list(texts), add_special_tokens=False).input_ids) if texts else 0
        hyps = evaluate.postprocess(texts, opencc)
        row = {"method": method, "sentences": n, "seconds": round(seconds, 2),
               "sentences_per_s": round(n / seconds, 1), "output_tokens": tokens,
               "output_tokens_per_s": round(tokens / seconds), "peak_gpu_memory_gib": peak,
               "hit_budget": sum(hit),
               "identical_to_reference": (sum(a == b for a, b in zip(texts, reference)) if reference is not None
                                          and method != methods[0] else None),
               "bleu": metrics.score(hyps, refs[:n])["bleu"], **extra_fields}
        if row["identical_to_reference"] is not None:
            row["identical_fraction"] = round(row["identical_to_reference"] / min(n, len(reference)), 4)
        report["results"].append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)

    for method in methods:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        peak = lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None  # noqa: E731
        print(f"--- {method}", flush=True)
        try:
            if method.startswith(("generate-b", "slot-b")):
                kind, rest = method.split("-b", 1)
                batch = int(rest.split("-")[0])
                graph = rest.endswith("-graph")
                started = time.perf_counter()
                texts, hit = run(model, "hf" if kind == "generate" else "slot", batch, graph=graph)
                sync()
                seconds = time.perf_counter() - started
                texts_of.setdefault(method, texts)
                record(method, seconds, texts, hit, peak(),
                       **({"slot_run": dict(generation.LAST_SLOT_RUN)} if kind == "slot" else {}))
            elif method == "evaluate":
                seconds, gen_seconds, texts, hit = run_evaluate(evaluate, generation, model_dir, test, params_file,
                                                                workdir, sync)
                record(method, seconds, texts, hit, peak(), generation_seconds=round(gen_seconds, 2),
                       generation_sentences_per_s=round(len(texts) / gen_seconds, 1))
            elif method == "continuous":
                if not cuda:  # it sizes its paged cache from free memory: on CPU that is most of the RAM
                    raise RuntimeError("skipped without CUDA (generate_batch would take most of the RAM for its cache)")
                started = time.perf_counter()
                texts, hit = run_continuous(model, tokenizer, prompts, sources, factor, extra, eos_ids, prompt)
                sync()
                record(method, time.perf_counter() - started, texts, hit, peak())
            elif method.startswith("fp32-n"):
                k = min(int(method.split("-n", 1)[1]), len(rows))
                record_fp32(method, k, models, model_dir, run, sync, report, peak)
            else:
                raise ValueError(f"unknown method {method!r}")
        except Exception as exc:  # noqa: BLE001  (a method that fails is reported, the others still run)
            report["results"].append({"method": method, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"{method}: failed: {type(exc).__name__}: {exc}", flush=True)
        write_report(out_dir, args.name, report)
    print(f"wrote {out_dir / args.name}.json and .md", flush=True)


def run_evaluate(evaluate, generation, model_dir, test, params_file, workdir, sync):
    """stages.evaluate.main in this process; generation.generate wrapped to time the generation and keep its outputs."""
    captured = {}
    original = generation.generate

    def timed(*a, **k):
        started = time.perf_counter()
        result = original(*a, **k)
        sync()
        captured["seconds"], captured["result"] = time.perf_counter() - started, result
        return result

    generation.generate = timed
    try:
        started = time.perf_counter()
        evaluate.main(["--test", str(test), "--model", str(model_dir), "--metrics", str(workdir / "metrics.json"),
                       "--out-dir", str(workdir / "evaluate"), "--hypotheses", str(workdir / "hypotheses.jsonl"),
                       "--params", str(params_file)])
        sync()
        seconds = time.perf_counter() - started
    finally:
        generation.generate = original
    texts, hit = captured["result"]
    metrics = json.loads((workdir / "metrics.json").read_text(encoding="utf-8"))
    print(f"evaluate stage: BLEU {metrics['bleu']} (its own reports/metrics.json)", flush=True)
    return seconds, captured["seconds"], texts, hit


def run_continuous(model, tokenizer, prompts, sources, factor, extra, eos_ids, prompt):
    """transformers' generate_batch; its outputs cut at each sentence's budget and first end-of-turn token."""
    import torch
    from transformers import GenerationConfig

    ids = prompt.prompt_ids(tokenizer, prompts)
    budgets = prompt.token_budgets(tokenizer, sources, factor, extra)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), eos_token_id=list(eos_ids), pad_token_id=pad)
    with torch.inference_mode():
        results = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
    keys = sorted(results, key=lambda k: int(str(k).rsplit("_", 1)[-1]))  # "req_<n>" in submission order
    if len(keys) != len(ids):
        raise RuntimeError(f"generate_batch returned {len(keys)} results for {len(ids)} prompts")
    by_index = {i: list(results[k].generated_tokens) for i, k in enumerate(keys)}
    texts, hit = [], []
    for i, budget in enumerate(budgets):
        tokens = by_index[i][:budget]
        end = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
        hit.append(end is None)
        text = tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=True)
        texts.append(text.rstrip("\ufffd") if end is None else text)
    return texts, hit


def record_fp32(method, k, models, model_dir, run, sync, report, peak):
    """Plain generate() and the slot loop on k sentences with fp32 weights, TF32 off: the loops themselves agree."""
    import torch

    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model32 = models.load_trained(model_dir, dtype=torch.float32).model
        timings, outs = {}, {}
        for name, loop in (("generate", "hf"), ("slot", "slot")):
            started = time.perf_counter()
            outs[name] = run(model32, loop, k, n=k)[0]
            sync()
            timings[name] = round(time.perf_counter() - started, 2)
        same = sum(a == b for a, b in zip(outs["generate"], outs["slot"]))
        row = {"method": method, "sentences": k, "dtype": "float32", "seconds_generate": timings["generate"],
               "seconds_slot": timings["slot"], "slot_identical_to_generate": same,
               "identical_fraction": round(same / k, 4), "peak_gpu_memory_gib": peak()}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        del model32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32


def write_report(out_dir: Path, name: str, report: dict) -> None:
    from wenyan.files import write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", report)
    n = report["sentences"]
    lines = [f"# Greedy generation on {report['device']} ({report['dtype']}), {n} test sentences"
             + (" (SMOKE: tiny random model, measures nothing)" if report["smoke"] else ""), "",
             f"`{report['command']}`", "",
             f"Model `{report['model']}` (loaded in {report['load_seconds']} s), budget {report['budget']} tokens, "
             f"torch {report['torch']}, transformers {report['transformers']}. Identical: decoded outputs equal to "
             f"the first row's ({report['reference']}).", "",
             "| method | sentences/s | output tokens/s | seconds | peak GPU GiB | identical to reference | BLEU | "
             "hit budget |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:150]} | | | | | | |")
        elif r["method"].startswith("fp32-"):
            notes.append(f"- {r['method']}: fp32 weights, TF32 off, {r['sentences']} sentences: the slot loop's "
                         f"outputs equal plain generate()'s for {r['slot_identical_to_generate']}/{r['sentences']} "
                         f"(generate {r['seconds_generate']} s, slot {r['seconds_slot']} s).")
        else:
            same = "reference" if r["identical_to_reference"] is None else \
                f"{r['identical_to_reference']}/{r['sentences']} ({100 * r['identical_fraction']:.1f}%)"
            label = r["method"]
            if "slot_run" in r:
                run = r["slot_run"]
                label += (f" ({run['decode_steps']} steps, {run['prefills']} prefills, {run['columns']} KV columns"
                          + (f", {run['graph_replays']} graph replays" if r["method"].endswith("-graph") else "") + ")")
            if "generation_seconds" in r:
                label += f" (generation alone: {r['generation_seconds']} s, {r['generation_sentences_per_s']}/s)"
            lines.append(f"| {label} | {r['sentences_per_s']} | {r['output_tokens_per_s']} | {r['seconds']} | "
                         f"{r['peak_gpu_memory_gib']} | {same} | {r['bleu']} | {r['hit_budget']} |")
    write_text(out_dir / f"{name}.md", "\n".join(lines + [""] + notes + [""]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's wenyan/ and stages/ from anywhere
    from wenyan.errors import run_main

    run_main(main)
