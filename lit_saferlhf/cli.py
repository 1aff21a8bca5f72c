"""The one command line, ``lit-saferlhf``: the table of commands and the error boundary.

Every command lives in ``lit_saferlhf.commands`` (one module, or a small package, each). ``fit``,
``validate``, ``test`` and ``predict`` run any stage from YAML through LightningCLI (the stage named
by the config's ``model.class_path``); the others are the project's own. ``lit-saferlhf --help``
lists them all, ``lit-saferlhf <command> --help`` gives each one's options. Nothing in the package
imports this module: it is the entry point.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_saferlhf.errors import EXIT_STATUS, TRACEBACK_VARIABLE, ConfigError, chain, expected_error

__all__ = ["COMMANDS", "main"]


@dataclass(frozen=True)
class Command:
    """One ``lit-saferlhf`` command: where it lives and what it does, in one line."""

    module: str
    """The module under ``lit_saferlhf.commands`` that defines ``<name>_command(argv)``."""
    summary: str
    """One line for ``lit-saferlhf --help``."""

    def load(self, name: str) -> Callable[[Sequence[str]], object]:
        """The command's function, imported only when the command runs (``--help`` stays fast)."""
        return getattr(importlib.import_module(f"lit_saferlhf.commands.{self.module}"), f"{name}_command")


LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train one stage from YAML: lit-saferlhf fit --config cli_configs/tiny/sft.yaml",
    "validate": "run a stage's validation loop on a checkpoint",
    "test": "run a stage's test loop on a checkpoint",
    "predict": "run a stage's predict loop on a checkpoint",
}
"""LightningCLI's subcommands (``lit_saferlhf.commands.fit``), listed with the project's own."""

COMMANDS: dict[str, Command] = {
    "pipeline": Command("pipeline", "SFT -> reward -> cost -> PPO-Lagrangian (or offline) -> evaluation -> report"),
    "evaluate": Command("evaluate", "generate from policies, score and judge every answer, compare two in an arena"),
    "export": Command("export", "write a stage's Hugging Face dir from any of its training checkpoints"),
    "report": Command("report", "write report.md and its plots again from a pipeline's run dir"),
    "world": Command("world", "write the safety world's splits and tokenizer to a folder"),
    "select": Command("select", "an FDC safety set with exact quotas per risk category (Equilibrate RLHF)"),
    "merge": Command("merge", "a linear weight merge of policy exports (P-SACPO)"),
}
"""The project's own commands, in the order ``--help`` lists them."""


def usage() -> str:
    """``lit-saferlhf --help``: every command with one line each."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    lines = ["usage: lit-saferlhf <command> [options]   (lit-saferlhf <command> --help for its options)", ""]
    lines += ["Stages (LightningCLI):"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in LIGHTNING_COMMANDS.items()]
    lines += ["", "Project commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"Errors in your input are one line (exit {EXIT_STATUS}); --traceback shows the traceback too."]
    return "\n".join(lines)


UNION_FAILURE = "Does not validate against any of the Union subtypes"
"""How jsonargparse starts its report of a value that fits none of a setting's types."""
CONFIG_FLAGS = ("--config", "-c")
"""How a command line names a config file (LightningCLI's ``-c`` too)."""
INTERRUPTED_STATUS = 128 + signal.SIGINT
"""The exit status after Ctrl-C, as a shell reports a process that SIGINT ended."""
TRACEBACK_FLAG = "--traceback"
"""Shows the traceback of an error in the input too (as ``LIT_SAFERLHF_TRACEBACK=1`` does)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit-saferlhf`` console script: one command inside the error boundary.

    An error in the user's input (see ``lit_saferlhf.errors``) or a command-line parse error is printed as
    one ``error: ...`` message on stderr, and the exit status is 2; anything else keeps its traceback.
    Ctrl-C is one ``interrupted`` line (with what the command kept, when it says) and exit status 130;
    ``fit`` saves first (``lit_saferlhf.callbacks.preemption``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = TRACEBACK_FLAG in args or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0")
    args = [arg for arg in args if arg != TRACEBACK_FLAG]
    if argv is None:
        sys.argv[1:] = args  # LightningCLI reads sys.argv itself (and warns when it is also given args)
    try:
        run_command(args, from_sys_argv=argv is None)
    except KeyboardInterrupt as interrupt:
        if show_traceback:
            traceback.print_exc()
        print("interrupted" + (f": {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except Exception as error:
        message = error_message(error)
        if message is None:
            raise
        if show_traceback:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS) from None


def run_command(args: list[str], from_sys_argv: bool = False) -> None:
    """Run a project command (``COMMANDS``) or a LightningCLI subcommand (``fit``, ``validate``, ...).

    Args:
        args: The command line after ``lit-saferlhf``.
        from_sys_argv: ``args`` are ``sys.argv[1:]``: LightningCLI then reads them there itself.
    """
    if args in ([], ["-h"], ["--help"]):
        print(usage())
        return
    check_yaml_syntax(config_files(args))
    if args[0] in COMMANDS:
        COMMANDS[args[0]].load(args[0])(args[1:])
        return
    from lit_saferlhf.commands.fit import cli_main

    cli_main(None if from_sys_argv else args)


def config_files(args: Sequence[str]) -> list[Path]:
    """The existing files given as ``--config`` (or ``-c``) in ``args``; any command may take them."""
    values = [value for flag, value in itertools.pairwise(args) if flag in CONFIG_FLAGS]
    values += [arg.partition("=")[2] for arg in args if arg.partition("=")[0] in CONFIG_FLAGS]
    return [Path(value) for value in values if Path(value).is_file()]


def check_yaml_syntax(files: Sequence[Path]) -> None:
    """Refuse a config file that is not valid YAML, naming the file and line (jsonargparse's parser names neither).

    Raises:
        ConfigError: ``FILE:line L, column C: not valid YAML: PROBLEM``. Other problems (a file that cannot be
            read, another YAML error) are left to the command's own parser.
    """
    for file in files:
        try:
            yaml.safe_load(file.read_bytes())
        except yaml.MarkedYAMLError as error:
            mark, opened = error.problem_mark or error.context_mark, error.context_mark
            where = f"{file}:line {mark.line + 1}, column {mark.column + 1}" if mark else str(file)
            started = f" that starts at line {opened.line + 1}" if opened and mark and opened.line != mark.line else ""
            context = f" ({error.context}{started})" if error.context else ""
            raise ConfigError(where, f"not valid YAML: {error.problem}{context}") from None
        except (OSError, yaml.YAMLError):
            continue


def error_message(error: Exception) -> str | None:
    """What the boundary prints for ``error``: our error's message, a parse error's, or None (a bug)."""
    ours = expected_error(error)
    if ours is not None:
        return str(ours)
    misconfigured = next((linked for linked in chain(error) if isinstance(linked, MisconfigurationException)), None)
    if misconfigured is not None:  # Lightning's own word for settings that do not go together
        return " ".join(str(misconfigured).split())
    if isinstance(error, argparse.ArgumentError):
        return f"{short_parse_error(error)} (`--help` after the command lists the options)"
    return None


def short_parse_error(error: argparse.ArgumentError) -> str:
    """A command-line parse error as one line: the keys that lead to the problem, then the innermost report.

    jsonargparse wraps the real problem in "Does not validate against any of the Union subtypes" reports,
    one per level (``model`` -> ``model.config``); the innermost parse error of the chain says what is wrong.
    """
    reports = [linked.message for linked in chain(error) if isinstance(linked, argparse.ArgumentError)]
    keys = dict.fromkeys(key for report in reports for key in re.findall(r'Parser key "([^"]+)"', report))
    body = " ".join(re.sub(r'Parser key "[^"]+":', "", reports[-1]).split())
    body = re.sub(r"Expected an? (.+?)\. Got value: (.*)", r"expected \1, found \2", body)
    body = re.sub(r"<class '([^']+)'>", r"\1", body)
    if UNION_FAILURE in body:
        expected = dict.fromkeys(re.findall(r"Expected a ([\w.]+)", body))
        given = re.search(r"Given value: (?:NestedArg\(key='[^']*', val=)?(.*?)\)?$", body)
        body = f"expected {' or '.join(expected) or 'another value'}, found {given.group(1) if given else '?'}"
    return f"{' > '.join(keys)}: {body}" if keys else body


if __name__ == "__main__":
    main()
