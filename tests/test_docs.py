"""The documentation matches the code: the CLI reference covers every command and option, links resolve."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))

from generate_cli_reference import _subparsers, reference  # noqa: E402


def _all_parsers(parser, name="stable-md"):
    yield name, parser
    for child, sub in _subparsers(parser).items():
        yield from _all_parsers(sub, f"{name} {child}")


def test_cli_reference_lists_every_command_and_option():
    from stable_md.cli import build_parser

    committed = (REPO / "docs" / "cli.md").read_text()
    generated = reference()
    for name, parser in _all_parsers(build_parser()):
        if name != "stable-md":
            assert f"`{name}`" in committed, f"docs/cli.md lacks {name}; run python docs/generate_cli_reference.py"
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # a deprecated spelling, documented in the user guide
                continue
            for option in action.option_strings:
                if option.startswith("--"):
                    # Matched as a whole option, so --time does not pass for --max-time alone.
                    pattern = re.compile(rf"(?<![\w-]){re.escape(option)}(?![\w-])")
                    assert pattern.search(committed), f"docs/cli.md lacks {name} {option}"
                    assert pattern.search(generated)


def test_markdown_links_point_to_existing_files():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 6, "README plus quick start, user guide, method, CLI reference and results"
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    readme = (REPO / "README.md").read_text()
    for doc in ("docs/quickstart.md", "docs/user-guide.md", "docs/method.md", "docs/cli.md", "docs/results.md"):
        assert doc in readme, f"README does not link {doc}"


def test_readme_opens_with_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[0:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_every_test_named_in_the_reliability_table_exists():
    """docs/reliability.md lists bad inputs with the test that checks each; a renamed or removed test must not
    leave the table pointing at nothing."""
    text = (REPO / "docs" / "reliability.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 40
    named = re.findall(r"`(\w+\.py)::(\w+)`", text)
    assert all(re.search(r"`\w+\.py::\w+`", row) for row in rows), "every row names its test"
    for file, name in set(named):
        source = (REPO / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{file}::{name} does not exist"


def test_openmm_bridge_is_a_pure_engine_layer():
    """openmm_bridge may use only units, the Potential interface, model files and file helpers from stable_md
    (docs/architecture.md): workflows such as simulate live in stable_md and call the engine, never the reverse."""
    allowed = {"stable_md.units", "stable_md.potentials.base", "stable_md.potentials.model_file", "stable_md.files",
               "stable_md.geometry_checks"}
    for path in sorted((REPO / "openmm_bridge").glob("*.py")):
        used = set(re.findall(r"^\s*(?:from|import) (stable_md(?:\.\w+)*)", path.read_text(), re.MULTILINE))
        assert used <= allowed, f"{path.name} imports {sorted(used - allowed)} from stable_md"
