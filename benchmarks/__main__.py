"""Run every benchmark and write benchmarks/results/.

Redis: $HYBRIDINVAL_REDIS_URL, else a server on 127.0.0.1:6379, else an embedded one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import redis

from . import core

RESULTS = Path(__file__).parent / "results"


def _redis_url() -> tuple[str, object | None]:
    url = os.environ.get("HYBRIDINVAL_REDIS_URL")
    if url:
        return url, None
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/0", None
    except redis.RedisError:
        from hybridinval._embedded import EmbeddedRedis

        server = EmbeddedRedis.start()
        return server.url, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    url, server = _redis_url()
    started = time.time()
    print(f"hybridinval benchmarks against {url}", flush=True)
    results = {
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_url": url,
        "core": core.run_all(url, progress=lambda s: print(f"  {s}", flush=True)),
    }
    results["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core.json").write_text(json.dumps(results, indent=2) + "\n")
    table = core.markdown(results["core"])
    (args.out / "core.md").write_text(table)
    print(table)
    if server is not None:
        server.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
