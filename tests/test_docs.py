"""The repository explains itself: every ``docs/…md#section`` that code and tests cite exists, and
nothing cites a document outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/([\w-]+\.md)((?:#[\w-]+)(?:, #[\w-]+)*)")
OUTSIDE = re.compile("|".join(re.escape(s) for s in ("spec " + "§", "design " + "§", "sdxl-names" + ".md",
                                                     "lycoris-format" + ".md", ".." + "/shared/")) + r"|spec D\d")


def tracked_sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.split() if name.endswith((".py", ".js", ".mjs", ".c", ".toml"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_cited_docs_section_exists():
    cited = 0
    for path in tracked_sources():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            doc = ROOT / "docs" / match.group(1)
            assert doc.is_file(), f"{path.name} cites {match.group(0)}, but there is no {doc.name}"
            known = anchors(doc.read_text(encoding="utf-8"))
            for anchor in re.findall(r"#([\w-]+)", match.group(2)):
                assert anchor in known, f"{path.name} cites {doc.name}#{anchor}, which has no such section"
                cited += 1
    assert cited >= 20


def test_nothing_cites_a_document_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in tracked_sources()
                 for m in OUTSIDE.finditer(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
