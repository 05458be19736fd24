"""Serializers turn cached values into the bytes stored in L2.

A shared Redis is an attack surface: anyone who can write to it can plant a payload. The default,
:class:`JsonSerializer`, can only ever produce plain data when reading. :class:`PickleSerializer`
is opt-in and refuses any payload whose HMAC does not verify with your secret, so an attacker
without the secret cannot make a process unpickle their bytes.

Every payload starts with a one-byte tag naming its format, so a reader can tell a payload written
by another serializer (or garbage) from a value and treat it as a miss instead of misreading it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
from typing import Any, Protocol, runtime_checkable

from .errors import CorruptPayloadError

__all__ = [
    "CorruptPayloadError",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "get_serializer",
]


@runtime_checkable
class Serializer(Protocol):
    """Encodes values for L2. :mod:`hybridinval.testing` has the behaviour suite every
    serializer must pass (``SerializerContract``).

    Both methods are called from any thread, concurrently, and must be pure. Every process of
    a namespace must use the same serializer: each reads what the others wrote.
    """

    name: str
    """Names the format in error messages."""

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise ``TypeError``/``ValueError`` if it cannot be encoded (the
        cache reports that as a ``SerializationError`` naming the key, and stores nothing)."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode bytes produced by :meth:`dumps`; raise :class:`CorruptPayloadError` for any
        other bytes (the cache treats the key as a miss, logs and counts ``l2_corrupt``). It
        must never run code an attacker who can write to Redis chose."""
        ...


class JsonSerializer:
    """JSON (dicts, lists, str, int, float, bool, None). Safe: decoding never runs code.

    Tuples come back as lists, as they would from any JSON API; NaN and infinities are refused
    so that every stored payload is strict JSON another language can read.
    """

    name = "json"
    _TAG = b"j"

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode
        self._decode = json.JSONDecoder().decode

    def dumps(self, value: Any) -> bytes:
        return self._TAG + self._encode(value).encode()

    def loads(self, data: bytes) -> Any:
        if data[:1] != self._TAG:
            raise CorruptPayloadError("not a JSON payload")
        try:
            return self._decode(data[1:].decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptPayloadError(f"invalid JSON payload: {exc}") from exc
        except RecursionError as exc:  # deeper than dumps() could ever have written
            raise CorruptPayloadError("JSON payload nested too deeply") from exc


class PickleSerializer:
    """Pickle signed with HMAC-SHA256: any Python object, between processes sharing ``secret``.

    A payload that does not carry a valid signature is rejected before ``pickle.loads`` sees it.
    """

    name = "pickle"
    _TAG = b"p"
    _MAC_LEN = 32

    def __init__(self, secret: bytes | str) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("PickleSerializer secret must be at least 16 bytes")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def dumps(self, value: Any) -> bytes:
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(str(exc)) from exc
        return self._TAG + self._mac(body) + body

    def loads(self, data: bytes) -> Any:
        if data[:1] != self._TAG:
            raise CorruptPayloadError("not a pickle payload")
        mac, body = data[1 : 1 + self._MAC_LEN], data[1 + self._MAC_LEN :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise CorruptPayloadError("pickle payload signature does not verify")
        return pickle.loads(body)


def get_serializer(
    spec: str | Serializer | None, *, secret: bytes | str | None = None
) -> Serializer:
    """Resolve ``"json"``, ``"pickle"`` (needs ``secret``) or a Serializer instance."""
    if spec is None or spec == "json":
        return JsonSerializer()
    if spec == "pickle":
        if secret is None:
            raise ValueError("serializer='pickle' needs a secret (serializer_secret=...)")
        return PickleSerializer(secret)
    if isinstance(spec, Serializer):
        return spec
    raise ValueError(f"unknown serializer {spec!r}; use 'json', 'pickle' or a Serializer")
