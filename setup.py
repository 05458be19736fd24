"""Build configuration beyond pyproject.toml: the optional C hit path.

``hybridinval._speedups`` answers L1 hits in C (see ``hybridinval/_speedups.c``). It is built
on Linux with CPython, where its clock is the one ``time.monotonic()`` reads; anywhere else, or
where no compiler is found, the build goes on without it and the pure-Python hit path is used.
"""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and platform.python_implementation() == "CPython":
    ext_modules.append(
        Extension(
            "hybridinval._speedups",
            sources=["hybridinval/_speedups.c"],
            optional=True,  # a failed build installs the pure-Python package
        )
    )

setup(ext_modules=ext_modules)
