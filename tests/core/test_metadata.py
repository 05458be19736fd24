"""The installed distribution says what the source says: one version, and the license.

The version is written once, in ``hybridinval/_version.py``: ``pyproject.toml`` reads it at build
time and ``hybridinval.__version__`` imports it. An install made before the file last changed
(``make venv`` reinstalls when it does) reports another version than the code it runs.
"""

from __future__ import annotations

import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import hybridinval
from hybridinval import _version

ROOT = Path(__file__).resolve().parents[2]


def installed() -> metadata.Distribution:
    """The distribution installed in this environment's site-packages.

    Not whatever comes first on sys.path: with the source tree on it (the benchmark tests put it
    there), that is the ``hybridinval.egg-info`` a build left in the tree.
    """
    site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    found = list(metadata.distributions(name="hybridinval", path=site))
    assert len(found) == 1, f"expected one hybridinval in {site}, found {len(found)}"
    return found[0]


def test_the_installed_metadata_and_the_package_agree_on_the_version() -> None:
    installed_version = installed().version
    assert installed_version == hybridinval.__version__, (
        f"the installed hybridinval is {installed_version} but the source says "
        f"{hybridinval.__version__}: reinstall (make venv)"
    )


def test_the_version_is_written_in_one_place() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert "version" not in project, "pyproject.toml must not repeat hybridinval/_version.py"
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "hybridinval._version.__version__"
    }
    assert hybridinval.__version__ is _version.__version__


def test_the_license_is_in_the_metadata() -> None:
    dist = installed()
    assert dist.metadata["License-Expression"] == "MIT"
    assert dist.metadata.get_all("License-File") == ["LICENSE"]
    shipped = dist.read_text("licenses/LICENSE")
    assert shipped is not None and shipped == (ROOT / "LICENSE").read_text()
    assert shipped.startswith("MIT License") and "the hybridinval authors" in shipped
