"""The README's and docs' figures are the committed reports': every `<!-- results:NAME -->` block equals what
tools/results.py makes from reports/ (`python -m tools.results --write` refreshes them), and a block that no longer
matches its report is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools import results
from wenyan.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def test_committed_blocks_equal_the_committed_reports():
    assert results.check(REPO) == [], "stale README/docs figures: run python -m tools.results --write"


def test_every_block_is_used_and_the_readme_states_the_default_run():
    text = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in results.doc_files(REPO)}
    used = {m.group(2) for t in text.values() for m in results.BLOCK.finditer(t)}
    assert used == set(results.BLOCKS)
    readme = [m.group(2) for m in results.BLOCK.finditer(text["README.md"])]
    assert {"cpu-default", "gpu-best", "export-summary"} <= set(readme)
    metrics = json.loads((REPO / "reports/metrics.json").read_text(encoding="utf-8"))
    assert f"**BLEU {metrics['bleu']:.2f}**" in results.cpu_default(REPO)


def copy_of_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for rel in ("README.md", "dvc.lock", "docs", "reports/metrics.json", "reports/export.json", "reports/runs",
                "reports/benchmarks"):
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return root


def test_a_changed_report_names_the_stale_block_and_write_fixes_it(tmp_path, capsys):
    root = copy_of_repo(tmp_path)
    metrics = json.loads((root / "reports/metrics.json").read_text(encoding="utf-8"))
    metrics["bleu"] = 99.5
    (root / "reports/metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    assert results.check(root) == ["README.md: results:cpu-default", "docs/results.md: results:cpu-default"]
    with pytest.raises(SystemExit) as exit:
        results.main(["--check", "--root", str(root)])
    assert exit.value.code == 1 and "stale: README.md: results:cpu-default" in capsys.readouterr().out
    results.main(["--write", "--root", str(root)])
    assert "**BLEU 99.50**" in (root / "README.md").read_text(encoding="utf-8")
    assert results.check(root) == []
    results.main(["--check", "--root", str(root)])  # exits 0: returns


def test_an_edit_inside_a_block_is_stale_and_an_unknown_block_is_an_error(tmp_path):
    root = copy_of_repo(tmp_path)
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    readme.write_text(text.replace("**BLEU ", "**BLEU 1", 1), encoding="utf-8")
    assert results.check(root) == ["README.md: results:cpu-default"]
    readme.write_text(text + "\n<!-- results:nope -->\n<!-- /results:nope -->\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="unknown block results:nope"):
        results.check(root)
