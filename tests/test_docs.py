"""The guide holds: the README stays a short user's guide, every link between the pages resolves (files
and headings), every option is documented, and neither the docs nor the code carry a dated diary."""

import dataclasses
import re
from pathlib import Path

import pytest

from ilora import methods
from ilora.config.arguments import ContinualArguments, DataArguments, ModelArguments, RunArguments, TaskSpec

ROOT = Path(__file__).parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_the_readme_is_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def test_every_option_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    classes = [ModelArguments, DataArguments, ContinualArguments, RunArguments, TaskSpec]
    classes += [cls for cls in methods.argument_classes().values() if cls is not None]
    missing = [f.name for cls in classes for f in dataclasses.fields(cls) if f"`{f.name}`" not in text]
    assert not missing, f"docs/configuration.md does not list {missing}"


DIARY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bissue \d+|passed once|this session|earlier plan|rerun on", re.I)


def test_no_dated_history_in_the_docs_or_the_code():
    """History belongs in git log and CHANGELOG.md; the pages and the code say what is, with its command."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    files += sorted((ROOT / "src" / "ilora").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    found = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in files for m in DIARY.finditer(path.read_text())]
    assert not found, found
