"""Write docs/cli.md from the argparse parsers of ``stable-md`` (so the reference never drifts from the code).

    python docs/generate_cli_reference.py          # rewrites docs/cli.md
    python docs/generate_cli_reference.py --check  # exit 1 when docs/cli.md is out of date
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TARGET = Path(__file__).with_name("cli.md")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def reference() -> str:
    """The CLI reference as Markdown: every command's and subcommand's ``--help``."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it so the file is reproducible
    from stable_md.cli import build_parser

    parser = build_parser()
    parts = ["# CLI reference", "",
             "Generated from the argparse parsers by `python docs/generate_cli_reference.py`; "
             "`stable-md COMMAND --help` prints the same.", "", "```", parser.format_help().rstrip(), "```", ""]

    def add(name: str, sub: argparse.ArgumentParser, level: int) -> None:
        parts.extend([f"{'#' * level} `stable-md {name}`", "", "```", sub.format_help().rstrip(), "```", ""])
        for child, grandchild in _subparsers(sub).items():
            add(f"{name} {child}", grandchild, level + 1)

    for name, sub in _subparsers(parser).items():
        add(name, sub, 2)
    return "\n".join(parts)


def main() -> int:
    text = reference()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date; run python docs/generate_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
