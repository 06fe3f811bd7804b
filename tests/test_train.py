"""The train stage end to end on a tiny Llama (hidden 32, 2 layers) and a tiny tokenizer (conftest: tiny_train, tiny_train_bytes):
LoRA and full fine-tuning save what evaluate loads, the loss is finite and the weights move, a run killed
half-way and resumed ends where an uninterrupted run ends, and bad params fail before any loading.
GPU tests (unsloth, QLoRA) skip visibly without CUDA."""

from __future__ import annotations

import json
import math

import pytest
import torch


from wenyan import generation, models
from wenyan.training import examples
from wenyan.prompt import CHAT_TEMPLATES, build_messages
from wenyan.files import staging_path
from stages import train as train_stage
from wenyan.errors import PipelineError
from train_run import PROMPT, rows, tiny_train_params
from train_run import run_train as run
from tiny import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

CHATML = CHAT_TEMPLATES["chatml"]


@pytest.fixture(scope="module")
def tiny(tiny_train):
    """A tiny model directory (config.json + weights + tokenizer with a ChatML template) and JSONL data (conftest)."""
    return tiny_train


def test_lora_trains_saves_and_loads_like_evaluate(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    summary, paths = run(tiny, tmp_path)
    for key in ("backend", "model", "method", "trainable_params", "total_params", "steps", "examples",
                "examples_dropped_truncation", "tokens_seen", "completion_tokens_seen", "wall_time_s",
                "tokens_per_s", "completion_tokens_per_s", "peak_memory_mib", "final_train_loss",
                "final_eval_loss", "device"):
        assert key in summary, key
    assert summary["backend"] == "hf" and summary["method"] == "lora" and summary["steps"] == 4
    assert 0 < summary["trainable_params"] < summary["total_params"]
    # 4 steps of 4 rows: only those 16 of the 48 rows are tokenised (steps_examples), the same ones every run
    assert summary["examples"] == 16 and summary["train_data"]["rows"] == 16 and summary["examples_dropped_truncation"] == 0
    assert summary["train_data"]["rows_in_split"] == 48
    assert 0 < summary["completion_tokens_seen"] < summary["tokens_seen"]
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])
    out = paths["out"]
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["model"] == tiny["model"] and cfg["backend"] == "hf" and cfg["saved"] == "adapter"
    assert cfg["end_of_turn_token"] == "<|im_end|>"
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: training moved it
    assert not list(out.parent.glob(".adapter.tmp*"))  # written atomically
    # what the evaluate stage does
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML
    model = PeftModel.from_pretrained(models.load_model(cfg["model"]), out)
    ids = tokenizer.apply_chat_template(rows(1)[0]["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.isfinite(model(**ids).logits).all()
    # dvclive plots by step, for dvc.yaml (dvclive is a core dependency: always there)
    loss_tsv = (paths["reports"] / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss_tsv[0] == "step\tloss" and len(loss_tsv) == 1 + 4
    eval_tsv = (paths["reports"] / "plots" / "metrics" / "eval" / "loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in eval_tsv] == ["step", "0", "2", "4"]  # from before the first step: a curve
    # what the run measured is in --timings only, never in a DVC output (summary.json, metrics.json, the plots)
    for name in ("summary.json", "metrics.json"):
        assert not set(train_stage.MEASUREMENTS) & set(json.loads((paths["reports"] / name).read_text())), name
    assert sorted(p.name for p in (paths["reports"] / "plots" / "metrics" / "train").iterdir()) == ["learning_rate.tsv", "loss.tsv"]
    timings = json.loads(paths["timings"].read_text())
    assert set(train_stage.MEASUREMENTS) <= set(timings) and timings["tokens_per_s"] > 0
    assert [point["step"] for point in timings["curve"]] == [1, 2, 3, 4] and all(p["tokens_per_s"] > 0 for p in timings["curve"])


def test_full_fine_tuning_changes_the_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    summary, paths = run(tiny, tmp_path, method="full", learning_rate=0.001, eval_steps=0, save_steps=0)
    assert summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert math.isfinite(summary["final_train_loss"])
    before = load_file(f"{tiny['model']}/model.safetensors")
    after = load_file(paths["out"] / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((paths["out"] / "training_config.json").read_text())["saved"] == "model"


class Killed(Exception):
    """What kill_at's callback raises: a run stopped half-way."""


def kill_at(step: int, event: str):
    """A TrainerCallback that raises Killed at `event` (on_save, on_step_end, ...) of step `step`."""
    from transformers import TrainerCallback

    def hook(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise Killed

    return type("Kill", (TrainerCallback,), {event: hook})()


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(tiny, tmp_path):
    common = dict(max_steps=6, save_steps=3, eval_steps=0)
    whole, _ = run(tiny, tmp_path, "whole", **common)
    with pytest.raises(Killed):
        run(tiny, tmp_path, "killed", callbacks=[kill_at(3, "on_save")], **common)
    again, _ = run(tiny, tmp_path, "again", **common)
    assert again["final_train_loss"] == whole["final_train_loss"]  # runs repeat (LoRA init is seeded)
    resumed, paths = run(tiny, tmp_path, "killed", resume=True, **common)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert resumed["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-4)
    assert resumed["final_eval_loss"] == pytest.approx(whole["final_eval_loss"], rel=1e-4)
    # a fresh run (resume: false) clears the old checkpoints first
    run(tiny, tmp_path, "killed", max_steps=2, save_steps=0, eval_steps=0)
    assert not list(paths["checkpoints"].glob("checkpoint-*"))


def test_named_template_adds_its_tokens_and_trains_them(tiny, tmp_path):
    """The tiny tokenizer lacks Llama-3.1's header and end-of-turn tokens: they are added, the embeddings
    resized, and those rows trained with the adapter; evaluate resizes the base to training_config's vocab_size."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    summary, paths = run(tiny, tmp_path, chat_template="llama-3.1", eval_steps=0)
    assert math.isfinite(summary["final_train_loss"])
    cfg = json.loads((paths["out"] / "training_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(paths["out"])
    assert cfg["end_of_turn_token"] == "<|eot_id|>" and len(cfg["added_tokens"]) == 3
    assert len(tokenizer) == cfg["vocab_size"] and "<|start_header_id|>" in tokenizer.chat_template
    weights = load_file(paths["out"] / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in weights)  # the new rows are part of the adapter
    assert not any("embed_tokens.base_layer" in k or k.endswith("embed_tokens.weight") for k in weights)
    ids = tokenizer.apply_chat_template(rows(1)[0]["messages"], return_tensors="pt", return_dict=True)
    logits = []
    for seed in (1, 2):  # resizing initialises the new rows at random: the adapter's rows must replace them
        torch.manual_seed(seed)
        base = models.load_model(cfg["model"])
        base.resize_token_embeddings(cfg["vocab_size"])
        model = PeftModel.from_pretrained(base, paths["out"]).eval()
        logits.append(model(**ids).logits)
    assert torch.allclose(logits[0], logits[1])


@pytest.mark.bad_input
def test_resume_refuses_checkpoints_of_another_run(tiny, tmp_path):
    run(tiny, tmp_path, "a", max_steps=2, eval_steps=0)
    with pytest.raises(PipelineError, match="lora_r"):
        run(tiny, tmp_path, "a", max_steps=4, eval_steps=0, resume=True, lora_r=8)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lerning_rate": 1e-4}, "unknown key.*'lerning_rate' \\(did you mean 'learning_rate'\\?\\)"),
        ({"chat_template": "vicuna"}, "chat_template 'vicuna' is unknown"),
        ({"model": "/nonexistent/tiny-model"}, "neither an existing path nor a hub id"),
        ({"model": "missing.gguf"}, "GGUF file missing.gguf does not exist"),
        ({"method": "dora"}, "train.method must be one of"),
        ({"batch_size": "eight"}, "should be int"),
        ({"max_seq_length": 0}, "max_seq_length must be > 0"),
        ({"method": "full", "load_in_4bit": True}, "cannot train a 4-bit base"),
    ],
)
def test_bad_params_fail_before_any_loading(tiny, tmp_path, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("got past parameter checking")

    monkeypatch.setattr(train_stage, "pick_backend", no_loading)
    with pytest.raises(PipelineError, match=message):
        run(tiny, tmp_path, **overrides)


def test_rows_per_batch_follows_the_token_budget():
    assert examples.rows_per_batch([100, 300], 4096, 8) == 20
    assert examples.rows_per_batch([5000], 4096, 8) == 1
    assert examples.rows_per_batch([100], 0, 8) == 8


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + unsloth")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_unsloth_backend_trains(tiny, tmp_path, method):
    summary, paths = run(tiny, tmp_path, backend="unsloth", method=method, max_steps=3, eval_steps=0,
                         learning_rate=0.001 if method == "full" else 0.01, subprocess=True)
    assert summary["backend"] == "unsloth" and summary["padding_free"] is False  # auto: padded, grouped by length
    assert math.isfinite(summary["final_train_loss"]) and summary["peak_memory_kind"] == "torch.cuda.max_memory_allocated"
    assert (paths["out"] / "training_config.json").is_file()


@pytest.mark.gpu
@needs_cuda
def test_hf_backend_qlora_on_gpu(tiny, tmp_path):
    summary, _ = run(tiny, tmp_path, backend="hf", method="qlora", max_steps=3, eval_steps=0, subprocess=True)
    assert summary["backend"] == "hf" and summary["load_in_4bit"] is True
    assert math.isfinite(summary["final_train_loss"])


@pytest.mark.bad_input
def test_a_failed_run_leaves_the_last_reports_as_they_were(tiny, tmp_path):
    """dvclive writes as training goes: into a staging directory, swapped in only when the run ends."""
    _, paths = run(tiny, tmp_path, "r", eval_steps=0, save_steps=0)
    before = {p: p.read_bytes() for p in sorted(paths["reports"].rglob("*")) if p.is_file()}
    assert paths["reports"] / "summary.json" in before
    with pytest.raises(Killed):
        run(tiny, tmp_path, "r", callbacks=[kill_at(2, "on_step_end")], eval_steps=0, save_steps=0, learning_rate=0.02)
    after = {p: p.read_bytes() for p in sorted(paths["reports"].rglob("*")) if p.is_file()}
    assert after == before
    # the next good run replaces them, and clears what the killed one left
    summary, _ = run(tiny, tmp_path, "r", eval_steps=0, save_steps=0, learning_rate=0.02)
    assert summary["steps"] == 4
    assert not staging_path(paths["reports"]).exists()
    assert (paths["reports"] / "summary.json").read_bytes() != before[paths["reports"] / "summary.json"]


# The first training losses of the tiny model, pinned (torchtune's recipe tests do the same): a silent change of
# the recipe (tokenization, masking, loss, optimizer, LoRA init, seeding) fails here. Recompute them only for a
# deliberate change, and say why in the commit.
PINNED_LOSSES = {
    # recomputed for issue 23: a max_steps run tokenises and trains on only max_steps x batch rows (steps_examples:
    # the 16 rows of a seeded order, not all 48), so the batches, hence the losses, changed
    "lora": [5.985540866851807, 5.957902908325195, 5.965929985046387, 5.934595108032227],  # learning rate 0.01
    "full": [5.985540866851807, 5.934212684631348, 5.958390712738037, 5.883366584777832],  # learning rate 0.001
}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_first_losses_are_pinned(tiny, tmp_path, method):
    cfg = train_stage.resolve_config(tiny_train_params(tiny["model"], method=method, eval_steps=0, save_steps=0,
                                                       learning_rate=0.01 if method == "lora" else 0.001))
    prompt = train_stage.resolve_prompt(PROMPT["format"], PROMPT["clean"]["opencc"])
    summary = train_stage.train(cfg, tiny["train"], None, tmp_path / "out", tmp_path / "ckpt", tmp_path / "reports",
                                prompt=prompt)
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses == pytest.approx(PINNED_LOSSES[method], rel=1e-4)


@pytest.fixture(scope="module")
def tiny_bytes(tiny_train_bytes):
    """The tiny data with a byte-level tokenizer without merges (conftest): train.extend_vocab auto extends it."""
    return tiny_train_bytes


@pytest.mark.parametrize("method", ["lora", "full"])
def test_extended_vocabulary_trains_saves_and_translates(tiny_bytes, tmp_path, method):
    """extend_vocab auto on a tokenizer spending ~3 tokens a character: the train split's characters become
    tokens, the examples shrink, the model trains (LoRA trains the new rows), and the saved model + tokenizer
    load back through models.load_trained and translate with text that round-trips."""
    none, _ = run(tiny_bytes, tmp_path, name="none", method=method, extend_vocab="none", max_seq_length=512,
                  eval_steps=0, save_steps=0)
    summary, paths = run(tiny_bytes, tmp_path, name="auto", method=method, extend_vocab="auto", max_seq_length=512,
                         eval_steps=0, save_steps=0)
    assert none["added_tokens"] == 0 and summary["extend_vocab"] == "auto"
    characters = {c for r in rows(48) for m in r["messages"] for c in m["content"] if "\u4e00" <= c <= "\u9fff"}
    assert 0 < summary["added_tokens"] <= len(characters) + 20
    before, after = summary["tokens_per_cjk_char"]  # characters seen < 5 times stay byte pieces
    assert before > 2.5 and after < before - 0.5
    assert summary["mean_example_tokens"] < none["mean_example_tokens"] * 0.8
    assert math.isfinite(summary["final_train_loss"])
    cfg = json.loads((paths["out"] / "training_config.json").read_text())
    assert cfg["extend_vocab"]["added"] == summary["added_tokens"] and cfg["vocab_size"] == len(byte_tokenizer()) + summary["added_tokens"]
    trained = models.load_trained(paths["out"], backend="hf", device="cpu", dtype=torch.float32)
    assert len(trained.tokenizer) == cfg["vocab_size"]
    text = "子曰：学而时习之，不亦说乎？ABC 123"
    assert trained.tokenizer.decode(trained.tokenizer(text, add_special_tokens=False).input_ids) == text
    if method == "lora":  # the new rows were trained: they moved from their byte-piece means
        embed = trained.model.get_input_embeddings().weight
        base = models.load_model(tiny_bytes["model"]).get_input_embeddings().weight
        assert embed.shape[0] == cfg["vocab_size"] and base.shape[0] < embed.shape[0]
    sources = [r["source"] for r in rows(2)]
    prompts = [build_messages(s, None, [], trained.prompt["format"]) for s in sources]
    texts, _ = generation.generate(trained.model, trained.tokenizer, prompts, sources, batch_size=2, factor=1.0, extra=4)
    assert len(texts) == 2 and all("\ufffd" not in t for t in texts)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["some", 0, -3, 2.5, True, None])
def test_bad_extend_vocab_is_one_clear_error(tiny, value):
    with pytest.raises(PipelineError, match="extend_vocab"):
        train_stage.resolve_config(tiny_train_params(tiny["model"], extend_vocab=value))


def test_parallel_tokenizing_gives_the_serial_examples_in_order(tiny, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    data = rows(40)
    serial, serial_stats = examples.build_examples(tokenizer, data, 128, "train")
    monkeypatch.setattr(examples, "PARALLEL_ROWS", 10)
    monkeypatch.setattr(examples.os, "cpu_count", lambda: 3)
    parallel, parallel_stats = examples.build_examples(tokenizer, data, 128, "train")
    assert parallel == serial and parallel_stats == serial_stats


def test_model_card_names_a_public_base_never_a_local_path(tiny, tmp_path):
    """models/adapter/README.md (over peft's blank card, whose base_model was the local models/base/... path): the
    hub id of a built-in base (through the pretrain stage too), a hub id as given, none for a local directory."""
    _, paths = run(tiny, tmp_path)
    card = (paths["out"] / "README.md").read_text(encoding="utf-8")
    meta = card.split("---")[1]
    assert "base_model" not in meta and str(tiny["model"]) not in card  # a local base: no base_model line at all
    assert "pipeline_tag: translation" in meta and "library_name: peft" in meta
    assert "{classical}" in card and "tools.translate --model adapter" in card
    assert train_stage.public_base({"model": "gemma-3-270m"}) == "google/gemma-3-270m"
    assert train_stage.public_base({"model": "models/pretrain", "pretrained": {"base_model": "smollm2-135m-instruct"}}) \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert train_stage.public_base({"model": "unsloth/Llama-3.2-1B-Instruct"}) == "unsloth/Llama-3.2-1B-Instruct"
    assert train_stage.public_base({"model": str(tmp_path)}) is None
