from collections.abc import Callable
from typing import Any

def monotonic() -> float: ...

class Lease:
    until: float
    def __init__(self, until: float = 0.0) -> None: ...

class HitPath:
    __wrapped__: Callable[..., Any]
    @property
    def hits(self) -> int: ...
    def __init__(
        self, entries: dict[str, list[Any]], lease: Lease, fallback: Callable[..., Any]
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
