"""Tokenise once (wenyan/token_cache.py): the train stage's token ids read back for the same tokenizer and
conversations, recomputed for another tokenizer or other data, a damaged file tokenised again; tokenize_rows gives
the same examples from the cache as without it."""

from __future__ import annotations

import pytest

from wenyan import token_cache
from wenyan.training import examples
from wenyan.prompt import CHAT_TEMPLATES, end_of_turn_id
from tiny import bpe_tokenizer

PAIRS = [("学而时习之", "学了又时常温习"), ("温故而知新", "温习旧的知识"), ("三人行，必有我师焉。", "几个人一起走")]


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "你是翻译家。"}, {"role": "user", "content": PAIRS[i % 3][0] + str(i)},
             {"role": "assistant", "content": PAIRS[i % 3][1]}] for i in range(n)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WENYAN_MT_CACHE", str(tmp_path))
    monkeypatch.setattr(token_cache, "MIN_ROWS", 1)
    return tmp_path / "tokenized"


def tokenizer():
    return bpe_tokenizer(["你是翻译家。"] + [s + t for s, t in PAIRS] * 3 + ["system user assistant"], vocab_size=300)


def test_the_second_run_reads_what_the_first_tokenized(cache):
    tok, convs = tokenizer(), conversations(12)
    eot = end_of_turn_id(tok)
    first = token_cache.cached(tok, convs, eot, lambda c: examples.tokenize_conversations(tok, c, eot))
    assert len(list(cache.glob("*.npz"))) == 1

    def fail(_):
        raise AssertionError("tokenized again")

    assert token_cache.cached(tok, convs, eot, fail) == first  # same ids, masks and flags, in order
    other = tokenizer()
    other.chat_template = CHAT_TEMPLATES["qwen-2.5"]  # another tokenizer (its template): another key
    token_cache.cached(other, convs, end_of_turn_id(other), lambda c: examples.tokenize_conversations(other, c, eot))
    token_cache.cached(tok, convs[:-1], eot, lambda c: examples.tokenize_conversations(tok, c, eot))  # other data
    assert len(list(cache.glob("*.npz"))) == 3


def test_a_damaged_file_is_tokenized_again(cache):
    tok, convs = tokenizer(), conversations(6)
    eot = end_of_turn_id(tok)
    first = token_cache.cached(tok, convs, eot, lambda c: examples.tokenize_conversations(tok, c, eot))
    [path] = cache.glob("*.npz")
    path.write_bytes(path.read_bytes()[:40])
    assert token_cache.cached(tok, convs, eot, lambda c: examples.tokenize_conversations(tok, c, eot)) == first
    assert token_cache.load(path, len(convs)) == first  # replaced by a whole file


def test_tokenize_rows_gives_the_same_examples_from_the_cache(cache, monkeypatch):
    tok = tokenizer()
    rows = [{"id": i, "messages": c} for i, c in enumerate(conversations(9))]
    fresh = examples.tokenize_rows(tok, rows, 24, "train.jsonl")
    again = examples.tokenize_rows(tok, rows, 24, "train.jsonl")  # from the cache, then truncated at 24 as before
    monkeypatch.setattr(token_cache, "MIN_ROWS", 10**9)
    assert fresh == again == examples.tokenize_rows(tok, rows, 24, "train.jsonl")
