"""Key checks and the Redis names of a namespace (hybridinval.keyspace)."""

from __future__ import annotations

import pytest

from hybridinval.keyspace import MAX_KEY_LENGTH, Keyspace, check_key, check_namespace


def test_names_of_a_namespace() -> None:
    ks = Keyspace("app")
    assert ks.data("user:1") == "hi:app:d:user:1"
    assert ks.version("user:1") == "hi:app:v:user:1"
    assert ks.channel == "hi:app:inval"
    assert ks.incarnation == "hi:app:incarnation"
    assert ks.app("process-stats") == "hi:app:app:process-stats"
    assert ks.pattern == "hi:app:*"
    # every name lies under the pattern's prefix, so one SCAN finds (and cleans) them all
    for name in (ks.data("k"), ks.version("k"), ks.channel, ks.incarnation, ks.app("x")):
        assert name.startswith(ks.prefix)
    assert Keyspace("app") == ks and hash(Keyspace("app")) == hash(ks)
    assert Keyspace("other") != ks


@pytest.mark.parametrize("bad", ["", "a b", "a{b", "a}b", "a:b", "tab\there"])
def test_bad_namespaces_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match="namespace must be") as info:
        Keyspace(bad)
    assert repr(bad) in str(info.value)


def test_a_namespace_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="namespace must be a str, got bytes"):
        check_namespace(b"app")


def test_key_checks_name_the_key() -> None:
    assert check_key("k") == "k"
    with pytest.raises(TypeError, match="cache key must be a str, got int: 5"):
        check_key(5)
    with pytest.raises(ValueError, match="must not be empty"):
        check_key("")
    long = "x" * (MAX_KEY_LENGTH + 1)
    with pytest.raises(ValueError, match=f"{MAX_KEY_LENGTH + 1} characters long; the limit is"):
        check_key(long)
    assert check_key("x" * 10, max_length=10)
    with pytest.raises(ValueError, match="the limit is 9"):
        check_key("x" * 10, max_length=9)


def test_an_empty_app_key_name_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Keyspace("app").app("")
