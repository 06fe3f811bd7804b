"""Code shape of the repository: lines per Python module and the longest functions.

    python benchmarks/code_shape.py [--root .] [--top 10] [--out reports/benchmarks/code_shape.json]

Lines are `wc -l` lines; a function's length is its end line minus its first line (decorators excluded) plus one,
nested functions counted on their own as well. Used for the before/after figures of issue #19.
"""

import argparse
import ast
import json
import pathlib


def python_files(root):
    """The tracked-looking Python files below root: stages/, wenyan/, tools/, benchmarks/, tests/."""
    skip = {".venv", ".git", ".dvc", "build", "dist", "node_modules"}
    return sorted(p for p in pathlib.Path(root).rglob("*.py")
                  if not skip & set(p.relative_to(root).parts) and ".egg-info" not in str(p))


def functions(path, root):
    """(lines, 'file:function', first line) for every def in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(root).as_posix()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}", node.lineno))
    return out


def shape(root, top):
    root = pathlib.Path(root)
    files = python_files(root)
    lines = {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    funcs = sorted((f for p in files for f in functions(p, root)), key=lambda f: (-f[0], f[1]))
    return {"lines": lines, "longest_functions": [{"function": name, "line": line, "lines": n}
                                                  for n, name, line in funcs[:top]],
            "functions_over_60": sum(1 for f in funcs if f[0] > 60)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (default: .)")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list (default: 10)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    result = shape(args.root, args.top)
    for name, n in result["lines"].items():
        if not name.startswith("tests/"):
            print(f"{n:6d}  {name}")
    print(f"\nlongest functions (functions over 60 lines: {result['functions_over_60']}):")
    for f in result["longest_functions"]:
        print(f"{f['lines']:6d}  {f['function']} (line {f['line']})")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
