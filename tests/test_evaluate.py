"""Tests of the evaluate stage on CPU, offline: a tiny Llama with a character-level tokenizer and a
chatml template, and a tiny LoRA adapter on it, all built here; under evaluate.num_gpus, two gloo processes write
the reports of one."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from wenyan import distributed, generation, models
from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets
from stages import evaluate, evaluate_base
from wenyan.metrics import check_test_rows, score, select_evaluated
from conftest import BASE_PARAMS, shipped
from tiny import char_tokenizer, tiny_llama
from wenyan.errors import PipelineError
from wenyan.files import write_jsonl
from wenyan.prompt import CHAT_TEMPLATES

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "你是一位精通古汉语的翻译家。"
PAIRS = [  # (book, chapter, source, target), after the clean stage's t2s
    ("论语", "学而", "学而时习之，不亦说乎？", "学习了又时常温习和练习，不是很愉快吗？"),
    ("论语", "学而", "有朋自远方来，不亦乐乎？", "有志同道合的人从远方来，不是很令人高兴的吗？"),
    ("论语", "学而", "人不知而不愠，不亦君子乎？", "人家不了解我，我也不怨恨，不也是一个有德的君子吗？"),
    ("论语", "为政", "温故而知新，可以为师矣。", "温习旧知识从而得知新的理解与体会，凭借这一点就可以成为老师了。"),
    ("孟子", "梁惠王上", "老吾老，以及人之老；幼吾幼，以及人之幼。", "尊敬自己的长辈，从而推广到尊敬别人的长辈；爱护自己的孩子，从而推广到爱护别人的孩子。"),
    ("孟子", "公孙丑下", "得道者多助，失道者寡助。", "拥有道义的人，帮助他的人就多；失去道义的人，帮助他的人就少。"),
    ("孟子", "公孙丑下", "天时不如地利，地利不如人和。", "有利的天时比不上有利的地势，有利的地势比不上人心所向。"),
    ("史记", "伯夷列传", "此何以称焉？", "这又如何颂扬他们呢？"),
    ("史记", "伯夷列传", "及夏之时，有卞随、务光者。", "到了夏朝，又出现了不接受商汤让位的卞随、务光。"),
    ("史记", "伯夷列传", "示天下重器，王者大统，传天下若斯之难也。", "这表示天下是极贵重的宝器，帝王是极重要的统绪，所以传授政权是如此地郑重审慎啊！"),
    ("史记", "伯夷列传", "而说者曰尧让天下于许由，许由不受，耻之逃隐。", "可是诸子杂记里说：唐尧想把天下让给许由，许由不仅不接受，反而以此为耻辱，于是逃走隐居起来。"),
    ("史记", "伯夷列传", "孔子序列古之仁圣贤人，如吴太伯、伯夷之伦详矣。余以所闻由、光义至高，其文辞不少概见，何哉？", "孔子依次论列古代的仁人、圣人、贤人，如吴太伯、伯夷这些人，都非常详细。我所听说的许由、务光德义是极高的，可是经书里连个大概的记载都没有，这是为什么呢？"),
    ("史记", "项羽本纪", "项籍少时，学书不成，去。", "项籍小时候，学习认字写字，没有学成。"),
    ("史记", "项羽本纪", "学剑，又不成。", "放弃了学字，改学击剑，又没有学成。"),
    ("史记", "项羽本纪", "项梁怒之。", "项梁很生他的气。"),
    ("史记", "项羽本纪", "剑一人敌，不足学，学万人敌。", "剑也只能抵敌一人，不值得学，要学能抵抗万人的。"),
]
TRADITIONAL = "漢國學說們這為與東車馬書長"  # in the vocabulary, so the random model emits some of them


def make_rows(pairs=PAIRS) -> list[dict]:
    rows = []
    for n, (book, chapter, source, target) in enumerate(pairs, 1):
        rows.append({
            "id": f"{book}-{n}", "book": book, "chapter": chapter, "line": n, "source": source, "target": target,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"将下面的文言文翻译成现代汉语：\n{source}"},
                {"role": "assistant", "content": target},
            ],
        })
    return rows


def make_tokenizer():
    return char_tokenizer(SYSTEM + "将下面的文言文翻译成现代汉语：\n " + TRADITIONAL + "".join(s + t for _, _, s, t in PAIRS))


def make_model(tokenizer, seed=0):
    return tiny_llama(tokenizer, seed, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """models/base-like directory, a LoRA adapter directory and a full fine-tuned model directory."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    base = make_model(tokenizer)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    training_config = {"model": str(base_dir), "chat_template": None, "max_seq_length": 256, "backend": "hf",
                       "prompt": {"format": BASE_PARAMS["format"], "opencc": "t2s"}}

    torch.manual_seed(1)
    lora = get_peft_model(
        make_model(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter_dir = root / "adapter"
    lora.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "training_config.json").write_text(json.dumps(training_config))

    full_dir = root / "full"
    make_model(tokenizer, seed=2).save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    (full_dir / "training_config.json").write_text(json.dumps(training_config))
    return {"tokenizer": tokenizer, "base": base, "base_dir": base_dir, "adapter": adapter_dir, "full": full_dir}


def write_params(path: Path, base_model: str = "", **evaluate_params) -> Path:
    params = {
        "train": shipped("train", model=base_model, chat_template=None, backend="hf"),
        "evaluate": shipped("evaluate", **{"num_samples": 0, "batch_size": 4, "bootstrap_resamples": 100, "num_examples": 8,
                                       "max_new_tokens_factor": 1.0, "max_new_tokens_extra": 4, **evaluate_params}),
    }
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


def run_base(test: Path, out: Path, params: Path, base_dir: Path) -> Path:
    """The base and evaluate_base stages, as dvc.yaml runs them: models/base, then the base outputs."""
    from stages import base

    base.main(["--out", str(out / "models-base"), "--params", str(params)])
    base_outputs = out / "base_outputs.jsonl"
    evaluate_base.main(["--test", str(test), "--base", str(out / "models-base"), "--out", str(base_outputs),
                        "--params", str(params)])
    return base_outputs


def run_stage(tmp_path: Path, model_dir: Path, rows=None, opencc="t2s", tag="run", base_outputs=None,
              **evaluate_params) -> Path:
    """evaluate_base (unless base_outputs are given) then evaluate, in tmp_path/tag."""
    out = tmp_path / tag
    test = out / "test.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(test, make_rows() if rows is None else rows)
    cfg = json.loads((model_dir / "training_config.json").read_text())
    if cfg["prompt"]["opencc"] != opencc:  # a model trained with another clean.opencc: a copy recording it
        model_dir = shutil.copytree(model_dir, out / "model")
        cfg["prompt"]["opencc"] = opencc
        (model_dir / "training_config.json").write_text(json.dumps(cfg))
    params = write_params(out / "params.yaml", base_model=cfg["model"], **evaluate_params)
    if base_outputs is None:
        base_outputs = run_base(test, out, params, Path(cfg["model"]))
    evaluate.main([
        "--test", str(test), "--model", str(model_dir), "--metrics", str(out / "metrics.json"),
        "--out-dir", str(out / "evaluate"), "--hypotheses", str(out / "hypotheses.jsonl"),
        "--params", str(params), "--base-outputs", str(base_outputs),
    ])
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Generation


def test_batched_generation_with_left_padding_matches_one_at_a_time(tiny):
    """Mixed prompt lengths in one left-padded batch give exactly what one-at-a-time greedy gives."""
    rows = make_rows()
    prompts, sources = [r["messages"][:-1] for r in rows], [r["source"] for r in rows]
    kwargs = dict(factor=1.0, extra=6)
    batched, hit_b = generation.generate(tiny["base"], tiny["tokenizer"], prompts, sources, batch_size=16, **kwargs)
    single, hit_s = generation.generate(tiny["base"], tiny["tokenizer"], prompts, sources, batch_size=1, **kwargs)
    assert len({len(s) for s in sources}) > 5  # the batch really mixes lengths
    assert batched == single and hit_b == hit_s
    assert all(batched)
    # the prompt is not in the output: the output is only what the model added after it
    assert not any("将下面的文言文" in text or "assistant" in text for text in batched)


def one_at_a_time(model, tok, prompts, budgets, eot):
    """The notebook's way: plain transformers generate(), one unpadded prompt a call."""
    texts, hits = [], []
    for messages, budget in zip(prompts, budgets):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=budget, do_sample=False, eos_token_id=[eot],
                             pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        hits.append(eot not in out)
        texts.append(tok.decode(out[: out.index(eot)] if eot in out else out, skip_special_tokens=True))
    return texts, hits


def test_own_greedy_loop_matches_transformers_generate_one_sentence_at_a_time(tiny):
    """The CPU loop (shared prefix computed once, finished rows dropped) gives exactly what plain
    generate() gives one prompt at a time, for rows that end their turn at different steps and rows
    cut at their budget, in batches that mix them."""
    tok = tiny["tokenizer"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    model = make_model(tok, seed=3)
    with torch.no_grad():  # make the random model end its turn now and then (5 of 16, after 1 to 27 tokens)
        model.lm_head.weight[eot] *= 2.0
    rows = make_rows()
    prompts, sources = [r["messages"][:-1] for r in rows], [r["source"] for r in rows]
    budgets = token_budgets(tok, sources, 1.0, 6)
    expected = one_at_a_time(model, tok, prompts, budgets, eot)
    assert 3 <= sum(expected[1]) <= len(rows) - 3, "want some rows ending their turn and some hitting the budget"
    ended = [len(tok(t, add_special_tokens=False).input_ids) for t, hit in zip(*expected) if not hit]
    assert len(set(ended)) > 2, "rows should end their turn at different steps"
    for batch_size in (16, 5, 1):
        assert generation.generate(model, tok, prompts, sources, batch_size=batch_size, factor=1.0, extra=6,
                                 eos_token_ids=[eot], loop="own") == expected
    assert generation.generate(model, tok, prompts, sources, batch_size=16, factor=1.0, extra=6, eos_token_ids=[eot],
                             loop="hf") == expected
    length, cache = generation.shared_prefix(model, prompt_ids(tok, prompts))
    assert length == len(tok(tok.apply_chat_template([prompts[0][0]], tokenize=False) + "<|im_start|>user\n将下面的文言文翻译成现代汉语：\n",
                             add_special_tokens=False).input_ids) and cache.get_seq_length() == length


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: generate() appends a scripted continuation to each prompt, chosen by
    the prompt's unpadded length, padded like transformers pads finished rows."""

    def __init__(self, scripts: dict[int, list[int]], pad_id: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.pad_id, self.calls = scripts, pad_id, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append({"shape": tuple(input_ids.shape), "max_new_tokens": max_new_tokens, **kwargs})
        assert (attention_mask[:, -1] == 1).all(), "left padding: every prompt ends at the last column"
        rows = []
        for mask in attention_mask:
            new = self.scripts[int(mask.sum())][:max_new_tokens]
            rows.append(new + [self.pad_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


def test_generation_slices_at_input_length_stops_at_end_of_turn_and_at_budget(tiny):
    tok = tiny["tokenizer"]
    eot, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    rows = make_rows()
    short, long_ = rows[7], rows[11]  # 6 and 47 source characters
    prompts = [short["messages"][:-1], long_["messages"][:-1]]
    length = lambda r: len(ids(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)))  # noqa: E731
    echo = ids(short["source"])  # the model repeats the prompt's text, within its budget of 1.5 x 6 + 3
    model = ScriptedModel({
        length(short): echo + [eot] + ids("天下大乱"),  # ends its turn; what follows is dropped
        length(long_): ids("天下" * 200),  # never ends its turn: cut at its own budget
    }, pad)
    texts, hit = generation.generate(model, tok, prompts, [short["source"], long_["source"]],
                                   batch_size=2, factor=1.5, extra=3, eos_token_ids=[eot], loop="hf")
    # sliced at the input length, not by searching for the prompt's text
    assert texts[0] == short["source"] and not hit[0]
    budget_long = math.ceil(1.5 * len(long_["source"])) + 3  # one token a character
    assert texts[1] == ("天下" * 200)[:budget_long] and hit[1]
    # one call for both, with the longer sentence's budget; greedy; stops at the end-of-turn token
    (call,) = model.calls
    assert call["max_new_tokens"] == budget_long and call["num_beams"] == 1 and call["do_sample"] is False
    assert call["eos_token_id"] == [eot]


def test_end_of_turn_ids_and_beam_search_run(tiny):
    tok = tiny["tokenizer"]
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    rows = make_rows()[:3]
    texts, _ = generation.generate(tiny["base"], tok, [r["messages"][:-1] for r in rows], [r["source"] for r in rows],
                                 batch_size=3, num_beams=2, factor=0.5, extra=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_merged_adapter_generates_like_unmerged_and_disable_adapter_gives_the_base(tiny):
    """On CPU load_finetuned merges the LoRA weights; disable_adapter() must still give the base model."""
    from peft import PeftModel

    from wenyan import generation, models
    from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets

    cfg = models.read_training_config(tiny["adapter"])
    trained = models.load_trained(tiny["adapter"], backend="hf")
    tok, merged, is_adapter = trained.tokenizer, trained.model, trained.is_adapter
    assert is_adapter
    unmerged = PeftModel.from_pretrained(models.load_model(cfg["model"]), str(tiny["adapter"])).eval()
    rows = make_rows()
    args = ([r["messages"][:-1] for r in rows], [r["source"] for r in rows])
    ours = generation.generate(merged, tok, *args, factor=1.0, extra=4)
    assert ours == generation.generate(unmerged, tok, *args, factor=1.0, extra=4)
    with merged.disable_adapter():
        base = generation.generate(merged, tok, *args, factor=1.0, extra=4)
    assert base == generation.generate(tiny["base"], tok, *args, factor=1.0, extra=4) and base != ours


# ----------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.bad_input
def test_a_test_file_of_unseen_books_only_is_a_clear_error():
    rows = [{**r, "unseen_book": True} for r in make_rows()]
    with pytest.raises(PipelineError, match="test.jsonl: all 16 test rows have unseen_book true.*split.test_fraction"):
        check_test_rows(rows, "test.jsonl")
    with pytest.raises(PipelineError, match="test.jsonl:2: field 'unseen_book' should be true or false"):
        check_test_rows([rows[0], {**rows[1], "unseen_book": "yes"}], "test.jsonl", [1, 2])


@pytest.mark.bad_input
def test_hypotheses_get_the_clean_stage_normalisation_and_opencc():
    assert evaluate.postprocess(["漢語學說", "  天下\n大乱 ,\t "], "t2s") == ["汉语学说", "天下大乱，"]
    assert evaluate.postprocess(["漢語"], "none") == ["漢語"]
    with pytest.raises(PipelineError, match="no-such-config"):
        evaluate.postprocess(["天下"], "no-such-config")


def test_pick_examples_best_worst_spread():
    chrf = [float(x) for x in range(40)]
    picks = evaluate.pick_examples(chrf, 8)
    assert picks["best"] == [39, 38] and picks["worst"] == [0, 1] and len(picks["spread"]) == 4
    assert set(picks["spread"]).isdisjoint(picks["best"] + picks["worst"])


# ----------------------------------------------------------------------------------------------
# The stage end to end


def test_stage_writes_metrics_breakdowns_samples_and_hypotheses(tiny, tmp_path):
    from sacrebleu.metrics import BLEU, CHRF

    out = run_stage(tmp_path, tiny["adapter"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_sentences"] == len(PAIRS)
    for key in ("bleu", "chrf"):
        assert isinstance(metrics[key], float) and 0 <= metrics[key] <= 100
    assert metrics["bleu_ci95"]["low"] <= metrics["bleu_ci95"]["high"]
    assert set(metrics["baselines"]) == {"copy", "base"}
    # metrics.json holds numbers only (dvc exp show / metrics show stay narrow); the signatures, every system's CI
    # and limits hit are in scores.csv (git-tracked, a plot)
    assert list(metrics)[:3] == ["bleu", "chrf", "baselines"] and not any("signature" in k for k in metrics)
    scores = {r["system"]: r for r in read_csv(out / "evaluate" / "scores.csv")}
    assert set(scores) == {"model", "base", "copy"}
    assert "tok:zh" in scores["model"]["bleu_signature"] and "bs:100" in scores["model"]["bleu_signature"]
    assert "nc:6" in scores["model"]["chrf_signature"]
    assert float(scores["model"]["bleu"]) == metrics["bleu"] and float(scores["copy"]["chrf"]) == metrics["baselines"]["copy"]["chrf"]
    assert float(scores["base"]["bleu_low"]) <= float(scores["base"]["bleu_high"])
    # copy baseline = the classical source as the hypothesis
    sources, refs = [s for _, _, s, _ in PAIRS], [[t for *_, t in PAIRS]]
    assert metrics["baselines"]["copy"]["bleu"] == round(BLEU(tokenize="zh").corpus_score(sources, refs).score, 2)
    assert metrics["baselines"]["copy"]["chrf"] == round(CHRF().corpus_score(sources, refs).score, 2)

    hyps = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert [h["id"] for h in hyps] == [r["id"] for r in make_rows()]
    assert {"book", "chapter", "line", "source", "reference", "hypothesis", "chrf", "base", "base_chrf"} <= set(hyps[0])
    assert [h["hypothesis"] for h in hyps] != [h["base"] for h in hyps]  # disable_adapter() really switched it off
    model_scores = score([h["hypothesis"] for h in hyps], refs[0])
    assert (metrics["bleu"], metrics["chrf"]) == (model_scores["bleu"], model_scores["chrf"])

    by_book = read_csv(out / "evaluate" / "by_book.csv")
    assert list(by_book[0]) == ["book", "n", "bleu", "chrf", "base_bleu", "base_chrf", "copy_bleu", "copy_chrf"]
    assert {r["book"]: int(r["n"]) for r in by_book} == {"论语": 4, "孟子": 3, "史记": 9}
    by_length = read_csv(out / "evaluate" / "by_length.csv")
    assert [r["length"] for r in by_length] == ["1-10", "11-20", "21-40", "41+"]
    assert sum(int(r["n"]) for r in by_length) == len(PAIRS)

    samples = (out / "evaluate" / "samples.md").read_text()
    assert "## Best by sentence chrF" in samples and "## Worst by sentence chrF" in samples
    assert samples.count("- **Source:**") == 8 and samples.count("- **Base output:**") == 8
    best = max(hyps, key=lambda h: (h["chrf"], -hyps.index(h)))
    assert samples.index(best["source"]) < samples.index("## Worst")


def unseen_rows(unseen=("孟子",)) -> list[dict]:
    """make_rows() as the format stage writes test.jsonl: unseen_book true for the books in unseen."""
    return [{**r, "unseen_book": r["book"] in unseen} for r in make_rows()]


def test_stage_scores_unseen_books_apart_from_the_chapter_test(tiny, tmp_path):
    """The headline numbers are the chapter test's; the unseen books (孟子, 3 rows) get their own block in
    metrics.json and their own rows in scores.csv; the breakdowns, samples and hypotheses cover both. Both stages
    sample each group on its own (num_samples=4: 4 of the 13 chapter-test rows and all 3 unseen)."""
    rows = unseen_rows()
    out = run_stage(tmp_path, tiny["adapter"], rows=rows, num_samples=4)
    metrics = json.loads((out / "metrics.json").read_text())
    hyps = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    base_ids = [json.loads(line)["id"] for line in (out / "base_outputs.jsonl").read_text().splitlines()]
    assert [h["id"] for h in hyps] == base_ids == [r["id"] for r in select_evaluated(rows, 4, shipped("evaluate")["seed"])]
    assert [h["unseen_book"] for h in hyps] == [h["book"] == "孟子" for h in hyps]
    chapter, unseen = [h for h in hyps if not h["unseen_book"]], [h for h in hyps if h["unseen_book"]]
    assert (len(chapter), len(unseen)) == (4, 3)

    assert list(metrics) == ["bleu", "chrf", "baselines", "bleu_ci95", "n_sentences", "hit_max_new_tokens", "unseen_books"]
    block = metrics["unseen_books"]
    assert list(block) == ["bleu", "chrf", "baselines", "bleu_ci95", "n_sentences", "books"]
    assert metrics["n_sentences"] == 4 and block["n_sentences"] == 3 and block["books"] == ["孟子"]
    for group, got in ((chapter, metrics), (unseen, block)):
        refs = [h["reference"] for h in group]
        assert (got["bleu"], got["chrf"]) == tuple(score([h["hypothesis"] for h in group], refs)[k] for k in ("bleu", "chrf"))
        assert got["baselines"]["copy"]["chrf"] == score([h["source"] for h in group], refs)["chrf"]
        assert got["baselines"]["base"]["bleu"] == score([h["base"] for h in group], refs)["bleu"]

    scores = {r["system"]: r for r in read_csv(out / "evaluate" / "scores.csv")}
    assert list(scores) == ["model", "base", "copy", "model@unseen_books", "base@unseen_books", "copy@unseen_books"]
    assert [int(scores[s]["n"]) for s in scores] == [4, 4, 4, 3, 3, 3]
    assert float(scores["model@unseen_books"]["bleu"]) == block["bleu"] and float(scores["model"]["bleu"]) == metrics["bleu"]
    assert scores["copy@unseen_books"]["hit_max_new_tokens"] == "" and "tok:zh" in scores["base@unseen_books"]["bleu_signature"]
    by_book = {r["book"]: int(r["n"]) for r in read_csv(out / "evaluate" / "by_book.csv")}
    assert by_book == {b: sum(h["book"] == b for h in hyps) for b in {h["book"] for h in hyps}} and by_book["孟子"] == 3
    assert sum(int(r["n"]) for r in read_csv(out / "evaluate" / "by_length.csv")) == 7
    samples = (out / "evaluate" / "samples.md").read_text()
    assert samples.count("- **Source:**") == 7 and "(unseen book)" in samples and "unseen books (孟子)" in samples


def test_without_unseen_rows_the_outputs_are_those_of_a_test_file_without_the_field(tiny, tmp_path):
    """Test rows that all have unseen_book false (what format writes for a corpus without held-out books) give
    byte for byte the outputs of rows without the field: no unseen_books block, no extra scores.csv rows."""
    plain = run_stage(tmp_path, tiny["adapter"], tag="plain", num_samples=6)
    marked = run_stage(tmp_path, tiny["adapter"], rows=unseen_rows(unseen=()), tag="marked", num_samples=6,
                       base_outputs=plain / "base_outputs.jsonl")
    for name in ("metrics.json", "hypotheses.jsonl", *(f"evaluate/{f}" for f in evaluate.OUT_DIR_FILES)):
        assert (marked / name).read_bytes() == (plain / name).read_bytes(), name
    assert "unseen_books" not in json.loads((plain / "metrics.json").read_text())
    assert [r["system"] for r in read_csv(plain / "evaluate" / "scores.csv")] == ["model", "base", "copy"]


def test_stage_converts_hypotheses_with_clean_opencc(tiny, tmp_path):
    import opencc

    plain = run_stage(tmp_path, tiny["adapter"], opencc="none", tag="none", baselines=[])
    converted = run_stage(tmp_path, tiny["adapter"], opencc="t2s", tag="t2s", baselines=[])
    read = lambda out: [json.loads(l)["hypothesis"] for l in (out / "hypotheses.jsonl").read_text().splitlines()]  # noqa: E731
    raw, t2s = read(plain), read(converted)
    assert any(ch in TRADITIONAL for text in raw for ch in text), "the tiny model should emit traditional characters"
    assert t2s == [opencc.OpenCC("t2s").convert(text) for text in raw] and t2s != raw
    assert not any(ch in "漢國學說們這為與東車馬書長" for text in t2s for ch in text)
    assert json.loads((converted / "metrics.json").read_text())["baselines"] == {}


def test_full_model_directory_uses_the_base_model_for_the_base_baseline(tiny, tmp_path):
    out = run_stage(tmp_path, tiny["full"], baselines=["base"], num_samples=6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_sentences"] == 6 and set(metrics["baselines"]) == {"base"}
    hyps = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    # the base outputs are the base model's own greedy outputs
    rows = {r["id"]: r for r in make_rows()}
    picked = [rows[h["id"]] for h in hyps]
    expected, _ = generation.generate(tiny["base"], tiny["tokenizer"], [r["messages"][:-1] for r in picked],
                                    [r["source"] for r in picked], factor=1.0, extra=4)
    assert [h["base"] for h in hyps] == evaluate.postprocess(expected, "t2s")
    assert [h["hypothesis"] for h in hyps] != [h["base"] for h in hyps]


@pytest.fixture
def count_generated(monkeypatch):
    """{desc: sentences generated} of every evaluate.generate call the stage makes."""
    counts: dict[str, int] = {}
    real = generation.generate

    def counting(model, tokenizer, prompts, *args, desc="generate", **kwargs):
        counts[desc] = counts.get(desc, 0) + len(prompts)
        return real(model, tokenizer, prompts, *args, desc=desc, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    return counts


def another_adapter(tiny, path: Path) -> Path:
    """A second LoRA adapter on the same tiny base, as another train.* param would give."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    lora = get_peft_model(models.load_model(str(tiny["base_dir"])),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(path)
    tiny["tokenizer"].save_pretrained(path)
    (path / "training_config.json").write_text((tiny["adapter"] / "training_config.json").read_text())
    return path


def test_base_outputs_are_reused_by_a_run_with_another_adapter(tiny, tmp_path, count_generated):
    """evaluate_base generates the base outputs once; evaluate with any adapter only reads them (in the
    pipeline DVC skips evaluate_base while only train.* params change)."""
    first = run_stage(tmp_path, tiny["adapter"], tag="first")
    assert count_generated == {"base": len(PAIRS), "fine-tuned": len(PAIRS)}
    base_outputs = tmp_path / "first" / "base_outputs.jsonl"
    entries = [json.loads(line) for line in base_outputs.read_text().splitlines()]
    assert [e["id"] for e in entries] == [r["id"] for r in make_rows()]

    count_generated.clear()
    second = run_stage(tmp_path, another_adapter(tiny, tmp_path / "adapter2"), tag="second", base_outputs=base_outputs)
    assert count_generated == {"fine-tuned": len(PAIRS)}  # no base sentence generated, no base model loaded
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (first, second)]
    assert metrics[0]["baselines"] == metrics[1]["baselines"]  # base (and copy) scores identical
    hyps = [[json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()] for out in (first, second)]
    assert [h["base"] for h in hyps[0]] == [h["base"] for h in hyps[1]]
    assert [h["hypothesis"] for h in hyps[0]] != [h["hypothesis"] for h in hyps[1]]  # the adapter did change


@pytest.mark.bad_input
def test_base_outputs_must_cover_the_sample(tiny, tmp_path):
    six = run_stage(tmp_path, tiny["adapter"], tag="six", num_samples=6)
    with pytest.raises(PipelineError, match="no base output for .* rerun the evaluate_base stage"):
        run_stage(tmp_path, tiny["adapter"], tag="all", base_outputs=six / "base_outputs.jsonl")
    no_base = run_stage(tmp_path, tiny["adapter"], tag="no-base", baselines=["copy"])
    assert (no_base / "base_outputs.jsonl").read_text() == ""  # DVC expects its declared output even when off


def test_missing_test_file_and_model_dir_are_clear_errors(tiny, tmp_path, capsys):
    from wenyan.errors import run_main

    params = write_params(tmp_path / "params.yaml")
    args = lambda test, model: ["--test", str(test), "--model", str(model), "--metrics", str(tmp_path / "m.json"),  # noqa: E731
                                "--out-dir", str(tmp_path / "e"), "--hypotheses", str(tmp_path / "h.jsonl"),
                                "--params", str(params)]
    with pytest.raises(SystemExit) as exit_info:
        run_main(evaluate.main, args(tmp_path / "missing.jsonl", tiny["adapter"]))
    assert exit_info.value.code == 1
    assert "missing.jsonl: file not found" in capsys.readouterr().err

    test = tmp_path / "test.jsonl"
    write_jsonl(test, make_rows())
    with pytest.raises(PipelineError, match="model directory not found.*train"):
        evaluate.main(args(test, tmp_path / "no-model"))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(PipelineError, match="training_config.json: not found"):
        evaluate.main(args(test, tmp_path / "empty-model"))
    write_jsonl(test, [{"id": "x", "source": "天下", "target": "天下"}])
    with pytest.raises(PipelineError, match="test.jsonl:1: field 'messages' is missing"):
        evaluate.main(args(test, tiny["adapter"]))
    assert not (tmp_path / "m.json").exists()


@pytest.mark.bad_input
def test_bad_params_are_clear_errors():
    with pytest.raises(PipelineError, match="unknown key.*num_sample'.*did you mean 'num_samples'"):
        evaluate.check_evaluate_params({**shipped("evaluate"), "num_sample": 10})
    with pytest.raises(PipelineError, match="baselines: unknown"):
        evaluate.check_evaluate_params(shipped("evaluate", baselines=["copy", "oracle"]))
    with pytest.raises(PipelineError, match="length_buckets"):
        evaluate.check_evaluate_params(shipped("evaluate", length_buckets=[20, 10]))


# ----------------------------------------------------------------------------------------------
# The shipped configuration


def test_params_and_dvc_yaml_match_the_stage():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    evaluate.check_evaluate_params(params["evaluate"])
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    stage = dvc["stages"]["evaluate"]
    argv = shlex.split(stage["cmd"])
    assert argv[:3] == ["python", "-m", "stages.evaluate"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert set(flags) == {"--test", "--model", "--metrics", "--out-dir", "--hypotheses", "--base-outputs"}
    assert {"stages/evaluate.py", "wenyan/generation.py", "wenyan/text.py", "wenyan/files.py", flags["--test"], flags["--model"]} <= set(stage["deps"])
    assert "stages/clean.py" not in stage["deps"]  # evaluate imports library modules only
    assert set(stage["params"]) == {"evaluate"}  # the OpenCC config comes with the model
    assert [next(iter(m)) for m in stage["metrics"]] == [flags["--metrics"]]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"] + stage["plots"]]
    csvs = [f"{flags['--out-dir']}/{name}.csv" for name in ("by_book", "by_length", "scores")]
    assert set(outs) == {flags["--hypotheses"], *csvs, f"{flags['--out-dir']}/samples.md"}
    # DVC's run cache is off for a stage with a plain (not metric or plot) output marked cache: false
    assert all(isinstance(o, str) or next(iter(o.values())).get("cache", True) for o in stage["outs"])
    assert flags["--base-outputs"] in stage["deps"]
    # the base outputs: an ordinary cached stage, skipped while only train.* params change
    base = dvc["stages"]["evaluate_base"]
    base_argv = shlex.split(base["cmd"])
    assert base_argv[:3] == ["python", "-m", "stages.evaluate_base"]
    base_flags = dict(zip(base_argv[3::2], base_argv[4::2]))
    assert base["outs"] == [base_flags["--out"]] and base_flags["--out"] == flags["--base-outputs"]
    assert base_flags["--base"] in base["deps"] and flags["--test"] in base["deps"]
    assert not [p for p in base["params"] if p.startswith("train.") and p not in
                ("train.model", "train.chat_template", "train.backend")]
    assert {f"evaluate.{k}" for k in evaluate_base.BASE_KEYS} <= set(base["params"])
    for name, spec in dvc["stages"].items():  # persist would turn off DVC's run cache
        assert not any(isinstance(o, dict) and next(iter(o.values())).get("persist")
                       for o in spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", [])), name
    # every CSV is a plot of its own output (grouped bars, no top-level plots drawing one twice)
    plotted = {next(iter(o)): next(iter(o.values())) for o in stage["plots"] if isinstance(o, dict)}
    assert set(csvs) <= set(plotted) and "plots" not in dvc
    assert all(plotted[c].get("template") and plotted[c].get("cache") is False for c in csvs)


# ----------------------------------------------------------------------------------------------
# evaluate.num_gpus (was tests/test_evaluate_ddp.py): evaluate and evaluate_base start themselves again under
# torchrun, each process generates its shard of the sentences, rank 0 gathers the outputs in order and alone scores
# and writes. Here on CPU with two gloo processes (what torchrun runs on two GPUs, minus NCCL): the reports are byte
# for byte those of one process. The speed on GPUs waits for a multi-GPU machine.

OUTPUTS = ("metrics.json", "hypotheses.jsonl", "base_outputs.jsonl", "evaluate/by_book.csv",
           "evaluate/by_length.csv", "evaluate/samples.md")


@pytest.mark.parametrize("batch_size, processes", [(3, 2), (4, 3), (16, 2), (1, 4)])
def test_shards_put_together_are_the_one_process_outputs(tiny, batch_size, processes):
    """Every sentence in exactly one shard, and its output is what one process gives (whole batches)."""
    tok = tiny["tokenizer"]
    model = make_model(tok, seed=3)
    with torch.no_grad():  # some rows end their turn early, others run to their budget
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] *= 2.0
    rows = make_rows()
    prompts, sources = [r["messages"][:-1] for r in rows], [r["source"] for r in rows]
    kwargs = dict(batch_size=batch_size, factor=1.0, extra=6)
    one = generation.generate(model, tok, prompts, sources, **kwargs)
    shards = [generation.generate(model, tok, prompts, sources, shard=(rank, processes), **kwargs)
              for rank in range(processes)]
    for i in range(len(rows)):
        owners = [k for k, (texts, _) in enumerate(shards) if texts[i] is not None]
        assert len(owners) == 1
        assert (shards[owners[0]][0][i], shards[owners[0]][1][i]) == (one[0][i], one[1][i])
    assert any(one[1]) and not all(one[1])
    sizes = [sum(t is not None for t in texts) for texts, _ in shards]
    assert max(sizes) - min(sizes) <= batch_size  # whole batches dealt out in turn


def test_gather_shards_in_a_plain_process_returns_the_lists():
    assert distributed.gather_shards(["a", "b"], [True, False]) == (["a", "b"], [True, False])


def test_two_processes_write_the_reports_of_one(tiny, tmp_path):
    one = run_stage(tmp_path, tiny["adapter"], tag="one", batch_size=3)

    two = tmp_path / "two"
    two.mkdir()
    test = two / "test.jsonl"
    write_jsonl(test, make_rows())
    params = write_params(two / "params.yaml", base_model=str(tiny["base_dir"]), batch_size=3, num_gpus=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    from stages import base

    base.main(["--out", str(two / "models-base"), "--params", str(params)])
    # exactly the commands evaluate.num_gpus=2 launches on a machine with two GPUs
    commands = [
        ["stages.evaluate_base", "--test", str(test), "--base", str(two / "models-base"), "--out", str(two / "base_outputs.jsonl"),
         "--params", str(params)],
        ["stages.evaluate", "--test", str(test), "--model", str(tiny["adapter"]), "--metrics", str(two / "metrics.json"),
         "--out-dir", str(two / "evaluate"), "--hypotheses", str(two / "hypotheses.jsonl"), "--params", str(params),
         "--base-outputs", str(two / "base_outputs.jsonl")],
    ]
    for module, *argv in commands:
        proc = subprocess.run(distributed.launch_command(module, 2, argv), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for name in OUTPUTS:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert proc.stderr.count("wrote ") == 1  # one writer: rank 0
    assert "fine-tuned: 16 sentences" in proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", ["evaluate", "base"])
def test_more_gpus_than_visible_is_a_clear_error(tiny, tmp_path, monkeypatch, stage):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    params = write_params(tmp_path / "params.yaml", base_model=str(tiny["base_dir"]), num_gpus=3)
    test = tmp_path / "test.jsonl"
    write_jsonl(test, make_rows())
    argv = (["--test", str(test), "--base", str(tmp_path / "models-base"), "--out", str(tmp_path / "b.jsonl")]
            if stage == "base" else
            ["--test", str(test), "--model", str(tiny["adapter"]), "--metrics", str(tmp_path / "m.json"),
             "--out-dir", str(tmp_path / "e"), "--hypotheses", str(tmp_path / "h.jsonl")])
    with pytest.raises(PipelineError, match=r"^evaluate.num_gpus is 3 but 1 CUDA GPU\(s\) are visible; "
                                            r"set evaluate.num_gpus to at most 1$"):
        (evaluate_base if stage == "base" else evaluate).main([*argv, "--params", str(params)])
