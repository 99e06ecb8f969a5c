"""Every ```python block of the README runs as written (the guide's snippets stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_guide_snippets():
    text = README.read_text(encoding="utf-8")
    for title in ("Dilate a pretrained torchvision ResNet in one line",
                  "Put a BiFPN into torchvision's Faster R-CNN",
                  "An FPN on any timm backbone"):
        assert title in text
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
