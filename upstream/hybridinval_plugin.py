"""pytest plugin (``-p upstream.hybridinval_plugin``): hybridinval on every Session, every mapped
class tracked by its primary key, for running a library's own test suite against it.

At configure time it builds a :class:`hybridinval.HybridCache` on ``HYBRIDINVAL_REDIS_URL``
(a namespace per worker process), calls ``install(sqlalchemy.orm.Session, cache)`` and tracks
each class as its mapper is constructed (declarative, imperative, dataclass: all go through
``Mapper.__init__``, which fires ``after_mapper_constructed``) with the key template
``"<module>.<qualname>:{pk1}:{pk2}"``. Some suites clear every ORM event listener between
tests (SQLAlchemy's ``RemoveORMEventsGlobally``, ``Mapper.dispatch._clear()``), so before each
test the plugin puts back whatever was removed, and counts it. The terminal summary (and the
JSON file named by ``HYBRIDINVAL_PLUGIN_REPORT``) gives the tracked/untrackable class counts
and ``Installation.stats()``, summed over pytest-xdist workers.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hybridinval.sqlalchemy import Installation

REPORT_KEY = "hybridinval"


class Tracker:
    """Tracks every mapped class by its primary key; counts what it could not track."""

    def __init__(self) -> None:
        self.tracked = 0
        self.untrackable: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def listen(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import Mapper

        if not event.contains(Mapper, "after_mapper_constructed", self.on_mapper):
            event.listen(Mapper, "after_mapper_constructed", self.on_mapper)

    def on_mapper(self, mapper: Any, cls: type) -> None:
        from hybridinval.sqlalchemy import track

        try:
            attrs = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
            template = f"{cls.__module__}.{cls.__qualname__}:" + ":".join(f"{{{a}}}" for a in attrs)
            track(cls, keys=[template])
        except Exception as exc:  # a PK without a column attribute, a non-Column PK...
            reason = f"{type(exc).__name__}: {str(exc).split(':')[0][:120]}"
            self.untrackable[reason] += 1
            self.examples.setdefault(reason, f"{cls.__module__}.{cls.__qualname__}: {exc}"[:300])
        else:
            self.tracked += 1


class HybridinvalPlugin:
    """The per-process part: the cache, the installation, the tracker."""

    def __init__(self, config: pytest.Config) -> None:
        from hybridinval import HybridCache

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = os.environ.get("HYBRIDINVAL_REDIS_URL", "redis://127.0.0.1:6379/0")
        self.config = config
        self.cache = HybridCache.from_url(url, namespace=f"upstream-{worker}-{os.getpid()}")
        self.installations = [self.install()]
        self.tracker = Tracker()
        self.tracker.listen()
        self.restored: Counter[str] = Counter()

    def install(self) -> Installation:
        from sqlalchemy.orm import Session

        from hybridinval.sqlalchemy import install

        return install(Session, self.cache)  # every session of the process

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the listeners a test removed by clearing SessionEvents/MapperEvents."""
        from sqlalchemy import event
        from sqlalchemy.orm import Mapper, Session

        from hybridinval.sqlalchemy._flush import _install_mapper_listeners

        current = self.installations[-1]
        if not event.contains(Session, "after_commit", current._after_commit):
            current.uninstall()
            self.installations.append(self.install())
            self.restored["session_listeners"] += 1
        if not event.contains(Mapper, "after_mapper_constructed", self.tracker.on_mapper):
            self.tracker.listen()
            # A cleared MapperEvents removed hybridinval's flush listeners too; track() puts them
            # back by itself, but classes mapped before the clear may flush before any track().
            _install_mapper_listeners()
            self.restored["mapper_listeners"] += 1

    def report(self) -> dict[str, Any]:
        stats: Counter[str] = Counter()
        for installation in self.installations:
            stats.update(installation.stats())
        return {
            "classes_tracked": self.tracker.tracked,
            "classes_untrackable": sum(self.tracker.untrackable.values()),
            "untrackable": dict(self.tracker.untrackable),
            "untrackable_examples": self.tracker.examples,
            "listeners_restored": dict(self.restored),
            "stats": dict(stats),
        }

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = self.report()
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller sums and prints
            workeroutput[REPORT_KEY] = json.dumps(report)
        else:
            Summary.of(session.config).add(report)
        self.cache.close()


class Summary:
    """The terminal summary: one process's report, or the sum over xdist workers."""

    def __init__(self) -> None:
        self.total: dict[str, Any] = {}

    @staticmethod
    def of(config: pytest.Config) -> Summary:
        summary = config.pluginmanager.get_plugin("hybridinval-summary")
        assert isinstance(summary, Summary)
        return summary

    def add(self, report: dict[str, Any]) -> None:
        for key, value in report.items():
            if isinstance(value, dict):
                merged = self.total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v if isinstance(v, int) else merged.get(k, v)
            else:
                self.total[key] = self.total.get(key, 0) + value

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {}).get(REPORT_KEY)
        if output:
            self.add(json.loads(output))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        total = self.total
        terminalreporter.section("hybridinval")
        if not total:
            terminalreporter.write_line("no report (did the workers crash?)")
            return
        terminalreporter.write_line(
            f"classes tracked: {total['classes_tracked']}, untrackable: "
            f"{total['classes_untrackable']} {total['untrackable']}"
        )
        for reason, example in total["untrackable_examples"].items():
            terminalreporter.write_line(f"  e.g. {reason}: {example}")
        terminalreporter.write_line(f"listeners restored: {total['listeners_restored']}")
        terminalreporter.write_line(f"installation stats: {total['stats']}")
        path = os.environ.get("HYBRIDINVAL_PLUGIN_REPORT")
        if path:
            Path(path).write_text(json.dumps(total, indent=1))


def quiet_reads() -> None:
    """``HYBRIDINVAL_UPSTREAM_QUIET_READS=1``: hybridinval's own key reads run on a Connection
    that shares the session's DBAPI connection and transaction but not the engine's listeners
    (``_has_events=False``, as SQLAlchemy does for statements that must not reach them). A test
    that fails installed but passes this way differed only by the extra statements it saw."""
    from sqlalchemy.engine import Connection, Engine

    # Every read hybridinval makes for keys (flush and bulk statements) goes through this one.
    import hybridinval.sqlalchemy._keyselect as keyselect

    ordinary = keyselect._read_rows

    def read_quietly(conn: Any, sel: Any, params: Any, options: Any) -> Any:
        if not isinstance(getattr(conn, "engine", None), Engine):
            return ordinary(conn, sel, params, options)
        quiet = Connection(
            conn.engine, connection=conn.connection, _has_events=False, _allow_autobegin=False
        )
        return ordinary(quiet, sel, params, options)

    keyselect._read_rows = read_quietly


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("HYBRIDINVAL_UPSTREAM_QUIET_READS") == "1":
        quiet_reads()
    config.pluginmanager.register(Summary(), "hybridinval-summary")
    distributing = config.getoption("dist", "no") != "no" and not hasattr(config, "workerinput")
    if not distributing:  # an xdist controller runs no tests
        config.pluginmanager.register(HybridinvalPlugin(config), "hybridinval-plugin")
