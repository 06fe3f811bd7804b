"""Tokenise once (issue 35, item 5): the train stage's token ids of a set of conversations, kept on disk by what
decides them, so that `dvc exp run -S train.learning_rate=...` (or any other train.* value that leaves the
tokenizer and the data alone) reads them back instead of rendering and tokenizing the whole split again (on the
whole corpus: ~30 s in 16 processes on a GPU host, minutes on 2 cores).

The key is the SHA-256 of the tokenizer (its tokenizer.json, chat template and special tokens: a trimmed or
extended vocabulary is another tokenizer), the end-of-turn id and every conversation's messages, in order; the value
is each conversation's (ids, completion mask, retokenized) before truncation (max_seq_length applies after, so
it may change freely). One file a key, `<user cache>/tokenized/<key>.npz` ($WENYAN_MT_CACHE or
~/.cache/wenyan-mt; delete the folder to free the space), written whole or not at all. A damaged file is
tokenised again and replaced. Only sets of MIN_ROWS or more conversations are kept (the CPU default's 30-step
runs tokenise a few hundred rows in a second: nothing to gain).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from wenyan.errors import get_logger

log = get_logger("token_cache")

MIN_ROWS = 5000


def cache_dir() -> Path:
    from wenyan.files import user_cache_dir

    return user_cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
             tokenizer.chat_template or "", repr(sorted(map(str, getattr(tokenizer, "all_special_tokens", []))))]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def key(tokenizer, conversations: list[list[dict]], eot_id: int) -> str:
    digest = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{eot_id}:".encode())
    for conversation in conversations:
        digest.update(json.dumps(conversation, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def load(path: Path, n: int) -> list[tuple] | None:
    import zipfile

    import numpy as np

    try:
        with np.load(path) as data:
            ids, mask, offsets, retokenized = data["ids"], data["mask"], data["offsets"], data["retokenized"]
        if len(offsets) != n + 1 or len(retokenized) != n or offsets[-1] != len(ids) or len(mask) != len(ids):
            raise ValueError("lengths do not match")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: unreadable (%s); tokenizing again", path, exc)
        return None
    ids, mask, bounds = ids.tolist(), mask.tolist(), offsets.tolist()
    return [(ids[a:b], mask[a:b], bool(r)) for a, b, r in zip(bounds[:-1], bounds[1:], retokenized.tolist())]


def save(path: Path, results: list[tuple]) -> None:
    import numpy as np

    lengths = [len(ids) for ids, _, _ in results]
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {"ids": np.fromiter((t for ids, _, _ in results for t in ids), dtype=np.int32, count=int(offsets[-1])),
              "mask": np.fromiter((m for _, mask, _ in results for m in mask), dtype=np.uint8, count=int(offsets[-1])),
              "offsets": offsets, "retokenized": np.array([r for _, _, r in results], dtype=bool)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only cache costs the next run a tokenization, nothing more
        log.warning("%s: cannot keep the tokenized examples (%s)", path, exc.strerror or exc)
        Path(locals().get("tmp", path.with_suffix(".tmp"))).unlink(missing_ok=True)


def cached(tokenizer, conversations: list[list[dict]], eot_id: int, compute) -> list[tuple]:
    """compute(conversations) -> [(ids, mask, retokenized)], read from the cache when the same tokenizer and
    conversations were tokenized before."""
    if len(conversations) < MIN_ROWS:
        return compute(conversations)
    path = cache_dir() / f"{key(tokenizer, conversations, eot_id)}.npz"
    if path.is_file():
        results = load(path, len(conversations))
        if results is not None:
            log.info("tokenized examples of %d conversations read from %s (same tokenizer and data)", len(conversations), path)
            return results
    results = compute(conversations)
    save(path, results)
    return results
