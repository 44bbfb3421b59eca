"""Every docs/<file> that the code, the protos, the scripts or the README
cite is a file of the repository's docs/ (never a page outside it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"(?<![\w/.])docs/([\w.-]+\.md)")
SOURCES = ("common", "controller", "node", "server", "clients", "protos", "scripts", "tests",
           "bench")


def citing_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile"]
    for folder in SOURCES:
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and p.suffix in (".py", ".proto", ".sh", ".md")]
    return files


def test_every_cited_doc_exists():
    missing = {}
    for path in citing_files():
        for name in CITED.findall(path.read_text(errors="replace")):
            if not (ROOT / "docs" / name).is_file():
                missing.setdefault(f"docs/{name}", []).append(str(path.relative_to(ROOT)))
    assert missing == {}


def test_nothing_points_at_the_shared_folder():
    offenders = [str(p.relative_to(ROOT)) for p in citing_files()
                 if "../shared" in p.read_text(errors="replace") and p.name != Path(__file__).name]
    assert offenders == []
