"""Every ``.. code-block:: python`` of the front page, the guides and the study pages runs as
written.

The blocks of one page run in order in one namespace, as a reader pastes them one after the
other; console blocks (downloads, GPUs, torchrun) are shell commands and are not run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted([DOCS / "index.rst", *DOCS.glob("guides/*.rst"), *DOCS.glob("studies/*.rst")])
BLOCK = re.compile(r"^\.\. code-block:: python\n((?:[ \t]*\n|   .*\n)+)", flags=re.M)


def python_blocks(text: str) -> list[str]:
    """The dedented bodies of the page's ``.. code-block:: python`` directives."""
    return [textwrap.dedent(body).strip() + "\n" for body in BLOCK.findall(text)]


def test_the_block_reader_finds_what_it_should():
    page = (".. code-block:: python\n\n   a = 1\n\n   b = a\n\ntext\n\n"
            ".. code-block:: console\n\n   $ ls\n")
    assert python_blocks(page) == ["a = 1\n\nb = a\n"]


def test_the_guides_are_there_and_hold_code():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    for page in ("guides/install.rst", "guides/own_model.rst", "guides/dilate_resnet.rst",
                 "guides/receptive_fields.rst", "guides/training.rst", "guides/benchmarks.rst",
                 "guides/export.rst", "guides/weights.rst"):
        assert page in names
        assert python_blocks((DOCS / page).read_text(encoding="utf-8")), page


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_code_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no Python blocks on this page")
    monkeypatch.chdir(tmp_path)  # files a guide writes land here
    torch.manual_seed(0)
    namespace = {"__name__": "docs_guide"}
    for index, code in enumerate(blocks):
        exec(compile(code, f"{page.name}[block {index}]", "exec"), namespace)
