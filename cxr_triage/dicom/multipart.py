"""A streaming reader of ``multipart/related`` bodies (RFC 2046 5.1, RFC 2387), for the STOW-RS endpoint.

``MultipartReader.feed`` takes the body in chunks as they arrive and returns what they completed: the start of a
part (its headers), some of its bytes, its end. It never holds more than one chunk plus a delimiter's length of
body bytes, and at most ``MAX_HEADER_BYTES`` of a part's headers, so a request of any size costs bounded memory;
the caller decides where the part's bytes go (``cxr_triage.dicom.stow`` writes them to the spool as they come).
A body that breaks the syntax raises ``MultipartError``, and so does ``finish`` when the closing delimiter never
came. Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

MAX_HEADER_BYTES = 16384
"""The most bytes of headers one part may have."""
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,200}$")
"""RFC 2046 bchars, not ending in a space. RFC 2046 allows at most 70 of them, but real senders write more (Orthanc's
DICOMweb plugin 1.7: two UUIDs, 73 characters): up to 200 are accepted, which bounds the delimiter search all the
same."""


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (the message says where)."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]
    """Header names in lower case."""


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header's media type (lower case) and parameters (names in lower case, values unquoted)."""
    message = Message()
    message["Content-Type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[], header="Content-Type")[1:]}
    return message.get_content_type(), {k: str(v) for k, v in params.items()}


def check_boundary(boundary: str) -> str:
    """``boundary`` if RFC 2046 allows it, else MultipartError."""
    if not _BOUNDARY.match(boundary) or boundary.endswith(" "):
        raise MultipartError(f"boundary {boundary[:80]!r} is not a valid multipart boundary")
    return boundary


class MultipartReader:
    """The parts of one body, read incrementally (module docstring)."""

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\r\n--" + check_boundary(boundary).encode("ascii")
        self._buffer = b"\r\n"  # so that a delimiter at the very start is found like the others
        self._state = "preamble"
        self.parts = 0

    @property
    def complete(self) -> bool:
        """Whether the closing delimiter has been read."""
        return self._state == "epilogue"

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` (the next bytes of the body) completes, in order."""
        if self._state == "epilogue":
            return []
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        """The body has ended: MultipartError unless its closing delimiter came."""
        if self._state != "epilogue":
            where = "before its first part" if self.parts == 0 else f"inside part {self.parts}"
            raise MultipartError(f"the body ended {where}, without the closing delimiter")

    def _step(self, events: list[Event]) -> bool:
        """One step of the state machine; whether another may follow with the bytes buffered."""
        if self._state in ("preamble", "body"):
            return self._find_delimiter(events)
        if self._state == "delimited":
            return self._after_delimiter(events)
        if self._state == "headers":
            return self._headers(events)
        self._buffer = b""
        return False

    def _find_delimiter(self, events: list[Event]) -> bool:
        index = self._buffer.find(self._delimiter)
        in_body = self._state == "body"
        if index < 0:
            keep = len(self._delimiter) - 1  # a delimiter may straddle this chunk and the next
            if len(self._buffer) > keep:
                if in_body:
                    events.append(PartData(self._buffer[:-keep]))
                self._buffer = self._buffer[-keep:]
            return False
        if in_body:
            if index:
                events.append(PartData(self._buffer[:index]))
            events.append(PartEnd())
        self._buffer = self._buffer[index + len(self._delimiter) :]
        self._state = "delimited"
        return True

    def _after_delimiter(self, events: list[Event]) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer.startswith(b"--"):
            self._state, self._buffer = "epilogue", b""
            return False
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > 1024:
                raise MultipartError("no line end after a delimiter")
            return False
        if self._buffer[:end].strip(b" \t"):
            raise MultipartError("a delimiter is followed by something other than white space")
        self._buffer = self._buffer[end + 2 :]
        self._state = "headers"
        return True

    def _headers(self, events: list[Event]) -> bool:
        if self._buffer.startswith(b"\r\n"):  # a part without headers
            raw, self._buffer = b"", self._buffer[2:]
        else:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError(f"part {self.parts + 1}: headers longer than {MAX_HEADER_BYTES} bytes")
                return False
            raw, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        headers: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n") if raw else ():
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"part {self.parts + 1}: header line {line[:80]!r} is not 'Name: value'")
            headers[name.strip().lower()] = value.strip()
        self.parts += 1
        events.append(PartStart(headers))
        self._state = "body"
        return True
