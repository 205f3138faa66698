"""The code blocks the docs mark with ``<!-- run -->`` run as written: each page's marked blocks in order, in
one namespace, in a folder holding the files the page names (model.stable.pt, ethanol.pdb, ethanol_mm.xml)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- run -->\n```python\n(.*?)```", re.S)


def _pages_with_snippets() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [page for page in pages if MARKED.search(page.read_text())]


def test_the_docs_mark_snippets_to_run():
    assert REPO / "docs" / "user-guide.md" in _pages_with_snippets()
    assert len(MARKED.findall((REPO / "docs" / "user-guide.md").read_text())) >= 2


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch, pretrained_model, ethanol):
    """What the snippets name, in the working directory."""
    pytest.importorskip("openmmml")
    import openmm.app as app
    import openmm.unit as unit

    from openmm_bridge.topology import molecule_topology
    from stable_md.stability import detect_bonds

    shutil.copyfile(pretrained_model, tmp_path / "model.stable.pt")
    shutil.copyfile(REPO / "data" / "ethanol_mm.xml", tmp_path / "ethanol_mm.xml")
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50], None)
    topology = molecule_topology(ethanol.numbers, bonds.pairs, residue="ETH")
    with open(tmp_path / "ethanol.pdb", "w") as handle:
        app.PDBFile.writeFile(topology, ethanol.positions[0] * 0.1 * unit.nanometer, handle)
    assert app.PDBFile(str(tmp_path / "ethanol.pdb")).topology.getNumBonds() == len(bonds.pairs)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", _pages_with_snippets(), ids=lambda page: page.name)
def test_marked_snippets_run(page, snippet_folder):
    namespace: dict = {"__name__": "__docs__"}
    for number, code in enumerate(MARKED.findall(page.read_text()), start=1):
        try:
            exec(compile(code, f"{page.name} snippet {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, snippet {number} failed: {error!r}\n{code}") from error
