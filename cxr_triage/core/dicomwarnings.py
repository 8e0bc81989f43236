"""pydicom's complaints about one malformed dataset, counted and said once.

pydicom reports what it finds wrong in a dataset (an invalid value, a guessed VR, a bad length) twice: a WARNING on
its logger and a ``UserWarning`` that Python writes to standard error as several lines. A malformed dataset gives
8-10 of each. Inside ``collected()``, both are kept for the current thread instead; the caller logs one record
with their count and the first of them (``summary``).

Why a thread-local collector rather than ``warnings.catch_warnings(record=True)`` alone: the listener parses
headers in one thread per association and a worker prepares images in a thread beside its recorder, and
``catch_warnings`` swaps the process-wide warning state (Python 3.11), so two threads using it would lose or
restore each other's. The hooks here (a filter on pydicom's logger, a wrapper of ``warnings.showwarning``) are
installed once and act only for a thread that is collecting; every other warning goes where it always went.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any

_local = threading.local()
_lock = threading.Lock()
_previous: Any = None
"""The ``warnings.showwarning`` that ``_showwarning`` stands in front of."""


class _PydicomFilter(logging.Filter):
    """Keeps the records of pydicom's logger for a collecting thread, instead of letting them be logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        collected: list[str] | None = getattr(_local, "collected", None)
        if collected is None or record.levelno < logging.WARNING:
            return True
        collected.append(record.getMessage())
        return False


_FILTER = _PydicomFilter()


def _showwarning(message: Any, category: Any, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
    collected: list[str] | None = getattr(_local, "collected", None)
    if collected is None:
        _previous(message, category, filename, lineno, *args, **kwargs)
    elif str(message) not in collected:  # the warning copy of a logged record is not counted twice
        collected.append(str(message))


def _install() -> None:
    """The hooks, once (again when something, such as a test runner's ``catch_warnings``, has replaced them)."""
    global _previous
    with _lock:
        if _FILTER not in logging.getLogger("pydicom").filters:
            logging.getLogger("pydicom").addFilter(_FILTER)
        if warnings.showwarning is not _showwarning:
            _previous, warnings.showwarning = warnings.showwarning, _showwarning


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """The messages pydicom (or anything else) warns about in this thread meanwhile, none of them logged or
    written to standard error. Nested use collects into the outer list. pydicom logs each problem every time;
    Python shows a warning once per code location unless told otherwise, so the count is that of the log records
    (and of warnings nobody logged)."""
    _install()
    outer: list[str] | None = getattr(_local, "collected", None)
    if outer is not None:
        yield outer
        return
    messages: list[str] = []
    _local.collected = messages
    try:
        yield messages
    finally:
        _local.collected = None


def summary(messages: list[str]) -> str:
    """``messages`` in one phrase: how many, and the first."""
    first = " ".join(messages[0].split())[:300]
    return f"pydicom warned {len(messages)} time{'s' if len(messages) != 1 else ''} about its dataset (first: {first})"
