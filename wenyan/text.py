"""Text normalisation shared by clean (both sides of every pair), evaluate (model outputs get the
references' treatment) and translate (input lines get the training sources' treatment).

Steps 1-5 of stages/clean.py's docstring: NFC, control characters, whitespace, full-width punctuation,
OpenCC (config clean.opencc, recorded with each trained model in training_config.json).
"""

from __future__ import annotations

import re
import sys
import unicodedata

from wenyan.errors import PipelineError

# CJK characters and CJK/full-width punctuation: a space next to one of these is dropped, and a
# half-width , ; : ? ! ( ) touching one becomes full-width. Includes the Private Use Area, where the
# corpus keeps rare characters, and the geometric shapes (□ ○ ■) it uses for illegible ones.
WIDE = (
    "\u00b7\u2014\u2015\u2018-\u201f\u2026\u2236\u25a0-\u25ff\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff"
    "\u3100-\u312f\u31a0-\u31ff\u3200-\u9fff\ua000-\ua4cf\uac00-\ud7af\ue000-\uf8ff\uf900-\ufaff"
    "\ufe10-\ufe1f\ufe30-\ufe6f\uff00-\uffef\U00020000-\U0003ffff"
)
HALF_PUNCT = ",;:?!()\u2236"
TO_FULL = str.maketrans(",;:?!()\u2236", "，；：？！（）：")
SMALL_FORMS = str.maketrans("﹐﹑﹔﹕﹖﹗﹙﹚", "，、；：？！（）")

_WHITESPACE_RUN = re.compile(r"[^\S\n]+")
_SPACE_TO_DROP = re.compile(rf" (?:(?<=[{WIDE}] )|(?=[{WIDE}]|$))|^ ", re.MULTILINE)  # after runs became one space
_WIDE_CHAR = re.compile(f"[{WIDE}]")
_PUNCT_RUN = re.compile(f"[{re.escape(HALF_PUNCT)}]+")
_SMALL_FORM = re.compile("[﹐﹑﹔﹕﹖﹗﹙﹚]")
_HALF_OPEN_PAIR = re.compile(r"\(([^()（）\n]*)）")
_HALF_CLOSE_PAIR = re.compile(r"（([^()（）\n]*)\)")
_control_chars = None


def control_chars_re() -> re.Pattern:
    """Cc and Cf characters that are not whitespace (whitespace is collapsed instead)."""
    global _control_chars
    if _control_chars is None:
        codes = [
            c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cf") and not chr(c).isspace()
        ]
        ranges, start = [], codes[0]  # a class of ranges runs ~20x faster than one of 200 single characters
        for prev, code in zip(codes, codes[1:] + [None]):
            if code is None or code != prev + 1:
                ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
                start = code
        _control_chars = re.compile("[" + "".join(ranges) + "]")
    return _control_chars


# ----------------------------------------------------------------------------------------------
# Normalisation


def make_converter(config):
    """An OpenCC config name (clean.opencc) -> an opencc.OpenCC, or None for no conversion. An unknown config is an error."""
    if config is None or str(config).lower() in ("", "none"):
        return None
    import opencc

    valid = sorted(c.removesuffix(".json") for c in opencc.CONFIGS)
    name = str(config).removesuffix(".json")
    if name not in valid:
        raise PipelineError(f"params.yaml 'clean.opencc': unknown OpenCC config {config!r}; valid: {', '.join(valid)}, none")
    try:
        return opencc.OpenCC(name)
    except RuntimeError as exc:
        raise PipelineError(f"params.yaml 'clean.opencc': OpenCC could not load {config!r}: {exc}") from None


def normalise_lines(lines: list[str], converter=None, counts: dict | None = None) -> list[str]:
    """Apply steps 1-5 of the module docstring to every line; counts (if given) gets what changed.

    Works on all lines joined with "\\n", so each regex and OpenCC run once over a big block instead of
    once a line (a line's own newlines were whitespace and become spaces first).
    """
    counts = {} if counts is None else counts
    if not lines:  # "\n".join of no line would be one empty line
        for key in ("nfc_lines", "control_chars_removed", "whitespace_chars_removed", "punctuation_made_full_width",
                    "opencc_lines_changed"):
            counts[key] = counts.get(key, 0)
        return []
    lines = [s if s is not None else "" for s in lines]
    n_nfc = 0
    for i, s in enumerate(lines):
        if not unicodedata.is_normalized("NFC", s):
            lines[i] = unicodedata.normalize("NFC", s)
            n_nfc += 1
    text = "\n".join(lines)
    if text.count("\n") != len(lines) - 1:  # a line with newlines inside (jsonl)
        text = "\n".join(s.replace("\n", " ") for s in lines)
    text, n_control = control_chars_re().subn("", text)
    length = len(text)
    text = _WHITESPACE_RUN.sub(" ", text)
    text = _SPACE_TO_DROP.sub("", text)
    n_space = length - len(text)
    text, n_punct = _SMALL_FORM.subn(lambda m: m.group().translate(SMALL_FORMS), text)

    def to_full(m: re.Match) -> str:
        nonlocal n_punct
        start, end = m.span()
        if (start and _WIDE_CHAR.match(text, start - 1)) or _WIDE_CHAR.match(text, end):
            n_punct += end - start
            return m.group().translate(TO_FULL)
        return m.group()

    text = _PUNCT_RUN.sub(to_full, text)
    text, n1 = _HALF_OPEN_PAIR.subn(r"（\1）", text)
    text, n2 = _HALF_CLOSE_PAIR.subn(r"（\1）", text)
    n_punct += n1 + n2
    out = text.split("\n")
    n_opencc = 0
    if converter is not None:
        converted = converter.convert(text).split("\n")
        if len(converted) != len(out):  # never seen; OpenCC maps line by line
            converted = [converter.convert(s) for s in out]
        n_opencc = sum(a != b for a, b in zip(out, converted))
        out = converted
    assert len(out) == len(lines), "normalisation changed the number of lines"
    for key, n in (
        ("nfc_lines", n_nfc),
        ("control_chars_removed", n_control),
        ("whitespace_chars_removed", n_space),
        ("punctuation_made_full_width", n_punct),
        ("opencc_lines_changed", n_opencc),
    ):
        counts[key] = counts.get(key, 0) + n
    return out


def normalise_text(text: str, converter=None) -> str:
    return normalise_lines([text], converter)[0]


# ----------------------------------------------------------------------------------------------
# The leakage key (split's train/test check, pretrain's valid/test removal): one rule for both


_NOT_WORD = re.compile(r"[^\w\n]|_")  # punctuation, symbols, spaces; keeps CJK, Latin letters and digits


def leakage_key(sentence: str) -> str:
    """A sentence in NFKC with punctuation and spaces removed: `王曰：善。` and `王曰 善` both give `王曰善`, and a
    compatibility form counts as its character (full-width `ＡＢ１` as `AB1`, the Kangxi radical `⼈` as `人`)."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", sentence).replace("\n", " "))


def leakage_keys(sentences: list[str]) -> list[str]:
    """leakage_key of each sentence, in one pass over the joined text (the split stage's hundreds of thousands)."""
    text = "\n".join(unicodedata.normalize("NFKC", s).replace("\n", " ") for s in sentences)
    return _NOT_WORD.sub("", text).split("\n")
