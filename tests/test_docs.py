"""The repository stands alone: every reference to documentation points inside it (docs/METHOD.md,
docs/DATA.md), and each cited section of docs/ exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reference folder the project grew beside (its name is spelled in pieces so this file does not cite it):
# "<dir>/X" or "../<dir>/X", never a path that merely contains the word (/mnt/<dir>/... in an example).
REFERENCE_DIR = "sha" + "red"
OUTSIDE = re.compile(r"(?<![\w/.-])(?:\.\./)+[\w.-]+/[\w.-]+\.md|(?<![\w/.-])(?:\.\./)*" + REFERENCE_DIR + "/")
# The names of documents that live only outside the repository, cited without their docs/ folder.
OUTSIDE_DOCS = ("METHOD", "DATA", "STYLE", "ARCHITECTURE", "paper")
BARE = re.compile(r"(?<![\w/.-])(?:" + "|".join(OUTSIDE_DOCS) + r")\.md")
CITED = re.compile(r'docs/(\w+\.md)(?:[ \t]*\(?"([^"\n]+)")?')


def _tracked_text() -> dict[str, str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        # this file is the scanner: its planted examples are data, checked by the negative control below
        if not name or name in ("dvc.lock", "tests/test_docs.py") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:4096]:
            files[name] = data.decode("utf-8", errors="replace")
    return files


def _headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")}


def outside_references(name: str, text: str) -> list[str]:
    """Each line of `text` (from tracked file `name`) that cites a document outside the repository."""
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        # inside docs/, a bare name is a relative link to a sibling, which must exist
        bare = [m for m in BARE.findall(line) if not (name.startswith("docs/") and (ROOT / "docs" / m).exists())]
        if OUTSIDE.search(line) or bare:
            bad.append(f"{name}:{number}: {line.strip()}")
    return bad


def broken_citations(name: str, text: str) -> list[str]:
    """Each `docs/X.md "Section"` citation in `text` whose file or section does not exist."""
    bad = []
    for doc, section in CITED.findall(text):
        path = ROOT / "docs" / doc
        if not path.is_file():
            bad.append(f"{name}: docs/{doc} does not exist")
        elif section and section not in _headings(path):
            bad.append(f'{name}: docs/{doc} has no section "{section}"')
    return bad


def test_the_scanner_catches_planted_outside_references():
    """Negative control: each way the old references were written is caught, the harmless ones are not."""
    d, (method, data, style) = REFERENCE_DIR, (f"{n}.md" for n in OUTSIDE_DOCS[:3])
    planted = [f"see ../{d}/{method}", f"checksums in `{d}/{data}`", f"({style} rule 6)", f"# {method} prototype",
               "(../../notes/ideas.md)"]
    for line in planted:
        assert outside_references("ctxrepro/x.py", line), line
    for line in ["docs/METHOD.md \"Network\"", f"dvc remote add -d storage /mnt/{d}/ctxrepro-dvc",
                 "bench/README.md", "2 cores shared with other jobs"]:
        assert not outside_references("ctxrepro/x.py", line), line
    assert outside_references("docs/METHOD.md", f"[{style}]({style})")  # no such sibling in docs/
    assert not outside_references("docs/METHOD.md", f"[{data}]({data})")


def test_no_tracked_file_points_outside_the_repository():
    bad = [line for name, text in _tracked_text().items() for line in outside_references(name, text)]
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_every_docs_citation_names_an_existing_file_and_section():
    files = _tracked_text()
    cited = sum(len(CITED.findall(text)) for text in files.values())
    assert cited > 50  # the package and profiles cite docs/ throughout
    bad = [line for name, text in files.items() for line in broken_citations(name, text)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc, sections", [
    (ROOT / "docs/METHOD.md", ["Pretext task", "Network", "Transfer", "Headline numbers", "The tiny-world prototype",
                   "Where each paper-profile value comes from"]),
    (ROOT / "docs/DATA.md", ["Archives", "Layouts", "Known traps", "Selective search .mat", "VOC2007 detection AP",
                 "Fast R-CNN defaults", "NYUv2 surface normals", "Purity-coverage"]),
])
def test_docs_have_the_sections_the_code_cites(doc, sections):
    assert set(sections) <= _headings(doc)


def test_data_doc_lists_every_registry_archive_with_its_checksum():
    """docs/DATA.md "Archives" is the registry's source: every archive's name and checksum appear in it."""
    from ctxrepro.data.registry import ARCHIVES

    text = (ROOT / "docs/DATA.md").read_text()
    for archive in ARCHIVES:
        assert f"`{archive.name}`" in text, archive.name
        if archive.checksum is not None:
            assert archive.checksum.hexdigest in text, archive.name
        if archive.size is not None:
            assert f"{archive.size:,}" in text, archive.name
