"""Where the source outgrows its limits: every Python file over ``--max-file`` lines and every
function or method over ``--max-function`` lines (from its ``def`` line to its last line, decorators
not counted), longest first.

    python experiments/analysis/source_stats.py [--root unifuse] [--max-file 450] [--max-function 60]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def long_files(root: Path, limit: int) -> list[tuple[int, Path]]:
    sizes = [(len(p.read_text(encoding="utf-8").splitlines()), p) for p in sorted(root.rglob("*.py"))]
    return sorted(((n, p) for n, p in sizes if n > limit), key=lambda x: (-x[0], str(x[1])))


def long_functions(root: Path, limit: int) -> list[tuple[int, str]]:
    """(lines, ``file:line qualified.name``) of the functions over ``limit`` lines, nested ones included."""
    out = []
    for path in sorted(root.rglob("*.py")):

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - child.lineno + 1
                        if n > limit:
                            out.append((n, f"{path}:{child.lineno} {name}"))
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return sorted(out, key=lambda x: (-x[0], x[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="unifuse", help="the package directory to scan")
    ap.add_argument("--max-file", type=int, default=450, help="report files longer than this many lines")
    ap.add_argument("--max-function", type=int, default=60, help="report functions longer than this many lines")
    a = ap.parse_args()
    root = Path(a.root)
    if not root.is_dir():
        raise SystemExit(f"--root {a.root}: not a directory")
    files, funcs = long_files(root, a.max_file), long_functions(root, a.max_function)
    print(f"files over {a.max_file} lines: {len(files)}")
    for n, p in files:
        print(f"  {n:5d}  {p}")
    print(f"functions over {a.max_function} lines: {len(funcs)}")
    for n, where in funcs:
        print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
