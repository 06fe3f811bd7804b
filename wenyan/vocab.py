"""Extending a byte-level BPE vocabulary with the training data's CJK characters (issue 13).

SmolLM2-135M-Instruct's byte-level BPE has ~100 CJK characters as single tokens and spends ~1.9 tokens
a character on this corpus. Adding every CJK character seen >= 5 times in the training texts as a token
(plus the full-width punctuation that is not one token yet: ；？！《》「」...) brings that close to 1 token
a character; each new embedding row starts as the mean of the base tokenizer's byte pieces for that
character, so the model starts from what it already knows of the character.

A library module, used by train (nothing else needs it: the extended tokenizer is saved beside the model,
and evaluate, translate and export read the vocabulary back from there and resize the base to it). In train,
after loading model + tokenizer (and any chat-template tokens), before building examples and get_peft_model:

    texts = [m["content"] for row in train_rows for m in row["messages"]]     # the train split only
    new_tokens, stats = vocab.decide(cfg["extend_vocab"], tokenizer, texts)
    pieces = vocab.piece_ids(tokenizer, new_tokens)      # the base vocabulary's byte pieces, before adding
    vocab.extend_tokenizer(tokenizer, new_tokens)
    ids = vocab.extend_embeddings(model, tokenizer, new_tokens, pieces)
    LoraConfig(..., **vocab.lora_vocab_kwargs(model, template_added + ids, cfg["method"]))

Measured on the whole corpus (585,678 pairs, both sides, min count 5; benchmarks/vocab.py ->
reports/benchmarks/vocab.json): 7,776 new tokens (7,765 ideographs + 11 punctuation marks); tokens per CJK
ideograph 2.00 -> 1.00, per character 1.870 -> 1.000 (ideographs only: 1.008); a formatted example
(system prompt, user template, reply) 156.8 -> 93.0 tokens (ideographs only: 93.4). Punctuation is in
because it helps a little (0.8% fewer tokens) for 11 tokens; the CJK punctuation already one token
(，。：“”、) is not added again.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

from wenyan.errors import get_logger, PipelineError

log = get_logger("vocab")

# CJK ideographs: the unified block, extensions A to I, and the compatibility blocks.
CJK_IDEOGRAPHS = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0x2EBF0, 0x2EE5F), (0x2F800, 0x2FA1F),
    (0x30000, 0x3134F), (0x31350, 0x323AF),
)
# Full-width punctuation: CJK symbols and punctuation (、。《》「」), the full-width forms (，！？：；（）),
# and the general punctuation Chinese text uses (“”‘’…—). Spaces (U+3000, U+2000-200F) are left out:
# whitespace as an added token would take spaces away from the BPE's merges.
CJK_PUNCTUATION = ((0x3001, 0x303F), (0xFF01, 0xFF65), (0x2010, 0x2027), (0x2030, 0x205E))
AUTO_MIN_COUNT = 5  # issue 13: characters seen >= 5 times -> 7,776 tokens on the whole corpus
STATS_SAMPLE = 20_000  # texts the tokens-per-character figures are measured on (evenly spaced): seconds, not minutes
AUTO_THRESHOLD = 1.3  # auto extends when the base tokenizer spends more than this many tokens per CJK character


def _class(ranges) -> str:
    return "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges)


IDEOGRAPH_RE = re.compile(f"[{_class(CJK_IDEOGRAPHS)}]")
CJK_CHAR_RE = re.compile(f"[{_class(CJK_IDEOGRAPHS + CJK_PUNCTUATION)}]")
IDEOGRAPH_RUN_RE = re.compile(f"[{_class(CJK_IDEOGRAPHS)}]+")


def cjk_counts(texts, punctuation: bool = True) -> Counter:
    """How often each CJK ideograph (and, with punctuation, each full-width punctuation mark) occurs."""
    pattern = CJK_CHAR_RE if punctuation else IDEOGRAPH_RE
    counts = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def _count_tokens(tokenizer, texts, batch: int = 256) -> int:
    """Tokens of the texts, each tokenized alone. Encoding is per-string bound for short strings, so up to
    `batch` texts go in one string joined by newlines, and the newline tokens are taken off again (a lone
    newline is its own pre-token and one token in a byte-level BPE; without that, one call per text)."""
    sep_ids = tokenizer("\n", add_special_tokens=False).input_ids
    if len(sep_ids) != 1 or any("\n" in t for t in texts):
        return sum(len(ids) for i in range(0, len(texts), batch)
                   for ids in tokenizer(list(texts[i : i + batch]), add_special_tokens=False).input_ids)
    chunks = ["\n".join(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return sum(len(ids) - ids.count(sep_ids[0]) for i in range(0, len(chunks), 64)
               for ids in tokenizer(chunks[i : i + 64], add_special_tokens=False).input_ids)


def tokens_per_cjk_char(tokenizer, texts) -> float:
    """Tokens the tokenizer spends per CJK ideograph: the runs of ideographs in the texts, tokenized alone.

    A byte-level pre-tokenizer splits letters from punctuation, so a run costs alone what it costs in its
    sentence; 0.0 for texts without ideographs."""
    runs = [run for text in texts for run in IDEOGRAPH_RUN_RE.findall(text)]
    chars = sum(len(run) for run in runs)
    return _count_tokens(tokenizer, runs) / chars if chars else 0.0


def tokens_per_char(tokenizer, texts) -> float:
    """Tokens per character of the whole texts (punctuation, digits and Latin included)."""
    texts = list(texts)
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for i in range(0, len(texts), 4096)
                 for ids in tokenizer(texts[i : i + 4096], add_special_tokens=False).input_ids)
    return tokens / chars if chars else 0.0


def choose_new_tokens(counts: Counter, tokenizer, min_count: int) -> list[str]:
    """Characters seen >= min_count times that the tokenizer does not already hold as one token, most
    frequent first (ties by code point, so the order, and the new ids, are deterministic)."""
    frequent = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
    if not frequent:
        return []
    lengths = [len(ids) for ids in tokenizer(frequent, add_special_tokens=False).input_ids]
    return [c for c, n in zip(frequent, lengths) if n > 1]


def parse_setting(setting) -> int | None:
    """train.extend_vocab -> the minimum count (None: decide by the tokens per character, 0: no extension).
    Unset (None: train's DEFAULTS holds None, as the key takes a string or an int) means auto."""
    if setting == "auto" or setting is None:
        return None
    if setting == "none":
        return 0
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting
    raise PipelineError(f"train.extend_vocab must be auto, none or a minimum count >= 1; got {setting!r}")


def decide(setting, tokenizer, train_texts) -> tuple[list[str], dict]:
    """train.extend_vocab (auto | none | <min count>) -> (new tokens, stats), from the TRAINING texts only
    (a character seen only in valid/test must not become a token the model never trained).

    auto extends with min count 5 when the base tokenizer spends more than 1.3 tokens per CJK ideograph.
    Stats: tokens per CJK ideograph and per character before and after (on an evenly spaced sample of at most
    ~STATS_SAMPLE texts), the number of tokens added (from every text)."""
    min_count = parse_setting(setting)
    train_texts = list(train_texts)
    sample = train_texts[:: max(1, len(train_texts) // STATS_SAMPLE)]  # the counts below still read every text
    before = tokens_per_cjk_char(tokenizer, sample)
    stats = {"setting": setting, "min_count": min_count, "tokens_per_cjk_char_before": round(before, 4)}
    if min_count is None:
        min_count = AUTO_MIN_COUNT if before > AUTO_THRESHOLD else 0
        stats["min_count"] = min_count
        stats["reason"] = (f"auto: {before:.2f} tokens per CJK character "
                           f"{'>' if min_count else '<='} {AUTO_THRESHOLD}")
    new_tokens = choose_new_tokens(cjk_counts(train_texts), tokenizer, min_count) if min_count else []
    stats["added"] = len(new_tokens)
    if new_tokens:
        extended = copy.deepcopy(tokenizer)
        extend_tokenizer(extended, new_tokens)
        stats["tokens_per_cjk_char_after"] = round(tokens_per_cjk_char(extended, sample), 4)
        stats["tokens_per_char_before"] = round(tokens_per_char(tokenizer, sample), 4)
        stats["tokens_per_char_after"] = round(tokens_per_char(extended, sample), 4)
    else:
        stats["tokens_per_cjk_char_after"] = stats["tokens_per_cjk_char_before"]
    log.info("extend_vocab %s: %d new tokens; %.2f -> %.2f tokens per CJK character", setting, len(new_tokens),
             before, stats["tokens_per_cjk_char_after"])
    return new_tokens, stats


# ----------------------------------------------------------------------------------------------
# Tokenizer and model


def is_byte_level(tokenizer) -> bool:
    """A byte-level BPE (GPT-2 style): its pre-tokenizer or decoder has a ByteLevel step."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())

    def has_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    return has_byte_level(backend.get("pre_tokenizer")) or has_byte_level(backend.get("decoder"))


def extend_tokenizer(tokenizer, new_tokens: list[str]) -> int:
    """Add new_tokens as normal (not special) tokens, matched before BPE; return how many were added.

    A byte-level tokenizer gets a plain ByteLevel decoder: the chain transformers builds from a GGUF
    (ByteFallback -> Fuse -> Replace -> ByteLevel) fuses added tokens with byte pieces and garbles every
    decode once added tokens exist (`ï¼Į` for `，`). ByteLevel decodes a piece whose characters are not all
    byte symbols as its UTF-8 text, which is what an added CJK character is; the round trip is checked."""
    from tokenizers import AddedToken, decoders

    if not new_tokens:
        return 0
    added = tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new_tokens])
    if is_byte_level(tokenizer):
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    sample = "".join(new_tokens[:2000])
    back = tokenizer.decode(tokenizer(sample, add_special_tokens=False).input_ids)
    if back != sample:
        encoded = tokenizer(list(new_tokens), add_special_tokens=False).input_ids
        bad = next((t for t, ids in zip(new_tokens, encoded) if tokenizer.decode(ids) != t), "?")
        raise PipelineError(f"the extended tokenizer does not decode its new token {bad!r} back to itself")
    return added


def piece_ids(base_tokenizer, new_tokens: list[str]) -> list[list[int]]:
    """The base tokenizer's ids for each new token (its byte pieces)."""
    return base_tokenizer(list(new_tokens), add_special_tokens=False).input_ids


def extend_embeddings(model, tokenizer, new_tokens: list[str], base) -> list[int]:
    """Resize the model to the tokenizer and start each new token's input-embedding row as the mean of its
    byte pieces' rows; untied output embeddings (lm_head) get the same from lm_head, tied ones stay tied.
    base: the tokenizer before extend_tokenizer, or the list piece_ids() gave. Returns the new ids.

    No pad_to_multiple_of: evaluate and export resize the base to len(tokenizer) before loading an
    adapter, so a padded size would not match there."""
    import torch

    if not new_tokens:
        return []
    pieces = base if isinstance(base, list) else piece_ids(base, new_tokens)
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    old_rows = model.get_input_embeddings().weight.shape[0]  # resize_token_embeddings rewrites config.vocab_size
    if any(i is None or i < old_rows for i in ids) or any(not p or max(p) >= old_rows for p in pieces):
        raise PipelineError("extend_embeddings: the new tokens must be added to the tokenizer (extend_tokenizer) "
                            "and their pieces must be ids of the base vocabulary")
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    targets = [model.get_input_embeddings().weight]
    if not tied and model.get_output_embeddings() is not None:
        targets.append(model.get_output_embeddings().weight)
    index = torch.tensor(ids, device=targets[0].device)
    with torch.no_grad():
        for weight in targets:
            means = torch.stack([weight[p].float().mean(0) for p in pieces]).to(weight.dtype)
            weight[index] = means
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise PipelineError("extend_embeddings: resizing untied the input and output embeddings")
    log.info("embeddings %d -> %d rows (%s); %d new rows start as the mean of their byte pieces", old_rows,
             model.get_input_embeddings().weight.shape[0], "tied" if tied else "untied lm_head too", len(ids))
    return ids


def _module_name(model, module) -> str:
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


def lora_vocab_kwargs(model, added: list[int], method: str, backend: str = "hf") -> dict:
    """The LoraConfig (hf) or FastLanguageModel.get_peft_model (unsloth) arguments that make the new tokens'
    rows train; nothing for method full, which trains everything, or when no token was added.

    hf: peft's trainable_token_indices (peft >= 0.15) trains exactly those rows (a delta of len(added) x hidden)
    and, with tied embeddings, ties the lm_head to them; untied, the lm_head gets its own rows. Chosen over
    modules_to_save=[embed_tokens, lm_head], which trains and saves the whole matrices
    (reports/benchmarks/vocab_peft.json measures both).
    unsloth: modules_to_save=[embed_tokens, lm_head], what its get_peft_model turns on by itself after
    add_new_tokens (extend_unsloth); not tested here (no GPU)."""
    if method == "full" or not added:
        return {}
    embed_module = model.get_input_embeddings()
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not embed_module.weight
    if backend == "unsloth":
        modules = [embed_module] + ([head] if head is not None else [])
        return {"modules_to_save": [_module_name(model, m) for m in modules]}
    indices = {_module_name(model, embed_module): list(added)}
    if untied:
        indices[_module_name(model, head)] = list(added)
    return {"trainable_token_indices": indices}


def extend_unsloth(model, tokenizer, new_tokens: list[str]) -> list[int]:
    """The unsloth (GPU) path, before FastLanguageModel.get_peft_model: unsloth's
    add_new_tokens(model, tokenizer, new_tokens=..., method="mean") adds the tokens, resizes, fixes
    config.vocab_size, re-ties, and flags the model so that get_peft_model trains embed_tokens and lm_head
    (modules_to_save). Its new rows are the mean of ALL embeddings (its "interpolation" looks the pieces up
    after adding, i.e. finds the new token itself), so they are then set to the mean of each character's
    byte pieces as on the hf path, and the decoder is fixed and checked as extend_tokenizer does.
    Import unsloth lazily: it raises without a GPU (train imports it before transformers)."""
    if not new_tokens:
        return []
    import torch
    from unsloth import add_new_tokens

    pieces = piece_ids(tokenizer, new_tokens)  # before adding: the base vocabulary's byte pieces
    add_new_tokens(model, tokenizer, new_tokens=list(new_tokens), method="mean")
    extend_tokenizer(tokenizer, new_tokens)  # adds nothing now: the decoder fix and the round-trip check
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    with torch.no_grad():
        for weight in weights:  # the byte pieces' rows are unchanged by the resize
            index = torch.tensor(ids, device=weight.device)
            weight[index] = torch.stack([weight[p].float().mean(0) for p in pieces]).to(weight.dtype)
    return ids
