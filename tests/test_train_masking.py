"""The loss is on the reply only: for every supported chat template the labels the trainer's collator
produces are -100 on system, user and header tokens and equal the input ids on exactly the assistant text
plus its end-of-turn token (not on what the template adds after it, e.g. the "\\n" after <|im_end|>).

Tiny byte-level BPE tokenizers are built here (offline); the expected positions come from character
offsets in the rendered conversation, independently of the code under test.
"""

from __future__ import annotations

import pytest
import torch

from wenyan.prompt import CHAT_TEMPLATES, apply_chat_template_override, end_of_turn_id, end_of_turn_token
from wenyan import models
from wenyan.training import examples as training_examples
from wenyan.training.trainer import build_trainer, example_dataset, sft_config
from stages import train as train_stage
from wenyan.errors import PipelineError
from conftest import shipped
from tiny import tiny_llama

# SmolLM2-Instruct's own template (from its tokenizer_config.json): ChatML plus a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
# Pre-tokenizer splits: GPT-2's (SmolLM2) and Llama-3's (Qwen2's differs only in single digits).
GPT2 = None  # ByteLevel's built-in GPT-2 regex
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# template name -> (template set by the test (None: a named override via wenyan.prompt), bos, eos, pre-tokenizer)
TEMPLATES = {
    "smollm2": (SMOLLM2_TEMPLATE, None, "<|im_end|>", GPT2),
    "chatml": (None, None, "<|im_end|>", GPT2),
    "qwen-2.5": (None, None, "<|im_end|>", LLAMA3),
    "llama-3.1": (None, "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
}
SYSTEM = "你是一位精通古汉语的翻译家。"
CONVERSATIONS = [
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "将下面的文言文翻译成现代汉语：\n学而时习之，不亦说乎？"},
        {"role": "assistant", "content": "学了又时常温习，不是很愉快吗？"},
    ],
    [  # no system message: SmolLM2 and Qwen-2.5 add their default one, which must stay masked too
        {"role": "user", "content": "将下面的文言文翻译成现代汉语：\n有朋自远方来，不亦乐乎？"},
        {"role": "assistant", "content": "有志同道合的人从远方来，不是很令人高兴的吗？"},
    ],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "将下面的文言文翻译成现代汉语：\n人不知而不愠，不亦君子乎？"},
        {"role": "assistant", "content": "人家不了解我，我也不怨恨，不也是一个有德的君子吗？ assistant"},
    ],
]


def make_tokenizer(name: str, split=...):
    """A byte-level BPE (like SmolLM2's, Llama-3's, Qwen's) trained on the test conversations, with the
    template's special tokens, wrapped as a transformers tokenizer with the named chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, default_split = TEMPLATES[name]
    split = default_split if split is ... else split
    texts = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant You are a helpful\n\n"] * 3
    backend = Tokenizer(models.BPE())
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>")
    if template is not None:
        tok.chat_template = template
        apply_chat_template_override(tok, None)
    else:
        added = apply_chat_template_override(tok, name)
        assert not added  # the specials are in the vocab already
    return tok


def expected_trained(tok, conversation) -> list[int]:
    """Token positions that must be trained: those inside the last reply or its end-of-turn token, by
    character offsets in the rendered text."""
    text = tok.apply_chat_template(conversation, tokenize=False)
    reply = conversation[-1]["content"]
    eot = end_of_turn_token(tok)
    start = text.rindex(reply + eot)
    end = start + len(reply) + len(eot)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    positions = [i for i, (a, b) in enumerate(enc.offset_mapping) if a >= start and b <= end and b > a]
    # the reply plus end-of-turn token, nothing before or after
    assert tok.decode([enc.input_ids[i] for i in positions]) == reply + eot
    return positions


def trainer_for(tok, examples, padding_free: bool, tmp_path):
    model = tiny_llama(tok, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       tie_word_embeddings=False).train()  # the same tiny model every call (seed 0)
    cfg = shipped("train", max_steps=1, eval_steps=0, save_steps=0)
    args = sft_config(cfg, rows=len(examples), padding_free=padding_free, dtype=torch.float32,
                       optim="adamw_torch", gradient_checkpointing=False, output_dir=tmp_path / "ckpt",
                       has_valid=False, model=model)
    return build_trainer(model, tok, args, example_dataset(examples))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_masks_exactly_the_reply_and_end_of_turn(name):
    tok = make_tokenizer(name)
    eot_id = end_of_turn_id(tok)
    for conversation, (ids, mask, retokenized) in zip(
        CONVERSATIONS, training_examples.tokenize_conversations(tok, CONVERSATIONS, eot_id)
    ):
        assert not retokenized
        assert ids == tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
        trained = [i for i, m in enumerate(mask) if m]
        assert trained == expected_trained(tok, conversation)
        assert ids[trained[-1]] == eot_id
        # the template's text after the end-of-turn token (ChatML's "\n") stays masked
        assert trained[-1] < len(ids) - 1 or name.startswith("llama")


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_collator_labels_are_the_reply_only(name, padding_free, tmp_path):
    """The labels that reach the model: after the trainer's dataset preparation and its data collator."""
    tok = make_tokenizer(name)
    rows = [{"id": str(i), "messages": c} for i, c in enumerate(CONVERSATIONS)]
    examples, stats = training_examples.build_examples(tok, rows, 512, "test")
    assert stats["examples"] == len(CONVERSATIONS) and stats["dropped_truncation"] == 0
    trainer = trainer_for(tok, examples, padding_free, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    input_ids, labels = batch["input_ids"], batch["labels"]
    if padding_free:  # one flattened row; sequences restart at position 0
        assert "attention_mask" not in batch and input_ids.shape[0] == 1
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
        rows_ids = [input_ids[0, a:b] for a, b in zip(starts, starts[1:])]
        rows_labels = [labels[0, a:b] for a, b in zip(starts, starts[1:])]
    else:
        rows_ids, rows_labels = list(input_ids), list(labels)
    assert len(rows_ids) == len(CONVERSATIONS)
    for conversation, ids, lab in zip(CONVERSATIONS, rows_ids, rows_labels):
        expected = expected_trained(tok, conversation)
        trained = (lab != -100).nonzero().flatten().tolist()
        assert trained == expected, f"{name}: trained {trained} expected {expected}"
        assert torch.equal(lab[trained], ids[trained])  # every label is -100 or its input id
        assert tok.decode(ids[trained]) == conversation[-1]["content"] + end_of_turn_token(tok)


def test_padding_free_batches_give_the_padded_loss_with_sdpa(tmp_path):
    """Flattened batches are only right if attention stays within each sequence: transformers builds a
    block-diagonal mask from position_ids (sdpa/eager) when no cache is used, which the CPU loss path ensures."""
    tok = make_tokenizer("chatml")
    examples, _ = training_examples.build_examples(tok, [{"messages": c} for c in CONVERSATIONS], 512, "test")
    losses = {}
    for padding_free in (False, True):
        trainer = trainer_for(tok, examples, padding_free, tmp_path)
        assert trainer.model.config._attn_implementation == "sdpa"
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))]))
        trainer.model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_whole_dataloader_batch_has_no_prompt_labels(tmp_path):
    tok = make_tokenizer("chatml")
    rows = [{"id": str(i), "messages": c} for i, c in enumerate(CONVERSATIONS * 4)]
    examples, _ = training_examples.build_examples(tok, rows, 512, "test")
    trainer = trainer_for(tok, examples, False, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    labels, ids = batch["labels"], batch["input_ids"]
    keep = labels != -100
    assert torch.equal(labels[keep], ids[keep])
    assert not (labels == im_start).any()  # no header token is ever a target
    assert (keep & (batch["attention_mask"] == 0)).sum() == 0  # nor a pad position


@pytest.mark.bad_input
def test_truncation_drops_examples_with_no_reply_left_and_counts_them(tmp_path):
    tok = make_tokenizer("chatml")
    rows = [{"id": str(i), "messages": c} for i, c in enumerate(CONVERSATIONS)]
    full = training_examples.tokenize_conversations(tok, CONVERSATIONS, end_of_turn_id(tok))
    prompt_lengths = [m.index(1) for _, m, _ in full]
    limit = sorted(prompt_lengths)[1]  # the longest prompt(s) fill it: no reply token left
    examples, stats = training_examples.build_examples(tok, rows, limit, "test")
    n_dropped = sum(p >= limit for p in prompt_lengths)
    assert n_dropped >= 1
    assert stats["dropped_truncation"] == n_dropped
    assert stats["examples"] == len(rows) - n_dropped
    assert stats["truncated_kept"] == sum(len(ids) > limit for ids, _, _ in full) - n_dropped
    for e in examples:
        assert len(e["input_ids"]) <= limit and any(e["completion_mask"])
    # and the trainer keeps every one of them with at least one trained label
    trainer = trainer_for(tok, examples, False, tmp_path)
    assert len(trainer.train_dataset) == len(examples)
    assert all(any(x != -100 for x in row["labels"]) for row in trainer.train_dataset)


def test_tokens_merging_across_the_reply_boundary_follow_inference():
    """SmolLM2's GPT-2 pre-tokenizer with the Llama-3.1 template: "\n\n" ends the prompt alone but splits
    before the reply. The prompt keeps its inference tokens; the reply is tokenized after them."""
    tok = make_tokenizer("llama-3.1", split=GPT2)
    eot = end_of_turn_token(tok)
    results = training_examples.tokenize_conversations(tok, CONVERSATIONS, end_of_turn_id(tok))
    assert any(r for _, _, r in results)
    for conversation, (ids, mask, _) in zip(CONVERSATIONS, results):
        prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        assert ids[: len(prompt_ids)] == prompt_ids and not any(mask[: len(prompt_ids)])
        trained = [t for t, m in zip(ids, mask) if m]
        assert tok.decode(trained) == conversation[-1]["content"] + eot
        assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)


@pytest.mark.bad_input
def test_prompt_that_is_not_a_prefix_is_an_error():
    tok = make_tokenizer("chatml")
    # the generation prompt differs from how the full conversation renders the assistant header
    tok.chat_template = CHATML_BROKEN = CHAT_TEMPLATES["chatml"].replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant:\n' }}"
    )
    assert CHATML_BROKEN != CHAT_TEMPLATES["chatml"]
    with pytest.raises(PipelineError, match="renders the prompt"):
        training_examples.tokenize_conversations(tok, CONVERSATIONS, end_of_turn_id(tok))


@pytest.mark.bad_input
def test_template_without_end_of_turn_is_an_error():
    tok = make_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(PipelineError, match="no end-of-turn token"):
        training_examples.build_examples(tok, [{"id": "a", "messages": CONVERSATIONS[0]}], 512, "test")


@pytest.mark.bad_input
def test_bad_messages_are_named():
    tok = make_tokenizer("chatml")
    rows = [{"id": "x1", "messages": CONVERSATIONS[0][:-1]}]  # no reply
    with pytest.raises(PipelineError, match="x1.*assistant"):
        training_examples.build_examples(tok, rows, 512, "train.jsonl")
