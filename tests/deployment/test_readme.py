"""The README's Python examples run as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 8


def test_every_python_block_is_fenced_python() -> None:
    """A block fenced ``py`` (or ``python3``, ``pycon``) would silently escape the test below."""
    text = README.read_text()
    fences = re.findall(r"^```(\S*)$", text, flags=re.M)
    opening = fences[0::2]  # fences alternate: opening, closing
    assert set(opening) <= {"python", "sh", ""}, sorted(set(opening))
    assert len(BLOCKS) == opening.count("python")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module: libraries that resolve annotations (SQLAlchemy) look the class's module up.
    module = types.ModuleType(f"readme_example_{index}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), module.__dict__)
