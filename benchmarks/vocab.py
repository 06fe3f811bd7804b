"""Measure issue 13's vocabulary extension on the whole corpus: how many CJK characters become tokens, and
what that does to tokens per character and to the length of a formatted training example.

Streams the NiuTrans archive (source.txt/target.txt line pairs of every chapter), normalises both sides
as the clean stage does (clean.normalise_lines with OpenCC t2s), then with SmolLM2-135M-Instruct's
tokenizer (wenyan.models.load_tokenizer, offline): characters seen >= min count in all pairs (both
sides), with and without full-width punctuation; tokens per CJK ideograph and per character before and
after; mean tokens per example rendered with the chat template (system `你是翻译家。`, user
"将下面的文言文翻译成现代汉语：\\n{classical}", the modern text as the reply) before and after.

Run:  /work/venv/bin/python benchmarks/vocab.py [--archive /work/shared/corpora/classical-modern.tar.xz]
Writes reports/benchmarks/vocab.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from wenyan import models, vocab  # noqa: E402
from stages import clean
from wenyan.files import write_json

DEFAULT_ARCHIVE = "/work/shared/corpora/classical-modern.tar.xz"
SYSTEM = "你是翻译家。"
USER = "将下面的文言文翻译成现代汉语：\n{classical}"


def read_pairs(archive: str) -> tuple[list[tuple[str, str]], int]:
    """(classical, modern) line pairs of every chapter whose source.txt and target.txt have as many lines;
    and the number of chapters skipped for a line-count mismatch."""
    sides = defaultdict(dict)
    with tarfile.open(archive) as tar:
        for member in tar:
            name = Path(member.name)
            if member.isfile() and name.name in ("source.txt", "target.txt"):
                sides[str(name.parent)][name.name] = tar.extractfile(member).read().decode("utf-8").splitlines()
    pairs, skipped = [], 0
    for chapter in sorted(sides):
        src, tgt = sides[chapter].get("source.txt"), sides[chapter].get("target.txt")
        if src is None or tgt is None or len(src) != len(tgt):
            skipped += 1
            continue
        pairs += [(s, t) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    return pairs, skipped


def render(classical: str, modern: str, template: tuple[str, str, str]) -> str:
    head, middle, tail = template
    return head + classical + middle + modern + tail


def chat_template_parts(tokenizer) -> tuple[str, str, str]:
    """The rendered conversation split around the classical and the modern text (rendered once, so the
    half million examples are string joins; checked against apply_chat_template in main)."""
    a, b = "CLASSICAL_7F3A", "MODERN_7F3A"
    text = tokenizer.apply_chat_template(conversation(a, b), tokenize=False)
    head, rest = text.split(a)
    middle, tail = rest.split(b)
    return head, middle, tail


def conversation(classical: str, modern: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(classical=classical)},
            {"role": "assistant", "content": modern}]


def mean_tokens(tokenizer, texts: list[str], batch: int = 4096) -> float:
    total = 0
    for i in range(0, len(texts), batch):
        total += sum(len(ids) for ids in tokenizer(texts[i : i + batch], add_special_tokens=False).input_ids)
    return total / len(texts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE)
    parser.add_argument("--min-count", type=int, default=vocab.AUTO_MIN_COUNT)
    parser.add_argument("--report", default=str(REPO / "reports/benchmarks/vocab.json"))
    args = parser.parse_args(argv)
    timings, start = {}, time.perf_counter()

    pairs, skipped = read_pairs(args.archive)
    converter = clean.make_converter("t2s")
    classical = clean.normalise_lines([s for s, _ in pairs], converter)
    modern = clean.normalise_lines([t for _, t in pairs], converter)
    texts = classical + modern
    timings["read_and_normalise_s"] = round(time.perf_counter() - start, 1)
    print(f"{len(pairs):,} pairs ({skipped} chapters skipped)", file=sys.stderr, flush=True)

    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    t = time.perf_counter()
    counts = {p: vocab.cjk_counts(texts, punctuation=p) for p in (False, True)}
    chosen = {p: vocab.choose_new_tokens(counts[p], tokenizer, args.min_count) for p in (False, True)}
    extended = {}
    for p in (False, True):
        extended[p] = copy.deepcopy(tokenizer)
        vocab.extend_tokenizer(extended[p], chosen[p])
    timings["count_choose_extend_s"] = round(time.perf_counter() - t, 1)
    print("count_choose_extend_s", timings["count_choose_extend_s"], file=sys.stderr, flush=True)

    t = time.perf_counter()
    per_cjk = {"base": vocab.tokens_per_cjk_char(tokenizer, texts)}
    per_char = {"base": vocab.tokens_per_char(tokenizer, texts)}
    for p, name in ((False, "ideographs_only"), (True, "ideographs_and_punctuation")):
        per_cjk[name] = vocab.tokens_per_cjk_char(extended[p], texts)
        per_char[name] = vocab.tokens_per_char(extended[p], texts)
    timings["tokens_per_char_s"] = round(time.perf_counter() - t, 1)
    print("tokens_per_char_s", timings["tokens_per_char_s"], file=sys.stderr, flush=True)

    t = time.perf_counter()
    parts = chat_template_parts(tokenizer)
    for i in (0, len(pairs) // 2, len(pairs) - 1):
        assert render(classical[i], modern[i], parts) == tokenizer.apply_chat_template(
            conversation(classical[i], modern[i]), tokenize=False), "the template split does not render as the template"
    examples = [render(c, m, parts) for c, m in zip(classical, modern)]
    per_example = {"base": mean_tokens(tokenizer, examples)}
    for p, name in ((False, "ideographs_only"), (True, "ideographs_and_punctuation")):
        per_example[name] = mean_tokens(extended[p], examples)
    timings["examples_s"] = round(time.perf_counter() - t, 1)
    print("examples_s", timings["examples_s"], file=sys.stderr, flush=True)

    punct = [c for c in chosen[True] if not vocab.IDEOGRAPH_RE.match(c)]
    ideographs_seen = sum(1 for c in counts[True] if vocab.IDEOGRAPH_RE.match(c))
    single_already = sum(1 for c in counts[False] if len(tokenizer(c, add_special_tokens=False).input_ids) == 1)
    result = {
        "what": "CJK characters seen >= min_count times in all pairs (both sides, after clean's t2s) added as tokens "
                "to SmolLM2-135M-Instruct's tokenizer; tokens per character and per formatted example before/after",
        "command": shlex.join([sys.executable, os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
        "archive": args.archive,
        "pairs": len(pairs),
        "chapters_skipped_line_mismatch": skipped,
        "characters": sum(len(x) for x in texts),
        "min_count": args.min_count,
        "cjk_ideographs_seen": ideographs_seen,
        "cjk_ideographs_single_token_in_base": single_already,
        "added_tokens": {"ideographs_only": len(chosen[False]), "ideographs_and_punctuation": len(chosen[True])},
        "punctuation_added": punct,
        "tokens_per_cjk_ideograph": {k: round(v, 4) for k, v in per_cjk.items()},
        "tokens_per_char": {k: round(v, 4) for k, v in per_char.items()},
        "mean_tokens_per_example": {k: round(v, 2) for k, v in per_example.items()},
        "example_format": {"system": SYSTEM, "user": USER, "assistant": "{modern}", "template": "the model's own"},
        "timings": timings,
        "total_s": round(time.perf_counter() - start, 1),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()},
    }
    write_json(Path(args.report), result)
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
