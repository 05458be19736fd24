"""The shared part of the upstream-suite runners: fetch a library's sdist, run its tests twice
(plain, and with a hybridinval pytest plugin), and report what regressed.

A suite is described by a :class:`Suite`; ``main(suite)`` is the whole command line. Results live
under ``.cache/upstream/`` in the repository: ``dl/`` (sdists), ``<dist>-<version>/`` (extracted
trees), ``results/<suite>-<db>-<time>-<pid>/`` (junit xml, logs, plugin reports of one
invocation, so that concurrent invocations do not mix) and ``plain/`` (the last plain results
per version, database and pytest arguments, for ``--reuse-plain``). Exit status: 0 when
nothing regressed outside ``upstream/allowed.txt``, 1 on a regression, 2 when a run crashed or
collected nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "upstream"
ALLOWLIST = REPO / "upstream" / "allowed.txt"
STATUSES = ("passed", "failed", "error", "skipped")
_RANK = {status: rank for rank, status in enumerate(("skipped", "passed", "failed", "error"))}


@dataclass(frozen=True)
class Suite:
    """What differs between the upstream suites."""

    dist: str  # the distribution whose sdist holds the tests, e.g. "sqlalchemy"
    test_paths: tuple[str, ...]  # relative to the extracted sdist
    plugin: str  # the pytest plugin module of the "installed" run
    dbs: tuple[str, ...]
    # (db, sdist dir) -> extra pytest arguments for that database; may prepare the database.
    db_args: Callable[[str, Path], list[str]]
    env: tuple[tuple[str, str], ...] = ()  # environment of the pytest process and its workers
    pytest_args: tuple[str, ...] = ()
    label: str = ""  # in the default report name: /tmp/upstream_regressions_<label><db>.txt
    # The plugin's environment switch that hides hybridinval's own reads from the engine's
    # listeners; regressions are re-run with it to tell "saw extra SQL" from a real change.
    quiet_env: str = ""


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES
    message: str = ""
    text: str = ""


@dataclass
class Run:
    mode: str
    rc: int
    seconds: float
    outcomes: dict[str, Outcome]
    log: Path
    report: dict[str, object] = field(default_factory=dict)
    source: str = ""  # source_fingerprint() when the run started

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for outcome in self.outcomes.values():
            counts[outcome.status] += 1
        return counts

    def problem(self) -> str | None:
        """Why this run cannot be trusted, or None."""
        if not self.outcomes:
            return f"collected no tests (pytest exit {self.rc}); see {self.log}"
        if self.rc not in (0, 1):
            return f"pytest exited {self.rc} (interrupted or crashed); see {self.log}"
        return None


# -- the sdist ----------------------------------------------------------------------------------


def installed_version(python: Path, dist: str) -> str:
    """The version of ``dist`` installed for ``python`` (another venv's interpreter)."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{dist} is not installed for {python}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def fetch_sdist(python: Path, dist: str, version: str) -> Path:
    """Download (once) and extract (once) the sdist of ``dist==version``; its directory."""
    target = CACHE / f"{dist}-{version}"
    if (target / ".extracted").exists():
        return target
    download = CACHE / "dl" / f"{dist}-{version}"
    archives = sorted(download.glob("*.tar.gz"))
    if not archives:
        # --no-binary for this one distribution only: ":all:" would also build the sdist's
        # build requirements (Cython...) from source, which takes minutes.
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                dist,
                f"{dist}=={version}",
                "-d",
                download,
            ],
            check=True,
        )
        archives = sorted(download.glob("*.tar.gz"))
    if len(archives) != 1:
        sys.exit(f"expected one sdist in {download}, found {archives}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(archives[0]) as tar:
        tar.extractall(tmp, filter="data")
        (top,) = Path(tmp).iterdir()
        (top / ".extracted").touch()
        shutil.rmtree(target, ignore_errors=True)
        top.rename(target)
    return target


# -- running pytest -----------------------------------------------------------------------------


def run_pytest(
    python: Path,
    suite: Suite,
    cwd: Path,
    mode: str,
    args: Sequence[str],
    stem: Path,
    extra_env: dict[str, str] | None = None,
) -> Run:
    """One pytest run in ``cwd``: junit xml, log and plugin report next to ``stem``."""
    junit, log, report = (_with(stem, s) for s in (".xml", ".log", ".report.json"))
    for path in (junit, report):
        path.unlink(missing_ok=True)
    env = {**os.environ, **dict(suite.env), **(extra_env or {})}
    # The repository root on the path in both modes (so that only the plugin differs).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["HYBRIDINVAL_PLUGIN_REPORT"] = str(report)
    plugin = ["-p", suite.plugin] if mode in ("installed", "quiet") else []
    # Test paths among the extra arguments replace the suite's default ones.
    chosen = any((cwd / a.split("::")[0]).exists() for a in args if not a.startswith("-"))
    cmd = [
        str(python),
        "-m",
        "pytest",
        *(() if chosen else suite.test_paths),
        *suite.pytest_args,
        *plugin,
        f"--junitxml={junit}",
        "-p",
        "no:cacheprovider",
        *args,
    ]
    source = source_fingerprint()
    print(f"\n== {mode}: {' '.join(cmd)}\n   (in {cwd}; log {log})", flush=True)
    print(f"   hybridinval source: {source}", flush=True)
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    print(f"   {mode}: exit {rc} after {seconds:.0f}s: {''.join(last)}", flush=True)
    outcomes = parse_junit(junit, cwd) if junit.exists() else {}
    plugin_report = json.loads(report.read_text()) if report.exists() else {}
    return Run(mode, rc, seconds, outcomes, log, plugin_report, source)


def parse_junit(path: Path, root: Path) -> dict[str, Outcome]:
    """Outcome per pytest node id. A test with a failing teardown counts as an error."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = node_id(case.get("classname", ""), case.get("name", ""), root)
        outcome = Outcome("passed")
        for child in case:
            status = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if status is not None:
                outcome = Outcome(status, child.get("message", ""), child.text or "")
                break
        previous = outcomes.get(nodeid)
        if previous is None or _RANK[outcome.status] > _RANK[previous.status]:
            outcomes[nodeid] = outcome
    return outcomes


def node_id(classname: str, name: str, root: Path) -> str:
    """Turn junit's ``test.orm.test_x.Class`` + ``test_y`` back into a pytest node id."""
    parts = classname.split(".") if classname else []
    for split in range(len(parts), 0, -1):
        candidate = "/".join(parts[:split]) + ".py"
        if (root / candidate).is_file():
            return "::".join([candidate, *parts[split:], name])
    return "::".join([*parts, name])


def source_fingerprint() -> str:
    """Which hybridinval ran: the git HEAD and a hash of the working tree's hybridinval/**/*.py,
    subpackages (hybridinval.sqlalchemy) included (others may be editing it while a suite runs)."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    digest = hashlib.sha256()
    package = REPO / "hybridinval"
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return f"HEAD {head or '?'}, hybridinval/**/*.py sha256 {digest.hexdigest()[:12]}"


# -- comparing ----------------------------------------------------------------------------------


def regressions(plain: Run, installed: Run) -> dict[str, Outcome]:
    """Tests that passed plain and did not pass installed (missing counts as not passed)."""
    return {
        nodeid: installed.outcomes.get(nodeid, Outcome("missing", "not run in the installed run"))
        for nodeid, outcome in plain.outcomes.items()
        if outcome.status == "passed"
        and installed.outcomes.get(nodeid, Outcome("missing")).status != "passed"
    }


_OURS = (f"{REPO}/hybridinval/", f"{REPO}/upstream/")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def cause(outcome: Outcome) -> str:
    """A grouping key: the exception line plus the innermost hybridinval/upstream frame."""
    lines = [line for line in outcome.text.splitlines() if line.strip()]
    exception = next(
        (
            line.strip()
            for line in reversed(lines)
            if re.match(
                r"^\s*[\w.]+(Error|Exception|"
                r"Warning|Exit|Failed)\b",
                line,
            )
        ),
        outcome.message.splitlines()[0] if outcome.message else outcome.status,
    )
    exception = re.sub(r"0x[0-9a-f]+", "0x…", exception)[:200]
    received = re.search(r"received\s+'(?P<sql>[^']*)", outcome.text)
    if received:  # an SQL assertion: what ran instead says more than the assertion does
        exception += f", received {sql_shape(received['sql'])}"
    frames = list(_FRAME.finditer(outcome.text))
    ours = [m for m in frames if m["file"].startswith(_OURS)]
    if ours:
        where = f"{Path(ours[-1]['file']).name}:{ours[-1]['func']}"
    else:
        where = "no hybridinval frame" + (
            f"; {Path(frames[-1]['file']).name}:{frames[-1]['func']}" if frames else ""
        )
    return f"{exception}  @ {where}"


def sql_shape(statement: str) -> str:
    """An SQL statement reduced to its verb, select list and locking: ``SELECT x FROM … FOR
    UPDATE``, ``SELECT max(x) AS x FROM …``."""
    shape = re.split(r"\b(FROM|VALUES|SET)\b", statement)[0]
    shape = re.sub(r"\b[a-z_][\w.]*\b(?!\()", "x", shape)
    shape = re.sub(r"x(, x)+", "x, …", shape).strip()
    verb = {"SELECT": " FROM …", "INSERT": " …", "UPDATE": " SET …"}.get(shape.split(" ")[0], "")
    return shape + verb + (" FOR UPDATE" if "FOR UPDATE" in statement else "")


def load_allowlist(path: Path) -> dict[str, str]:
    """``node id  # kind: reason`` lines; blank lines and ``#`` comments ignored."""
    allowed: dict[str, str] = {}
    for line in path.read_text().splitlines():
        nodeid, _, reason = line.partition("  #")
        if nodeid.strip() and not nodeid.lstrip().startswith("#"):
            allowed[nodeid.strip()] = reason.strip()
    return allowed


def write_report(path: Path, found: dict[str, Outcome], title: str) -> None:
    """Every regression, grouped by cause, with its failure text (for the to-do list)."""
    groups: dict[str, list[str]] = {}
    for nodeid, outcome in found.items():
        groups.setdefault(cause(outcome), []).append(nodeid)
    with path.open("w") as out:
        out.write(f"# {title}: {len(found)} regressions in {len(groups)} groups\n")
        for key, nodeids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            out.write(f"\n## [{len(nodeids)}] {key}\n")
            out.write("\n".join(nodeids) + "\n")
        out.write("\n\n# Full failure text per test\n")
        for nodeid, outcome in found.items():
            out.write(f"\n=== {nodeid} [{outcome.status}] {outcome.message[:300]}\n")
            out.write(f"{outcome.text}\n")


def summarize(
    plain: Run,
    installed: Run,
    allowed: dict[str, str],
    report: Path,
    extra_sql_only: set[str] | None = None,
) -> int:
    """Print counts and regressions; the exit status. ``extra_sql_only``: regressions that pass
    when hybridinval's own reads are hidden from the engine's listeners (allowed: they differ
    only by the statements they saw)."""
    for run in (plain, installed):
        counts = " ".join(f"{k}={v}" for k, v in run.counts().items())
        print(f"{run.mode:>9}: {counts}  ({run.seconds:.0f}s, exit {run.rc})")
        if run.report:
            print(f"{'':>9}  plugin: {json.dumps(run.report)[:2000]}")
    found = regressions(plain, installed)
    write_report(report, found, f"{report.stem} ({installed.source}; log {installed.log})")
    groups: dict[str, list[str]] = {}
    for nodeid, outcome in found.items():
        groups.setdefault(cause(outcome), []).append(nodeid)
    for key, nodeids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"\n[{len(nodeids)}] {key}")
        for nodeid in nodeids[:5]:
            message = found[nodeid].message.strip().splitlines()
            print(f"    {nodeid}\n        {' | '.join(message[:2])[:240]}")
        if len(nodeids) > 5:
            print(f"    ... and {len(nodeids) - 5} more")
    extra = extra_sql_only or set()
    unexpected = [n for n in found if n not in allowed and n not in extra]
    stale = [n for n in allowed if n not in found]
    if extra_sql_only is not None:
        kinds: dict[str, int] = {}
        for nodeid in extra:
            kinds[cause(found[nodeid]).split("  @ ")[0]] = (
                kinds.get(cause(found[nodeid]).split("  @ ")[0], 0) + 1
            )
        print(
            f"\n{len(extra)} of the {len(found)} regressions differ only by hybridinval's own "
            f"statements (they pass when those are hidden from the engine's listeners):"
        )
        for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"    [{count}] {kind[:200]}")
    print(f"\n{len(found)} regressions ({len(unexpected)} not allowed); full list: {report}")
    for nodeid in unexpected[:20]:
        print(f"    NOT ALLOWED: {nodeid}")
    if stale:
        print(f"{len(stale)} allowlist entries did not regress (remove them?): {stale[:10]}")
    for run in (plain, installed):
        problem = run.problem()
        if problem:
            print(f"ERROR: the {run.mode} run {problem}")
            return 2
    return 1 if unexpected else 0


# -- the command line ---------------------------------------------------------------------------


def main(suite: Suite, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Run {suite.dist}'s own tests plain and with {suite.plugin}; report "
        f"tests that pass plain but not installed. Unknown arguments go to pytest."
    )
    parser.add_argument("--db", choices=suite.dbs, default=suite.dbs[0])
    parser.add_argument("--mode", choices=("both", "plain", "installed"), default="both")
    parser.add_argument(
        "--venv",
        type=Path,
        default=REPO / ".venv",
        help="the virtualenv whose Python (and library version) runs the tests",
    )
    parser.add_argument(
        "--reuse-plain",
        action="store_true",
        help="reuse the cached plain results of an earlier run with the same "
        "version, database and pytest arguments",
    )
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST)
    parser.add_argument("--report", type=Path, help="where to write the full regression list")
    options, pytest_args = parser.parse_known_args(argv)
    venv = options.venv.absolute()
    python = venv / "bin" / "python"
    version = installed_version(python, suite.dist)
    source = fetch_sdist(python, suite.dist, version)
    args = [*suite.db_args(options.db, source), *pytest_args]
    name = f"{suite.dist}-{version}-{options.db}"
    results = CACHE / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    results.mkdir(parents=True)
    # Keyed by venv too: Flask-SQLAlchemy's results depend on the venv's SQLAlchemy.
    cached = CACHE / "plain" / f"{name}-{venv.name.lstrip('.')}"
    runs: dict[str, Run] = {}
    for mode in ("plain", "installed"):
        if options.mode not in ("both", mode):
            continue
        if mode == "plain" and options.reuse_plain and _cached(cached, args):
            runs[mode] = Run(
                mode, 0, 0.0, parse_junit(_with(cached, ".xml"), source), _with(cached, ".log")
            )
            print(f"\n== plain: reusing {_with(cached, '.xml')}")
            continue
        stem = results / mode
        runs[mode] = run_pytest(python, suite, source, mode, args, stem)
        if mode == "plain" and runs[mode].problem() is None:
            _store(stem, cached, args)
    if options.mode != "both":
        (run,) = runs.values()
        print(f"{run.mode}: {run.counts()} ({run.seconds:.0f}s)  {run.report or ''}")
        return 2 if run.problem() else 0
    # The default venv's report has the plain name; another venv's names its version.
    other = "" if venv == REPO / ".venv" else f"-{venv.name.lstrip('.')}"
    report = options.report or Path(tempfile.gettempdir()) / (
        f"upstream_regressions_{suite.label}{options.db}{other}.txt"
    )
    extra_sql_only = None
    found = regressions(runs["plain"], runs["installed"])
    if found and suite.quiet_env and runs["installed"].problem() is None:
        # Each regression again, installed, with hybridinval's reads hidden from listeners.
        selectors = sorted({_selector(nodeid) for nodeid in found})
        quiet = run_pytest(
            python,
            suite,
            source,
            "quiet",
            [*args, *selectors],
            results / "quiet",
            {suite.quiet_env: "1"},
        )
        extra_sql_only = {
            n for n in found if quiet.outcomes.get(n, Outcome("missing")).status == "passed"
        }
    return summarize(
        runs["plain"], runs["installed"], load_allowlist(options.allowlist), report, extra_sql_only
    )


def _selector(nodeid: str) -> str:
    """A node id pytest can select: SQLAlchemy's plugin names each test class after the backend
    it runs on (``FooTest_sqlite+pysqlite_3_40_1``) but selects it by its own name."""
    return re.sub(
        r"(::[A-Za-z_]\w*?)_(sqlite|postgresql|mysql|mariadb|oracle|mssql)\+[^:]*", r"\1", nodeid
    )


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)


def _cached(cached: Path, args: Sequence[str]) -> bool:
    key = _with(cached, ".args.json")
    return (
        _with(cached, ".xml").exists()
        and key.exists()
        and json.loads(key.read_text()) == list(args)
    )


def _store(stem: Path, cached: Path, args: Sequence[str]) -> None:
    """Keep a successful plain run for ``--reuse-plain`` (each file replaced atomically)."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".xml", ".log"):
        tmp = _with(cached, f"{suffix}.{os.getpid()}")
        shutil.copyfile(_with(stem, suffix), tmp)
        tmp.replace(_with(cached, suffix))
    _with(cached, ".args.json").write_text(json.dumps(list(args)))
