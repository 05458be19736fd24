"""The version of hybridinval: the one place it is written.

``pyproject.toml`` reads it at build time (``[tool.setuptools.dynamic]``, parsed without
importing the package) and ``hybridinval.__version__`` imports it, so a wheel, an sdist and a
source tree on ``sys.path`` all report the same string.
"""

__version__ = "0.1.0"
