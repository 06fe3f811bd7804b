"""export: the merged 16-bit model equals base + adapter and loads with plain transformers; export.gguf: false
skips GGUF knowingly (GGUF itself: tests/test_gguf.py); the stage stays out of plain `dvc repro`."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import BASE_PARAMS, EXPORT_PARAMS, REPO
from conftest import export_params_file as write_params
from tiny import make_tiny_model

from stages import export
from wenyan.errors import PipelineError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

def logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_merged_export_matches_base_plus_adapter(tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_tiny_model(tmp_path / "tiny", trainable_tokens=True)
    out, report = tmp_path / "models" / "export", tmp_path / "reports" / "export.json"
    export.main(["--model", str(adapter), "--out", str(out), "--report", str(report),
                 "--params", str(write_params(tmp_path / "params.yaml"))])

    # reference: base + adapter through peft, fp32
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = export.check_input_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "base", dtype=torch.float32)
    base_logits = logits(base, ids)
    peft_logits = logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    scale = float(peft_logits.abs().max())

    # the export, loaded by plain transformers: bf16 on disk, its tokenizer and chat template beside it
    hf = out / "hf"
    merged = AutoModelForCausalLM.from_pretrained(hf)
    assert merged.dtype == torch.bfloat16
    merged_logits = logits(merged.float(), ids)
    error = float((merged_logits - peft_logits).abs().max())
    effect = float((peft_logits - base_logits).abs().max())
    assert error < 0.02 * scale, (error, scale)  # bf16 rounding only
    assert effect > 10 * error, (effect, error)  # the adapter changed the model far beyond that tolerance
    exported_tok = AutoTokenizer.from_pretrained(hf)
    assert exported_tok.chat_template == tokenizer.chat_template
    assert merged.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stops at end of turn

    # the fp32 merge itself is exact to float error (what the stage checks before casting)
    rep = json.loads(report.read_text(encoding="utf-8"))
    assert rep["merge_check"]["merged"] and rep["merge_check"]["max_abs_logit_diff"] < 1e-4
    assert rep["hf"]["dtype"] == "bf16" and rep["hf"]["path"] == str(hf)

    # export.gguf: false: no GGUF, knowingly
    assert rep["gguf"] == "skipped (export.gguf: false)" and not list(out.glob("*.gguf"))

    # the exported model carries the training prompt, so translate needs no params.yaml for it
    cfg = json.loads((hf / "training_config.json").read_text(encoding="utf-8"))
    assert cfg["prompt"]["format"]["system_prompt"] == BASE_PARAMS["format"]["system_prompt"]
    assert cfg["prompt"]["opencc"] == "t2s" and cfg["max_seq_length"] == 256
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]  # no temporary directory left


@pytest.mark.bad_input
def test_missing_model_and_bad_params_are_clear_errors(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="model directory not found"):
        export.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"),
                     "--params", str(params)])
    with pytest.raises(PipelineError, match="export.dtype must be one of bf16, fp16"):
        export.check_export_params({**EXPORT_PARAMS, "dtype": "fp32"})
    with pytest.raises(PipelineError, match="export.gguf_quantize must be none or llama.cpp types"):
        export.check_export_params({**EXPORT_PARAMS, "gguf_quantize": ["Q4-K"]})
    assert export.quantize_list("q4_k_m") == ["Q4_K_M"] and export.quantize_list("none") == export.quantize_list([]) == []


def test_export_stage_is_out_of_plain_dvc_repro():
    """`dvc repro` runs the stages of ./dvc.yaml (and what they depend on); export lives in export/dvc.yaml,
    so only `dvc repro export/dvc.yaml` runs it. Its command must match the script's arguments."""
    root = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    assert "export" not in root["stages"]
    stage = yaml.safe_load((REPO / "export" / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["export"]
    assert stage["wdir"] == ".." and export.PIPELINE_STAGE == "export/dvc.yaml:export"
    assert stage["cmd"].startswith("python -m stages.export ")
    assert set(stage["params"]) == {"export"}  # the prompt comes with the model, not from params.yaml
    assert "models/adapter" in stage["deps"] and "stages/export.py" in stage["deps"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert outs == ["models/export", "reports/export.json"]
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    export.check_export_params(params["export"])
