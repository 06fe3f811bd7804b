"""The train stage on a tiny project, as tests/test_train.py runs it: a tiny Llama with a tokenizer saved under a root,
48 train / 8 valid rows of formatted 论语 JSONL, the shipped train: section sized for it, and the stage run through
main() (or train(), or a fresh interpreter). conftest.py builds the projects once a session (`tiny_train`: a BPE
tokenizer trained on the rows; `tiny_train_bytes`: byte-level, no merges).

    summary, paths = run_train(tiny_train, tmp_path, max_steps=2)   # summary.json + metrics.json + timings
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import shipped
from tiny import LUNYU_PAIRS, tiny_llama

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "你是翻译家。"
# the params train records as the model's prompt (format:, clean.opencc), as in the rows below
PROMPT = {"format": {"system_prompt": SYSTEM, "user_template": "翻译：\n{classical}", "context_sentences": 0,
                     "context_template": "上文：{context}\n"}, "clean": {"opencc": "t2s"}}
TOKENIZER_TEXTS = [SYSTEM] + [s + t for s, t in LUNYU_PAIRS] + ["system user assistant 翻译：\n"] * 3


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        src, tgt = LUNYU_PAIRS[i % len(LUNYU_PAIRS)]
        out.append({
            "id": f"论语-{i}", "book": "论语", "chapter": "学而", "line": i, "source": src, "target": tgt,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "翻译：\n" + src},
                         {"role": "assistant", "content": tgt}],
        })
    return out


def tiny_project(root: Path, tok, max_positions: int) -> dict:
    """A tiny Llama with this tokenizer saved under root, and 48 train / 8 valid rows of formatted JSONL."""
    model_dir = root / "tiny-llama"
    tiny_llama(tok, max_position_embeddings=max_positions).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "format"
    data.mkdir()
    for name, n in (("train", 48), ("valid", 8)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(n)), encoding="utf-8")
    return {"model": str(model_dir), "train": data / "train.jsonl", "valid": data / "valid.jsonl"}


def tiny_train_params(model: str, **overrides) -> dict:
    """The shipped train: section, sized for the tiny model (4 steps of 4 rows, eval and checkpoint every 2)."""
    tiny = dict(model=model, backend="hf", max_seq_length=128, batch_tokens=0, batch_size=4, max_steps=4, warmup_steps=0,
                learning_rate=0.01, logging_steps=1, eval_steps=2, eval_samples=8, save_steps=2, lora_r=4, lora_alpha=8)
    return shipped("train", **{**tiny, **overrides})


def run_train(project, tmp_path, name="run", callbacks=(), subprocess=False, **overrides) -> tuple[dict, dict]:
    """Run the stage on a tiny project through main() with a params.yaml (or train() when callbacks are given; or
    `python -m stages.train` in a fresh interpreter, for unsloth, which must be imported first)."""
    from stages import train as train_stage

    params = {**tiny_train_params(project["model"]), **overrides}
    base = tmp_path / name
    paths = {"out": base / "adapter", "checkpoints": base / "checkpoints", "reports": base / "reports",
             "timings": base / "timings" / "train.json"}
    if callbacks:
        cfg = train_stage.resolve_config(params)
        prompt = train_stage.resolve_prompt(PROMPT["format"], PROMPT["clean"]["opencc"])
        train_stage.train(cfg, project["train"], project["valid"], paths["out"], paths["checkpoints"], paths["reports"],
                          callbacks, prompt=prompt, timings=paths["timings"])
    else:
        base.mkdir(parents=True, exist_ok=True)
        (base / "params.yaml").write_text(yaml.safe_dump({"train": params, **PROMPT}, allow_unicode=True), encoding="utf-8")
        argv = [
            "--train", str(project["train"]), "--valid", str(project["valid"]), "--out", str(paths["out"]),
            "--checkpoints", str(paths["checkpoints"]), "--reports", str(paths["reports"]),
            "--params", str(base / "params.yaml"), "--timings", str(paths["timings"]),
        ]
        if subprocess:
            import subprocess as sp
            import sys

            proc = sp.run([sys.executable, "-m", "stages.train", *argv], cwd=REPO, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            train_stage.main(argv)
    summary = json.loads((paths["reports"] / "summary.json").read_text())
    # the run's measurements (times, tokens/s, memory, device) are in --timings only (git-ignored, no DVC output)
    summary.update(json.loads((paths["reports"] / "metrics.json").read_text()))
    summary.update(json.loads(paths["timings"].read_text()))
    return summary, paths
