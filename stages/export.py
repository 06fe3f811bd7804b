"""Export: merge the LoRA adapter into its base model and save a 16-bit model (+ GGUF where llama.cpp is found).

    models/adapter -> models/export/hf          the merged model (export.dtype: bf16 or fp16), its tokenizer
                                                with the chat template, and training_config.json (+ the prompt
                                                it was trained with, so `translate --model` needs no params.yaml)
                   -> models/export/model.gguf  only where llama.cpp's converter is found (LLAMA_CPP_DIR or PATH);
                      models/export/model-<Q>.gguf  also quantised with llama-quantize (export.gguf_quantize)
                   -> reports/export.json       what was written, the merge check, or what is missing for GGUF

Run it on request; plain `dvc repro` does not, because the stage sits in its own pipeline file:
    dvc repro export/dvc.yaml          (also runs train first if it is out of date)
    python -m stages.export --model models/adapter --out models/export --report reports/export.json [--params params.yaml]

The merge runs on CPU in fp32 (peft merge_and_unload), then checks that the merged model's logits equal
base + adapter on a test prompt before casting to 16 bits: a merge that changed the model fails the stage.
A fully fine-tuned model (config.json instead of adapter_config.json) is only cast and saved. The output
loads with plain transformers (AutoModelForCausalLM / AutoTokenizer), generation stopping at the end of
turn. Everything is written into a temporary directory and renamed onto models/export at the end, the
report right after it, so a failed export leaves the last good model directory and report as they were.
Missing llama.cpp tooling is not an error: the message says what is missing and how to get it, and goes
into the report too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stages.common import (
    Bool, PipelineError, Str, atomic_outputs, check_params, get_logger, load_params, replace_dir, run_main, write_json,
)
from stages import modeling

log = get_logger("export")

PIPELINE_STAGE = "export/dvc.yaml:export"  # its own pipeline file: plain `dvc repro` leaves it alone
DTYPES = ("bf16", "fp16")
GGUF_OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
SCHEMA = {  # values and their comments: params.yaml
    "dtype": Str(*DTYPES),
    "gguf": Bool(),
    "gguf_outtype": Str(*GGUF_OUTTYPES),
    "gguf_quantize": Str(),  # none or a llama-quantize type: check_export_params
}
CHECK_TEXT = "学而时习之，不亦说乎？"
GET_LLAMA_CPP = (
    "to get it: git clone --depth 1 https://github.com/ggml-org/llama.cpp && export LLAMA_CPP_DIR=$PWD/llama.cpp "
    "(the converter runs with this environment's python; pip install sentencepiece if it asks for it), "
    "then: dvc repro -f -s export/dvc.yaml"
)
GET_QUANTIZE = (
    "build it in the llama.cpp checkout: cmake -B build && cmake --build build --config Release --target llama-quantize "
    "(found as $LLAMA_CPP_DIR/build/bin/llama-quantize or on PATH)"
)


# ----------------------------------------------------------------------------------------------
# Parameters


def check_export_params(section: dict) -> dict:
    p = check_params(section, SCHEMA, "export")
    if not p["gguf_quantize"] or not str(p["gguf_quantize"]).replace("_", "").isalnum():
        raise PipelineError(f"params.yaml: export.gguf_quantize must be none or a llama-quantize type such as Q4_K_M; got {p['gguf_quantize']!r}")
    return p


# ----------------------------------------------------------------------------------------------
# Merge


def check_input_ids(tokenizer):
    """A short chat prompt, tokenized as generation sees it, for the merge check."""
    import torch

    ids = modeling.prompt_ids(tokenizer, [[{"role": "user", "content": CHECK_TEXT}]])[0]
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
    exported = {"from": str(model_dir), "dtype": dtype_name}
    write_json(out / "training_config.json", {**cfg, "exported": exported})  # the prompt travels on
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp tooling, where present)


def find_llama_cpp() -> dict:
    """Paths of convert_hf_to_gguf.py and llama-quantize, from $LLAMA_CPP_DIR or PATH (None if absent)."""
    found = {"convert": None, "quantize": None}
    root = os.environ.get("LLAMA_CPP_DIR")
    if root:
        root = Path(root).expanduser()
        if (root / "convert_hf_to_gguf.py").is_file():
            found["convert"] = str(root / "convert_hf_to_gguf.py")
        for candidate in (root / "build" / "bin" / "llama-quantize", root / "bin" / "llama-quantize", root / "llama-quantize"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found["quantize"] = str(candidate)
                break
    found["convert"] = found["convert"] or shutil.which("convert_hf_to_gguf.py") or shutil.which("convert_hf_to_gguf")
    found["quantize"] = found["quantize"] or shutil.which("llama-quantize")
    return found


def _run_tool(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise PipelineError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def export_gguf(hf_dir: Path, out: Path, p: dict, tools: dict) -> dict:
    """Write GGUF file(s) into `out` where the tools are there; else say what is missing and how to get it."""
    if not p["gguf"]:
        return {"files": [], "message": "GGUF skipped (export.gguf: false)"}
    where = f"$LLAMA_CPP_DIR={os.environ['LLAMA_CPP_DIR']}" if os.environ.get("LLAMA_CPP_DIR") else "$LLAMA_CPP_DIR (unset)"
    if tools["convert"] is None:
        return {
            "files": [],
            "message": f"no GGUF file: llama.cpp's convert_hf_to_gguf.py was not found in {where} or on PATH; "
            f"{GET_LLAMA_CPP}. The merged model in hf/ is complete without it.",
        }
    convert = tools["convert"]
    gguf = out / "model.gguf"
    cmd = ([sys.executable] if convert.endswith(".py") else []) + [convert, str(hf_dir), "--outfile", str(gguf), "--outtype", p["gguf_outtype"]]
    _run_tool(cmd, "convert_hf_to_gguf")
    if not gguf.is_file():
        raise PipelineError(f"convert_hf_to_gguf exited 0 but wrote no {gguf}")
    result = {"files": [gguf.name], "converter": convert, "outtype": p["gguf_outtype"], "message": f"wrote {gguf.name}"}
    quant = str(p["gguf_quantize"])
    if quant.lower() == "none":
        return result
    if tools["quantize"] is None:
        result["message"] += f"; not quantised to {quant}: llama-quantize was not found in {where} or on PATH; {GET_QUANTIZE}"
        return result
    quantized = out / f"model-{quant}.gguf"
    _run_tool([tools["quantize"], str(gguf), str(quantized), quant], "llama-quantize")
    result["files"].append(quantized.name)
    result["quantize"] = {"tool": tools["quantize"], "type": quant}
    result["message"] += f" and {quantized.name}"
    return result


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the train stage's output (models/adapter)")
    parser.add_argument("--out", required=True, type=Path, help="export directory (models/export): hf/ and any .gguf")
    parser.add_argument("--report", required=True, type=Path, help="JSON report (reports/export.json)")
    parser.add_argument("--params", type=Path, default=None, help="read this params.yaml instead of asking DVC (tests)")
    args = parser.parse_args(argv)

    p = check_export_params(load_params("export", args.params, dvc_stage=PIPELINE_STAGE))
    trained = modeling.load_trained(args.model, model=False, backend="hf")  # before anything heavy: clear errors
    cfg, tokenizer, is_adapter = trained.config, trained.tokenizer, trained.is_adapter
    tools = find_llama_cpp()

    import torch

    model = modeling.load_trained_model(trained, device="cpu", dtype=torch.float32, merge=False)
    log.info("%s: %s on %s; merging and saving as %s", args.model, "LoRA adapter" if is_adapter else "full model", cfg["model"], p["dtype"])
    model, check = merge(model, is_adapter, tokenizer)
    if is_adapter:
        log.info("merge check: max |logit difference| %.2g over %d tokens (logits up to %.3g)",
                 check["max_abs_logit_diff"], check["tokens"], check["max_abs_logit"])

    tmp = args.out.with_name(f".{args.out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        hf = save_hf(model, tokenizer, cfg, p["dtype"], args.model, tmp / "hf")
        del model
        gguf = export_gguf(tmp / "hf", tmp, p, tools)
        report = {
            "model": str(args.model),
            "base_model": cfg["model"],
            "kind": "LoRA adapter merged into its base" if is_adapter else "full model, cast",
            "hf": {"path": str(args.out / "hf"), "dtype": p["dtype"], **hf},
            "merge_check": check,
            "gguf": {**gguf, "files": [str(args.out / f) for f in gguf["files"]]},
            "params": p,
        }
        # the report is written first and renamed last, once the new model directory is in place
        with atomic_outputs(args.report) as (report_tmp,):
            write_json(report_tmp, report)
            replace_dir(tmp, args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    (log.info if gguf["files"] else log.warning)("GGUF: %s", gguf["message"])
    log.info("wrote %s/hf%s and %s", args.out, "".join(f", {f}" for f in gguf["files"]), args.report)


if __name__ == "__main__":
    run_main(main)
