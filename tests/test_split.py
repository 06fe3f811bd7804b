"""Split: by chapter, deterministic, stable when books are added, test books held out, leakage dropped."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stages import split
from wenyan.errors import PipelineError
from stages.split import assign_splits, chapter_split, leakage_keys


def corpus_frame(books: dict[str, int], lines_per_chapter: int = 3, corpus: str = "c") -> pd.DataFrame:
    """books: name -> number of chapters; every sentence unique."""
    rows = []
    for book, n_chapters in books.items():
        for c in range(n_chapters):
            for line in range(1, lines_per_chapter + 1):
                chapter = f"卷{c // 10}/篇{c}"
                rows.append(
                    {
                        "id": f"{corpus}/{book}/{chapter}#{line}",
                        "corpus": corpus,
                        "book": book,
                        "chapter": chapter,
                        "line": line,
                        "source": f"{book}{c}之{line}。",
                        "target": f"{book}第{c}篇第{line}句。",
                    }
                )
    return pd.DataFrame(rows)


def run_split(tmp_path, write_params, df, **split_params):
    pairs = tmp_path / "pairs.parquet"
    df.to_parquet(pairs, index=False)
    out, report = tmp_path / "split", tmp_path / "split.json"
    split.main(["--pairs", str(pairs), "--out", str(out), "--report", str(report), "--params", str(write_params(split=split_params))])
    frames = {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "valid", "test")}
    return frames, json.loads(report.read_text(encoding="utf-8"))


def chapters_of(frame):
    return set(frame["corpus"] + "/" + frame["book"] + "/" + frame["chapter"])


def test_chapter_split_is_a_pure_function_of_id_and_seed():
    assert chapter_split("c/史记/七十列传/伯夷列传", 42, 0.1, 0.1) == chapter_split("c/史记/七十列传/伯夷列传", 42, 0.1, 0.1)
    draws = [chapter_split(f"c/书/篇{i}", 42, 0.1, 0.2) for i in range(2000)]
    assert 0.17 < draws.count("test") / 2000 < 0.23 and 0.07 < draws.count("valid") / 2000 < 0.13
    other_seed = [chapter_split(f"c/书/篇{i}", 7, 0.1, 0.2) for i in range(2000)]
    assert draws != other_seed


def test_no_chapter_spans_two_splits_and_rows_are_kept(tmp_path, write_params):
    df = corpus_frame({"史记": 60, "论语": 20})
    frames, report = run_split(tmp_path, write_params, df, valid_fraction=0.1, test_fraction=0.2)
    chapters = [chapters_of(f) for f in frames.values()]
    assert not (chapters[0] & chapters[1]) and not (chapters[0] & chapters[2]) and not (chapters[1] & chapters[2])
    assert sum(len(f) for f in frames.values()) == len(df)  # no leakage in this corpus
    assert all(len(f) for f in frames.values())
    assert sorted(pd.concat(frames.values())["id"]) == sorted(df["id"])
    assert list(frames["train"].columns) == list(df.columns)
    assert report["splits"]["test"]["pairs"] == len(frames["test"])
    assert report["pairs_per_book"]["c/史记"]["train"] == int((frames["train"]["book"] == "史记").sum())


def test_same_seed_same_split(tmp_path, write_params):
    df = corpus_frame({"史记": 40})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, report_a = run_split(tmp_path / "a", write_params, df)
    b, report_b = run_split(tmp_path / "b", write_params, df)
    for s in a:
        pd.testing.assert_frame_equal(a[s], b[s])
    assert report_a == report_b


def test_adding_a_book_moves_no_other_chapter():
    small = corpus_frame({"史记": 50})
    big = pd.concat([small, corpus_frame({"汉书": 50})], ignore_index=True)
    before = dict(zip(small["id"], assign_splits(small, 42, 0.1, 0.2, [])))
    after = dict(zip(big["id"], assign_splits(big, 42, 0.1, 0.2, [])))
    assert all(after[i] == s for i, s in before.items())
    # and a different row order does not matter either
    shuffled = big.sample(frac=1, random_state=0)
    assert dict(zip(shuffled["id"], assign_splits(shuffled, 42, 0.1, 0.2, []))) == after


def test_test_books_are_held_out_whole(tmp_path, write_params):
    frames, report = run_split(tmp_path, write_params, corpus_frame({"史记": 30, "论语": 5}), test_books=["论语"])
    assert set(frames["test"][frames["test"]["book"] == "论语"]["chapter"]) == {f"卷0/篇{c}" for c in range(5)}
    assert "论语" not in set(frames["train"]["book"]) | set(frames["valid"]["book"])
    assert report["pairs_per_book"]["c/论语"] == {"train": 0, "valid": 0, "test": 15}


@pytest.mark.bad_input
def test_unknown_test_book_lists_books(tmp_path, write_params):
    with pytest.raises(PipelineError, match="孟子.*available books: 史记, 论语"):
        run_split(tmp_path, write_params, corpus_frame({"史记": 3, "论语": 2}), test_books=["孟子"])


def test_leakage_check_drops_train_and_valid_copies_of_test_sentences(tmp_path, write_params):
    df = corpus_frame({"史记": 30, "论语": 4})
    test_sentence = df.loc[df["book"] == "论语", "source"].iloc[0]
    leaks = df[df["book"] == "史记"].head(2).copy()
    df.loc[leaks.index[0], "source"] = test_sentence.replace("。", "！")  # punctuation differs: still a leak
    df.loc[leaks.index[1], "source"] = " " + test_sentence
    frames, report = run_split(tmp_path, write_params, df, test_books=["论语"], valid_fraction=0.0, test_fraction=0.0)
    assert report["leakage_dropped"] == {"train": 2, "valid": 0}
    assert report["splits"]["train"]["dropped_leakage"] == 2
    assert len(frames["train"]) == 30 * 3 - 2
    assert test_sentence in set(frames["test"]["source"])


def test_leakage_keys():
    assert leakage_keys(["王曰：善。", "王曰 善", "。。", "A, b_c"]) == ["王曰善", "王曰善", "", "Abc"]
    # compatibility forms (issue 29, class 5): full-width letters and digits, Kangxi radicals, compatibility ideographs
    assert leakage_keys(["ＡＢ１２曰", "⼈之初", "\uf900"]) == leakage_keys(["AB12曰", "人之初", "\u8c48"])


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "split_params, message",
    [({"test_fraction": 1.0}, r"split.test_fraction must be < 1"), ({"valid_fraction": 0.6, "test_fraction": 0.5}, "below 1"), ({"sed": 1}, "did you mean 'seed'"), ({"seed": "42"}, "should be int")],
)
def test_bad_params(tmp_path, write_params, split_params, message):
    with pytest.raises(PipelineError, match=message):
        run_split(tmp_path, write_params, corpus_frame({"史记": 3}), **split_params)
