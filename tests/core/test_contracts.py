"""Every seam's behaviour suite (hybridinval.testing), run against every implementation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from hybridinval import JsonSerializer, MemoryL1, NullL1, PickleSerializer, RedisL2
from hybridinval._l2 import redis_client
from hybridinval.keyspace import Keyspace
from hybridinval.testing import (
    L1StoreContract,
    L2StoreContract,
    MemoryHub,
    MemoryL2,
    SerializerContract,
    TransportContract,
)
from hybridinval.transports import RedisPubSubTransport, Transport


class TestMemoryL1(L1StoreContract):
    def make_store(self) -> MemoryL1:
        return MemoryL1(max_entries=100)


class TestNullL1(L1StoreContract):
    keeps_entries = False

    def make_store(self) -> NullL1:
        return NullL1()


class TestRedisL2(L2StoreContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> Iterator[None]:
        self.url = redis_url
        self.namespaces: list[str] = []
        yield
        with redis_client(redis_url) as client:
            for ns in self.namespaces:
                keys = list(client.scan_iter(Keyspace(ns).pattern, count=1000))
                if keys:
                    client.delete(*keys)

    def make_store(self) -> RedisL2:
        namespace = f"contract-{uuid.uuid4().hex[:8]}"
        self.namespaces.append(namespace)
        return RedisL2(redis_client(self.url), namespace, version_ttl=60.0)


class TestMemoryL2(L2StoreContract):
    publishes_notify = False

    def make_store(self) -> MemoryL2:
        return MemoryL2(version_ttl=60.0)


class TestRedisPubSubTransport(TransportContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> None:
        self.url = redis_url

    def make_transports(self, n: int) -> list[Transport]:
        channel = Keyspace(f"contract-{uuid.uuid4().hex[:8]}").channel
        return [RedisPubSubTransport(self.url, channel) for _ in range(n)]

    def test_a_store_on_the_same_server_gets_the_channel(self) -> None:
        transport = RedisPubSubTransport(self.url, Keyspace("x").channel)
        same = RedisL2(redis_client(self.url), "x")
        other = RedisL2(redis_client("redis://192.0.2.1:6379/0"), "x")
        try:
            assert transport.script_channel(same) == Keyspace("x").channel
            assert transport.script_channel(other) is None
        finally:
            same.close()
            other.close()


class TestMemoryTransport(TransportContract):
    def make_transports(self, n: int) -> list[Transport]:
        hub = MemoryHub()
        return [hub.transport() for _ in range(n)]


class TestJsonSerializer(SerializerContract):
    def make_serializer(self) -> JsonSerializer:
        return JsonSerializer()


class TestPickleSerializer(SerializerContract):
    def make_serializer(self) -> PickleSerializer:
        return PickleSerializer(b"contract-secret-of-16+-bytes")
