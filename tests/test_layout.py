"""The layout holds: stages/ are DVC stage scripts that import only the wenyan library, tools/ import only wenyan,
wenyan never imports stages or tools and has no main(); and every dvc.yaml stage declares as code deps exactly its
script and the wenyan modules it reaches (imports read with ast, function-level ones too: tools/deps.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tools import deps

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("stages", "wenyan", "tools", "benchmarks", "tests")


def project_imports(path: Path) -> set[str]:
    """The first component of every project package a file imports (stages, wenyan, tools, ...)."""
    return {name.split(".")[0] for name in deps.imported_modules(path)} & set(PROJECT)


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("package, allowed", [("stages", {"wenyan"}), ("tools", {"wenyan"}), ("wenyan", {"wenyan"})])
def test_each_package_imports_only_what_it_may(package, allowed):
    wrong = {p.relative_to(ROOT).as_posix(): sorted(project_imports(p) - allowed) for p in files(package)}
    assert not {k: v for k, v in wrong.items() if v}


def test_the_library_has_no_main_and_no_argparse():
    for path in files("wenyan"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "main"], path
        assert "argparse" not in deps.imported_modules(path), path


def test_one_stage_script_per_dvc_stage():
    stages = set()
    for name in deps.PIPELINES:
        stages |= set(yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))["stages"])
    scripts = {p.stem for p in files("stages")} - {"__init__"}
    assert scripts == stages
    for name in deps.PIPELINES:
        for stage, spec in yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))["stages"].items():
            assert spec["cmd"].split()[:3] == ["python", "-m", f"stages.{stage}"], stage


def test_every_stage_declares_exactly_the_code_it_imports():
    results = deps.check()
    assert len(results) == len({p.stem for p in files("stages")} - {"__init__"})
    differ = {stage: {"declared": declared, "derived": derived} for stage, (declared, derived) in results.items()
              if declared != derived}
    assert not differ, f"dvc.yaml code deps differ from the imports (python -m tools.deps --write): {differ}"


def test_derived_deps_follow_function_level_imports(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "wenyan").mkdir()
    (tmp_path / "stages" / "s.py").write_text("def main():\n    from wenyan import a\n")
    (tmp_path / "wenyan" / "a.py").write_text("def f():\n    import wenyan.b\n")
    (tmp_path / "wenyan" / "b.py").write_text("from wenyan.c import x\n")
    (tmp_path / "wenyan" / "c.py").write_text("x = 1\n")
    (tmp_path / "wenyan" / "unused.py").write_text("")
    assert deps.derived_deps("python -m stages.s --out x", tmp_path) == [
        "stages/s.py", "wenyan/a.py", "wenyan/b.py", "wenyan/c.py"]


def test_rewrite_keeps_other_deps_and_comments():
    text = ("stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - stages/s.py\n"
            "      - wenyan/old.py\n      - wenyan/a.py  # why\n      - data/x\n    params:\n      - s\n")
    assert deps.rewrite(text, {"s": ["stages/s.py", "wenyan/a.py", "wenyan/b.py"]}) == (
        "stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - stages/s.py\n"
        "      - wenyan/a.py  # why\n      - wenyan/b.py\n      - data/x\n    params:\n      - s\n")


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py and the helper modules beside it (project.py, tiny.py,
    train_run.py, diskfull.py), never in a test module: importing one runs its module fixtures twice and ties two
    test files together."""
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    wrong = {p.name: sorted({m.split(".")[0] for m in deps.imported_modules(p)} & tests)
             for p in sorted((ROOT / "tests").glob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}
