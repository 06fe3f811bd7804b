"""Tiny tokenizers and models for the model-half tests, built in the test (no hub, no download).

    tiny_llama(tokenizer, seed=0, **config)   a 2-layer Llama (hidden 32) sized to the tokenizer, eval mode
    bpe_tokenizer(texts, vocab_size)          byte-level BPE trained on texts + ChatML specials (like SmolLM2's)
    byte_tokenizer()                          byte-level, no merges (any text, ~3 tokens a Chinese character)
    char_tokenizer(text)                      one token a character of text (word level), ChatML
    gemma_like_tokenizer(text)                Unigram with byte fallback and Gemma's specials, no chat template
    tiny_gemma(tokenizer, seed=0, **config)   a 2-layer Gemma 3 (hidden 32) sized to the tokenizer, eval mode
    one_thread()                              a context: torch on one thread (tiny tensors gain nothing from two)
    make_tiny_model(root)                     root/base + root/adapter laid out as the train stage writes models/adapter
"""

from __future__ import annotations

import contextlib

from wenyan.prompt import CHAT_TEMPLATES

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# 论语 pairs (classical, modern) the model-half tests train and translate on
LUNYU_PAIRS = [
    ("学而时习之，不亦说乎？", "学了又时常温习，不是很愉快吗？"),
    ("有朋自远方来，不亦乐乎？", "有志同道合的人从远方来，不是很令人高兴的吗？"),
    ("人不知而不愠，不亦君子乎？", "人家不了解我，我也不怨恨，不也是一个有德的君子吗？"),
    ("温故而知新，可以为师矣。", "温习旧的知识从而得到新的理解，就可以做老师了。"),
    ("三人行，必有我师焉。", "几个人一起走，其中必定有可以做我老师的人。"),
    ("知之为知之，不知为不知，是知也。", "知道就是知道，不知道就是不知道，这才是聪明。"),
]


def tiny_llama(tokenizer, seed: int = 0, **config):
    """LlamaForCausalLM(hidden 32, 2 layers, 4 heads, 2 KV heads, tied embeddings like SmolLM2) with the
    tokenizer's vocabulary, eos and pad; `config` overrides any LlamaConfig field. Seeded: the same weights
    every call with the same arguments."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on texts, eos <|im_end|>, pad <|endoftext|>, the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHATML_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    return tok


def byte_tokenizer():
    """Byte-level BPE without merges (any text, ~3 tokens a Chinese character) + ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    return tokenizer


def char_tokenizer(text: str):
    """One token a character of text (plus ASCII letters), <unk> for the rest, ChatML."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(text + string.ascii_letters)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    return tokenizer


@contextlib.contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gemma_like_tokenizer(text: str):
    """Unigram over the single characters of text, a few two-character pieces and bytes, Gemma's specials and turn
    markers as plain pieces (as transformers builds Gemma's GGUF tokenizer), no chat template; ~1 token a character."""
    from tokenizers import Tokenizer, decoders, models as tmodels, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text + "usermodel") - {" "})
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0),
              ("<start_of_turn>", 0.0), ("<end_of_turn>", 0.0), ("<unused0>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [(c, -5.0) for c in chars] + [("不亦", -6.0), ("君子", -6.0), ("大乱", -6.0), ("\u2581", -5.0)]
    pieces += [("\t", -5.0), ("\t", -5.0)]  # one piece twice, as in Gemma's GGUF: get_vocab() is one short of the rows
    backend = Tokenizer(tmodels.Unigram(pieces, unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def tiny_gemma(tokenizer, seed: int = 0, **config):
    """Gemma3ForCausalLM (hidden 32, 2 layers: a sliding and a full attention layer, tied embeddings) over the
    tokenizer; `config` overrides any Gemma3TextConfig field."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    settings = dict(vocab_size=max(tokenizer.get_vocab().values()) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                    sliding_window=16, tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"],
                    pad_token_id=0, eos_token_id=1, bos_token_id=2)
    settings.update(config)
    return Gemma3ForCausalLM(Gemma3TextConfig(**settings)).eval()


def make_tiny_model(root, max_seq_length: int = 256, trainable_tokens: bool = False, seed: int = 0):
    """root/base (tiny Llama, tied embeddings like SmolLM2) + root/adapter (LoRA with non-zero B weights,
    tokenizer, training_config.json), laid out as the train stage writes models/adapter. Returns the adapter
    directory."""
    import json

    import torch
    from conftest import BASE_PARAMS
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer()
    base_dir, adapter_dir = root / "base", root / "adapter"
    tiny_llama(tokenizer, seed, max_position_embeddings=1024, bos_token_id=None).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    extra = {"trainable_token_indices": {"embed_tokens": [tokenizer.convert_tokens_to_ids("<|im_start|>")]}} if trainable_tokens else {}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM", **extra)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora)
    with torch.no_grad():  # a large adapter effect, so that "merged == base + adapter" means something
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    cfg = {"model": str(base_dir), "chat_template": None, "max_seq_length": max_seq_length, "backend": "hf",
           "prompt": {"format": BASE_PARAMS["format"], "opencc": BASE_PARAMS["clean"]["opencc"]}}
    (adapter_dir / "training_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return adapter_dir
