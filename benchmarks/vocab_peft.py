"""Which peft option trains the added tokens' rows: trainable_token_indices or modules_to_save.

On SmolLM2-135M-Instruct (CPU, fp32, tied embeddings) extended with the CJK characters seen >= 5 times in
the built-in 史记 corpus (wenyan.vocab), LoRA r 16 on all linear layers plus either
  - trainable_token_indices = the new ids (what wenyan.vocab.lora_vocab_kwargs returns), or
  - modules_to_save = [embed_tokens, lm_head] (ensure_weight_tying, what unsloth turns on by itself):
trainable parameters, seconds per optimizer step (batch 8 x the first 史记 examples), adapter size on disk,
and whether the saved adapter, loaded on a fresh base resized to len(tokenizer) (as evaluate does), gives
the trained model's logits.

Run:  python benchmarks/vocab_peft.py [--corpus DIR] [--out reports/benchmarks/vocab_peft.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from wenyan import models, vocab
from wenyan.training import examples as training_examples
from wenyan.files import write_json

SHIJI = Path("data/corpus/classical-modern/双语数据/史记")  # the built-in corpus, relative to the repository root
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shiji_pairs(corpus: Path) -> list[tuple[str, str]]:
    out = []
    for source in sorted(corpus.rglob("source.txt")):
        src = source.read_text(encoding="utf-8").splitlines()
        tgt = source.with_name("target.txt").read_text(encoding="utf-8").splitlines()
        out += [(s, t) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    return out


def batch_of(tokenizer, pairs) -> dict:
    import torch

    rows = [{"messages": [{"role": "system", "content": "你是翻译家。"},
                          {"role": "user", "content": f"将下面的文言文翻译成现代汉语：\n{s}"},
                          {"role": "assistant", "content": t}]} for s, t in pairs]
    examples, _ = training_examples.build_examples(tokenizer, rows, 256, "bench")
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (n - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([e["completion_mask"] + [0] * (n - len(e["input_ids"])) for e in examples])
    attention = torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.where(mask == 1, ids, -100)}


def measure(option: str, tokenizer, base_tokenizer, new_tokens, batch, steps: int = 4) -> dict:
    import torch

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = models.load_model("smollm2-135m-instruct")
    ids = vocab.extend_embeddings(model, tokenizer, new_tokens, base_tokenizer)
    extra = (vocab.lora_vocab_kwargs(model, ids, "lora") if option == "trainable_token_indices"
             else {"modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS, **extra))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"save_embedding_layers": False} if option == "trainable_token_indices" else {}
        model.save_pretrained(tmp, **kwargs)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        fresh = models.load_model("smollm2-135m-instruct")
        fresh.resize_token_embeddings(len(tokenizer))  # as evaluate/export do: new rows are not the trained ones
        reloaded = PeftModel.from_pretrained(fresh, tmp).eval()
        with torch.no_grad():
            same = torch.allclose(reloaded(**batch).logits, logits, atol=1e-4)
    return {"trainable_params": trainable, "step_s": sorted(times)[len(times) // 2], "losses": losses,
            "adapter_mib": round(size / 2**20, 1), "reload_on_resized_base_same_logits": same}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=SHIJI, help=f"a NiuTrans book directory (default: {SHIJI})")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/vocab_peft.json"), help="the JSON report")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    pairs = shiji_pairs(args.corpus)
    base_tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    new_tokens, stats = vocab.decide("auto", base_tokenizer, [s for s, _ in pairs] + [t for _, t in pairs])
    tokenizer = copy.deepcopy(base_tokenizer)
    vocab.extend_tokenizer(tokenizer, new_tokens)
    batch = batch_of(tokenizer, pairs[:8])
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": shlex.join(["python", "benchmarks/vocab_peft.py", *(sys.argv[1:] if argv is None else argv)]),
        "added_tokens": len(new_tokens),
        "batch": list(batch["input_ids"].shape),
        "options": {o: measure(o, tokenizer, base_tokenizer, new_tokens, batch)
                    for o in ("trainable_token_indices", "modules_to_save")},
        "peft": __import__("peft").__version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
