"""``lit-saferlhf world``: write the safety world's splits and tokenizer to a folder."""

from __future__ import annotations

from collections.abc import Sequence

from lit_saferlhf.data.safety_world import RiskConfig, WorldConfig, write_world
from lit_saferlhf.errors import CommandParser, output_dir


def world_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf world``: write the safety world's splits and tokenizer to a folder."""
    parser = CommandParser(prog="lit-saferlhf world", description=world_command.__doc__)
    parser.add_argument("--out", required=True, help="folder to write <split>.jsonl files and tokenizer/ into")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--risk", action="store_true", help="also write the risk splits (pairs-risk, prompts-risk*)")
    parser.add_argument(
        "--guard", action="store_true", help="also write the guard splits (guard, guard-val) and guard_tokenizer/"
    )
    args = parser.parse_args(argv)
    for name, path in write_world(
        output_dir(args.out, "--out"), WorldConfig(seed=args.seed), RiskConfig() if args.risk else None, args.guard
    ).items():
        print(f"{name}: {path}")
