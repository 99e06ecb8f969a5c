"""The README stays true: its example runs, its links lead to pages that exist, and its
two commands are the ones CI and the Makefile use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", TEXT, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_lead_to_files():
    links = re.findall(r"\]\(([^)#]+)\)", TEXT)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to the guides"
    for link in local:
        assert (ROOT / link).is_file(), link


def test_readme_has_the_benchmark_table():
    section = TEXT.split("## Speed against the peers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "ratio" not in line]
    assert len(rows) >= 5, section


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
