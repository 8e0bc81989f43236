"""Logging for loops that retry: a failure that repeats is logged once, with its traceback, and again only when
the error changes; the recovery is logged with the number of failed attempts. A database that is down for a
minute then gives three lines, not thousands."""

from __future__ import annotations

import logging


class FailureLog:
    """The state of one retrying loop: how many attempts in a row failed, and the last error logged."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.failures = 0
        self._last: str | None = None

    def failed(self, exc: BaseException) -> int:
        """Record a failed attempt (call it inside ``except``); the number of failures in a row."""
        self.failures += 1
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if error != self._last:
            self._last = error
            self.logger.exception("%s failed (retried; the same error is not logged again)", self.what)
        return self.failures

    def succeeded(self) -> None:
        """Record a successful attempt: logs the recovery after failures."""
        if self.failures:
            self.logger.warning("%s works again after %d failed attempt(s)", self.what, self.failures)
        self.failures, self._last = 0, None
