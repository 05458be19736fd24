"""Fuzzed decoders: whatever bytes reach the backplane or L2, the decoders answer with a value
or their typed error (``MalformedMessage``, ``CorruptPayloadError``), never anything else, and
a subscriber that swallows 10,000 garbage messages still delivers the next real invalidation.
"""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.waiting import wait_until

from hybridinval import CorruptPayloadError, HybridCache, JsonSerializer, PickleSerializer
from hybridinval._message import MalformedMessage, decode_message, encode_message
from hybridinval.keyspace import Keyspace

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)

# Objects shaped like messages, with each field sometimes the wrong type.
message_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.integers(-2, 3) | json_values,
        "i": st.text(max_size=20) | json_values,
        "s": st.integers() | json_values,
        "t": st.integers() | json_values,
        "f": json_values,
        "k": st.lists(st.text(max_size=10)) | json_values,
    },
)


def deep(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + closer * depth).encode()


def _decodes_or_malformed(payload: bytes) -> None:
    try:
        message = decode_message(payload)
    except MalformedMessage:
        return
    assert isinstance(message.keys, tuple) and all(type(k) is str for k in message.keys)


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_message_decoder_on_any_bytes(payload: bytes) -> None:
    _decodes_or_malformed(payload)


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(message_like | json_values)
def test_message_decoder_on_any_json(body: Any) -> None:
    _decodes_or_malformed(json.dumps(body).encode())


@given(st.lists(st.text(min_size=1, max_size=30), max_size=20), st.booleans())
def test_every_encoded_message_decodes_to_itself(keys: list[str], flush: bool) -> None:
    message = decode_message(encode_message("me", 7, keys, flush=flush))
    assert message.keys == tuple(keys) and message.flush == flush and message.sender == "me"


def test_nesting_deeper_than_the_interpreter_allows_is_malformed_not_a_crash() -> None:
    for payload in (deep(100_000), deep(100_000, '{"a":', "}")):
        with pytest.raises(MalformedMessage, match="nested too deeply"):
            decode_message(payload)
    with pytest.raises(CorruptPayloadError, match="nested too deeply"):
        JsonSerializer().loads(b"j" + deep(100_000))


def _loads_or_corrupt(serializer: Any, payload: bytes) -> None:
    with contextlib.suppress(CorruptPayloadError):
        serializer.loads(payload)


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_payload_decoders_on_any_bytes(payload: bytes) -> None:
    _loads_or_corrupt(JsonSerializer(), payload)
    _loads_or_corrupt(JsonSerializer(), b"j" + payload)
    pickle = PickleSerializer(secret=b"s" * 32)
    _loads_or_corrupt(pickle, payload)
    _loads_or_corrupt(pickle, b"p" + payload)


@settings(max_examples=500)
@given(json_values)
def test_a_corrupted_json_payload_is_corrupt_or_a_value(value: Any) -> None:
    serializer = JsonSerializer()
    try:
        good = serializer.dumps(value)
    except (ValueError, TypeError):  # NaN and infinities are refused at dumps
        return
    for cut in range(1, len(good)):
        _loads_or_corrupt(serializer, good[:cut])


def garbage(rng: random.Random, i: int) -> bytes:
    """Ten kinds of wrong, in turn: random bytes, truncated and bit-flipped real messages, valid
    JSON of the wrong shape, wrong types in each field, very deep nesting, huge and empty."""
    real = encode_message("stranger", i, [f"k{i}", "user:1"])
    kind = i % 10
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        return real[: rng.randrange(0, len(real))]
    if kind == 2:
        flipped = bytearray(real)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind == 3:
        return json.dumps(rng.choice([[], 1, "x", None, [1, 2], {"k": 1}])).encode()
    if kind == 4:
        return json.dumps({"v": 1, "i": 5, "s": 1, "t": 1, "k": ["a"]}).encode()
    if kind == 5:
        return json.dumps({"v": 1, "i": "x", "s": "1", "t": 1, "k": ["a"]}).encode()
    if kind == 6:
        return json.dumps({"v": 1, "i": "x", "s": 1, "t": 1, "k": [1, None]}).encode()
    if kind == 7:
        return deep(rng.choice([2_000, 50_000]))
    if kind == 8:
        return b"\xff\xfe" + rng.randbytes(64)
    return b""


@pytest.mark.slow
def test_ten_thousand_garbage_messages_leave_the_subscriber_alive(
    make_cache: Any, redis_url: str, namespace: str
) -> None:
    reader: HybridCache = make_cache()
    writer: HybridCache = make_cache()
    assert reader.wait_until_subscribed(10) and writer.wait_until_subscribed(10)
    rng = random.Random(1234)
    raw = redis.Redis.from_url(redis_url)
    channel = Keyspace(namespace).channel
    try:
        pipe = raw.pipeline(transaction=False)
        for i in range(10_000):
            pipe.publish(channel, garbage(rng, i))
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
    finally:
        raw.close()

    def consumed() -> int:
        # Every garbage message is either malformed (counted) or a well-formed one from a
        # stranger (a flipped bit inside a key can leave valid JSON): nothing else happens.
        stats = reader.stats()
        return stats["messages_malformed"] + stats["invalidations_received"]

    wait_until(lambda: consumed() == 10_000, timeout=60, what="all garbage consumed")
    assert reader.stats()["messages_malformed"] >= 9_000
    assert reader.subscribed and reader.stats()["blind_periods"] == 0
    reader.set("user:1", "old")  # (a garbage message may have named it: set it again)
    assert reader.get_local("user:1") == "old"
    writer.invalidate("user:1")  # the next real invalidation is delivered
    wait_until(lambda: reader.get_local("user:1") is None, what="the real one applied")
    wait_until(lambda: consumed() == 10_001, what="counted once")
