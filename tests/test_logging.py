"""The log cannot be forged from the wire: one record is one line, whatever a peer put in a UID or an AE title."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from cxr_triage.core.bootstrap import configure_logging

RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        yield stream
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])


def test_a_newline_or_nul_from_the_wire_cannot_forge_a_line(logged: io.StringIO) -> None:
    forged = "1.2.3\n2026-12-02 01:00:00,000 INFO MainProcess cxr_triage.forged: ADMIN\x00\r\u2028"
    logging.getLogger("cxr_triage.listener").info("received SOP instance %s", forged)
    logging.getLogger("pynetdicom.acse").warning("calling AE %r", "EVIL\nAE")
    err = logged.getvalue()
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert all(RECORD_START.match(line) for line in lines)
    assert "\x00" not in err and "\r" not in err and "\u2028" not in err
    assert "1.2.3\\n2026-12-02 01:00:00,000 INFO MainProcess cxr_triage.forged: ADMIN\\x00\\r\\u2028" in lines[0]


def test_a_traceback_stays_inside_its_record(logged: io.StringIO) -> None:
    try:
        raise ValueError("bad UID 1.2\n2026-12-02 01:00:00,000 INFO MainProcess cxr_triage.forged: ADMIN")
    except ValueError:
        logging.getLogger("cxr_triage.worker").exception("batch failed")
    lines = logged.getvalue().splitlines()
    assert RECORD_START.match(lines[0]) and lines[0].endswith("batch failed")
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[1:]), lines
    assert not any(RECORD_START.match(line) for line in lines[1:])
