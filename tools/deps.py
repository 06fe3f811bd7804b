"""The code deps of every DVC stage, derived from the imports: its script + the wenyan modules it reaches.

    python -m tools.deps            # print each stage's derived code deps; exit 1 where dvc.yaml declares others
    python -m tools.deps --write    # rewrite the .py deps of dvc.yaml and export/dvc.yaml to the derived ones

A stage's script is the module of its `python -m stages.X` command; the modules it reaches are found by reading
the imports (ast, every `import`/`from ... import` in the file, inside functions too) of the script and then of
each wenyan module reached, transitively. `--write` keeps every other dep (data, models) and the comment
beside a code dep that stays; the code deps come first, the script, then the wenyan modules sorted.
tests/test_layout.py checks that the declared deps equal the derived ones.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ("dvc.yaml", "export/dvc.yaml")
LIBRARY = "wenyan"


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the modules a file imports anywhere in it (`from wenyan import a` gives wenyan.a too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a dotted module name in this repository (a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def reached(script: Path, root: Path = ROOT) -> list[Path]:
    """The library modules (wenyan/*.py) that script imports, directly or through each other; sorted."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            if name.split(".")[0] != LIBRARY:
                continue
            path = module_file(name, root)
            if path is not None and path.name != "__init__.py" and path not in seen:
                seen.add(path)
                todo.append(path)
    return sorted(seen)


def stage_script(cmd: str, root: Path = ROOT) -> Path | None:
    """stages/X.py for a `python -m stages.X ...` command; None for another command."""
    argv = shlex.split(cmd)
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        return module_file(argv[2], root)
    return None


def derived_deps(cmd: str, root: Path = ROOT) -> list[str] | None:
    """The code deps a stage's command needs: its script, then the wenyan modules reached, as repo paths."""
    script = stage_script(cmd, root)
    if script is None:
        return None
    return [p.relative_to(root).as_posix() for p in (script, *reached(script, root))]


def dep_path(dep) -> str:
    return dep if isinstance(dep, str) else next(iter(dep))


def declared_code_deps(stage: dict) -> list[str]:
    """The deps of a dvc.yaml stage that are Python files."""
    return [dep_path(d) for d in stage.get("deps", []) if dep_path(d).endswith(".py")]


def check(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """{pipeline:stage: (declared, derived)} for every stage run as `python -m ...`."""
    import yaml

    out = {}
    for name in PIPELINES:
        path = root / name
        if not path.is_file():
            continue
        for stage, spec in (yaml.safe_load(path.read_text(encoding="utf-8")).get("stages") or {}).items():
            derived = derived_deps(spec["cmd"], root)
            if derived is not None:
                out[f"{name}:{stage}"] = (declared_code_deps(spec), derived)
    return out


def rewrite(text: str, derived: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's .py deps replaced by the derived ones (comments of kept ones kept)."""
    lines = text.splitlines(keepends=True)
    out, stage, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        top = re.match(r"^  ([A-Za-z0-9_]+):\s*$", line)
        if top:
            stage = top.group(1)
        out.append(line)
        if stage in derived and re.match(r"^    deps:\s*$", line):
            block = []
            i += 1
            while i < len(lines) and re.match(r"^      - ", lines[i]):
                block.append(lines[i])
                i += 1
            comments = {}
            others = []
            for entry in block:
                m = re.match(r"^      - (\S+?\.py)(\s+#.*)?\n?$", entry)
                if m:
                    comments[m.group(1)] = m.group(2) or ""
                else:
                    others.append(entry)
            out += [f"      - {p}{comments.get(p, '')}\n" for p in derived[stage]] + others
            continue
        i += 1
    return "".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml and export/dvc.yaml")
    args = parser.parse_args(argv)
    results = check()
    if args.write:
        for name in PIPELINES:
            path = ROOT / name
            if path.is_file():
                mine = {key.split(":", 1)[1]: derived for key, (_, derived) in results.items() if key.startswith(name + ":")}
                path.write_text(rewrite(path.read_text(encoding="utf-8"), mine), encoding="utf-8")
        results = check()
    differ = 0
    for key, (declared, derived) in results.items():
        same = declared == derived
        differ += not same
        print(f"{key}: {'ok' if same else 'DIFFERS'}  {' '.join(derived)}")
        if not same:
            print(f"    declared: {' '.join(declared)}")
    print(f"{len(results) - differ} of {len(results)} stages declare exactly the code they import")
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
