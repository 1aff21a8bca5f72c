"""The manual stays true: every ``lit-saferlhf`` command quoted in README.md and docs/*.md parses, and links resolve.

Commands are read from fenced shell blocks (backslash-continued lines joined, ``&&`` chains split,
``# comments`` dropped) and from inline code that starts with ``lit-saferlhf``. How each is checked:

- ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI): parsed as quoted, plus ``--print_config``,
  through ``lit_saferlhf.cli.main`` (LightningCLI prints the config and exits with status 0; no model
  dir is opened, so configs that name trained models parse offline, as in ``tests/test_configs.py``).
  ``fit --config <one stage YAML>`` alone is only checked to exist: ``tests/test_configs.py`` parses
  every shipped stage YAML already.
- ``export``: its ``--ckpt_path`` and ``--out`` are checked to be there, the rest parsed as ``fit`` parses it.
- ``evaluate``, ``pipeline`` (jsonargparse): parsed as quoted, plus ``--print_config``.
- ``world``, ``select``, ``merge``, ``report`` (argparse, whose parser lives inside the command): ``--help``
  exits 0 and lists every option the quoted command uses.
- A command without arguments (``lit-saferlhf evaluate`` in prose): its name is a command.

Import paths (``lit_saferlhf.commands.evaluate.judging.looks_like_refusal``) and repository paths
(``plugins/objectives/ama.py``) quoted on a page must exist; relative links must resolve, anchors included.

Table cells stay under 200 characters (longer ones belong in prose).

Skipped, each with its reason in the test report: commands with a placeholder (``...`` or ``<...>``,
e.g. ``lit-saferlhf export <fit arguments> ...``), which stand for arguments the reader fills in, and
the commands of ``UNPARSEABLE``.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lit_saferlhf.cli import COMMANDS, LIGHTNING_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CURRENT_PAGES = [ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]  # CHANGELOG.md names old paths too
LINKED_PAGES = [*PAGES, *CURRENT_PAGES, ROOT / "CHANGELOG.md"]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>")
ARGPARSE_COMMANDS = ("world", "select", "merge", "report")
JSONARGPARSE_COMMANDS = ("evaluate", "pipeline")
MAX_TABLE_CELL = 200
REPO_FOLDERS = ("lit_saferlhf", "plugins", "cli_configs", "tests", "benchmarks", "docs")
UNPARSEABLE: dict[str, str] = {}
"""Quoted commands that cannot be parsed offline, each with the reason (none today)."""

FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`(lit-saferlhf[^`\n]*)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Quoted:
    where: str  # README.md:12
    args: tuple[str, ...]  # after `lit-saferlhf`
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def without_code_blocks(text: str) -> str:
    """The page with its fenced blocks blanked (line numbers kept)."""
    return FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)


def without_comment(line: str) -> str:
    """The line up to its shell comment: a ``#`` that starts a word outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands_in(snippet: str) -> list[list[str]]:
    """The ``lit-saferlhf`` commands of a shell snippet, as argument lists after the program name."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", snippet).splitlines():
        if "lit-saferlhf" not in line:
            continue
        segment: list[str] = []
        for token in [*shlex.split(without_comment(line)), "&&"]:
            if token not in ("&&", "||", ";", "|"):
                segment.append(token)
                continue
            while segment and re.fullmatch(r"\w+=\S*", segment[0]):  # OMP_NUM_THREADS=1 lit-saferlhf ...
                segment.pop(0)
            if segment and segment[0] == "lit-saferlhf":
                found.append(segment[1:])
            segment = []
    return found


def quoted_commands() -> list[Quoted]:
    """Every distinct command quoted in the README and the docs, with where it is first quoted."""
    found: dict[tuple[str, ...], Quoted] = {}
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        snippets = [
            (text[: match.start()].count("\n") + 1, match.group(2))
            for match in FENCE.finditer(text)
            if match.group(1) in SHELL_BLOCKS
        ]
        prose = without_code_blocks(text)
        snippets += [(prose[: match.start()].count("\n") + 1, match.group(1)) for match in INLINE.finditer(prose)]
        for line, snippet in snippets:
            for args in commands_in(snippet):
                text_of = shlex.join(["lit-saferlhf", *args])
                found.setdefault(tuple(args), Quoted(f"{name}:{line}", tuple(args), text_of))
    return list(found.values())


QUOTED = quoted_commands()


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``lit-saferlhf ARGS`` in-process: its exit status (0 when it returns) and what it printed."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = 0 if exit_info.code is None else exit_info.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def print_config_args(args: list[str]) -> list[str]:
    """The quoted arguments, made to stop after parsing (LightningCLI and jsonargparse's ``--print_config``)."""
    if any(arg in ("-h", "--help", "--print_config") or arg.endswith(".help") for arg in args):
        return args
    return [*args, "--print_config"]


def test_quoted_commands_are_found() -> None:
    commands = {quoted.args[0] for quoted in QUOTED if quoted.args}
    assert len(QUOTED) >= 20
    assert {"fit", "pipeline", "evaluate", "export", "report", "world", "select", "merge"} <= commands


@pytest.mark.parametrize("quoted", QUOTED, ids=str)
def test_quoted_command_parses(
    quoted: Quoted, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if PLACEHOLDER.search(quoted.text):
        pytest.skip("a placeholder (... or <...>) stands for arguments the reader fills in")
    if quoted.text in UNPARSEABLE:
        pytest.skip(UNPARSEABLE[quoted.text])
    monkeypatch.chdir(ROOT)  # the docs quote paths from the repository root
    args = list(quoted.args)
    if len(args) <= 1:  # `lit-saferlhf evaluate` in prose, or `lit-saferlhf --help`
        assert not args or args[0] in (*COMMANDS, *LIGHTNING_COMMANDS, "--help"), quoted
        return
    command = args[0]
    for config in (value for flag, value in zip(args, args[1:], strict=False) if flag == "--config"):
        assert (ROOT / config).is_file(), f"{quoted}: {config} does not exist"
    if args[:2] == ["fit", "--config"] and args[3:] in ([], ["--print_config"]):
        return  # one shipped stage YAML alone: tests/test_configs.py parses every one of them already
    if command in ARGPARSE_COMMANDS:
        code, printed = run([command, "--help"], capsys)
        assert code == 0, printed
        for flag in (arg.split("=")[0] for arg in args[1:] if arg.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", printed), f"{quoted}: {command} has no option {flag}"
        return
    if command == "export":
        for flag in ("--ckpt_path", "--out"):
            assert flag in args, f"{quoted}: export needs {flag}"
            del args[args.index(flag) : args.index(flag) + 2]
        args[0] = "fit"
    assert command in (*LIGHTNING_COMMANDS, *JSONARGPARSE_COMMANDS, "export"), f"{quoted}: unknown command"
    code, printed = run(print_config_args(args), capsys)
    assert code == 0, f"{quoted}\n{printed[-2000:]}"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, printed = run(["--help"], capsys)
    assert code == 0
    for name in (*LIGHTNING_COMMANDS, *COMMANDS):
        assert re.search(rf"^\s+{name}\s+\S", printed, re.MULTILINE), f"`lit-saferlhf --help` does not list {name}"


def test_every_command_is_documented() -> None:
    manual = (ROOT / "docs" / "commands.md").read_text()
    missing = [name for name in (*LIGHTNING_COMMANDS, *COMMANDS) if f"`{name}`" not in manual]
    assert not missing, f"docs/commands.md does not describe {missing}"


def resolves(dotted: str) -> bool:
    """Whether ``a.b.C`` names a module, or an attribute of the longest importable module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


@pytest.mark.parametrize("page", [*PAGES, *CURRENT_PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_import_paths_and_files_exist(page: Path) -> None:
    """``lit_saferlhf...`` names import, and quoted repository paths (``plugins/...``, ``cli_configs/...``) exist."""
    text = page.read_text()
    names = set(re.findall(r"\b(lit_saferlhf(?:_plugins)?(?:\.\w+)+)", text))
    missing = sorted(name for name in names if not name.endswith((".json", ".py")) and not resolves(name))
    paths = {path.rstrip("/").split("::")[0] for path in re.findall(rf"`((?:{'|'.join(REPO_FOLDERS)})/[^`\s:]*)", text)}
    missing += sorted(path for path in paths if not re.search(r"[{*<]", path) and not (ROOT / path).exists())
    assert not missing, f"{page.relative_to(ROOT)} quotes what does not exist: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(page.read_text()), re.MULTILINE):
        base, n = slug(heading), 0
        while (f"{base}-{n}" if n else base) in found:  # GitHub numbers repeated headings
            n += 1
        found.add(f"{base}-{n}" if n else base)
    return found


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_table_cells_stay_short(page: Path) -> None:
    rows = [line for line in without_code_blocks(page.read_text()).splitlines() if line.lstrip().startswith("|")]
    cells = [cell.strip() for row in rows for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
    long = [cell[:60] + "..." for cell in cells if len(cell) > MAX_TABLE_CELL]
    assert not long, f"{page.relative_to(ROOT)}: cells over {MAX_TABLE_CELL} characters (split them into prose): {long}"
