"""Format: the JSONL contract that train and evaluate read, context sentences, template errors."""

from __future__ import annotations

import json
import yaml

import pandas as pd
import pytest

from stages import format as fmt
from wenyan.errors import PipelineError
from wenyan.files import read_jsonl

from conftest import REPO

PARAMS = {"system_prompt": "你是翻译家。", "user_template": "翻译：\n{classical}", "context_sentences": 0, "context_template": "上文：{context}\n"}


def frame(rows):
    """rows: (book, chapter, line, source)"""
    return pd.DataFrame(
        [
            {"id": f"c/{b}/{ch}#{ln}", "corpus": "c", "book": b, "chapter": ch, "line": ln, "source": s, "target": f"译{s}"}
            for b, ch, ln, s in rows
        ]
    )


def test_row_contract():
    (row,) = fmt.format_rows(frame([("史记", "本纪/五帝本纪", 3, "问曰：若何有？")]), PARAMS)
    assert row == {
        "id": "c/史记/本纪/五帝本纪#3",
        "book": "史记",
        "chapter": "本纪/五帝本纪",
        "line": 3,
        "source": "问曰：若何有？",
        "target": "译问曰：若何有？",
        "messages": [
            {"role": "system", "content": "你是翻译家。"},
            {"role": "user", "content": "翻译：\n问曰：若何有？"},
            {"role": "assistant", "content": "译问曰：若何有？"},
        ],
    }
    # evaluate prompts with messages[:-1] and scores against target: the answer is exactly the target
    assert row["messages"][-1] == {"role": "assistant", "content": row["target"]}
    assert row["messages"][-2]["role"] == "user"


def test_no_system_message_when_prompt_empty():
    (row,) = fmt.format_rows(frame([("书", "篇", 1, "甲。")]), {**PARAMS, "system_prompt": ""})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_context_is_previous_sentences_of_same_chapter_in_line_order():
    rows = [("书", "篇二", 1, "丁。"), ("书", "篇一", 3, "丙。"), ("书", "篇一", 1, "甲。"), ("书", "篇一", 2, "乙。"), ("书", "篇一", 5, "戊。")]
    stats = {}
    out = {r["id"]: r["messages"][1]["content"] for r in fmt.format_rows(frame(rows), {**PARAMS, "context_sentences": 2}, stats)}
    assert out["c/书/篇一#1"] == "翻译：\n甲。"  # first of its chapter: no context
    assert out["c/书/篇一#2"] == "上文：甲。\n翻译：\n乙。"
    assert out["c/书/篇一#3"] == "上文：甲。乙。\n翻译：\n丙。"
    assert out["c/书/篇一#5"] == "上文：乙。丙。\n翻译：\n戊。"  # line 4 is not in this split: the previous ones are
    assert out["c/书/篇二#1"] == "翻译：\n丁。"  # context never crosses chapters
    assert stats["with_context"] == 3
    assert stats["example"]["id"] == "c/书/篇一#2"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "params, message",
    [
        ({"user_template": "翻译：{text}"}, r"should contain \{classical\}"),
        ({"user_template": "{classical} {0}"}, "does not format"),
        ({"context_sentences": 2, "context_template": "上文：\n"}, r"should contain \{context\}"),
        ({"context_sentences": -1}, ">= 0"),
        ({"system_promt": "x"}, "did you mean 'system_prompt'"),
    ],
)
def test_bad_params(tmp_path, write_params, params, message):
    with pytest.raises(PipelineError, match=message):
        fmt.main(["--split-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"), "--params", str(write_params(format=params))])


def test_main_writes_splits_and_report(tmp_path, write_params):
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    frame([("书", "篇一", 1, "甲。"), ("书", "篇一", 2, "乙。")]).to_parquet(split_dir / "train.parquet", index=False)
    frame([("书", "篇二", 1, "丙。")]).to_parquet(split_dir / "valid.parquet", index=False)
    frame([]).reindex(columns=["id", "corpus", "book", "chapter", "line", "source", "target"]).to_parquet(split_dir / "test.parquet", index=False)
    out, report = tmp_path / "format", tmp_path / "format.json"
    fmt.main(["--split-dir", str(split_dir), "--out", str(out), "--report", str(report), "--params", str(write_params(format={"context_sentences": 1}))])
    train = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in train] == ["c/书/篇一#1", "c/书/篇一#2"]
    assert train[1]["messages"][1]["content"] == "上文：甲。\n翻译：\n乙。"
    assert read_jsonl(out / "test.jsonl") == []
    rep = json.loads(report.read_text(encoding="utf-8"))
    assert rep["rows"] == {"train": 2, "valid": 1, "test": 0}
    assert rep["splits"]["train"]["with_context"] == 1
    # mean prompt = system + user characters: (6 + 6) and (6 + 12) -> 15
    assert rep["splits"]["train"]["mean_prompt_chars"] == 15.0


@pytest.mark.bad_input
def test_missing_split_says_which_stage(tmp_path, write_params):
    with pytest.raises(PipelineError, match="train.parquet: not found; run the split stage first"):
        fmt.main(["--split-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"), "--params", str(write_params())])


def test_test_rows_of_books_held_out_by_split_are_unseen():
    """split.test_books sends 论语 to test whole: its test rows are unseen_book true; 史记's test chapters (the
    chapter test of a book train has) false; train and valid rows carry no such field."""
    from stages.split import assign_splits

    df = frame([(b, f"篇{c}", 1, f"{b}{c}。") for b, n in (("史记", 30), ("论语", 4)) for c in range(n)])
    assigned = assign_splits(df, 42, 0.2, 0.2, ["论语"])
    frames = {s: df[[a == s for a in assigned]] for s in fmt.SPLITS}
    seen = fmt.seen_books(frames)
    assert seen == {"史记"}
    test = list(fmt.format_rows(frames["test"], PARAMS, seen=seen))
    assert {r["book"]: r["unseen_book"] for r in test} == {"史记": False, "论语": True}  # both books have test rows
    assert [r["unseen_book"] for r in test] == [r["book"] == "论语" for r in test]
    assert not any("unseen_book" in r for r in fmt.format_rows(frames["train"], PARAMS))


def test_main_marks_test_rows_whose_book_has_no_train_or_valid_row(tmp_path, write_params):
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    frame([("史记", "篇一", 1, "甲。")]).to_parquet(split_dir / "train.parquet", index=False)
    frame([("孟子", "篇一", 1, "乙。")]).to_parquet(split_dir / "valid.parquet", index=False)  # seen through valid
    frame([("史记", "篇二", 1, "丙。"), ("孟子", "篇二", 1, "丁。"), ("论语", "学而", 1, "戊。"), ("论语", "学而", 2, "己。")]
          ).to_parquet(split_dir / "test.parquet", index=False)
    out, report = tmp_path / "format", tmp_path / "format.json"
    fmt.main(["--split-dir", str(split_dir), "--out", str(out), "--report", str(report), "--params", str(write_params())])
    test = read_jsonl(out / "test.jsonl")
    assert {r["id"]: r["unseen_book"] for r in test} == {
        "c/孟子/篇二#1": False, "c/史记/篇二#1": False, "c/论语/学而#1": True, "c/论语/学而#2": True}
    assert not any("unseen_book" in r for s in ("train", "valid") for r in read_jsonl(out / f"{s}.jsonl"))
    rep = json.loads(report.read_text(encoding="utf-8"))
    assert rep["splits"]["test"]["unseen_book_rows"] == 2 and "unseen_book_rows" not in rep["splits"]["train"]


def test_no_shipped_param_holds_a_newline_and_listed_lines_make_the_same_prompt():
    """`dvc exp show` prints a param value as it is: a newline in one (the templates had one) took every row two
    lines. params.yaml lists a template's lines instead; joined, they are the prompt the string gave."""
    from wenyan.prompt import build_messages, check_templates, join_templates

    shipped_params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def values(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from values(v)
        elif isinstance(node, list):
            for v in node:
                yield from values(v)
        else:
            yield node

    assert not [v for v in values(shipped_params) if isinstance(v, str) and "\n" in v]
    fmt = shipped_params["format"]
    assert isinstance(fmt["user_template"], list)
    as_string = {**fmt, "user_template": "将下面的文言文翻译成现代汉语：\n{classical}", "context_template": "上文：{context}\n"}
    check_templates(fmt)
    joined = join_templates(fmt)
    assert joined == join_templates(as_string) == as_string
    assert build_messages("学而", "学习", [], joined) == build_messages("学而", "学习", [], as_string)
