"""One base for the support objects used as ``with obj: ...``: leaving the block closes them."""

from __future__ import annotations

from typing import Self


class ClosesOnExit:
    """``__exit__`` calls ``close()`` whatever happened in the block; ``__enter__`` returns the
    object itself (a subclass may start something there instead)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
