"""The package's floors: a module imports from its own floor or the floors below it, never above.

Floors, top to bottom. A module is on the floor whose entry names it most closely, so a folder may
span floors: ``unifuse/run/`` holds the run machinery, but its checkpoint reader sits below the nets
that load checkpoints and its progress reporting below everything that reports.

* entry points: ``train``, ``sample``, ``evaluate``, ``export``, ``python -m unifuse.data``
* config: composing the Hydra configs, the schema store
* data assembly: the DataModule and pre-encoding shards with a trained image tokenizer (which
  loads checkpoints: above the run machinery)
* lit: the LightningModules
* run: checkpoint loading and IO, resume, preemption, EMA, guard, parallel strategies, memory plan,
  callbacks (the FID callback measures through ``eval``)
* eval: FID/KID, reference sets, feature extractors
* pipelines: prompts to images (net + image tokenizer)
* decoding: the programs that decode with a net (AR, MaskGIT, Transfusion)
* models: nets (parameters and forward passes)
* checkpoint reading: ``run.checkpoint`` and ``run.sharded`` rebuild a net or pipeline from a file
  through the paradigm specs, so nets (e.g. ``load_vqvae``) may load one
* paradigms: one spec per kind of model. It names its net, module, pipeline, decoder and evaluator
  as ``"module:Name"`` strings resolved when used, so it imports none of them and every floor above
  may read it.
* diffusion: transports, noise schedules, samplers
* sampling: sampling settings, token sampling, guidance, eval mode
* data: shard formats, reading, writing, staging, the per-rank stream, collators, embedded datasets
* text: text tokenizers and the unified vocabulary
* leaf helpers: the package root and progress reporting (they import no unifuse module)

Every import statement counts: module level, inside functions, under ``TYPE_CHECKING``. Imports by
string (``importlib``, Hydra ``_target_``, the paradigm specs) are resolved at run time by design and
are not seen here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "unifuse"
ROOT = Path(__file__).resolve().parent.parent

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("unifuse.train", "unifuse.sample", "unifuse.evaluate", "unifuse.export",
                      "unifuse.data.__main__")),
    ("config", ("unifuse.config",)),
    ("data assembly", ("unifuse.data.datamodule", "unifuse.data.encode")),
    ("lit", ("unifuse.lit",)),
    ("run", ("unifuse.run",)),
    ("eval", ("unifuse.eval",)),
    ("pipelines", ("unifuse.pipelines",)),
    ("decoding", ("unifuse.decoding",)),
    ("models", ("unifuse.models",)),
    ("checkpoint reading", ("unifuse.run.checkpoint", "unifuse.run.sharded")),
    ("paradigms", ("unifuse.paradigms",)),
    ("diffusion", ("unifuse.diffusion",)),
    ("sampling", ("unifuse.sampling",)),
    ("data", ("unifuse.data",)),
    ("text", ("unifuse.text",)),
    ("leaf helpers", ("unifuse", "unifuse.run.progress")),
]


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, module: str, is_pkg: bool, known: set[str], package: str) -> list[str]:
    """The ``package`` modules an import statement imports (none for other nodes).
    ``from a.b import c`` imports ``a.b.c`` when that is a module, else ``a.b``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == package]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        anchor = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
        base = ".".join([*anchor, base] if base else anchor)
    if base.split(".")[0] != package:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imported_modules(module: str, path: Path, known: set[str], package: str = PACKAGE,
                     at_import: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``package`` module in ``path``, at any depth; with
    ``at_import``, only those that run when the module is imported (not in functions or classes,
    not under ``if TYPE_CHECKING``)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    if not at_import:
        return [(n.lineno, t) for n in ast.walk(tree) for t in _targets(n, module, is_pkg, known, package)]
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        out += [(node.lineno, t) for t in _targets(node, module, is_pkg, known, package)]
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def floor_of(module: str, floors=FLOORS, package: str = PACKAGE) -> int | None:
    """Index of the floor whose longest entry names ``module`` (the package root names only itself)."""
    best, depth = None, -1
    for i, (_, entries) in enumerate(floors):
        for e in entries:
            hit = module == e or (e != package and module.startswith(e + "."))
            if hit and e.count(".") > depth:
                best, depth = i, e.count(".")
    return best


def upward_imports(root: Path, floors=FLOORS, package: str = PACKAGE) -> tuple[list[str], list[str]]:
    """(modules on no floor, upward imports as ``file:line: importer (floor) imports target (floor)``)."""
    files = module_files(root, package)
    homeless = [m for m in files if floor_of(m, floors, package) is None]
    bad = []
    for module, path in files.items():
        mine = floor_of(module, floors, package)
        for line, target in imported_modules(module, path, set(files), package):
            theirs = floor_of(target, floors, package)
            if mine is not None and theirs is not None and theirs < mine:
                bad.append(f"{path.relative_to(root)}:{line}: {module} ({floors[mine][0]}) imports {target} "
                           f"({floors[theirs][0]}), a floor above")
    return homeless, bad


def import_cycle(root: Path, package: str = PACKAGE) -> list[str]:
    """A cycle of imports that run at import time (``a:line -> b``, ..., back to the first), or []."""
    files = module_files(root, package)
    graph = {m: [(line, t) for line, t in imported_modules(m, p, set(files), package, at_import=True)
                 if t in files and t != m] for m, p in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[tuple[str, int, str]] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        for line, t in graph[m]:
            path.append((m, line, t))
            if state.get(t) == 1:
                start = next(i for i, (a, _, _) in enumerate(path) if a == t)
                return [f"{a}:{n} -> {b}" for a, n, b in path[start:]]
            if t not in state and (cycle := visit(t)):
                return cycle
            path.pop()
        state[m] = 2
        return []

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_every_module_has_a_floor():
    homeless, _ = upward_imports(ROOT)
    assert not homeless, f"modules on no floor (add them to FLOORS in {Path(__file__).name}): {homeless}"


def test_imports_go_downward():
    _, bad = upward_imports(ROOT)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycle = import_cycle(ROOT)
    assert not cycle, "modules import each other when imported: " + ", ".join(cycle)


def unexplained_deferred_imports(root: Path, package: str = PACKAGE) -> list[str]:
    """Imports of ``package`` modules that do not run at import time (in a function or class, under
    ``if TYPE_CHECKING``) without a ``# deferred: <why>`` comment on their line or the line above."""
    files = module_files(root, package)
    out = []
    for module, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        at_import = set(imported_modules(module, path, set(files), package, at_import=True))
        for line, target in imported_modules(module, path, set(files), package):
            if (line, target) not in at_import and not any("# deferred: " in lines[i - 1] for i in (line - 1, line)):
                out.append(f"{path.relative_to(root)}:{line}: {module} imports {target}")
    return sorted(set(out))


def test_imports_deferred_into_functions_say_why():
    """An import inside a function hides a dependency from the reader; it is there only to defer a
    heavy optional dependency or to break a cycle, and its comment says which."""
    bad = unexplained_deferred_imports(ROOT)
    assert not bad, "imports in functions without `# deferred: <heavy optional dependency | cycle A<->B>`:\n" + \
        "\n".join(bad)


def test_floors_are_listed_once():
    entries = [e for _, es in FLOORS for e in es]
    assert len(entries) == len(set(entries)), "an entry is on two floors"


# ----------------------------------------------------------------------------- the checker itself
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


TOY_FLOORS = [("top", ("pkg.top",)), ("low", ("pkg.low",)), ("leaf", ("pkg", "pkg.top.leaf"))]


@pytest.mark.parametrize("text,line", [
    ("from pkg.top import a\n", 1),                            # module level
    ("import os\n\ndef f():\n    import pkg.top.a\n", 4),      # inside a function
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n", 3),  # a subpackage by name
    ("from ..top import a\n", 1),                              # relative
])
def test_an_upward_import_is_reported_with_its_line_and_floors(tmp_path, text, line):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/top/__init__.py": "", "pkg/top/a.py": "",
                            "pkg/top/leaf.py": "", "pkg/low/__init__.py": "", "pkg/low/b.py": text})
    homeless, bad = upward_imports(root, TOY_FLOORS, "pkg")
    assert not homeless
    assert len(bad) == 1 and bad[0].startswith(f"pkg/low/b.py:{line}: pkg.low.b (low) imports pkg.top")
    assert bad[0].endswith("(top), a floor above")


def test_downward_and_sideways_imports_pass_and_a_stray_module_is_named(tmp_path):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/top/__init__.py": "from pkg.low import b\n",
                            "pkg/top/leaf.py": "", "pkg/low/__init__.py": "from . import b\n",
                            "pkg/low/b.py": "import pkg\nfrom pkg.top.leaf import x\n", "pkg/stray.py": ""})
    homeless, bad = upward_imports(root, TOY_FLOORS, "pkg")
    assert bad == [] and homeless == ["pkg.stray"]


def test_a_cycle_is_found_and_imports_in_functions_or_for_type_checking_make_none(tmp_path):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import os\nfrom pkg import b\n",
                            "pkg/b.py": "try:\n    from pkg.c import x\nexcept ImportError:\n    pass\n",
                            "pkg/c.py": "def f():\n    from pkg import a\n"})
    assert import_cycle(root, "pkg") == []
    (root / "pkg/c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    assert import_cycle(root, "pkg") == []
    (root / "pkg/c.py").write_text("if True:\n    import pkg.a\n")
    assert import_cycle(root, "pkg") == ["pkg.a:2 -> pkg.b", "pkg.b:2 -> pkg.c", "pkg.c:2 -> pkg.a"]


def test_a_deferred_import_needs_its_reason(tmp_path):
    b = "from pkg import a\n\ndef f():\n    from pkg.a import x  # deferred: cycle a<->b\n\ndef g():\n"
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "", "pkg/b.py": b + "    import pkg.a\n    import os\n"})
    assert unexplained_deferred_imports(root, "pkg") == ["pkg/b.py:7: pkg.b imports pkg.a"]
