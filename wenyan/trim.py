"""Trimming a large vocabulary to the tokens the corpus uses (train.trim_vocab; issue 35).

Gemma 3 270M has a 262,144-token vocabulary: its embedding (tied to the LM head) is 168M of its 268M parameters,
and the head's matrix product and softmax over 262k logits are most of a training step. This corpus uses a few
thousand of them. Trimming keeps only

  - every token the training conversations are encoded with (the train split's system prompt, user messages and
    replies, rendered through the chat template, so the template's own tokens too),
  - every single-character token of a CJK ideograph or full-width punctuation mark (text the train split never
    showed, a book held out for test, stays one token a character instead of falling back to bytes),
  - the byte-fallback tokens <0x00>..<0xFF> (any other character still encodes, as bytes); a tokenizer without
    them (byte-level BPE) keeps its whole alphabet, every single-character token, instead, and
  - the special tokens (bos, eos, pad, unk, the template's markers),

in their original order, and gathers those rows of the embedding (and of an untied head). Tokenization of text
made of kept tokens is unchanged: a Unigram model (Gemma from GGUF) segments by the best-scoring path, and every
piece of the best path is kept, so no other path can win; a BPE model keeps the merges between kept tokens, with
every token that a kept token is merged from (the closure), so the same merges apply in the same order. Ids are
renumbered 0..N-1; the model directory train saves holds the trimmed tokenizer and, for LoRA, trimmed_vocab.json
(the kept ids of the base), from which a base is trimmed again when the adapter is loaded.

    kept = trim.kept_ids(tokenizer, texts)           # texts: rendered train conversations
    tokenizer = trim.trim_tokenizer(tokenizer, kept)
    trim.trim_model(model, kept)

auto trims a vocabulary of more than AUTO_MIN_VOCAB tokens (Gemma's; SmolLM2's 49,152 stay as they are).
Measured: reports/benchmarks/trim_vocab.md (CPU, python benchmarks/trim_vocab.py), reports/runs/h100-gemma-trim-speed/
(one H100, unsloth full fine-tuning: peak memory 68.9 -> 3.6 GB, steady tokens/s 1.3x).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from wenyan.errors import get_logger, PipelineError
from wenyan.vocab import CJK_CHAR_RE

log = get_logger("trim")

AUTO_MIN_VOCAB = 100_000  # auto trims above this: Gemma 3's 262,144 (the head is most of a step), not SmolLM2's 49,152
KEPT_FILE = "trimmed_vocab.json"  # beside an adapter: {"vocab_size_before": N, "kept_ids": [...]}


def parse_setting(setting) -> str:
    """train.trim_vocab: auto | none | always."""
    if setting in ("auto", "none", "always"):
        return setting
    raise PipelineError(f"train.trim_vocab should be auto, none or always, got {setting!r}")


def wanted(setting, tokenizer) -> bool:
    setting = parse_setting(setting)
    return setting == "always" or setting == "auto" and len(tokenizer) > AUTO_MIN_VOCAB


def _model_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PipelineError("train.trim_vocab needs a fast tokenizer (tokenizer.json); this one is "
                            f"{type(tokenizer).__name__}: set train.trim_vocab none")
    return json.loads(backend.to_str())


def kept_ids(tokenizer, texts: list[str]) -> list[int]:
    """The ids to keep (sorted): tokens of `texts`, single CJK characters, byte fallbacks, special tokens, and for
    BPE every token a kept token is merged from."""
    spec = _model_json(tokenizer)
    kind = spec["model"]["type"]
    if kind not in ("Unigram", "BPE"):
        raise PipelineError(f"train.trim_vocab: a {kind} tokenizer cannot be trimmed (Unigram and BPE can); "
                            f"set train.trim_vocab none")
    vocab = tokenizer.get_vocab()
    keep = set(tokenizer.all_special_ids)
    keep.update(t["id"] for t in spec.get("added_tokens", []) if t.get("special"))
    for i in range(0, len(texts), 1024):
        for ids in tokenizer(texts[i : i + 1024], add_special_tokens=False).input_ids:
            keep.update(ids)
    byte_fallback = "<0x00>" in vocab  # else the single characters are the alphabet (byte-level BPE): all kept
    for token, i in vocab.items():
        text = token.replace("\u2581", "")
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            keep.add(i)
        elif len(text) == 1 and (not byte_fallback or CJK_CHAR_RE.fullmatch(text)):
            keep.add(i)
    if byte_fallback:  # a byte spelt as its character (Gemma's GGUF has "\t" where <0x09> belongs) is kept as well
        for b in range(256):
            if f"<0x{b:02X}>" not in vocab and chr(b) in vocab:
                keep.add(vocab[chr(b)])
    if kind == "BPE":
        keep |= _merge_closure(spec["model"], {i: t for t, i in vocab.items()}, keep)
    return sorted(i for i in keep if i is not None)


def _merge_closure(model: dict, tokens: dict[int, str], keep: set[int]) -> set[int]:
    """Every token that a kept token is merged from, transitively (BPE): without them its merges never happen."""
    parts = {}
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        parts.setdefault(a + b, (a, b))
    index = model["vocab"]
    out, todo = set(keep), [tokens[i] for i in keep if i in tokens]
    while todo:
        token = todo.pop()
        for part in parts.get(token, ()):
            j = index.get(part)
            if j is not None and j not in out:
                out.add(j)
                todo.append(part)
    return out


def trimmed_spec(spec: dict, kept: list[int]) -> dict:
    """tokenizer.json with only the kept ids, renumbered in order (model vocab, merges, added tokens, the post
    processor's special-token ids)."""
    new_id = {old: new for new, old in enumerate(kept)}
    model = dict(spec["model"])
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][i] for i in kept if i < len(model["vocab"])]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id.get(model["unk_id"])
    else:  # BPE: vocab {token: id}, merges whose both parts and result are kept
        by_id = {i: t for t, i in model["vocab"].items()}
        model["vocab"] = {by_id[i]: new_id[i] for i in kept if i in by_id}
        kept_tokens = model["vocab"]
        merges = []
        for merge in model.get("merges", []):
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            if a in kept_tokens and b in kept_tokens and a + b in kept_tokens:
                merges.append(merge)
        model["merges"] = merges
    out = dict(spec, model=model)
    out["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens", []) if t["id"] in new_id]
    out["post_processor"] = _remap_ids(spec.get("post_processor"), new_id)
    return out


def _remap_ids(node, new_id: dict[int, int]):
    """The post processor's special tokens ({"ids": [...]}) renumbered (a dropped one is an error)."""
    if isinstance(node, list):
        return [_remap_ids(n, new_id) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            missing = [v for v in value if v not in new_id]
            if missing:
                raise PipelineError(f"train.trim_vocab: the tokenizer's post processor uses ids {missing} that were not kept")
            out[key] = [new_id[v] for v in value]
        else:
            out[key] = _remap_ids(value, new_id)
    return out


def trim_tokenizer(tokenizer, kept: list[int]):
    """A new tokenizer of the same class with only the kept ids (its chat template, special tokens and padding
    side as they were)."""
    from transformers import AutoTokenizer

    spec = trimmed_spec(_model_json(tokenizer), kept)
    specials = {name: getattr(tokenizer, name) for name in ("eos_token", "pad_token", "bos_token", "unk_token")}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config_path = Path(tmp, "tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        new_id = {old: new for new, old in enumerate(kept)}
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                              if int(k) in new_id}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            config.pop(key, None)
        config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        trimmed = AutoTokenizer.from_pretrained(tmp)
    for name, value in specials.items():
        if value is not None and getattr(trimmed, name) != value:
            setattr(trimmed, name, value)
    trimmed.padding_side = tokenizer.padding_side
    if tokenizer.chat_template and trimmed.chat_template != tokenizer.chat_template:
        trimmed.chat_template = tokenizer.chat_template
    return trimmed


def trim_model(model, kept: list[int]) -> None:
    """Keep the embedding rows (and an untied head's rows and bias) of the kept ids, in place; config.vocab_size
    and the special token ids of config and generation_config follow."""
    import torch

    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    index = torch.tensor(kept, dtype=torch.long, device=embeddings.weight.device)
    embeddings.weight = torch.nn.Parameter(embeddings.weight.data.index_select(0, index).clone(),
                                           requires_grad=embeddings.weight.requires_grad)
    embeddings.num_embeddings = len(kept)
    new_id = {old: new for new, old in enumerate(kept)}
    if getattr(embeddings, "padding_idx", None) is not None:
        embeddings.padding_idx = new_id.get(embeddings.padding_idx)
    if head is not None:
        if tied:
            head.weight = embeddings.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.data.index_select(0, index.to(head.weight.device)).clone(),
                                             requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.data.index_select(0, index.to(head.bias.device)).clone())
        head.out_features = len(kept)
    config = model.config
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        cfg.vocab_size = len(kept)
        _remap_config_ids(cfg, new_id)
    if getattr(model, "generation_config", None) is not None:
        _remap_config_ids(model.generation_config, new_id)
    for module in model.modules():  # modules keep their own copy (Gemma3ForCausalLM's loss reads self.vocab_size)
        if isinstance(getattr(module, "vocab_size", None), int):
            module.vocab_size = len(kept)


def _remap_config_ids(cfg, new_id: dict[int, int]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            setattr(cfg, key, new_id.get(value))
        elif isinstance(value, list):
            setattr(cfg, key, [new_id[v] for v in value if v in new_id] or None)


def apply(setting, model, tokenizer, texts: list[str]):
    """train.trim_vocab at load time: (tokenizer, kept ids or None, stats). `texts`: rendered training conversations."""
    before = max(len(tokenizer), model.get_input_embeddings().num_embeddings)
    if not wanted(setting, tokenizer):
        return tokenizer, None, {"setting": setting, "trimmed": False, "vocab_size": before}
    kept = kept_ids(tokenizer, texts)
    tokenizer = trim_tokenizer(tokenizer, kept)
    trim_model(model, kept)
    log.info("train.trim_vocab %s: kept %s of %s tokens (the embedding and head shrink %.1fx)", setting,
             f"{len(kept):,}", f"{before:,}", before / len(kept))
    return tokenizer, kept, {"setting": setting, "trimmed": True, "vocab_size_before": before, "vocab_size": len(kept)}


def write_kept(directory: Path, kept: list[int], before: int) -> None:
    Path(directory, KEPT_FILE).write_text(json.dumps({"vocab_size_before": before, "kept_ids": kept}) + "\n",
                                          encoding="utf-8")


def read_kept(directory: Path) -> list[int] | None:
    """The base's kept ids saved beside an adapter (None: not trimmed); a damaged file is one error naming it."""
    path = Path(directory, KEPT_FILE)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kept = data["kept_ids"]
        if not isinstance(kept, list) or not all(isinstance(i, int) and i >= 0 for i in kept) or kept != sorted(set(kept)):
            raise ValueError("kept_ids is not a sorted list of distinct ids")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); retrain (dvc repro train)") from None
    return kept
