"""Clean: normalisation rules, OpenCC, and each filter's count."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stages import clean
from wenyan.text import make_converter, normalise_lines, normalise_text
from wenyan.errors import PipelineError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("问曰： 若何有？ ", "问曰：若何有？"),  # the corpus's spaces where quotation marks were
        ("  诗人美而颂之曰 殷社芒芒！", "诗人美而颂之曰殷社芒芒！"),
        ("王曰\u3000善。", "王曰善。"),  # ideographic space
        ("Hello   world,\tfoo  bar", "Hello world, foo bar"),  # single spaces between Latin words stay
        ("曰:若何有?", "曰：若何有？"),
        ("甲,乙;丙!丁", "甲，乙；丙！丁"),
        ("注(见上)", "注（见上）"),
        ("有?)", "有？）"),
        ("之，(注）", "之，（注）"),  # a half-width bracket facing a full-width one
        ("比例 3:5, a (b)", "比例3:5, a (b)"),  # between Latin characters nothing changes
        ("天∶地", "天：地"),
        ("甲﹐乙﹕丙", "甲，乙：丙"),
        ("汉\u200b书\u200d\ufeff志\x07", "汉书志"),  # zero-width and control characters
        ("Cafe\u0301", "Café"),  # NFC
        ("\ufa0c兀", "兀兀"),  # CJK compatibility ideograph -> unified form (NFC)
        ("说。“善。”", "说。“善。”"),  # full stops and curly quotes untouched
    ],
)
def test_normalise_without_opencc(raw, expected):
    assert normalise_text(raw) == expected


def test_opencc_t2s_and_none():
    assert normalise_text("黄帝者，姓公孫，名曰軒轅。", make_converter("t2s")) == "黄帝者，姓公孙，名曰轩辕。"
    assert normalise_text("軒轅", make_converter("none")) == "軒轅"
    assert make_converter(None) is None


@pytest.mark.parametrize("config", ["t2s", "t2s.json", "s2t", "t2tw"])
def test_opencc_config_forms(config):
    assert make_converter(config).convert("汉") in ("汉", "漢")


@pytest.mark.bad_input
def test_unknown_opencc_config_lists_valid_ones():
    with pytest.raises(PipelineError) as err:
        make_converter("t2x")
    assert "'t2x'" in str(err.value) and "t2s" in str(err.value) and "s2twp" in str(err.value)


@pytest.mark.bad_input
def test_unknown_opencc_config_fails_before_reading(tmp_path, write_params):
    params = write_params(clean={"opencc": "simplified"})
    with pytest.raises(PipelineError, match="unknown OpenCC config 'simplified'"):
        clean.main(["--pairs", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o.parquet"), "--report", str(tmp_path / "r.json"), "--params", str(params)])


def test_lines_stay_aligned_with_newlines_inside():
    counts = {}
    out = normalise_lines(["甲\n乙", "", "丙 丁", None], None, counts)
    assert out == ["甲乙", "", "丙丁", ""]
    assert counts["whitespace_chars_removed"] == 2


def pairs_frame(rows):
    return pd.DataFrame(
        [
            {"id": f"c/书/篇#{i}", "corpus": "c", "book": "书", "chapter": "篇", "line": i, "source": s, "target": t}
            for i, (s, t) in enumerate(rows, 1)
        ]
    )


def run_clean(tmp_path, write_params, rows, **clean_params):
    pairs = tmp_path / "pairs.parquet"
    pairs_frame(rows).to_parquet(pairs, index=False)
    params = write_params(clean=clean_params)
    out, report = tmp_path / "clean" / "pairs.parquet", tmp_path / "clean.json"
    clean.main(["--pairs", str(pairs), "--out", str(out), "--report", str(report), "--params", str(params)])
    return pd.read_parquet(out), json.loads(report.read_text(encoding="utf-8"))


@pytest.mark.bad_input
def test_filters_count_each_rule(tmp_path, write_params):
    rows = [
        ("问曰： 若何有？ ", "问道： 有什么呢？"),  # kept, normalised
        ("", "只有译文。"),  # empty
        ("王曰：善。", "  "),  # empty after normalisation
        ("善", "好的"),  # too short (1 char)
        ("甲" * 30, "乙" * 31),  # too long (max_chars 30)
        ("曰", "他说了很多很多很多话。"),  # too short wins over ratio
        ("子曰：善。", "孔子说：好，很好，非常好，实在是太好了，好极了。"),  # ratio 5 > 4
        ("问曰：若何有？", "问道：有什么呢？"),  # duplicate of row 1 once normalised
        ("黄帝姓公孫。", "黄帝姓公孙。"),  # kept, t2s
        ("黄帝姓公孙。", "黄帝姓公孙。"),  # duplicate of the previous row after t2s
    ]
    df, report = run_clean(tmp_path, write_params, rows, max_chars=30)
    assert report["dropped"] == {"empty": 2, "too_short": 2, "too_long": 1, "ratio": 1, "duplicate": 2}
    assert report["pairs_in"] == 10 and report["pairs_kept"] == 2
    assert df["source"].tolist() == ["问曰：若何有？", "黄帝姓公孙。"]
    assert df["target"].tolist() == ["问道：有什么呢？", "黄帝姓公孙。"]
    assert df["id"].tolist() == ["c/书/篇#1", "c/书/篇#9"]  # provenance kept
    assert list(df.columns) == ["id", "corpus", "book", "chapter", "line", "source", "target"]
    assert report["normalised"]["source"]["opencc_lines_changed"] == 1
    assert report["kept_per_book"] == {"c/书": 2}


def test_dedupe_off_and_opencc_none(tmp_path, write_params):
    rows = [("黄帝姓公孫。", "黄帝姓公孙。"), ("黄帝姓公孫。", "黄帝姓公孙。")]
    df, report = run_clean(tmp_path, write_params, rows, dedupe=False, opencc="none")
    assert df["source"].tolist() == ["黄帝姓公孫。"] * 2 and report["dropped"]["duplicate"] == 0


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "clean_params, message",
    [
        ({"max_chars": 1, "min_chars": 2}, "below min_chars"),
        ({"max_ratio": 0.5}, "clean.max_ratio must be >= 1"),
        ({"min_char": 3}, "did you mean 'min_chars'"),
        ({"dedupe": "yes"}, "should be bool"),
    ],
)
def test_bad_params(tmp_path, write_params, clean_params, message):
    params = write_params(clean=clean_params)
    with pytest.raises(PipelineError, match=message):
        clean.main(["--pairs", "x", "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r"), "--params", str(params)])


@pytest.mark.bad_input
def test_missing_input_says_which_stage(tmp_path, write_params):
    with pytest.raises(PipelineError, match="run the ingest stage first"):
        clean.main(["--pairs", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r"), "--params", str(write_params())])
