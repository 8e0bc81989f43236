"""tqdm progress bars when tqdm is installed; a silent stand-in otherwise (a bare GPU host may lack tqdm)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised only on hosts without tqdm
    _tqdm = None


class _Silent:
    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self.iterable = iterable if iterable is not None else ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, or a stand-in with ``__iter__``/``update``/``close`` that prints nothing."""
    if _tqdm is None or kwargs.get("disable"):
        return _Silent(iterable)
    return _tqdm(iterable, **kwargs)
