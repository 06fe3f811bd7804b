"""Ingest: NiuTrans layout from directories and archives, TSV, JSONL, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHAPTERS, N_PAIRS, REPO, make_archive, niutrans

from stages import ingest
from stages.common import PipelineError


def run_ingest(tmp_path, write_params, sources, **ingest_params):
    params = write_params(ingest={"sources": sources, **ingest_params})
    out, report = tmp_path / "out" / "pairs.parquet", tmp_path / "out" / "ingest.json"
    ingest.main(["--out", str(out), "--report", str(report), "--params", str(params)])
    return pd.read_parquet(out), json.loads(report.read_text(encoding="utf-8"))


def test_directory_rows_keep_provenance(tmp_path, make_corpus, write_params):
    df, report = run_ingest(tmp_path, write_params, [niutrans(make_corpus("corp"))])
    assert list(df.columns) == ["id", "corpus", "book", "chapter", "line", "source", "target"]
    assert len(df) == N_PAIRS and df["id"].is_unique
    row = df[df["id"] == "corp/史记/十二本纪/五帝本纪#3"].iloc[0]
    assert (row["corpus"], row["book"], row["chapter"], row["line"]) == ("corp", "史记", "十二本纪/五帝本纪", 3)
    assert row["source"] == "问曰： 若何有？ "  # raw text: clean normalises
    assert set(df[df["book"] == "论语"]["chapter"]) == {"学而篇"}
    assert report["pairs"] == N_PAIRS
    assert report["pairs_per_book"] == {"corp/史记": 5, "corp/论语": 3}
    assert report["files_read"] == 2 * len(CHAPTERS) and report["files_skipped"] == 0


def test_books_directly_or_under_bilingual_dir_give_same_pairs(tmp_path, make_corpus, write_params):
    a = make_corpus("corp", bilingual_dir=True, parent=tmp_path / "a")
    b = make_corpus("corp", bilingual_dir=False, parent=tmp_path / "b")
    df_a, _ = run_ingest(tmp_path, write_params, [niutrans(a)])
    df_b, _ = run_ingest(tmp_path, write_params, [niutrans(b)])
    pd.testing.assert_frame_equal(df_a, df_b)


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".tar", ".zip"])
def test_archives_give_same_pairs_as_directory(tmp_path, make_corpus, write_params, suffix):
    root = make_corpus("corp", parent=tmp_path / "dir")
    archive = make_archive(root, tmp_path / f"corp{suffix}")  # 双语数据/<book>/... at the top, as shipped
    df_dir, _ = run_ingest(tmp_path, write_params, [niutrans(root)])
    df_arc, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    pd.testing.assert_frame_equal(df_dir, df_arc)
    assert report["sources"][0]["corpus"] == "corp"


def test_archive_with_top_folder_named_like_it(tmp_path, make_corpus, write_params):
    root = make_corpus("corp", bilingual_dir=False, parent=tmp_path / "dir")
    archive = make_archive(root.parent, tmp_path / "corp.zip")  # corp/<book>/...
    df, _ = run_ingest(tmp_path, write_params, [niutrans(archive)])
    assert set(df["book"]) == {"史记", "论语"} and len(df) == N_PAIRS


@pytest.mark.bad_input
def test_bom_and_crlf_are_silent(tmp_path, make_corpus, write_params):
    plain = make_corpus("corp", parent=tmp_path / "plain")
    crlf = make_corpus("corp", parent=tmp_path / "crlf", line_end="\r\n")
    f = crlf / "双语数据/论语/学而篇/source.txt"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    df_plain, _ = run_ingest(tmp_path, write_params, [niutrans(plain)])
    df_crlf, report = run_ingest(tmp_path, write_params, [niutrans(crlf)])
    pd.testing.assert_frame_equal(df_plain, df_crlf)
    assert report["files_skipped"] == 0


@pytest.mark.bad_input
def test_blank_lines(tmp_path, make_corpus, write_params):
    chapters = {"书/篇": (["甲乙丙。", "", "", "丁戊己。", "", ""], ["甲乙丙啊。", "只有译文。", "", "丁戊己啊。"])}
    df, report = run_ingest(tmp_path, write_params, [niutrans(make_corpus(chapters=chapters))])
    # trailing blank lines are not lines; a pair blank on one side stays for clean; blank on both is skipped
    assert df["line"].tolist() == [1, 2, 4]
    assert df["source"].tolist() == ["甲乙丙。", "", "丁戊己。"]
    assert report["sources"][0]["blank_lines_skipped"] == 1


def test_bitext_where_source_and_target_are_absent(tmp_path, make_corpus, write_params):
    root = make_corpus(chapters={"孟子/梁惠王上": (["孟子见梁惠王。"], ["孟子拜见梁惠王。"])})
    d = root / "双语数据/孟子/梁惠王下"
    d.mkdir()
    (d / "bitext.txt").write_text("古文：庄暴见孟子。\n现代文：庄暴来见孟子。\n\n古文：王语暴以好乐。\n现代文：王告诉我他喜欢音乐。\n", encoding="utf-8")
    # beside source.txt/target.txt a bitext.txt is ignored
    (root / "双语数据/孟子/梁惠王上/bitext.txt").write_text("古文：别的。\n现代文：别的话。\n", encoding="utf-8")
    df, _ = run_ingest(tmp_path, write_params, [niutrans(root)])
    assert df["id"].tolist() == ["corp/孟子/梁惠王上#1", "corp/孟子/梁惠王下#1", "corp/孟子/梁惠王下#2"]
    assert df["target"].tolist()[1:] == ["庄暴来见孟子。", "王告诉我他喜欢音乐。"]


@pytest.mark.bad_input
def test_malformed_bitext_names_file_and_line(tmp_path, make_corpus, write_params):
    root = make_corpus(chapters={})
    d = root / "双语数据/孟子/梁惠王下"
    d.mkdir(parents=True)
    (d / "bitext.txt").write_text("古文：庄暴见孟子。\n译文：庄暴来见孟子。\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"bitext\.txt:2: expected a line starting with 古文"):
        run_ingest(tmp_path, write_params, [niutrans(root)])


def misaligned_corpus(make_corpus):
    root = make_corpus()
    (root / "双语数据/论语/学而篇/target.txt").write_text("只有一行。\n", encoding="utf-8")
    return root


@pytest.mark.bad_input
def test_misaligned_error_names_file_and_counts(tmp_path, make_corpus, write_params):
    with pytest.raises(PipelineError) as err:
        run_ingest(tmp_path, write_params, [niutrans(misaligned_corpus(make_corpus))], on_misaligned="error")
    message = str(err.value)
    assert "论语/学而篇/source.txt" in message and "论语/学而篇/target.txt" in message
    assert "3 lines" in message and "but 1 in" in message and "on_misaligned: skip" in message


@pytest.mark.bad_input
def test_misaligned_skip_is_counted(tmp_path, make_corpus, write_params):
    df, report = run_ingest(tmp_path, write_params, [niutrans(misaligned_corpus(make_corpus))], on_misaligned="skip")
    assert "论语" not in set(df["book"]) and len(df) == N_PAIRS - 3
    assert report["files_skipped"] == 1
    skipped = report["sources"][0]["skipped_files"][0]
    assert skipped["file"].endswith("论语/学而篇/source.txt") and skipped["reason"].startswith("misaligned")
    assert report["sources"][0]["skipped_by_reason"] == {"misaligned": 1}


@pytest.mark.bad_input
def test_missing_target_is_misaligned(tmp_path, make_corpus, write_params):
    root = make_corpus()
    (root / "双语数据/论语/学而篇/target.txt").unlink()
    with pytest.raises(PipelineError, match=r"学而篇/source\.txt has no target\.txt"):
        run_ingest(tmp_path, write_params, [niutrans(root)])
    df, report = run_ingest(tmp_path, write_params, [niutrans(root)], on_misaligned="skip")
    assert len(df) == N_PAIRS - 3 and report["files_skipped"] == 1


@pytest.mark.bad_input
def test_empty_file_is_a_counted_skip(tmp_path, make_corpus, write_params):
    root = make_corpus()
    (root / "双语数据/论语/学而篇/source.txt").write_bytes(b"")
    df, report = run_ingest(tmp_path, write_params, [niutrans(root)])
    assert len(df) == N_PAIRS - 3
    assert report["sources"][0]["skipped_by_reason"] == {"empty file": 1}
    assert report["sources"][0]["skipped_files"][0]["file"].endswith("论语/学而篇/source.txt")


@pytest.mark.bad_input
def test_non_utf8_names_file_line_and_encoding_option(tmp_path, make_corpus, write_params):
    root = make_corpus()
    (root / "双语数据/论语/学而篇/target.txt").write_bytes("第一行。\n第二行。\n第三行。\n".encode("gbk"))
    with pytest.raises(PipelineError) as err:
        run_ingest(tmp_path, write_params, [niutrans(root)])
    message = str(err.value)
    assert "论语/学而篇/target.txt:1:" in message and "not valid utf-8" in message and "encoding" in message


@pytest.mark.bad_input
def test_gbk_source_with_encoding_option(tmp_path, write_params):
    f = tmp_path / "gbk.tsv"
    f.write_bytes("子曰：学而时习之。\t孔子说：学习并时常温习。\n".encode("gbk"))
    df, _ = run_ingest(tmp_path, write_params, [{"path": str(f), "format": "tsv", "encoding": "gbk"}])
    assert df["source"].tolist() == ["子曰：学而时习之。"]


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".zip"])
def test_truncated_archive_names_archive(tmp_path, make_corpus, write_params, suffix):
    archive = make_archive(make_corpus(parent=tmp_path / "dir"), tmp_path / f"corp{suffix}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=rf"corp{suffix.replace('.', '[.]')}: corrupt or truncated archive"):
        run_ingest(tmp_path, write_params, [niutrans(archive)])


@pytest.mark.bad_input
def test_garbage_archive_names_archive(tmp_path, write_params):
    archive = tmp_path / "junk.tar.xz"
    archive.write_bytes(b"this is not an archive at all" * 10)
    with pytest.raises(PipelineError, match=r"junk\.tar\.xz: corrupt or truncated archive"):
        run_ingest(tmp_path, write_params, [niutrans(archive)])


@pytest.mark.bad_input
def test_book_filter(tmp_path, make_corpus, write_params):
    root = make_corpus()
    df, report = run_ingest(tmp_path, write_params, [niutrans(root, books=["论语"])])
    assert set(df["book"]) == {"论语"} and report["pairs"] == 3
    with pytest.raises(PipelineError) as err:
        run_ingest(tmp_path, write_params, [niutrans(root, books=["孟子"])])
    assert "孟子" in str(err.value) and "available books: 史记, 论语" in str(err.value)


@pytest.mark.bad_input
def test_book_filter_on_archive_lists_books(tmp_path, make_corpus, write_params):
    archive = make_archive(make_corpus(parent=tmp_path / "dir"), tmp_path / "corp.tar.gz")
    with pytest.raises(PipelineError, match="available books: 史记, 论语"):
        run_ingest(tmp_path, write_params, [niutrans(archive, books=["史紀"])])


def test_tsv_with_header_and_columns(tmp_path, write_params):
    f = tmp_path / "extra.tsv"
    f.write_text("source\ttarget\tbook\tchapter\n学而时习之。\t学习并时常温习。\t论语\t学而\n\n温故而知新。\t温习旧知识得到新体会。\t论语\t为政\n", encoding="utf-8")
    df, report = run_ingest(tmp_path, write_params, [{"path": str(f), "format": "tsv"}])
    assert df["id"].tolist() == ["extra/论语/为政#4", "extra/论语/学而#2"]
    assert report["pairs_per_book"] == {"extra/论语": 2}


def test_tsv_without_header_uses_file_name_and_line_chunks(tmp_path, write_params):
    f = tmp_path / "extra.tsv"
    f.write_text("".join(f"句{i}。\t第{i}句。\n" for i in range(1, 151)), encoding="utf-8")
    df, _ = run_ingest(tmp_path, write_params, [{"path": str(f), "format": "tsv"}])
    assert set(df["book"]) == {"extra"} and set(df["chapter"]) == {"lines-1-100", "lines-101-200"}
    assert df["id"].iloc[0] == "extra/extra/lines-1-100#1"


@pytest.mark.bad_input
def test_tsv_bad_line_names_file_and_line(tmp_path, write_params):
    f = tmp_path / "bad.tsv"
    f.write_text("甲。\t甲啊。\n乙。 乙啊。\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"bad\.tsv:2: expected 2 tab-separated columns"):
        run_ingest(tmp_path, write_params, [{"path": str(f), "format": "tsv"}])


@pytest.mark.bad_input
def test_jsonl(tmp_path, write_params):
    f = tmp_path / "more.jsonl"
    rows = [{"source": "学而时习之。", "target": "学习并时常温习。", "book": "论语", "chapter": "学而"}, {"source": "甲。", "target": "甲啊。"}]
    f.write_text("\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    df, _ = run_ingest(tmp_path, write_params, [{"path": str(f), "format": "jsonl"}])
    assert df["id"].tolist() == ["more/more/lines-1-100#2", "more/论语/学而#1"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "line, message",
    [('{"source": "甲。", "target": ', "not valid JSON"), ('{"source": "甲。"}', "no 'target' field"), ('["甲", "乙"]', "expected a JSON object"), ('{"source": 1, "target": "乙"}', "'source' should be a string")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, write_params, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"source": "甲。", "target": "甲啊。"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=rf"bad\.jsonl:2: {message}"):
        run_ingest(tmp_path, write_params, [{"path": str(f), "format": "jsonl"}])


@pytest.mark.bad_input
def test_empty_tsv_is_a_counted_skip(tmp_path, make_corpus, write_params):
    f = tmp_path / "empty.tsv"
    f.write_text("", encoding="utf-8")
    df, report = run_ingest(tmp_path, write_params, [niutrans(make_corpus()), {"path": str(f), "format": "tsv"}])
    assert len(df) == N_PAIRS and report["files_skipped"] == 1
    assert report["sources"][1]["skipped_files"] == [{"file": str(f), "reason": "empty file"}]


@pytest.mark.bad_input
def test_several_sources_and_name_clash(tmp_path, make_corpus, write_params):
    a = make_corpus("corp", parent=tmp_path / "a")
    b = make_corpus("corp", parent=tmp_path / "b")
    with pytest.raises(PipelineError, match="give one a distinct `name:`"):
        run_ingest(tmp_path, write_params, [niutrans(a), niutrans(b)])
    df, report = run_ingest(tmp_path, write_params, [niutrans(a), niutrans(b, name="corp2")])
    assert len(df) == 2 * N_PAIRS and [s["corpus"] for s in report["sources"]] == ["corp", "corp2"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "ingest_params, message",
    [
        ({"on_misalinged": "skip"}, "did you mean 'on_misaligned'"),
        ({"on_misaligned": "ignore"}, "ingest.on_misaligned must be one of error, skip"),
        ({"sources": [{"path": "x", "format": "csv"}]}, "format' should be one of niutrans, tsv, jsonl"),
        ({"sources": [{"path": "x", "fromat": "tsv"}]}, "did you mean 'format'"),
        ({"sources": [{"path": "does/not/exist"}]}, "does/not/exist: not found"),
        ({"sources": [{"path": ".", "encoding": "utf-9"}]}, "unknown encoding 'utf-9'"),
        ({"sources": []}, "non-empty list"),
    ],
)
def test_bad_params_are_clear_errors(tmp_path, write_params, ingest_params, message):
    params = write_params(ingest=ingest_params)
    with pytest.raises(PipelineError, match=message):
        ingest.main(["--out", str(tmp_path / "p.parquet"), "--report", str(tmp_path / "r.json"), "--params", str(params)])


@pytest.mark.bad_input
def test_cli_error_is_one_line_without_traceback(tmp_path, write_params):
    params = write_params(ingest={"sources": [{"path": str(tmp_path / "missing"), "format": "niutrans"}]})
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--out", str(tmp_path / "p.parquet"), "--report", str(tmp_path / "r.json"), "--params", str(params)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and f"error: {tmp_path / 'missing'}: not found" in proc.stderr
    assert not Path(tmp_path / "p.parquet").exists()
