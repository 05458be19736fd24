"""``redis+sentinel://`` URLs: L2 and the backplane on whichever server the sentinels name master.

Format: ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/<db>]``. The
credentials are the data servers'; the sentinels are asked without (``?sentinel_password=``
when they need one). Every connection is made to the master of the moment:

* L2 is a redis-py client on a ``SentinelConnectionPool``: after a failover its next command
  finds the new master;
* the Pub/Sub subscriber asks the sentinels for the master each time it (re)connects; the
  failover cut its connection, so the cache was blind, and the promoted replica has a run id of
  its own, so nothing set aside before the failover comes back (a new incarnation);
* the asyncio cache's clients are ``redis.asyncio`` sentinel clients, one per event loop.

A master's writes that had not reached the replica when it died are lost with it (Redis
replicates asynchronously): such an invalidation may be gone from the new master's L2 too. The
L1s were flushed by the failover either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

__all__ = ["SCHEME", "SentinelTarget"]

SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        if not url.startswith(SCHEME):
            raise ValueError(f"not a {SCHEME} URL: {url!r}")
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        sentinels = []
        for host_port in filter(None, netloc.split(",")):
            host, _, port = host_port.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{url!r}: each sentinel is host:port, got {host_port!r}")
            sentinels.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                f"{url!r}: expected redis+sentinel://host:port[,host:port...]/<service>[/<db>]"
            )
        query = parse_qs(parts.query)
        return cls(
            tuple(sentinels),
            unquote(path[0]),
            int(path[1]) if len(path) == 2 else 0,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            query["sentinel_password"][0] if "sentinel_password" in query else None,
        )

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """What ``redis_endpoint`` would say: the same for every client of this service, so the
        L2 scripts may publish the backplane's messages (both follow the master)."""
        return ("sentinel", f"{self.service}@{','.join(f'{h}:{p}' for h, p in self.sentinels)}", 0)

    def _sentinel_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"socket_timeout": options.get("socket_connect_timeout", 1.0)}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def _server_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**options, "db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def client(self, **options: Any) -> redis.Redis:
        """A client of the master of the moment (``options``: redis-py's connection options)."""
        sentinel = redis.sentinel.Sentinel(
            list(self.sentinels), sentinel_kwargs=self._sentinel_kwargs(options)
        )
        client: redis.Redis = sentinel.master_for(self.service, **self._server_kwargs(options))
        return client

    def async_client(self, **options: Any) -> redis.asyncio.Redis:
        sentinel = redis.asyncio.sentinel.Sentinel(
            list(self.sentinels), sentinel_kwargs=self._sentinel_kwargs(options)
        )
        client: redis.asyncio.Redis = sentinel.master_for(
            self.service, **self._server_kwargs(options)
        )
        return client

    def master_url(self, **options: Any) -> str:
        """``redis://`` URL of the master now (asks the sentinels; raises ``RedisError``)."""
        sentinel = redis.sentinel.Sentinel(
            list(self.sentinels), sentinel_kwargs=self._sentinel_kwargs(options)
        )
        host, port = sentinel.discover_master(self.service)
        auth = ""
        if self.password:
            from urllib.parse import quote

            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{auth}{host}:{port}/{self.db}"
