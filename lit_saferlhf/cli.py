"""The one command line, ``lit-saferlhf``.

``fit``/``validate``/``test`` run any stage from a YAML (LightningCLI, the stage named by its
``model.class_path``); the other commands are the project's own:

    lit-saferlhf pipeline --config cli_configs/tiny/pipeline.yaml   # all four stages, evaluation, report
    lit-saferlhf fit --config cli_configs/tiny/sft.yaml             # run one stage
    lit-saferlhf evaluate --config ...                              # compare policies
    lit-saferlhf export --config <stage>.yaml --ckpt_path CKPT --out DIR   # a checkpoint -> Hugging Face dir
    lit-saferlhf world --out outputs/world                          # write the safety world's files

Built-in solvers and datamodules are imported (by ``lit_saferlhf.parsing``, which the command
modules share), and so are solvers that other packages register under the ``lit_saferlhf.solvers``
entry-point group, so YAML and the command line can name them by short class name
(``--model.solver PIDLagrangian``) or by full import path. Nothing in the package imports this module:
it is the entry point.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_saferlhf.errors import EXIT_STATUS, TRACEBACK_VARIABLE, CommandParser, chain, expected_error, output_dir
from lit_saferlhf.parsing import cli_main, configure_parsing

__all__ = ["COMMANDS", "cli_main", "configure_parsing", "main"]


def world_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf world``: write the safety world's splits and tokenizer to a folder."""
    from lit_saferlhf.data.safety_world import RiskConfig, WorldConfig, write_world

    parser = CommandParser(prog="lit-saferlhf world", description=world_command.__doc__)
    parser.add_argument("--out", required=True, help="folder to write <split>.jsonl files and tokenizer/ into")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--risk", action="store_true", help="also write the risk splits (pairs-risk, prompts-risk*)")
    args = parser.parse_args(argv)
    for name, path in write_world(
        output_dir(args.out, "--out"), WorldConfig(seed=args.seed), RiskConfig() if args.risk else None
    ).items():
        print(f"{name}: {path}")


def pipeline_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf pipeline``: SFT -> reward -> cost -> PPO-Lagrangian -> evaluation -> report."""
    from lit_saferlhf.pipeline import pipeline_command as run

    run(argv)


def evaluate_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf evaluate``: generate from policies, score, summarise, and run the arena."""
    from lit_saferlhf.evaluation import evaluate_command as run

    run(argv)


def export_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf export``: write a stage's Hugging Face dir from any of its training checkpoints."""
    from lit_saferlhf.consolidate import export_command as run

    run(argv)


def select_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf select``: an FDC safety set with exact quotas per risk category (Equilibrate RLHF)."""
    from lit_saferlhf.select import select_command as run

    run(argv)


def merge_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf merge``: a linear weight merge of policy exports (P-SACPO)."""
    from lit_saferlhf.merge import merge_command as run

    run(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "pipeline": pipeline_command,
    "evaluate": evaluate_command,
    "export": export_command,
    "world": world_command,
    "select": select_command,
    "merge": merge_command,
}


UNION_FAILURE = "Does not validate against any of the Union subtypes"
"""How jsonargparse starts its report of a value that fits none of a setting's types."""
TRACEBACK_FLAG = "--traceback"
"""Shows the traceback of an error in the input too (as ``LIT_SAFERLHF_TRACEBACK=1`` does)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit-saferlhf`` console script: one command inside the error boundary.

    An error in the user's input (see ``lit_saferlhf.errors``) or a command-line parse error is printed as
    one ``error: ...`` message on stderr, and the exit status is 2; anything else keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = TRACEBACK_FLAG in args or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0")
    args = [arg for arg in args if arg != TRACEBACK_FLAG]
    if argv is None:
        sys.argv[1:] = args  # LightningCLI reads sys.argv itself (and warns when it is also given args)
    try:
        run_command(args, from_sys_argv=argv is None)
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
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return
    if args in ([], ["-h"], ["--help"]):
        print("Project commands: " + ", ".join(f"lit-saferlhf {name} --help" for name in COMMANDS) + "\n")
    cli_main(None if from_sys_argv else args)


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
