"""The backplane's wire format: small, versioned JSON.

A message carries the schema version, the sender's instance id (so a process drops its own
echoes), a per-sender sequence number, the send time (for lag metrics) and the keys to evict, or
a flush flag. A reader that meets a newer schema version evicts everything: it cannot know which
keys the message names, and evicting everything is always safe. Every transport carries these
bytes unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "MalformedMessage",
    "Message",
    "decode_message",
    "encode_message",
    "with_keys",
]

SCHEMA_VERSION = 1


class MalformedMessage(ValueError):
    """A backplane payload that is not a message this version can read."""


@dataclass(frozen=True, slots=True)
class Message:
    version: int
    sender: str
    seq: int
    sent_at_ns: int  # time.time_ns() at the sender
    keys: tuple[str, ...]
    flush: bool  # evict everything (cache.clear(), or a message from a newer schema)


def encode_message(sender: str, seq: int, keys: Sequence[str], *, flush: bool = False) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "i": sender, "s": seq, "t": time.time_ns()}
    if flush:
        body["f"] = 1
    body["k"] = list(keys)
    return _dump(body)


def with_keys(payload: bytes, keys: Sequence[str]) -> bytes:
    """``payload`` (a message this process encoded) naming ``keys`` instead: the part of one
    invalidation that a store sends where only some of its keys live (sender, sequence number
    and send time unchanged)."""
    body = json.loads(payload)
    body["k"] = list(keys)
    return _dump(body)


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode_message(payload: bytes) -> Message:
    """Parse and validate a payload. A newer schema version decodes to a flush-everything message:
    we cannot know which keys it names, and evicting everything is always safe."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than any message we write
        raise MalformedMessage("JSON nested too deeply") from exc
    if not isinstance(body, dict):
        raise MalformedMessage("not a JSON object")
    version = body.get("v")
    if type(version) is not int or version < 1:
        raise MalformedMessage(f"field 'v' must be a positive int, got {version!r}")
    sender, seq, sent_at = body.get("i"), body.get("s", 0), body.get("t", 0)
    if type(sender) is not str:
        raise MalformedMessage(f"field 'i' must be a string, got {sender!r}")
    if type(seq) is not int or type(sent_at) is not int:
        raise MalformedMessage("fields 's' and 't' must be ints")
    if version > SCHEMA_VERSION:
        return Message(version, sender, seq, sent_at, (), True)
    keys = body.get("k")
    if not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise MalformedMessage("field 'k' must be a list of strings")
    return Message(version, sender, seq, sent_at, tuple(keys), bool(body.get("f")))
