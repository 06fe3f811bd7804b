"""Export: merge the LoRA adapter into its base model, save a 16-bit model and GGUF files checked with llama.cpp.

    models/adapter -> models/export/hf          the merged model (export.dtype: bf16 or fp16), its tokenizer
                                                with the chat template, and training_config.json (+ the prompt
                                                it was trained with, so `translate --model` needs no params.yaml)
                   -> models/export/model.gguf  llama.cpp's convert_hf_to_gguf.py (export.gguf_outtype; auto = the
                                                merged model's dtype), and model-<Q>.gguf for each of
                                                export.gguf_quantize (llama.cpp's quantizer)
                      models/export/Modelfile, Modelfile.<Q>   Ollama: FROM the GGUF, TEMPLATE = the chat
                                                template, stop tokens, temperature 0, SYSTEM = the model's prompt
                      models/export/training_config.json + tokenizer files: what `translate --model x.gguf` reads
                   -> reports/export.json       what was written, the merge check, and the GGUF check: each
                                                file's size, outputs identical to transformers', BLEU, speed

Run it on request; plain `dvc repro` does not, because the stage sits in its own pipeline file:
    dvc repro export/dvc.yaml          (also runs train first if it is out of date)
    python -m stages.export --model models/adapter --out models/export --report reports/export.json \
        --test data/format/test.jsonl [--params params.yaml]

The merge runs on CPU in fp32 (peft merge_and_unload), then checks that the merged model's logits equal
base + adapter on a test prompt before casting to 16 bits: a merge that changed the model fails the stage.
A fully fine-tuned model (config.json instead of adapter_config.json) is only cast and saved. The output
loads with plain transformers (AutoModelForCausalLM / AutoTokenizer), generation stopping at the end of
turn. GGUF needs the gguf extra (wenyan/gguf.py's docstring: pip install -e '.[gguf]', python -m tools.gguf
setup); without it the stage fails saying so, unless export.gguf is false. The GGUF check greedily translates
the first export.check_samples test sentences (their prompts as evaluate builds them) with transformers
(the exported weights, computed in fp32, batched as translate does) and with llama.cpp (each GGUF, one
sentence after the other), on the same threads. Everything is written into a temporary directory and
renamed onto models/export at the end (with the manifest of what it wrote), the report right after it, so
a failed export leaves the last good model directory and report as they were. An --out that holds files this
stage did not write, or that is, holds or lies inside --model, --test or --report, is refused before anything runs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.metrics import bleu
from wenyan import artifacts
from wenyan.files import (atomic_outputs, check_output_path, check_owned_dir, check_paths, read_jsonl, staged_dir,
                          with_path_errors, write_json)
from wenyan.params import add_params_options, Bool, check_params, Int, load_params, Param, Str
from wenyan import generation, gguf, models
from wenyan.prompt import prompt_ids

log = get_logger("export")

PIPELINE_STAGE = "export/dvc.yaml:export"  # its own pipeline file: plain `dvc repro` leaves it alone
DTYPES = ("bf16", "fp16")
GGUF_OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
SCHEMA = {  # values and their comments: params.yaml
    "dtype": Str(*DTYPES),
    "gguf": Bool(),
    "gguf_outtype": Str(*GGUF_OUTTYPES),
    "gguf_quantize": Param((list, str), items=str),  # [] / none, one type or a list of llama.cpp types
    "check_samples": Int(min=0),
}
SIGNATURE = "hf/training_config.json"  # what marks a directory as this stage's output (before output manifests too)
CHECK_TEXT = "学而时习之，不亦说乎？"
CHECK_BATCH_SIZE = 16  # transformers' side of the GGUF check, as translate batches
CHECK_FACTOR, CHECK_EXTRA = 2.0, 16  # token budget of each check sentence (generation.generate's defaults)


# ----------------------------------------------------------------------------------------------
# Parameters


def quantize_list(value) -> list[str]:
    """export.gguf_quantize as a list of llama.cpp type names: none / [] -> [], Q4_K_M -> [Q4_K_M]."""
    items = [value] if isinstance(value, str) else list(value)
    return [str(q).upper() for q in items if str(q).lower() != "none"]


def check_export_params(section: dict) -> dict:
    p = check_params(section, SCHEMA, "export")
    wanted = quantize_list(p["gguf_quantize"])
    known = sorted(gguf.quantize_types()) if wanted and gguf.missing() is None else None  # llama.cpp's own list
    for q in wanted:
        if not re.fullmatch(r"(I?Q\d|TQ\d|MXFP\d|BF16|F16|F32)[A-Z0-9_]*", q) or known is not None and q not in known:
            raise PipelineError(f"params.yaml: export.gguf_quantize must be none or llama.cpp types such as Q4_K_M; got {q!r}"
                                + (f" (llama.cpp knows: {', '.join(known)})" if known else ""))
    return p


# ----------------------------------------------------------------------------------------------
# Merge


def check_input_ids(tokenizer):
    """A short chat prompt, tokenized as generation sees it, for the merge check."""
    import torch

    ids = prompt_ids(tokenizer, [[{"role": "user", "content": CHECK_TEXT}]])[0]
    return torch.tensor([ids + tokenizer(CHECK_TEXT, add_special_tokens=False).input_ids])


def merge(model, is_adapter: bool, tokenizer) -> tuple[object, dict]:
    """merge_and_unload an adapter (fp32); returns (plain model, merge check). The check compares the
    logits of base + adapter with the merged model's on a test prompt; a difference beyond float error
    (1e-3 of the logits' scale) is an error."""
    import torch

    if not is_adapter:
        return model, {"merged": False}
    ids = check_input_ids(tokenizer)
    with torch.inference_mode():
        before = model(input_ids=ids).logits.float()
    merged = model.merge_and_unload()
    with torch.inference_mode():
        after = merged(input_ids=ids).logits.float()
    diff = float((before - after).abs().max())
    scale = float(before.abs().max())
    check = {"merged": True, "tokens": int(ids.shape[1]), "max_abs_logit_diff": round(diff, 8), "max_abs_logit": round(scale, 4)}
    if not diff <= 1e-3 * max(scale, 1.0):
        raise PipelineError(f"the merged model's logits differ from base + adapter by up to {diff:.3g} (logits up to {scale:.3g})")
    return merged, check


def save_hf(model, tokenizer, cfg: dict, dtype_name: str, model_dir: Path, out: Path) -> dict:
    """16-bit weights + tokenizer (chat template) + training_config.json, loadable by plain transformers."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model = model.to(dtype)
    for config in (model.config, model.generation_config):  # plain generate() stops at the end of turn
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    notice = models.terms_notice(cfg)
    if notice:  # Gemma's terms travel with the model and everything made from it
        (out / models.NOTICE_FILE).write_text(notice + "\n", encoding="utf-8")
    exported = {"from": str(model_dir), "dtype": dtype_name}
    write_json(out / "training_config.json", {**cfg, "exported": exported})  # the prompt travels on
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }


# ----------------------------------------------------------------------------------------------
# GGUF: llama.cpp's converter and quantizer (wenyan/gguf.py), checked against transformers


def export_gguf(hf_dir: Path, out: Path, p: dict, tokenizer, cfg: dict) -> list[dict]:
    """model.gguf (+ model-<Q>.gguf), a Modelfile for each, and beside them what translate reads (the
    tokenizer and training_config.json). Returns [{file, type, bytes, seconds}]."""
    from tqdm.auto import tqdm

    outtype = {"bf16": "bf16", "fp16": "f16"}[p["dtype"]] if p["gguf_outtype"] == "auto" else p["gguf_outtype"]
    wanted = quantize_list(p["gguf_quantize"])
    # one bar over the files: the conversion takes seconds (a subprocess), each quantisation a second or two
    with tqdm(total=1 + len(wanted), desc=f"GGUF: model.gguf ({outtype})", unit="file") as bar:
        info = gguf.convert(hf_dir, out / "model.gguf", outtype)
        files = [{"file": "model.gguf", "type": outtype.upper(), "bytes": info["bytes"], "seconds": info["seconds"]}]
        bar.update(1)
        for q in wanted:
            bar.set_description(f"GGUF: model-{q}.gguf")
            info = gguf.quantize(out / "model.gguf", out / f"model-{q}.gguf", q)
            files.append({"file": f"model-{q}.gguf", "type": q, "bytes": info["bytes"], "seconds": info["seconds"]})
            bar.update(1)
    fmt = cfg["prompt"]["format"]  # Ollama gets one sentence at a time: no context sentences
    for f in files:
        name = "Modelfile" if f["file"] == "model.gguf" else f"Modelfile.{f['type']}"
        (out / name).write_text(gguf.render_modelfile(f["file"], tokenizer, fmt["system_prompt"], fmt["user_template"],
                                                      license_text=models.terms_notice(cfg)), encoding="utf-8")
        f["modelfile"] = name
    tokenizer.save_pretrained(str(out))
    shutil.copy(hf_dir / "training_config.json", out / "training_config.json")
    if (hf_dir / models.NOTICE_FILE).is_file():
        shutil.copy(hf_dir / models.NOTICE_FILE, out / models.NOTICE_FILE)
    return files


def check_rows(test: Path, n: int) -> list[dict]:
    """The first n rows of the format stage's test file (source, target, messages)."""
    rows, lines = read_jsonl(test, with_lines=True)
    schema = {**artifacts.TEST_ROW, "id": artifacts.Optional(artifacts.ROW_ID)}  # the check needs no ids
    artifacts.check_rows(rows[:n], schema, test, "rewrite it with the format stage (dvc repro format)", lines=lines[:n])
    rows = rows[:n]
    return rows


def check_gguf(model, tokenizer, out: Path, files: list[dict], rows: list[dict]) -> dict:
    """Greedy translations of the rows with transformers (model, fp32) and with each GGUF on llama.cpp: per file
    identical_fraction (same text as transformers), BLEU and its change, sentences/s of each engine."""
    import torch

    threads = torch.get_num_threads()
    prompts, sources = [r["messages"][:-1] for r in rows], [r["source"] for r in rows]
    references = [r["target"] for r in rows]
    started = time.monotonic()
    reference, _ = generation.generate(model, tokenizer, prompts, sources, batch_size=CHECK_BATCH_SIZE, factor=CHECK_FACTOR,
                                     extra=CHECK_EXTRA, desc="transformers")
    hf_seconds = time.monotonic() - started
    hf_bleu, signature = bleu(reference, references)
    result = {
        "sentences": len(rows), "threads": threads, "bleu_signature": signature,
        "transformers": {"dtype": "fp32 (the exported weights)", "batch_size": CHECK_BATCH_SIZE, "bleu": hf_bleu,
                         "seconds": round(hf_seconds, 1), "sentences_per_s": round(len(rows) / hf_seconds, 2)},
    }
    n_ctx = gguf.context_size(tokenizer, prompts, sources, CHECK_FACTOR, CHECK_EXTRA)
    for f in files:
        llm = gguf.load_llama(out / f["file"], n_ctx=n_ctx, n_threads=threads)
        started = time.monotonic()
        texts, _ = gguf.generate(llm, tokenizer, prompts, sources, factor=CHECK_FACTOR, extra=CHECK_EXTRA, desc=f["file"])
        seconds = time.monotonic() - started
        del llm
        f_bleu = bleu(texts, references)[0]
        f["check"] = {
            "identical_fraction": round(sum(a == b for a, b in zip(texts, reference)) / len(rows), 3),
            "bleu": f_bleu, "bleu_change": round(f_bleu - hf_bleu, 2), "seconds": round(seconds, 1),
            "sentences_per_s": round(len(rows) / seconds, 2),
        }
        log.info("%s: %.0f%% identical to transformers, BLEU %.2f (%+.2f), %.2f sentences/s (transformers %.2f)",
                 f["file"], 100 * f["check"]["identical_fraction"], f_bleu, f["check"]["bleu_change"],
                 f["check"]["sentences_per_s"], result["transformers"]["sentences_per_s"])
    return result


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the train stage's output (models/adapter)")
    parser.add_argument("--out", required=True, type=Path, help="export directory (models/export): hf/, GGUF files, Modelfiles")
    parser.add_argument("--report", required=True, type=Path, help="JSON report (reports/export.json)")
    parser.add_argument("--test", type=Path, help="the format stage's test.jsonl: sentences of the GGUF check")
    add_params_options(parser, check=False)
    args = parser.parse_args(argv)
    check_output_path(args.out, directory=True)  # before the merge, not after
    check_output_path(args.report)
    model_inputs = models.model_inputs(args.model)
    inputs = {**model_inputs, "--test": args.test, "--params": args.params}  # the base is read too
    check_paths(inputs, {"--out": args.out, "--report": args.report}, dirs=list(model_inputs))
    check_owned_dir(args.out, "--out", "export", signature=SIGNATURE)

    p = check_export_params(load_params("export", args.params, dvc_stage=PIPELINE_STAGE))
    trained = models.load_trained(args.model, model=False, backend="hf")  # before anything heavy: clear errors
    cfg, tokenizer, is_adapter = trained.config, trained.tokenizer, trained.is_adapter
    rows = []
    if p["gguf"]:
        absent = gguf.missing()
        if absent:
            raise PipelineError(f"export.gguf is true but {absent}; or set export.gguf: false to export without GGUF")
        if p["check_samples"]:
            if args.test is None:
                raise PipelineError("export.check_samples > 0 needs --test data/format/test.jsonl (the sentences of the GGUF check)")
            rows = check_rows(args.test, p["check_samples"])

    import torch

    model = models.load_trained_model(trained, device="cpu", dtype=torch.float32, merge=False)
    log.info("%s: %s on %s; merging and saving as %s", args.model, "LoRA adapter" if is_adapter else "full model", cfg["model"], p["dtype"])
    model, check = merge(model, is_adapter, tokenizer)
    if is_adapter:
        log.info("merge check: max |logit difference| %.2g over %d tokens (logits up to %.3g)",
                 check["max_abs_logit_diff"], check["tokens"], check["max_abs_logit"])

    # the report is written first and renamed last, once the new model directory is in place
    with atomic_outputs(args.report) as (report_tmp,), staged_dir(args.out, "export", signature=SIGNATURE) as tmp:
        hf = save_hf(model, tokenizer, cfg, p["dtype"], args.model, tmp / "hf")
        files, gguf_check = [], None
        if p["gguf"]:
            files = export_gguf(tmp / "hf", tmp, p, tokenizer, cfg)
            if rows:
                gguf_check = check_gguf(model.float().eval(), tokenizer, tmp, files, rows)
        del model
        report = {
            "model": str(args.model),
            "base_model": cfg["model"],
            "kind": "LoRA adapter merged into its base" if is_adapter else "full model, cast",
            "hf": {"path": str(args.out / "hf"), "dtype": p["dtype"], **hf},
            "merge_check": check,
            "gguf": {"files": [{**f, "path": str(args.out / f["file"])} for f in files], "check": gguf_check}
            if p["gguf"] else "skipped (export.gguf: false)",
            "params": p,
        }
        write_json(report_tmp, report)
    log.info("wrote %s/hf%s and %s", args.out, "".join(f", {f['file']}" for f in files), args.report)


if __name__ == "__main__":
    run_main(with_path_errors(main))
