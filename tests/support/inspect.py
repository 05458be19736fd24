"""Looking inside a cache built on the default seams (what the tests assert about)."""

from __future__ import annotations

from typing import Any

from hybridinval import HybridCache, MemoryL1, RedisL2


def entries(cache: HybridCache) -> dict[str, list[Any]]:
    """The cache's MemoryL1 map: ``key -> [value, expires_at, referenced, version]``."""
    l1 = cache.l1
    assert isinstance(l1, MemoryL1), f"{type(l1).__name__} has no map to look into"
    return l1.entries


def redis_l2(cache: HybridCache) -> RedisL2:
    l2 = cache.l2
    assert isinstance(l2, RedisL2), f"{type(l2).__name__} is not a RedisL2"
    return l2


def wire_spy(monkeypatch: Any) -> list[bytes]:
    """Record every command the calling thread writes to a Redis socket from now on (blocking
    and asyncio redis-py connections alike; other threads, such as the subscriber's PINGs, are
    not recorded). Undone with the ``monkeypatch``."""
    import threading

    import redis.asyncio.connection
    import redis.connection

    sent: list[bytes] = []
    caller = threading.get_ident()

    def record(command: Any) -> None:
        if threading.get_ident() == caller:
            sent.append(b"".join(command) if isinstance(command, list) else bytes(command))

    blocking = redis.connection.AbstractConnection.send_packed_command

    def spy(self: Any, command: Any, check_health: bool = True) -> None:
        record(command)
        blocking(self, command, check_health)

    awaited = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def async_spy(self: Any, command: Any, check_health: bool = True) -> None:
        record(command)
        await awaited(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", spy)
    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection, "send_packed_command", async_spy
    )
    return sent
