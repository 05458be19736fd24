"""Make the repository root importable (``workers``, the example deployment, lives there).

``pytest`` puts only ``tests/`` on ``sys.path`` (``python -m pytest`` adds the working directory
too), so test modules that import ``workers`` import this first.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
