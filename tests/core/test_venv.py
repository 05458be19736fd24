"""`make venv` rebuilds a .venv that a wrong or broken Python made, and reinstalls only then.

The Makefile and ``.ci/ensure-venv`` are copied into a scratch project and run by ``make`` there,
with stand-in interpreters: shell scripts that say a version when asked (``-c``), make a venv of
themselves (``-m venv``) and log what pip was asked to do (``-m pip``). So every case runs the
real rules (the check on every run, the stamp that follows ``.venv/.python``) in milliseconds.
One more case runs the script on a real venv of the Python running these tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the install stamp depends on besides .venv/.python; their content does not matter here.
STAMP_INPUTS = ("setup.py", "hybridinval/_speedups.c", "hybridinval/_version.py")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pip_log = root / "pip.log"
        self.venv = root / ".venv"
        for name in ("Makefile", "pyproject.toml", ".ci/ensure-venv"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
        for name in STAMP_INPUTS:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("")
        self.pip_log.write_text("")

    def python(self, version: str) -> Path:
        """A stand-in for Python ``version`` (outside the venv, as a base interpreter is)."""
        path = self.root / "pythons" / f"python{version}"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            "#!/bin/sh\n"
            f"# stand-in for Python {version}\n"
            'case "$1" in\n'
            f'  -c) echo "{version} /opt/python-{version}" ;;\n'
            '  -m) case "$2" in\n'
            '        venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;\n'
            f'        pip) echo "$*" >>"{self.pip_log}" ;;\n'
            "        *) exit 1 ;;\n"
            "      esac ;;\n"
            "  *) exit 1 ;;\n"
            "esac\n"
        )
        path.chmod(0o755)
        return path

    def installed_venv(self, python: Path) -> None:
        """A .venv of ``python`` with a fresh install stamp, as an earlier `make venv` left it."""
        subprocess.run([python, "-m", "venv", self.venv], check=True)
        (self.venv / ".installed").touch()

    def venv_python_version(self) -> str:
        out = subprocess.run(
            [self.venv / "bin" / "python", "-c", ""], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]

    def installs(self) -> int:
        return self.pip_log.read_text().count("pip install -e .[test]")

    def make_venv(self, python: Path | str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        return subprocess.run(
            ["make", "venv", f"PYTHON={python}"],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def test_make_venv_creates_the_venv_and_then_leaves_it_alone(project: Project) -> None:
    first = project.make_venv(project.python("3.11.4"))
    assert first.returncode == 0, first.stderr
    assert project.venv_python_version() == "3.11.4"
    assert project.installs() == 1
    assert (project.venv / ".installed").exists()
    again = project.make_venv(project.python("3.11.4"))
    assert again.returncode == 0, again.stderr
    assert project.installs() == 1, "a sound venv must not be reinstalled on every run"
    assert "rebuilding" not in again.stderr


def test_a_venv_of_an_unsupported_python_is_rebuilt(project: Project) -> None:
    project.installed_venv(project.python("3.10.13"))
    result = project.make_venv(project.python("3.12.1"))
    assert result.returncode == 0, result.stderr
    assert "is Python 3.10.13; hybridinval needs Python >= 3.11" in result.stderr
    assert "rebuilding .venv with" in result.stderr
    assert project.venv_python_version() == "3.12.1"
    assert project.installs() == 1


def test_a_venv_whose_base_python_was_removed_is_rebuilt(project: Project) -> None:
    (project.venv / "bin").mkdir(parents=True)
    gone = project.root / "removed" / "bin" / "python3.11"
    (project.venv / "bin" / "python").symlink_to(gone)
    (project.venv / ".installed").touch()
    result = project.make_venv(project.python("3.11.4"))
    assert result.returncode == 0, result.stderr
    assert f"links to {gone}, which does not exist" in result.stderr
    assert project.venv_python_version() == "3.11.4"
    assert project.installs() == 1


def test_a_venv_whose_python_fails_to_start_is_rebuilt(project: Project) -> None:
    project.installed_venv(project.python("3.11.4"))
    broken = project.venv / "bin" / "python"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    result = project.make_venv(project.python("3.11.4"))
    assert result.returncode == 0, result.stderr
    assert "does not run: Fatal Python error: init_fs_encoding" in result.stderr
    assert project.venv_python_version() == "3.11.4"
    assert project.installs() == 1


def test_a_venv_whose_python_changed_in_place_is_reinstalled(project: Project) -> None:
    # The base interpreter a venv links to was upgraded (3.11.4 -> 3.11.9): the venv still
    # works, but what was built against the old one (the C hit path) is built again.
    assert project.make_venv(project.python("3.11.4")).returncode == 0
    shutil.copy2(project.python("3.11.9"), project.venv / "bin" / "python")
    result = project.make_venv(project.python("3.11.4"))
    assert result.returncode == 0, result.stderr
    assert "rebuilding" not in result.stderr
    assert project.venv_python_version() == "3.11.9"
    assert project.installs() == 2


@pytest.mark.parametrize("venv", ["none", "broken"])
def test_an_unsupported_PYTHON_stops_make_with_the_problem_and_the_fix(
    project: Project, venv: str
) -> None:
    if venv == "broken":
        project.installed_venv(project.python("3.9.18"))
    result = project.make_venv(project.python("3.10.13"))
    assert result.returncode != 0
    assert "python3.10.13 is Python 3.10.13; hybridinval needs Python >= 3.11" in result.stderr
    assert "fix: make venv PYTHON=/path/to/python3.11" in result.stderr
    assert project.installs() == 0
    if venv == "broken":  # left as it was: nothing better could replace it
        assert project.venv_python_version() == "3.9.18"
    else:
        assert not project.venv.exists()


def test_a_missing_PYTHON_stops_make(project: Project) -> None:
    result = project.make_venv("no-such-python")
    assert result.returncode != 0
    assert "no-such-python does not exist" in result.stderr
    assert "fix: make venv PYTHON=" in result.stderr


def test_a_real_venv_of_this_python_passes_as_it_is(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    created = (venv / "pyvenv.cfg").stat().st_mtime_ns
    (tmp_path / "pyproject.toml").write_text('requires-python = ">=3.11"\n')
    result = subprocess.run(
        ["sh", ROOT / ".ci" / "ensure-venv", venv, "no-such-python"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == created, "rebuilt a sound venv"
    major, minor, micro = sys.version_info[:3]
    assert (venv / ".python").read_text() == f"{major}.{minor}.{micro} {sys.base_prefix}\n"
