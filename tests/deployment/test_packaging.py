"""What the wheel is made of: every package of the library, and the example deployment
(``workers/``, ``alembic/``) mapped into the demo, which nothing else in the library imports.

The wheel itself is built and run in ``test_demo_wheel.py`` (slow); these checks read the
configuration and the source.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from support.repo import REPO_ROOT

LIBRARY = REPO_ROOT / "hybridinval"


def setuptools_config() -> dict[str, object]:
    config: dict[str, object] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]
    return config


def test_every_package_of_the_library_is_listed() -> None:
    # The package list is explicit (a mapped package cannot be discovered): a new package
    # directory, e.g. a module turned into a package, must be added or the wheel lacks it.
    listed = set(setuptools_config()["packages"])  # type: ignore[call-overload]
    in_tree = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts) for init in LIBRARY.rglob("__init__.py")
    }
    missing = in_tree - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_the_demo_ships_the_repository_example_and_its_migrations() -> None:
    config = setuptools_config()
    package_dir = config["package-dir"]
    assert package_dir == {
        "hybridinval.demo.example": "workers",
        "hybridinval.demo.migrations": "alembic",
    }
    assert (REPO_ROOT / "workers" / "__init__.py").is_file()
    assert (REPO_ROOT / "alembic" / "env.py").is_file()
    # An __init__.py in alembic/ would make `import alembic` from the repository root find it
    # instead of the alembic library.
    assert not (REPO_ROOT / "alembic" / "__init__.py").exists()
    assert config["package-data"]["hybridinval.demo.migrations"] == ["script.py.mako"]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports: (absolute name or ``.relative``, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [
                (f"{base}.{alias.name}" if node.level else base, node.lineno)
                for alias in node.names
            ]
    return found


def test_the_library_never_imports_the_example() -> None:
    offences = []
    for path in LIBRARY.rglob("*.py"):
        if LIBRARY / "demo" in path.parents:
            continue
        for name, line in _imports(path):
            demo = name.startswith(("hybridinval.demo", ".demo"))
            # The command's way into the demo: the package's own names, never its modules.
            command = path.name == "cli.py" and name.count(".") == 2 and name.startswith(".demo.")
            if name.startswith("workers") or (demo and not command):
                offences.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    assert not offences
    # The example's modules import each other relatively, whatever their package is called.
    for path in (REPO_ROOT / "workers").glob("*.py"):
        for name, line in _imports(path):
            assert not name.startswith("workers"), f"{path.name}:{line} imports {name}"


def test_importing_the_library_and_its_command_loads_no_example() -> None:
    code = (
        "import sys, hybridinval, hybridinval.celery, hybridinval.sqlalchemy, hybridinval.cli\n"
        "hybridinval.cli.build_parser()\n"
        "print(','.join(m for m in sys.modules if m.startswith(('workers', "
        "'hybridinval.demo.example', 'hybridinval.demo.runner'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert done.stdout.strip() == ""


def test_the_core_imports_no_integration_eagerly_or_lazily() -> None:
    """Everything but the integrations, the demo and its command stands without them."""
    integrations = {"sqlalchemy", "celery", "kombu", "flask", "gunicorn", "alembic", "fastapi"}
    ours = {"sqlalchemy", "celery", "demo", "cli"}
    offences = []
    for path in LIBRARY.rglob("*.py"):
        relative = path.relative_to(LIBRARY)
        if relative.parts[0] in ("sqlalchemy", "demo") or path.stem in ("celery", "cli"):
            continue
        if relative.as_posix() == "transports/kombu.py":
            continue  # the kombu backplane itself (the amqp extra), imported only when configured
        for name, line in _imports(path):
            if name.startswith("."):
                head = name.lstrip(".").split(".")[0]
                bad = head in ours
            else:
                parts = name.split(".")
                bad = parts[0] in integrations or (
                    parts[0] == "hybridinval" and len(parts) > 1 and parts[1] in ours
                )
            if bad:
                offences.append(f"{relative}:{line} imports {name}")
    assert not offences
