"""``hybridinval demo`` from a wheel, as a new user gets it: the wheel built from this checkout,
installed in a fresh virtual environment, run from a directory outside the checkout, with
nothing on ``PYTHONPATH``. Without the ``demo`` extra it says, in one line, what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.demo_harness import Demo, fresh_env
from support.repo import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a build and two installs

# What a build in the checkout would read that is not the project's (or is a previous build's).
NOT_SOURCE = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*cache")


def user_env(**extra: str) -> dict[str, str]:
    """A shell's environment with no trace of this checkout or its virtual environment."""
    env = fresh_env(**extra)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env


def run(*args: str | Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout, so that the build neither leaves
    ``build/`` behind nor packs a stale one."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist", source, cwd=root)
    (built,) = (root / "dist").glob("hybridinval-*.whl")
    return built


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Path]:
    """A fresh virtual environment (pip's cache is shared with the user's)."""
    path = tmp_path / "venv"
    run(sys.executable, "-m", "venv", path, cwd=tmp_path)
    yield path


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A directory that is not the checkout, as a new user's working directory."""
    path = tmp_path / "somewhere"
    path.mkdir()
    return path


def test_without_the_extra_the_demo_says_in_one_line_what_to_install(
    wheel: Path, venv: Path, elsewhere: Path
) -> None:
    run(venv / "bin" / "pip", "install", wheel, cwd=elsewhere)
    done = subprocess.run(
        [str(venv / "bin" / "hybridinval"), "demo", "--duration", "1"],
        cwd=elsewhere,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.rstrip().endswith("pip install 'hybridinval[demo]'"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_demo_runs_from_the_wheel_with_no_stale_reads(
    wheel: Path, venv: Path, elsewhere: Path, tmp_path: Path
) -> None:
    run(venv / "bin" / "pip", "install", f"{wheel}[demo]", cwd=elsewhere)
    # The example runs from the installed package, not from this checkout.
    where = run(
        venv / "bin" / "python",
        "-c",
        "import hybridinval.demo.example as e, hybridinval.demo.runner as r; "
        "print(e.__file__); print(r.migrations_dir())",
        cwd=elsewhere,
    ).stdout.split()
    site = str(venv / "lib")
    assert all(path.startswith(site) for path in where), where
    assert (Path(where[1]) / "versions" / "0001_users_and_cards.py").is_file()
    assert (Path(where[1]) / "script.py.mako").is_file()

    home = tmp_path / "demo"
    home.mkdir()
    demo = Demo(
        home,
        "--duration",
        "3",
        command=[str(venv / "bin" / "hybridinval")],
        cwd=elsewhere,
        env=user_env(),
    )
    try:
        code = demo.watch(timeout=300)
        output = demo.output()
        print(output)  # the table, for whoever reads the test's log
        assert code == 0, output[-4000:]
        assert "embedded" in output and "sqlite" in output
        assert "stale reads: 0" in output and output.rstrip().endswith("OK"), output[-2000:]
        assert demo.survivors() == [] and demo.leftover_files() == []
        assert os.listdir(elsewhere) == [], "the demo writes nothing in the user's directory"
    finally:
        demo.close()
