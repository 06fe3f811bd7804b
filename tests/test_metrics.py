"""wenyan/metrics.py: which test rows are scored (a seeded sample in file order, the unseen books apart), sacrebleu's
BLEU and chrF with their signatures and a bootstrap interval, length buckets. (The evaluate stage that uses them:
tests/test_evaluate.py.)"""

from __future__ import annotations

from tiny import LUNYU_PAIRS

from wenyan.metrics import length_bucket, score, select_evaluated, select_rows


def test_select_rows_is_deterministic_spread_and_keeps_file_order():
    rows = [{"id": f"{b}-{i}", "book": b, "line": i} for b in ("论语", "孟子", "史记") for i in range(200)]
    picked = select_rows(rows, 60, seed=0)
    assert picked == select_rows(rows, 60, seed=0)
    assert len(picked) == 60 and {r["book"] for r in picked} == {"论语", "孟子", "史记"}
    assert picked != rows[:60] and [rows.index(r) for r in picked] == sorted(rows.index(r) for r in picked)
    assert select_rows(rows, 60, seed=1) != picked
    assert select_rows(rows, 0, seed=0) == rows and select_rows(rows, 10_000, seed=0) == rows


def test_select_evaluated_samples_the_chapter_test_and_the_unseen_books_apart():
    chapter = [{"id": f"{b}-{i}", "book": b, "unseen_book": False} for b in ("论语", "史记") for i in range(200)]
    unseen = [{"id": f"孟子-{i}", "book": "孟子", "unseen_book": True} for i in range(100)]
    rows = chapter[:200] + unseen[:50] + chapter[200:] + unseen[50:]  # the groups interleaved in the file
    picked = select_evaluated(rows, 60, seed=0)
    # each group sampled on its own, up to num_samples each, with the same seed; all in file order
    assert [r for r in picked if not r["unseen_book"]] == select_rows(chapter, 60, seed=0)
    assert [r for r in picked if r["unseen_book"]] == select_rows(unseen, 60, seed=0)
    assert len(picked) == 120 and [rows.index(r) for r in picked] == sorted(rows.index(r) for r in picked)
    assert select_evaluated(rows, 0, seed=0) == rows and len(select_evaluated(rows, 80, seed=0)) == 160
    # without unseen-book rows: exactly select_rows, with the field false or absent
    for sample in (chapter, [{k: v for k, v in r.items() if k != "unseen_book"} for r in chapter]):
        for n in (0, 7, 60, 10_000):
            assert select_evaluated(sample, n, seed=3) == select_rows(sample, n, seed=3)


def test_score_has_zh_signature_and_bootstrap_ci():
    refs = [t for _, t in LUNYU_PAIRS]
    perfect = score(refs, refs, n_bootstrap=50)
    assert perfect["bleu"] == 100.0 and perfect["chrf"] == 100.0
    assert "tok:zh" in perfect["bleu_signature"] and "bs:50" in perfect["bleu_signature"]
    assert perfect["chrf_signature"].startswith("nrefs:1|") and "nc:6" in perfect["chrf_signature"]
    copy = score([s for s, _ in LUNYU_PAIRS], refs, n_bootstrap=200)
    assert 0 < copy["bleu"] < 100 and copy["bleu_ci95"]["low"] <= copy["bleu"] <= copy["bleu_ci95"]["high"]
    assert "bleu_ci95" not in score(refs, refs)


def test_length_buckets():
    bounds = [10, 20, 40]
    assert [length_bucket(n, bounds) for n in (1, 10, 11, 20, 21, 40, 41, 500)] == [
        "1-10", "1-10", "11-20", "11-20", "21-40", "21-40", "41+", "41+"]
