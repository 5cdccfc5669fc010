"""The commands that README.md and docs/*.md show still run as written, without running them.

Every shell command in a ```bash block (continuation lines joined, comments dropped) and every inline
code span that starts with ``python -m unifuse.`` or ``make`` is checked:

- ``make <target>``: the target exists in the Makefile; ``ARGS="..."`` given to a target whose recipe
  runs ``python -m unifuse.train ... $(ARGS)`` composes with that recipe's overrides.
- ``python -m unifuse.{train,sample,evaluate,export}`` (also under ``torchrun ... -m``, after
  ``VAR=value`` prefixes): its overrides compose against the app's config with Hydra's compose API
  (config group choices, keys, ``+``/``~`` forms, ``hydra.*`` settings); with ``-m`` every point of a
  sweep's lists is composed. ``--cfg job`` and other Hydra flags are dropped; nothing is trained.
- ``python -m unifuse.evaluate build-extractor ...``: its arguments pass that command's own parser.

Placeholders: ``<anything>`` in an argument (``ckpt=<run>/checkpoints/last.ckpt``,
``hydra.launcher.partition=<partition>``) becomes the string ``PLACEHOLDER``; ``...`` inside a path
(``outputs/runs/.../last.ckpt``, ``ckpt=...``) is kept, as Hydra reads it as a plain string; a word
``...`` alone stands for further overrides and is dropped. Checkpoint
files are never opened: composing a config does not read them.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

import unifuse.eval.extractors
import unifuse.evaluate
from unifuse.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
APPS = {"unifuse.train": "train", "unifuse.sample": "sample", "unifuse.evaluate": "evaluate",
        "unifuse.export": "export"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path",
                          "-cp", "--config-dir", "-cd", "--info", "-i"}
README_MAX_LINES = 200
PLACEHOLDER = "PLACEHOLDER"  # what an ``<anything>`` of a command stands for here


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # the command as the page shows it

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def fenced_commands(path: Path) -> list[Command]:
    """The lines of the page's ```bash blocks, continuation lines joined, with their line numbers."""
    out, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block and line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not in_block:
            continue
        if not pending:
            start = n
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(Command(f"{path.name}:{start}", pending.strip()))
        pending = ""
    return out


def inline_commands(path: Path) -> list[Command]:
    """Inline code spans of the page that are whole commands of the apps or of make."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(("    ", "```")):
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if re.match(r"(python -m unifuse\.(train|sample|evaluate|export)\b|make [a-z])", span):
                out.append(Command(f"{path.name}:{n}", span))
    return out


def commands(paths=DOCS) -> list[Command]:
    """The commands of ``paths``, each text once (at its first place: the README comes first)."""
    found = {}
    for c in (c for p in paths for c in fenced_commands(p) + inline_commands(p)):
        if c.text not in found and any(app_of(s) or make_of(s) for s in segments(c.text)):
            found[c.text] = c
    return list(found.values())


def words(text: str) -> list[str]:
    """The shell words of ``text``, placeholders filled first (``<ldm run>`` holds a space)."""
    return shlex.split(re.sub(r"<[^<>]*>", PLACEHOLDER, text), comments=True)


def segments(text: str) -> list[list[str]]:
    """The simple commands of a shell line joined by ``&&``, ``||`` or ``;``."""
    out = [[]]
    for word in words(text):
        if word in ("&&", "||", ";"):
            out.append([])
        else:
            out[-1].append(word)
    return [s for s in out if s]


def without_env(argv: list[str]) -> list[str]:
    """The command after its ``VAR=value`` prefixes."""
    i = 0
    while i < len(argv) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[i]):
        i += 1
    return argv[i:]


def app_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """(config name, arguments) of ``python -m unifuse.<app> ...`` or ``torchrun ... -m unifuse.<app>``."""
    argv = without_env(argv)
    if not argv or not (Path(argv[0]).name.startswith("python") or argv[0] == "torchrun"):
        return None
    for i, word in enumerate(argv[:-1]):
        if word == "-m" and argv[i + 1] in APPS:
            return APPS[argv[i + 1]], argv[i + 2:]
    return None


def make_of(argv: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """(targets, variables) of a ``make`` command."""
    argv = without_env(argv)
    if not argv or argv[0] != "make":
        return None
    variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    return [a for a in argv[1:] if "=" not in a and not a.startswith("-")], variables


def makefile() -> dict[str, list[str]]:
    """Makefile target -> its recipe lines."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+):(?!=)", line)
        if m:
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
    return targets


def split_flags(args: list[str]) -> tuple[list[str], bool]:
    """(overrides, multirun): Hydra's own flags dropped."""
    overrides, multirun, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg != "..." and not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job Hydra's basic sweeper would start (the list itself without ``-m``)."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def compose_all(config_name: str, overrides: list[str], multirun: bool) -> int:
    """Compose ``conf/<config_name>.yaml`` with every sweep point of ``overrides``; their number."""
    points = sweep_points(overrides, multirun)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for point in points:
                compose(config_name, overrides=point, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    return len(points)


def check_build_extractor(args: list[str], monkeypatch) -> None:
    """Run the command's own argument parser, with the extractor training replaced by a recorder."""
    calls = []
    fake = lambda shards, out, epochs: calls.append((shards, out, epochs)) or {}  # noqa: E731
    for module in (unifuse.evaluate, unifuse.eval.extractors):
        if hasattr(module, "train_domain_extractor"):
            monkeypatch.setattr(module, "train_domain_extractor", fake)
    try:
        unifuse.evaluate.build_extractor(args)
    except SystemExit as e:  # argparse's way of rejecting an argument
        raise AssertionError(f"build-extractor rejects {args}") from e
    assert calls, "build-extractor did not reach the extractor training"


def check(argv: list[str], monkeypatch) -> None:
    """Check one simple command (other programs, such as ``python -m unifuse.data``, pass)."""
    make, app = make_of(argv), app_of(argv)
    if make is not None:
        check_make(*make)
    elif app is not None and app[0] == "evaluate" and app[1][:1] == ["build-extractor"]:
        check_build_extractor(app[1][1:], monkeypatch)
    elif app is not None:
        compose_all(app[0], *split_flags(app[1]))


def check_make(targets: list[str], variables: dict[str, str]) -> None:
    recipes = makefile()
    for target in targets:
        assert target in recipes, f"make {target}: no such target in the Makefile"
        if "ARGS" not in variables:
            continue
        train_lines = [r for r in recipes[target] if "-m unifuse.train" in r and "$(ARGS)" in r]
        for line in train_lines:
            base = line.split("-m unifuse.train", 1)[1].replace("$(ARGS)", "")
            compose_all("train", words(base) + words(variables["ARGS"]),
                        multirun=False)


ALL = commands()


@pytest.mark.parametrize("command", ALL, ids=[c.where for c in ALL])
def test_command_composes(command: Command, monkeypatch):
    for argv in segments(command.text):
        check(argv, monkeypatch)


def test_readme_shows_the_two_commands_and_every_paradigm():
    """The first screen's commands are found by the extraction, so the checks above cover them."""
    shown = [c.text for c in ALL if c.where.startswith("README.md:")]
    for needed in ("make train", "make test", "make train-ar", "make train-maskgit", "make train-ldm"):
        assert any(t == needed or t.startswith(needed + " ") for t in shown), f"README lacks `{needed}`"


def test_readme_is_short_and_its_links_resolve():
    """README.md stays a first page (at most README_MAX_LINES lines); every relative link and picture
    of README.md and docs/*.md names a file that exists, and a #fragment names one of its headings."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"", page.read_text()):
            link = next(t for t in target if t)
            if re.match(r"[a-z]+://", link):
                continue
            file, _, fragment = link.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.name}: link to missing {link}"
            if fragment:
                assert fragment in anchors(dest), f"{page.name}: {link} names no heading of {dest.name}"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def named_code(page: Path) -> list[tuple[str, str]]:
    """(line, name) of every module, object or file of the package the page names: inline spans that
    are a dotted ``unifuse.`` name or a ``unifuse/`` path, and the imports of its ```python blocks."""
    out, lang = [], None
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            lang = None if lang is not None else line[3:].strip()
            continue
        where = f"{page.name}:{n}"
        if lang == "python":
            m = re.match(r"\s*from (unifuse[\w.]*) import ([\w, ]+)", line)
            if m:
                out += [(where, f"{m.group(1)}.{name.strip()}") for name in m.group(2).split(",")]
        elif lang is None:
            out += [(where, span) for span in re.findall(r"`(unifuse[./][\w./]*)`", line)]
    return out


def resolves(name: str) -> bool:
    """``unifuse/...`` exists as a file or folder; ``unifuse.a.b.c`` is a module or an attribute of one."""
    if "/" in name:
        return (ROOT / name).exists()
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_named_modules_exist():
    """The modules, classes and files of the package that the pages name exist where they say, so a
    moved module cannot leave its old name in the docs."""
    missing = [f"{where}: {name}" for page in DOCS for where, name in named_code(page) if not resolves(name)]
    assert not missing, "the docs name code that does not exist:\n" + "\n".join(missing)
