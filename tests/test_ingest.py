"""Ingest: NiuTrans layout from directories and archives, TSV, JSONL, and every bad input."""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHAPTERS, N_PAIRS, REPO, make_archive, niutrans

from stages import ingest
from wenyan import archives
from wenyan.errors import PipelineError


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


def test_sources_as_a_mapping_by_name(tmp_path, make_corpus, write_params):
    """params.yaml's form (flat columns in `dvc exp show`): {name: {path, format, ...}}, the key the corpus name."""
    corpus = make_corpus("corp")
    df, report = run_ingest(tmp_path, write_params, {"my-corpus": {"path": str(corpus), "format": "niutrans"}})
    assert len(df) == N_PAIRS and report["sources"][0]["corpus"] == "my-corpus"
    assert df["id"].str.startswith("my-corpus/").all()
    with pytest.raises(PipelineError, match="ingest.sources.x.format' should be one of"):
        run_ingest(tmp_path, write_params, {"x": {"path": str(corpus), "format": "csv"}})
    # an old `-S ingest.sources.0.path=...` on the mapping would add a source "0" beside the shipped one: refused
    with pytest.raises(PipelineError, match=r"ingest.sources.0': sources are keyed by name \(ingest.sources.my-corpus.path"):
        run_ingest(tmp_path, write_params, {"my-corpus": {"path": str(corpus), "format": "niutrans"},
                                            "0": {"path": str(corpus)}})


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
        ({"sources": []}, "non-empty mapping"),
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


# ----------------------------------------------------------------------------------------------
# Links, special files, damaged downloads (issue 15): read what resolves inside the corpus, count the
# rest by reason, never open anything outside it or anything that is not a regular file.


def shared_chapter_tree(tmp_path, make_corpus):
    """A corpus in which a second chapter shares both its files with 五帝本纪 through hard links."""
    root = make_corpus(parent=tmp_path / "dir")
    a, b = root / "双语数据/史记/十二本纪/五帝本纪", root / "双语数据/史记/十二本纪/夏本纪"
    b.mkdir()
    for name in ("source.txt", "target.txt"):
        os.link(a / name, b / name)
    return root


def gnu_tar(root: Path, out: Path, *flags: str) -> Path:
    subprocess.run(["tar", *flags, "-cf", str(out), "-C", str(root), "."], check=True)
    return out


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix, flags", [(".tar", ()), (".tar.gz", ("-z",)), (".tar.xz", ("-J",))])
def test_gnu_tar_hard_links_between_chapters_are_read(tmp_path, make_corpus, write_params, suffix, flags):
    root = shared_chapter_tree(tmp_path, make_corpus)
    archive = gnu_tar(root, tmp_path / f"corp{suffix}", *flags)
    with tarfile.open(archive) as tar:
        assert sum(m.islnk() for m in tar.getmembers()) == 2  # GNU tar stored the second chapter as links
    df_dir, _ = run_ingest(tmp_path, write_params, [niutrans(root)])
    df_arc, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    pd.testing.assert_frame_equal(df_dir, df_arc)
    assert len(df_arc[df_arc["chapter"] == "十二本纪/夏本纪"]) == 3
    assert report["files_read"] == 2 * (len(CHAPTERS) + 1) and report["files_skipped"] == 0


def linked_tree(tmp_path, make_corpus):
    """Symlinks: a book linked inside the corpus, a chapter file linked inside, two linked outside, one dangling."""
    root = make_corpus(parent=tmp_path / "dir")
    books = root / "双语数据"
    (books / "论语副本").symlink_to("论语", target_is_directory=True)
    d = books / "史记/三十世家/吴太伯世家"
    d.mkdir(parents=True)
    (d / "source.txt").symlink_to("../../七十列传/伯夷列传/source.txt")
    (d / "target.txt").symlink_to("../../七十列传/伯夷列传/target.txt")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1:bin:/bin:/sbin/nologin\n", encoding="utf-8")
    out = books / "史记/三十世家/外链"
    out.mkdir()
    (out / "source.txt").write_text("甲。\n乙。\n", encoding="utf-8")
    (out / "target.txt").symlink_to(secret)  # absolute, outside the corpus
    rel_out = books / "史记/三十世家/相对外链"
    rel_out.mkdir()
    (rel_out / "source.txt").write_text("甲。\n乙。\n", encoding="utf-8")
    (rel_out / "target.txt").symlink_to("../../../../../secret.txt")  # relative, climbing out
    dangling = books / "史记/三十世家/断链"
    dangling.mkdir()
    (dangling / "source.txt").write_text("甲。\n", encoding="utf-8")
    (dangling / "target.txt").symlink_to("nowhere.txt")
    return root


def check_linked(df, report):
    assert "root:x" not in "".join(df["target"]) and "secret" not in "".join(df["target"])
    assert set(df[df["book"] == "论语副本"]["source"]) == set(CHAPTERS["论语/学而篇"][0])
    assert len(df[df["chapter"] == "三十世家/吴太伯世家"]) == 2
    assert not {"三十世家/外链", "三十世家/相对外链", "三十世家/断链"} & set(df["chapter"])
    reasons = report["sources"][0]["skipped_by_reason"]
    assert reasons.get("partner skipped") == 3 and sum(reasons.values()) == report["files_skipped"] == 6


@pytest.mark.bad_input
def test_directory_symlinks_read_inside_the_root_and_refused_outside(tmp_path, make_corpus, write_params):
    root = linked_tree(tmp_path, make_corpus)
    df, report = run_ingest(tmp_path, write_params, [niutrans(root)])
    check_linked(df, report)
    reasons = report["sources"][0]["skipped_by_reason"]
    assert reasons["link outside the corpus"] == 2 and reasons["dangling link"] == 1
    # the books filter sees a linked book
    df, _ = run_ingest(tmp_path, write_params, [niutrans(root, books=["论语副本"])])
    assert set(df["book"]) == {"论语副本"} and len(df) == 3


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix, flags", [(".tar", ()), (".tar.gz", ("-z",)), (".tar.xz", ("-J",))])
def test_tar_symlinks_read_inside_the_archive_and_counted_outside(tmp_path, make_corpus, write_params, suffix, flags):
    archive = gnu_tar(linked_tree(tmp_path, make_corpus), tmp_path / f"corp{suffix}", *flags)
    df, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    check_linked(df, report)  # never the link's target path as text, never the file outside
    reasons = report["sources"][0]["skipped_by_reason"]
    assert reasons["link outside the archive"] == 2 and reasons["dangling link"] == 1


def zip_with_links(path: Path, files: dict, links: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP's `zip --symlinks` stores one
            zf.writestr(info, target)
    return path


@pytest.mark.bad_input
def test_zip_symlinks_read_inside_the_archive_and_counted_outside(tmp_path, write_params):
    src, tgt = CHAPTERS["论语/学而篇"]
    files = {"双语数据/论语/学而篇/source.txt": "\n".join(src), "双语数据/论语/学而篇/target.txt": "\n".join(tgt),
             "双语数据/孟子/篇/source.txt": "甲。\n"}
    links = {"双语数据/论语/学而篇二/source.txt": "../学而篇/source.txt", "双语数据/论语/学而篇二/target.txt": "../学而篇/target.txt",
             "双语数据/论语副本": "论语", "双语数据/孟子/篇/target.txt": "/etc/passwd"}
    df, report = run_ingest(tmp_path, write_params, [niutrans(zip_with_links(tmp_path / "corp.zip", files, links))])
    assert df.groupby("book").size().to_dict() == {"论语": 6, "论语副本": 6}
    assert "/etc/passwd" not in "".join(df["target"]) and "学而篇/source.txt" not in "".join(df["source"])
    assert report["sources"][0]["skipped_by_reason"] == {"link outside the archive": 1, "partner skipped": 1}


@pytest.mark.bad_input
def test_link_loops_do_not_hang(tmp_path, make_corpus, write_params):
    root = make_corpus(parent=tmp_path / "dir")
    (root / "双语数据/论语/学而篇/回环").symlink_to("..", target_is_directory=True)
    (root / "双语数据/史记/自指").symlink_to("自指")
    df, report = run_ingest(tmp_path, write_params, [niutrans(root)])
    assert len(df) == N_PAIRS and report["files_skipped"] == 2
    archive = gnu_tar(root, tmp_path / "corp.tar")
    df, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    assert len(df) == N_PAIRS and report["files_skipped"] == 2


def ingest_cli(tmp_path, params, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--out", str(tmp_path / "o" / "p.parquet"), "--report",
         str(tmp_path / "o" / "r.json"), "--params", str(params)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.bad_input
def test_fifo_socket_device_and_directory_where_a_file_belongs_are_counted_never_opened(tmp_path, make_corpus, write_params, monkeypatch):
    root = make_corpus(parent=tmp_path / "dir")
    books = root / "双语数据"
    os.mkfifo(books / "论语/学而篇/source.txt.fifo")
    os.replace(books / "论语/学而篇/source.txt.fifo", books / "论语/学而篇/source.txt")  # a FIFO named source.txt
    (books / "史记/七十列传/伯夷列传/target.txt").unlink()
    (books / "史记/七十列传/伯夷列传/target.txt").mkdir()  # a directory named target.txt
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(books / "史记/十二本纪/五帝本纪")  # a socket's path must be short
    sock.bind("bitext.txt")  # unused beside source+target, still counted
    expected = {"not a regular file": 3, "partner skipped": 2}
    try:
        os.mknod(books / "史记/README.txt", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["not a regular file"] += 1
    except OSError:
        pass  # no permission to make a device file here
    params = write_params(ingest={"sources": [niutrans(root)]})
    proc = ingest_cli(tmp_path, params)  # in a subprocess with a timeout: a FIFO opened for reading blocks
    sock.close()
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o" / "r.json").read_text(encoding="utf-8"))
    assert report["sources"][0]["skipped_by_reason"] == expected
    assert report["pairs"] == 3 and "fifo" in str(report) and "is a directory" in str(report)


@pytest.mark.bad_input
def test_tar_fifo_member_and_unsafe_member_paths(tmp_path, write_params):
    archive = tmp_path / "corp.tar"
    with tarfile.open(archive, "w") as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data))
        add("/双语数据/论语/学而篇/source.txt", "甲。\n".encode())  # absolute: read as 双语数据/...
        add("/双语数据/论语/学而篇/target.txt", "甲啊。\n".encode())
        add("../../etc/双语数据/孟子/篇/source.txt", "乙。\n".encode())  # climbs out: counted, not read
        add("双语数据/孟子/篇/target.txt", "乙啊。\n".encode())
        add("双语数据/孟子/篇二/source.txt", kind=tarfile.FIFOTYPE)
        add("双语数据/孟子/篇二/target.txt", "丙啊。\n".encode())
    df, report = run_ingest(tmp_path, write_params, [niutrans(archive)], on_misaligned="skip")
    assert df["id"].tolist() == ["corp/论语/学而篇#1"]
    reasons = report["sources"][0]["skipped_by_reason"]
    assert reasons == {"member path outside the archive": 1, "not a regular file": 1, "partner skipped": 2}


@pytest.mark.bad_input
def test_gbk_member_names_in_a_tar(tmp_path, write_params):
    archive = tmp_path / "corp.tar"
    with tarfile.open(archive, "w", encoding="gbk") as tar:  # as written on a Chinese-locale system
        for name, text in (("source.txt", "甲。\n"), ("target.txt", "甲啊。\n")):
            info = tarfile.TarInfo(f"双语数据/论语/学而篇/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    df, _ = run_ingest(tmp_path, write_params, [niutrans(archive)])
    assert df["id"].tolist() == ["corp/论语/学而篇#1"]


# ----------------------------------------------------------------------------------------------
# Damaged downloads: cut anywhere, or a byte flipped, is one error line naming the archive


def big_corpus(make_corpus, parent):
    """Chapters of tens of kB of varied text, so that cuts fall inside members and compression keeps them large."""
    rng = random.Random(15)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    chapters = {}
    for key in ("史记/本纪/甲", "史记/本纪/乙", "论语/学而"):
        n = 400
        chapters[key] = (["".join(rng.choices(chars, k=30)) for _ in range(n)], ["".join(rng.choices(chars, k=40)) for _ in range(n)])
    return make_corpus(chapters=chapters, parent=parent)


def cut_points(size: int) -> list[int]:
    return sorted({max(1, size * k // 16 + k * 37 % 511) for k in range(1, 16)} | {size - 1})


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz", ".zip"])
def test_archive_cut_anywhere_is_one_clear_error(tmp_path, make_corpus, write_params, suffix):
    archive = make_archive(big_corpus(make_corpus, tmp_path / "dir"), tmp_path / f"corp{suffix}")
    data = archive.read_bytes()
    assert len(data) > 100_000
    df_good, _ = run_ingest(tmp_path, write_params, [niutrans(archive)])
    for cut in cut_points(len(data)):
        archive.write_bytes(data[:cut])
        with pytest.raises(PipelineError, match=rf"corp{re.escape(suffix)}: corrupt or truncated archive"):
            run_ingest(tmp_path, write_params, [niutrans(archive)])
    archive.write_bytes(data[: len(data) // 3])
    proc = ingest_cli(tmp_path, write_params(ingest={"sources": [niutrans(archive)]}))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {archive}: corrupt or truncated archive")


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz", ".zip"])
def test_archive_with_a_flipped_byte_is_an_error_or_the_same_pairs(tmp_path, make_corpus, write_params, suffix):
    """Compressed formats carry checksums: a flipped byte anywhere never changes the text silently."""
    archive = make_archive(big_corpus(make_corpus, tmp_path / "dir"), tmp_path / f"corp{suffix}")
    data = archive.read_bytes()
    df_good, _ = run_ingest(tmp_path, write_params, [niutrans(archive)])
    errors = 0
    for offset in cut_points(len(data)):
        archive.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :])
        try:
            df, _ = run_ingest(tmp_path, write_params, [niutrans(archive)])
        except PipelineError as exc:
            assert f"corp{suffix}: corrupt or truncated archive" in str(exc)
            errors += 1
        else:
            pd.testing.assert_frame_equal(df, df_good)
    assert errors >= 10


@pytest.mark.bad_input
def test_zip_bad_crc_in_member_data(tmp_path, write_params):
    archive = tmp_path / "corp.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("双语数据/论语/学而篇/source.txt", "子曰：学而时习之。\n" * 2000)
        zf.writestr("双语数据/论语/学而篇/target.txt", "孔子说：学习。\n" * 2000)
    data = bytearray(archive.read_bytes())
    data[20_000] ^= 0x01  # inside source.txt's stored data
    archive.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"corp\.zip: corrupt or truncated archive \(BadZipFile: Bad CRC-32"):
        run_ingest(tmp_path, write_params, [niutrans(archive)])


# ----------------------------------------------------------------------------------------------
# Files too large for memory are skipped (niutrans) or refused (tsv/jsonl) by size, never read


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["dir", ".tar.gz", ".zip"])
def test_member_over_the_size_limit_is_skipped_unread(tmp_path, make_corpus, write_params, monkeypatch, kind):
    root = make_corpus(parent=tmp_path / "dir")
    (root / "双语数据/论语/学而篇/target.txt").write_text("很长的译文。" * 200, encoding="utf-8")
    source = root if kind == "dir" else make_archive(root, tmp_path / f"corp{kind}")
    monkeypatch.setattr(archives, "MAX_FILE_BYTES", 2000)
    df, report = run_ingest(tmp_path, write_params, [niutrans(source)])
    assert len(df) == N_PAIRS - 3
    assert report["sources"][0]["skipped_by_reason"] == {"too large": 1, "partner skipped": 1}
    assert "limit 2,000" in str(report["sources"][0]["skipped_files"])


@pytest.mark.bad_input
def test_zip_declaring_a_huge_member_is_skipped_without_reading(tmp_path, make_corpus, write_params):
    archive = make_archive(make_corpus(parent=tmp_path / "dir"), tmp_path / "corp.zip")
    data = bytearray(archive.read_bytes())
    target = "双语数据/论语/学而篇/target.txt".encode()
    entry = data.find(b"PK\x01\x02")  # the central directory's entries: the name sits at +46
    while data[entry + 46 : entry + 46 + len(target)] != target:
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = (0xFFFF_FFF0).to_bytes(4, "little")  # declared size: ~4 GiB (a zip bomb's claim)
    archive.write_bytes(bytes(data))
    df, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    assert len(df) == N_PAIRS - 3 and report["sources"][0]["skipped_by_reason"] == {"too large": 1, "partner skipped": 1}


@pytest.mark.bad_input
def test_tsv_over_the_size_limit_is_refused(tmp_path, write_params, monkeypatch):
    f = tmp_path / "big.tsv"
    f.write_text("甲。\t甲啊。\n" * 500, encoding="utf-8")
    monkeypatch.setattr(archives, "MAX_FILE_BYTES", 2000)
    with pytest.raises(PipelineError, match=r"big\.tsv: too large: .* bytes \(limit 2,000 a file\); split it"):
        run_ingest(tmp_path, write_params, [{"path": str(f), "format": "tsv"}])


@pytest.mark.bad_input
@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_line_source_that_is_a_fifo_or_directory_is_a_clear_error(tmp_path, write_params, fmt):
    fifo, directory = tmp_path / f"pipe.{fmt}", tmp_path / f"dir.{fmt}"
    os.mkfifo(fifo)
    directory.mkdir()
    for path, what in ((fifo, "fifo"), (directory, "directory")):
        proc = ingest_cli(tmp_path, write_params(ingest={"sources": [{"path": str(path), "format": fmt}]}))
        assert proc.returncode == 1 and f"error: {path}: a {fmt} source must be a regular file (it is a {what})" in proc.stderr


# ----------------------------------------------------------------------------------------------
# JSONL fields, encodings, params top level


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"source": null, "target": "乙"}', "'source' should be a string, got null"),
        ('{"source": "甲", "target": null}', "'target' should be a string, got null"),
        ('{"source": "甲", "target": 3.5}', "'target' should be a string, got float 3.5"),
        ('{"source": ["甲"], "target": "乙"}', "'source' should be a string, got list"),
        ('{"source": {"a": 1}, "target": "乙"}', "'source' should be a string, got dict"),
        ('{"source": "甲", "target": "乙", "book": 7}', "'book' should be a string, got int 7"),
        ('{"source": "甲", "target": "乙", "chapter": false}', "'chapter' should be a string, got bool"),
        ('{"source": "\\ud800甲", "target": "乙"}', "'source' holds a lone surrogate"),
        ('{"source": "甲", "target": "乙\\udfff"}', "'target' holds a lone surrogate"),
        ('{"source": "甲", "target": "乙", "book": "\\ud83d"}', "'book' holds a lone surrogate"),
        ('{"source": NaN, "target": "乙"}', "'source' should be a string, got float"),
        ('{"\\ud800": "甲", "target": "乙"}', "no 'source' field (has \\ud800, target)"),
    ],
)
def test_jsonl_null_non_string_and_surrogate_fields_name_file_and_line(tmp_path, write_params, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"source": "\\ud83d\\ude00甲。", "target": "甲啊。"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=rf"bad\.jsonl:2: {re.escape(message)}"):
        run_ingest(tmp_path, write_params, [{"path": str(f), "format": "jsonl"}])


@pytest.mark.bad_input
@pytest.mark.parametrize("encoding", ["utf-9", "hex", "rot13", "base64", "", None, 8])
def test_unknown_or_non_text_encoding_is_one_line_naming_the_source(tmp_path, write_params, make_corpus, encoding):
    root = make_corpus(parent=tmp_path / "dir")
    proc = ingest_cli(tmp_path, write_params(ingest={"sources": [niutrans(root, encoding=encoding)]}))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "ingest.sources[0].encoding" in proc.stderr and (isinstance(encoding, int) or str(root) in proc.stderr)


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["- ingest\n- clean\n", "42\n", "just a string\n", "ingest\n", "", "# only a comment\n"])
def test_params_file_whose_top_level_is_not_a_mapping_is_one_line(tmp_path, text):
    params = tmp_path / "params.yaml"
    params.write_text(text, encoding="utf-8")
    proc = ingest_cli(tmp_path, params)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert f"{params}: the top level should be a mapping" in proc.stderr or f"{params}: empty" in proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["directory", "fifo", "gbk"])
def test_params_file_that_is_not_a_readable_text_file_is_one_line(tmp_path, kind):
    params = tmp_path / "params.yaml"
    if kind == "directory":
        params.mkdir()
    elif kind == "fifo":
        os.mkfifo(params)  # opening it would block
    else:
        params.write_bytes("ingest:\n  sources: []  # 古文\n".encode("gbk"))
    proc = ingest_cli(tmp_path, params, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"error: {params}: ")


@pytest.mark.bad_input
def test_books_null_is_a_clear_error(tmp_path, write_params, make_corpus):
    with pytest.raises(PipelineError, match=r"books' should be a list"):
        run_ingest(tmp_path, write_params, [niutrans(make_corpus(), books=None)])


# ----------------------------------------------------------------------------------------------
# Temporary files left by kill -9


@pytest.mark.bad_input
def test_stale_temp_files_of_a_killed_run_are_removed_and_ignored_by_git(tmp_path, make_corpus, write_params):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = [out_dir / f".pairs.parquet.{dead.pid}-k3j2h1g0.partial.tmp", out_dir / f".ingest.json.{dead.pid}-abc.partial.tmp",
             out_dir / ".pairs.parquet.x8m2q9zt.tmp"]  # the last: an earlier version's name
    live = out_dir / f".pairs.parquet.{os.getppid()}-zzz.partial.tmp"  # a writer still running: left alone
    unrelated = out_dir / ".other.parquet.x8m2q9zt.tmp"
    for p in (*stale, live, unrelated):
        p.write_bytes(b"PAR1 half a file")
    run_ingest(tmp_path, write_params, [niutrans(make_corpus())])
    assert not any(p.exists() for p in stale) and live.exists() and unrelated.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["ingest.json", "pairs.parquet", live.name, unrelated.name])
    for name in ("reports/data/.ingest.json.1234-ab_cd12.partial.tmp", "data/ingest/.pairs.parquet.99-x.partial.tmp",
                 ".params.yaml.5-y.partial.tmp"):
        assert subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO).returncode == 0, name


@pytest.mark.bad_input
def test_ingest_killed_mid_run_leaves_only_ignored_temp_files(tmp_path, make_corpus, write_params):
    """kill -9 while the outputs are being written: what is left is ignored by git and gone after the next run."""
    params = write_params(ingest={"sources": [niutrans(make_corpus())]})
    out_dir = tmp_path / "o"
    code = (
        "import os, signal; from stages import ingest\n"
        "def die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ingest.write_json = die\n"
        f"ingest.main(['--out', {str(out_dir / 'p.parquet')!r}, '--report', {str(out_dir / 'r.json')!r}, '--params', {str(params)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    left = sorted(p.name for p in out_dir.iterdir())
    assert left and all(name.endswith(".partial.tmp") for name in left)
    assert ingest_cli(tmp_path, params).returncode == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["p.parquet", "r.json"]


@pytest.mark.bad_input
def test_tar_bz2_cut_anywhere_is_one_clear_error(tmp_path, make_corpus, write_params):
    archive = gnu_tar(big_corpus(make_corpus, tmp_path / "dir"), tmp_path / "corp.tar.bz2", "-j")
    data = archive.read_bytes()
    run_ingest(tmp_path, write_params, [niutrans(archive)])
    for cut in cut_points(len(data))[::2]:
        archive.write_bytes(data[:cut])
        with pytest.raises(PipelineError, match=r"corp\.tar\.bz2: corrupt or truncated archive"):
            run_ingest(tmp_path, write_params, [niutrans(archive)])


@pytest.mark.bad_input
def test_niutrans_source_that_is_a_fifo_is_a_clear_error(tmp_path, write_params):
    fifo = tmp_path / "corp.tar.xz"
    os.mkfifo(fifo)
    proc = ingest_cli(tmp_path, write_params(ingest={"sources": [niutrans(fifo)]}))
    assert proc.returncode == 1 and f"error: {fifo}: a niutrans source must be a directory or an archive" in proc.stderr
    assert "(it is a fifo)" in proc.stderr


@pytest.mark.bad_input
def test_tar_hard_link_to_a_missing_member_is_counted(tmp_path, write_params):
    archive = tmp_path / "corp.tar"
    with tarfile.open(archive, "w") as tar:
        for name, text in (("双语数据/论语/学而篇/source.txt", "甲。\n"), ("双语数据/论语/学而篇/target.txt", "甲啊。\n"),
                           ("双语数据/论语/为政篇/source.txt", "乙。\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
        info = tarfile.TarInfo("双语数据/论语/为政篇/target.txt")
        info.type, info.linkname = tarfile.LNKTYPE, "双语数据/论语/别处/target.txt"
        tar.addfile(info)
    df, report = run_ingest(tmp_path, write_params, [niutrans(archive)])
    assert df["id"].tolist() == ["corp/论语/学而篇#1"]
    assert report["sources"][0]["skipped_by_reason"] == {"dangling link": 1, "partner skipped": 1}


@pytest.mark.bad_input
def test_corpus_root_given_through_a_symlink_reads_links_inside_it(tmp_path, make_corpus, write_params):
    root = linked_tree(tmp_path, make_corpus)
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    df, report = run_ingest(tmp_path, write_params, [niutrans(alias)])
    check_linked(df, report)


@pytest.mark.bad_input
def test_zip_windows_separators_absolute_and_climbing_member_names(tmp_path, write_params):
    files = {"双语数据\\论语\\学而篇\\source.txt": "甲。\n", "双语数据\\论语\\学而篇\\target.txt": "甲啊。\n",
             "/双语数据/孟子/篇/source.txt": "乙。\n", "/双语数据/孟子/篇/target.txt": "乙啊。\n",
             "../双语数据/庄子/篇/source.txt": "丙。\n", "双语数据/庄子/篇/target.txt": "丙啊。\n"}
    df, report = run_ingest(tmp_path, write_params, [niutrans(zip_with_links(tmp_path / "corp.zip", files, {}))])
    assert df["id"].tolist() == ["corp/孟子/篇#1", "corp/论语/学而篇#1"]
    assert report["sources"][0]["skipped_by_reason"] == {"member path outside the archive": 1, "partner skipped": 1}


@pytest.mark.parametrize("order", [("source.txt", "target.txt"), ("target.txt", "source.txt")])
def test_a_newer_pair_appended_to_a_tar_is_read_whole_never_new_with_old(tmp_path, make_corpus, write_params, order):
    """`tar rf` of a newer source.txt, then a newer target.txt, of one chapter (one line more than before): the chapter
    is read once the walk is over, as `tar x` leaves it, so on_misaligned: error never sees the new source beside the
    old target (that pairing used to fail the whole ingest)."""
    archive = make_archive(make_corpus(), tmp_path / "corp.tar")
    src, tgt = CHAPTERS["论语/学而篇"]
    newer = {"source.txt": [*src, "新增"], "target.txt": [*tgt, "新加的一句"]}
    with tarfile.open(archive, "a") as tar:
        for name in order:
            data = ("\n".join(newer[name]) + "\n").encode()
            info = tarfile.TarInfo(f"双语数据/论语/学而篇/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    df, report = run_ingest(tmp_path, write_params, [{"path": str(archive), "format": "niutrans"}], on_misaligned="error")
    rows = df[df["book"] == "论语"]
    assert rows["source"].tolist() == newer["source.txt"] and rows["target"].tolist() == newer["target.txt"]
    assert report["sources"][0]["not_used_by_reason"]["replaced by a later archive member of the same name (as tar x)"] == 2
