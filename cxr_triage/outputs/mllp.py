"""MLLP, the minimal lower layer protocol that carries HL7 v2 over TCP: a message between a start block (VT) and an
end block (FS CR), the answer read back the same way. ``send`` is one exchange over its own connection; what the
answer means is ``cxr_triage.outputs.hl7.parse_ack``'s to say.
"""

from __future__ import annotations

import socket
import time

MAX_ACK_BYTES = 1 << 20
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
"""MLLP framing: <VT> message <FS><CR>."""


def read_frame(sock: socket.socket, timeout: float) -> bytes:
    """The answer between the MLLP start and end blocks, within ``timeout`` seconds in all; raises TimeoutError or
    ConnectionError."""
    deadline = time.monotonic() + timeout
    data = b""
    while END_BLOCK not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before an ACK came" + (f" (got {data[:80]!r})" if data else ""))
        data += chunk
        if len(data) > MAX_ACK_BYTES:
            raise ConnectionError(f"no MLLP end block in the first {MAX_ACK_BYTES} bytes of the answer")
    return data[data.find(START_BLOCK) + 1 if START_BLOCK in data else 0 : data.index(END_BLOCK)]


def send(host: str, port: int, payload: bytes, timeout: float) -> bytes:
    """Send ``payload`` framed over a new connection and return the framed answer; raises OSError (refused, a
    host name that does not resolve, ...), TimeoutError or ConnectionError."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(START_BLOCK + payload + END_BLOCK)
        return read_frame(sock, timeout)
