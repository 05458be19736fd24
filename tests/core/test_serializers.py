"""The serializer seam: every implementation round-trips and refuses foreign bytes."""

from __future__ import annotations

import pickle

import pytest

from hybridinval import JsonSerializer, PickleSerializer, Serializer
from hybridinval.serializers import CorruptPayloadError, get_serializer

SECRET = b"0123456789abcdef-test-secret"


@pytest.fixture(params=["json", "pickle"])
def serializer(request: pytest.FixtureRequest) -> Serializer:
    return JsonSerializer() if request.param == "json" else PickleSerializer(SECRET)


@pytest.mark.parametrize("value", [None, 0, -1.5, "é", [1, "a"], {"id": 1, "tags": ["x"]}])
def test_round_trip(serializer: Serializer, value: object) -> None:
    assert serializer.loads(serializer.dumps(value)) == value


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01", b"j{not json", b"p" + b"x" * 40])
def test_foreign_bytes_are_corrupt(serializer: Serializer, garbage: bytes) -> None:
    with pytest.raises(CorruptPayloadError):
        serializer.loads(garbage)


def test_json_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError):
        JsonSerializer().dumps({"when": object()})
    with pytest.raises(ValueError):
        JsonSerializer().dumps(float("nan"))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def test_default_serializer_never_unpickles() -> None:
    planted = pickle.dumps(_Boom())
    with pytest.raises(CorruptPayloadError):
        get_serializer(None).loads(planted)
    with pytest.raises(CorruptPayloadError):
        get_serializer(None).loads(b"p" + planted)


def test_pickle_rejects_unsigned_and_tampered_payloads() -> None:
    s = PickleSerializer(SECRET)
    with pytest.raises(CorruptPayloadError, match="signature"):
        s.loads(b"p" + b"\x00" * 32 + pickle.dumps(_Boom()))
    good = bytearray(s.dumps({"a": 1}))
    good[-2] ^= 0x01
    with pytest.raises(CorruptPayloadError, match="signature"):
        s.loads(bytes(good))
    other = PickleSerializer(b"another-secret-of-16+bytes")
    with pytest.raises(CorruptPayloadError):
        other.loads(s.dumps(1))


def test_pickle_needs_a_real_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        get_serializer("pickle")
    with pytest.raises(ValueError, match="16 bytes"):
        PickleSerializer(b"short")
    with pytest.raises(ValueError, match="unknown serializer"):
        get_serializer("yaml")
