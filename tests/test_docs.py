"""docs/ is where code comments point (``docs/variants.md#dora``): every such reference in the
repository must name a file under docs/ and an anchor that file defines, either an explicit
``<a id="..."></a>`` or a heading's GitHub-style slug."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = ["lowrank", "tests", "reference", "benchmarks", "docs", "README.md"]
REFERENCE = re.compile(r"docs/([A-Za-z0-9_\-]+\.md)(?:#([A-Za-z0-9_\-]+))?")
LINK = re.compile(r"\]\(([A-Za-z0-9_\-]+\.md)(?:#([A-Za-z0-9_\-]+))?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    text = path.read_text(encoding="utf-8")
    found = set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    found |= {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    return found


def references():
    """``(where, file, anchor)`` for every docs reference in the repository's text files."""
    for top in SOURCES:
        path = ROOT / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                     if p.suffix in (".py", ".md"))
        for f in files:
            text = f.read_text(encoding="utf-8")
            for m in REFERENCE.finditer(text):
                yield f"{f.relative_to(ROOT)}", m.group(1), m.group(2)
            if f.parent == DOCS:   # relative links between docs pages
                for m in LINK.finditer(text):
                    yield f"{f.relative_to(ROOT)}", m.group(1), m.group(2)


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert pages, "docs/ holds no pages"
    assert [p for p in pages if f"({p})" not in index] == []


def test_every_docs_reference_resolves():
    cache, broken, seen = {}, [], 0
    for where, name, anchor in references():
        seen += 1
        page = DOCS / name
        if not page.is_file():
            broken.append(f"{where}: docs/{name} does not exist")
            continue
        if anchor and anchor not in cache.setdefault(name, anchors(page)):
            broken.append(f"{where}: docs/{name}#{anchor} has no such anchor")
    assert seen > 0
    assert broken == [], "\n".join(sorted(set(broken)))
