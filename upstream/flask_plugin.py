"""pytest plugin (``-p upstream.flask_plugin``): hybridinval on every Flask-SQLAlchemy extension
object a test creates, every mapped class tracked by its primary key.

``SQLAlchemy._make_scoped_session`` is wrapped so that each ``SQLAlchemy()`` gets
``install(db.session, cache)``; the installations a test made are uninstalled when it ends
(an application would do the same when it is torn down), so they do not pile up on Flask-
SQLAlchemy's shared Session class. Classes are tracked as in :mod:`upstream.hybridinval_plugin`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from .hybridinval_plugin import Summary, Tracker


class FlaskPlugin:
    def __init__(self) -> None:
        import flask_sqlalchemy

        from hybridinval import HybridCache
        from hybridinval.sqlalchemy import Installation, install

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = os.environ.get("HYBRIDINVAL_REDIS_URL", "redis://127.0.0.1:6379/0")
        self.cache = HybridCache.from_url(url, namespace=f"upstream-flask-{worker}-{os.getpid()}")
        self.tracker = Tracker()
        self.tracker.listen()
        self.live: list[Installation] = []
        self.stats: Counter[str] = Counter()
        self.extensions = 0
        original = flask_sqlalchemy.SQLAlchemy._make_scoped_session

        def make_scoped_session(ext: Any, options: dict[str, Any]) -> Any:
            scoped = original(ext, options)
            self.live.append(install(scoped, self.cache))
            self.extensions += 1
            return scoped

        ext_class: Any = flask_sqlalchemy.SQLAlchemy
        ext_class._make_scoped_session = make_scoped_session

    @pytest.fixture(autouse=True)
    def _hybridinval_uninstall(self) -> Iterator[None]:
        yield
        while self.live:
            installation = self.live.pop()
            self.stats.update(installation.stats())
            installation.uninstall()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = {
            "extensions_installed": self.extensions,
            "classes_tracked": self.tracker.tracked,
            "classes_untrackable": sum(self.tracker.untrackable.values()),
            "untrackable": dict(self.tracker.untrackable),
            "untrackable_examples": self.tracker.examples,
            "listeners_restored": {},
            "stats": dict(self.stats),
        }
        Summary.of(session.config).add(report)
        self.cache.close()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Summary(), "hybridinval-summary")
    config.pluginmanager.register(FlaskPlugin(), "hybridinval-flask")
