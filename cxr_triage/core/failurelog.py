"""Logging for loops that retry: a failure that repeats is logged once, with its traceback, and again only when
the error changes; the recovery is logged with the number of failed attempts. A database that is down for a
minute then gives three lines, not thousands. Safe to share between threads (the listener's associations)."""

from __future__ import annotations

import logging
import threading


class FailureLog:
    """The state of one retrying loop: how many attempts in a row failed, and the last error logged."""

    def __init__(self, logger: logging.Logger, what: str, new_errors: bool = True) -> None:
        """``new_errors`` False: only the first failure after a success is logged at ERROR, whatever follows (an
        outage whose error text changes as connections break in different ways is still one outage)."""
        self.logger, self.what, self.new_errors = logger, what, new_errors
        self.failures = 0
        self._last: str | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, detail: str = "") -> int:
        """Record a failed attempt (call it inside ``except``); the number of failures in a row. ``detail`` (what
        was being done) goes into the line logged; repeats of the same error are logged at DEBUG only."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        with self._lock:
            self.failures += 1
            failures = self.failures
            repeated = error == self._last or (not self.new_errors and self._last is not None)
            self._last = error
        where = f" ({detail})" if detail else ""
        if repeated:
            self.logger.debug("%s failed again%s: %s", self.what, where, error)
        else:
            self.logger.exception("%s failed%s (retried; the same error is not logged again)", self.what, where)
        return failures

    def succeeded(self) -> None:
        """Record a successful attempt: logs the recovery after failures."""
        with self._lock:
            failures, self.failures, self._last = self.failures, 0, None
        if failures:
            self.logger.warning("%s works again after %d failed attempt(s)", self.what, failures)
