"""The listener's connection guard: what a peer must show before pynetdicom gives it a thread, a slot or memory.

pynetdicom (3.0) trusts the wire in three ways that let one peer harm every other: it reads a PDU whole, as long as
its 4-byte length says (4 GiB), before anything can look at it; it counts every accepted TCP connection against
``maximum_associations`` from the moment it is accepted, whether or not it ever asks for an association; and the
sockets it accepts have no timeout (a listening socket with a timeout hands out blocking ones), so a PDU that stops
arriving halfway blocks its thread for as long as the peer keeps the connection open. With TLS, the handshake even
runs in the accept loop itself.

The guard stands between the listening socket and pynetdicom, through pynetdicom's public extension points:
``AE.make_server(server_class=GuardedServer, request_handler=GuardedRequestHandler)``, the documented way to run a
custom ``AssociationServer``, whose request handler hands pynetdicom the accepted socket.

* **Accept** (``GuardedServer.verify_request``, the accept loop): a peer address that already has
  ``[listener] max_connections_per_peer`` connections waiting for their association (not yet handed to
  pynetdicom) gets its new one closed at once. Associations that work do not count: a PACS may open as many in
  parallel as ``[listener] max_associations`` allows; what the cap bounds is what is idle or slow.
* **Before the association** (``GuardedRequestHandler.handle``, the connection's own thread): the TLS handshake and
  the A-ASSOCIATE-RQ must arrive within ``[listener] association_request_timeout``. The first PDU must be an
  A-ASSOCIATE-RQ of at most ``MAX_REQUEST_BYTES`` whose fixed fields and items are laid out as one
  (``request_problem``); anything else is answered with an A-ABORT and closed. Only then is the connection handed
  to pynetdicom, so only real association requests take one of its association slots. (A request over
  ``PEEK_BYTES``, which a plain socket cannot hold unread, is handed over once that much of it has arrived, its
  items unchecked; pynetdicom reads the rest within the same deadline.)
* **Every PDU after that** (``GuardedSocket``): its 6-byte header is checked before a byte of its body is read. A
  P-DATA-TF longer than the maximum this listener announced in its A-ASSOCIATE-AC (``[listener] max_pdu``, which
  the peer must respect, PS3.8 D.1), another PDU over ``MAX_REQUEST_BYTES``, or an unknown PDU type is answered
  with an A-ABORT and the connection is closed, having buffered nothing. A connection whose data stops for
  ``[listener] network_timeout`` in the middle of a PDU is closed.

Why a socket subclass: pynetdicom reads its connection only through ``socket.recv(n)`` (n <= 4096) on the socket
the request handler gives it, and that is the one place an application can see a PDU header before the body is
buffered. ``GuardedSocket`` is a subclass of Python's ``socket.socket`` (and ``GuardedSSLSocket`` of
``ssl.SSLSocket``, made by ``SSLContext.sslsocket_class``) that counts each PDU's bytes as they pass; it relies on
nothing of pynetdicom but that it reads the connection with ``recv``, which is all a socket offers.

Each refusal is one WARNING line naming the peer and the reason (at most one a minute per peer and reason, with the
count of those left out), so a flood cannot flood the log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from cxr_triage import log_name
from cxr_triage.core.settings import ListenerSettings

logger = logging.getLogger(log_name(__name__))

HEADER = struct.Struct(">BxL")
"""A PDU header: type, reserved byte, length of the rest (PS3.8 9.3.1)."""
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
"""A-ASSOCIATE-RQ, -AC, -RJ, P-DATA-TF, A-RELEASE-RQ, -RP, A-ABORT."""
ASSOCIATE_RQ_FIXED = 68
"""The fixed fields of an A-ASSOCIATE-RQ after its header: a shorter one is not one (PS3.8 9.3.2)."""
MAX_REQUEST_BYTES = 1 << 20
"""The longest A-ASSOCIATE-RQ (or other non-data PDU) accepted. Real ones are a few KiB; one proposing every
storage class with several transfer syntaxes is under 64 KiB."""
PEEK_BYTES = 32768
"""How much of an A-ASSOCIATE-RQ the guard waits for on a plain socket before the hand-off. It only peeks, so the
bytes stay in the kernel's receive buffer, which takes about 64 KiB from a peer before anything is read."""
LOG_INTERVAL = 60.0
"""Seconds during which further refusals of one peer for one reason are counted instead of logged."""
CLOSED = "closed by the peer"

# A-ABORT reasons (PS3.8 9.3.8): source 2 is the service provider.
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


class Refusal(NamedTuple):
    """Why a connection is closed, the A-ABORT reason to answer (None: no A-ABORT), and whether to say nothing
    (a peer that closed without sending anything: a port check)."""

    why: str
    abort: int | None = None
    quiet: bool = False


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason``."""
    return HEADER.pack(0x07, 4) + bytes((0, 0, 2, reason))


@dataclass(frozen=True)
class ConnectionPolicy:
    """The limits the guard enforces, from ``[listener]``."""

    max_pdu: int
    """The longest P-DATA-TF accepted (the maximum this listener announces); 0: no limit."""
    request_timeout: float
    network_timeout: float
    max_per_peer: int

    @classmethod
    def from_settings(cls, listener: ListenerSettings) -> ConnectionPolicy:
        return cls(
            max_pdu=listener.max_pdu,
            request_timeout=listener.association_request_timeout,
            network_timeout=listener.network_timeout,
            max_per_peer=listener.max_connections_per_peer,
        )

    def check(self, kind: int, length: int, first: bool) -> Refusal | None:
        """Why a PDU with this header is refused, or None."""
        if first and kind != A_ASSOCIATE_RQ:
            what = f"PDU type 0x{kind:02X}" if kind in PDU_TYPES else f"bytes 0x{kind:02X}... (not DICOM)"
            return Refusal(f"the first PDU must be an A-ASSOCIATE-RQ, got {what}", ABORT_UNEXPECTED_PDU)
        if kind not in PDU_TYPES:
            return Refusal(f"unknown PDU type 0x{kind:02X}", ABORT_UNRECOGNIZED_PDU)
        if kind == P_DATA_TF:
            if self.max_pdu and length > self.max_pdu:
                return Refusal(
                    f"P-DATA-TF of {length} bytes is over the negotiated maximum of {self.max_pdu} "
                    "([listener] max_pdu)",
                    ABORT_INVALID_PARAMETER,
                )
            return None
        if length > MAX_REQUEST_BYTES:
            name = "A-ASSOCIATE-RQ" if kind == A_ASSOCIATE_RQ else f"PDU of type 0x{kind:02X}"
            return Refusal(
                f"{name} of {length} bytes is over the limit of {MAX_REQUEST_BYTES}", ABORT_INVALID_PARAMETER
            )
        if kind == A_ASSOCIATE_RQ and length < ASSOCIATE_RQ_FIXED:
            return Refusal(f"A-ASSOCIATE-RQ of {length} bytes is too short to be one", ABORT_INVALID_PARAMETER)
        return None


REQUEST_ITEMS = {0x10: "application context", 0x20: "presentation context", 0x50: "user information"}


def request_problem(pdu: bytes, complete: bool) -> str | None:
    """Why an A-ASSOCIATE-RQ (its first bytes, header included; all of it if ``complete``) is not one, or None.

    The fixed fields and the layout of the items are checked (PS3.8 9.3.2), which garbage with a plausible header
    fails, before pynetdicom decodes it (and logs three tracebacks when that fails).
    """
    body = memoryview(pdu)[HEADER.size :]
    if len(body) >= 2 and not body[1] & 1:
        return "not an A-ASSOCIATE-RQ: protocol version bit 0 is not set"
    for name, field in (("called", body[4:20]), ("calling", body[20:36])):
        if any(byte >= 0x80 for byte in field):
            return f"not an A-ASSOCIATE-RQ: the {name} AE title is not ASCII"
    if not complete:
        return None
    kinds: list[int] = []
    offset = ASSOCIATE_RQ_FIXED
    while offset + 4 <= len(body):
        kind, length = body[offset], int.from_bytes(body[offset + 2 : offset + 4], "big")
        if kind not in REQUEST_ITEMS:
            return f"not an A-ASSOCIATE-RQ: item type 0x{kind:02X} at byte {HEADER.size + offset}"
        kinds.append(kind)
        offset += 4 + length
    if offset != len(body):
        return "not an A-ASSOCIATE-RQ: its items do not add up to its length"
    if kinds.count(0x10) != 1 or kinds.count(0x50) != 1 or 0x20 not in kinds:
        return "not an A-ASSOCIATE-RQ: it needs one application context, presentation contexts, one user information"
    return None


_NUMBERS = re.compile(r"0x[0-9A-F]+|\d+")


class PeerLog:
    """WARNING lines about peers: at most one per peer and reason every ``LOG_INTERVAL`` seconds (reasons that
    differ only in their numbers are one reason)."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, peer: tuple[str, int], message: str) -> None:
        now = time.monotonic()
        key = (peer[0], _NUMBERS.sub("#", message))
        with self._lock:
            last, left_out = self._last.get(key, (-self.interval, 0))
            if now - last < self.interval:
                self._last[key] = (last, left_out + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 4096:  # forget quiet peers
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
        more = f" ({left_out} more like it from this address in the last {self.interval:.0f} s)" if left_out else ""
        logger.warning("connection from %s:%d closed: %s%s", peer[0], peer[1], message, more)


class _Framed:
    """The PDU accounting shared by ``GuardedSocket`` and ``GuardedSSLSocket`` (mixed in before the socket class).

    The attributes are class defaults because ``ssl`` builds its sockets without calling ``__init__``; ``frame``
    sets them once the connection is accepted.
    """

    policy: ConnectionPolicy | None = None
    peer: tuple[str, int] = ("?", 0)
    peer_log: PeerLog | None = None
    handed_off = False
    _request_deadline = 0.0
    _pdus = 0
    _length = 0
    _left = 0
    _ahead = b""
    _refused = False

    def frame(self, policy: ConnectionPolicy, peer: tuple[str, int], peer_log: PeerLog, deadline: float) -> None:
        """Start checking: the A-ASSOCIATE-RQ must be complete by ``deadline`` (a ``time.monotonic()`` value)."""
        self.policy, self.peer, self.peer_log, self._request_deadline = policy, peer, peer_log, deadline
        self.settimeout(policy.network_timeout)  # type: ignore[attr-defined]

    def refuse(self, refusal: Refusal) -> None:
        """Log why, answer the A-ABORT if any, and shut the connection down; recv returns b"" from now on."""
        self._refused = True
        if self.peer_log is not None and not refusal.quiet:
            self.peer_log.warning(self.peer, refusal.why)
        if refusal.abort is not None:
            with contextlib.suppress(OSError):
                self.settimeout(1.0)  # type: ignore[attr-defined]
                super().sendall(abort_pdu(refusal.abort))  # type: ignore[misc]
        self.cut()

    def cut(self) -> None:
        """Shut the connection down (its thread's blocked ``recv`` returns at once)."""
        with contextlib.suppress(OSError):
            super().shutdown(socket.SHUT_RDWR)  # type: ignore[misc]

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags or self.policy is None:
            return bytes(super().recv(bufsize, flags))  # type: ignore[misc]
        if self._refused:
            return b""
        if self._ahead:
            data, self._ahead = self._ahead[:bufsize], self._ahead[bufsize:]
            return data
        if self._left == 0:
            header = self._header()
            data, self._ahead = header[:bufsize], header[bufsize:]
            return data
        return self._body(bufsize)

    def _header(self) -> bytes:
        assert self.policy is not None
        first = self._pdus == 0
        header, problem = self._read_exact(HEADER.size, first)
        if len(header) < HEADER.size:
            if header:
                self._refuse_incomplete(problem, "inside a PDU header")
            return b""
        kind, length = HEADER.unpack(header)
        refusal = self.policy.check(kind, length, first)
        if refusal is not None:
            self.refuse(refusal)
            return b""
        self._pdus += 1
        self._length = self._left = length
        return header

    def _body(self, bufsize: int) -> bytes:
        first = self._pdus == 1 and bool(self._request_deadline)
        data, problem = self._read_some(min(bufsize, self._left), first)
        if not data:
            self._refuse_incomplete(problem, f"inside a PDU ({self._length - self._left} of {self._length} bytes)")
            return b""
        self._left -= len(data)
        if first and not self._left:  # the A-ASSOCIATE-RQ is in: from now on, the network timeout
            assert self.policy is not None
            self._request_deadline = 0.0
            self.settimeout(self.policy.network_timeout)  # type: ignore[attr-defined]
        return data

    def _refuse_incomplete(self, problem: str, where: str) -> None:
        self.refuse(Refusal(f"{problem} {where}", ABORT_NOT_SPECIFIED if problem.startswith("no ") else None))

    def _read_exact(self, size: int, first: bool) -> tuple[bytes, str]:
        data, problem = bytearray(), ""
        while len(data) < size:
            more, problem = self._read_some(size - len(data), first)
            if not more:
                break
            data += more
        return bytes(data), problem

    def _read_some(self, size: int, first: bool) -> tuple[bytes, str]:
        """Up to ``size`` bytes, or none and the problem: ``CLOSED``, a timeout ("no ..."), a connection error.

        The A-ASSOCIATE-RQ (``first``) must be complete by the request deadline; after it, the socket's timeout
        (``network_timeout``) bounds each wait for data.
        """
        if first:
            remaining = self._request_deadline - time.monotonic()
            if remaining <= 0:
                return b"", self._timed_out(first)
            self.settimeout(remaining)  # type: ignore[attr-defined]
        try:
            data = bytes(super().recv(size))  # type: ignore[misc]
        except TimeoutError:
            return b"", self._timed_out(first)
        except OSError as exc:
            return b"", f"connection failed ({exc})"
        return data, "" if data else CLOSED

    def _timed_out(self, first: bool) -> str:
        assert self.policy is not None
        if first:
            return (
                f"no complete A-ASSOCIATE-RQ within {self.policy.request_timeout:g} s "
                "([listener] association_request_timeout)"
            )
        return f"no data for {self.policy.network_timeout:g} s ([listener] network_timeout)"


def _request_problem(received: int, problem: str) -> Refusal:
    """``await_request``'s answer when the A-ASSOCIATE-RQ did not arrive (``received`` bytes of it did)."""
    if problem == CLOSED and not received:
        return Refusal("closed without a request", quiet=True)
    if problem == CLOSED:
        return Refusal(f"closed by the peer inside its A-ASSOCIATE-RQ ({received} bytes received)")
    if problem.startswith("no "):
        return Refusal(problem, ABORT_NOT_SPECIFIED if received else None)
    return Refusal(problem)


class GuardedSocket(_Framed, socket.socket):
    """An accepted plain TCP connection, checked PDU by PDU (see the module docstring)."""

    def await_request(self) -> Refusal | None:
        """Wait, without consuming it, until the A-ASSOCIATE-RQ has arrived (its first ``PEEK_BYTES`` if longer):
        None when it has, else why the connection is to be closed."""
        assert self.policy is not None
        wanted, seen, length = HEADER.size, 0, 0
        while True:
            remaining = self._request_deadline - time.monotonic()
            if remaining <= 0:
                return _request_problem(seen, self._timed_out(True))
            readable, _, _ = select.select([self], [], [], remaining)
            if not readable:
                continue
            try:
                data = socket.socket.recv(self, wanted, socket.MSG_PEEK)
            except OSError as exc:
                return _request_problem(seen, f"connection failed ({exc})")
            if not data:
                return _request_problem(seen, CLOSED)
            seen = len(data)
            if wanted == HEADER.size and len(data) == HEADER.size:
                kind, length = HEADER.unpack(data)
                refusal = self.policy.check(kind, length, first=True)
                if refusal is not None:
                    return refusal
                wanted = min(HEADER.size + length, PEEK_BYTES)
                continue
            if len(data) >= wanted:
                problem = request_problem(data, complete=wanted == HEADER.size + length)
                return None if problem is None else Refusal(problem, ABORT_INVALID_PARAMETER)
            time.sleep(0.01)  # part of it is here: select would return at once until the rest comes


class GuardedSSLSocket(_Framed, ssl.SSLSocket):
    """A TLS connection, checked PDU by PDU; what the guard read ahead counts as pending (pynetdicom asks)."""

    def pending(self) -> int:
        return len(self._ahead) + super().pending()

    def await_request(self) -> Refusal | None:
        """Read the whole A-ASSOCIATE-RQ ahead (TLS allows no peeking); answers as ``GuardedSocket``'s does."""
        assert self.policy is not None
        header, problem = self._read_exact(HEADER.size, True)
        if len(header) < HEADER.size:
            return _request_problem(len(header), problem)
        kind, length = HEADER.unpack(header)
        refusal = self.policy.check(kind, length, first=True)
        if refusal is not None:
            return refusal
        body, problem = self._read_exact(length, True)
        if len(body) < length:
            return _request_problem(HEADER.size + len(body), problem)
        invalid = request_problem(header + body, complete=True)
        if invalid is not None:
            return Refusal(invalid, ABORT_INVALID_PARAMETER)
        self._ahead = header + body
        self._pdus, self._length, self._left = 1, length, 0
        self._request_deadline = 0.0
        self.settimeout(self.policy.network_timeout)
        return None


Guarded = GuardedSocket | GuardedSSLSocket


class ConnectionGuard:
    """The open connections of one listener and the policy they are held to."""

    def __init__(self, policy: ConnectionPolicy) -> None:
        self.policy = policy
        self.peer_log = PeerLog()
        self._open: weakref.WeakSet[Guarded] = weakref.WeakSet()
        self._lock = threading.Lock()

    def track(self, sock: Guarded) -> None:
        with self._lock:
            self._open.add(sock)

    def open_connections(self, address: str | None = None) -> int:
        """Connections open now (from ``address`` only, if given), before or after their hand-off."""
        with self._lock:
            return sum(1 for s in self._open if s.fileno() >= 0 and (address is None or s.peer[0] == address))

    def waiting_connections(self, address: str) -> int:
        """Connections from ``address`` open now and not yet handed to pynetdicom (no association yet)."""
        with self._lock:
            return sum(1 for s in self._open if s.fileno() >= 0 and not s.handed_off and s.peer[0] == address)

    def accept(self, client: socket.socket, address: tuple[str, int]) -> GuardedSocket:
        """``client`` (just accepted) as a GuardedSocket, tracked, its A-ASSOCIATE-RQ due in ``request_timeout``."""
        sock = GuardedSocket(client.family, client.type, client.proto, fileno=client.detach())
        sock.frame(self.policy, (str(address[0]), int(address[1])), self.peer_log, self._deadline())
        self.track(sock)
        return sock

    def _deadline(self) -> float:
        return time.monotonic() + self.policy.request_timeout

    def allow(self, sock: Guarded) -> bool:
        """Whether the peer of ``sock`` (tracked already) is within ``max_per_peer`` connections that wait for
        their association (its established associations are not counted: they are bounded by max_associations)."""
        count = self.waiting_connections(sock.peer[0])
        if count <= self.policy.max_per_peer:
            return True
        self.peer_log.warning(
            sock.peer,
            f"this address already has {count - 1} connections open without an association "
            f"([listener] max_connections_per_peer = {self.policy.max_per_peer})",
        )
        return False

    def admit(self, sock: GuardedSocket, tls: ssl.SSLContext | None) -> Guarded | None:
        """The connection to hand to pynetdicom once its TLS handshake and A-ASSOCIATE-RQ are in, or None (closed)."""
        guarded: Guarded = sock
        if tls is not None:
            wrapped = self._handshake(sock, tls)
            if wrapped is None:
                return None
            guarded = wrapped
        refusal = guarded.await_request()
        if refusal is None:
            guarded.handed_off = True
            return guarded
        if refusal.quiet:
            logger.debug("connection from %s:%d %s", *guarded.peer, refusal.why)
        guarded.refuse(refusal)
        guarded.close()
        return None

    def _handshake(self, sock: GuardedSocket, tls: ssl.SSLContext) -> GuardedSSLSocket | None:
        try:
            wrapped = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            sock.refuse(Refusal(f"TLS failed ({exc})"))
            sock.close()
            return None
        if not isinstance(wrapped, GuardedSSLSocket):
            raise TypeError("the listener's TLS context must make GuardedSSLSocket (SSLContext.sslsocket_class)")
        wrapped.frame(self.policy, sock.peer, self.peer_log, sock._request_deadline)
        self.track(wrapped)
        try:
            wrapped.settimeout(max(0.001, wrapped._request_deadline - time.monotonic()))
            wrapped.do_handshake()
            wrapped.settimeout(self.policy.network_timeout)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):  # closed, maybe without a byte: a port check
                logger.debug("connection from %s:%d closed during the TLS handshake", *wrapped.peer)
                refusal = Refusal("closed during the TLS handshake", quiet=True)
            elif isinstance(exc, TimeoutError):
                refusal = Refusal(f"no TLS handshake within {self.policy.request_timeout:g} s")
            else:
                refusal = Refusal(f"TLS handshake failed: {exc}")
            wrapped.refuse(refusal)
            wrapped.close()
            return None
        return wrapped

    def close_waiting(self) -> int:
        """Shut down every connection not yet handed to pynetdicom (the listener is stopping); how many."""
        with self._lock:
            waiting = [s for s in self._open if not s.handed_off and s.fileno() >= 0]
        for sock in waiting:
            sock.cut()
        return len(waiting)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard at its door (``AE.make_server(server_class=...)``).

    Its connection threads are daemons: one still waiting for a request never holds up the interpreter's exit.
    """

    daemon_threads = True

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, without TLS (the handshake happens in the connection's thread, under the request timeout)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.guard.accept(client, address), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.allow(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failure of a connection's thread (socketserver would print it to standard error, unescaped)."""
        logger.exception("connection from %s: unexpected error in the listener", client_address)

    def shutdown(self) -> None:
        """Stop accepting and close the connections still before their A-ASSOCIATE-RQ.

        Not pynetdicom's ``shutdown``, which also removes the server from the AE's list of the servers
        ``start_server`` started: ``make_server`` never adds it there.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self.guard.close_waiting()


class GuardedRequestHandler(RequestHandler):
    """Hands a connection to pynetdicom only once the guard has seen its A-ASSOCIATE-RQ."""

    server: GuardedServer

    def handle(self) -> None:
        sock = self.request
        if not isinstance(sock, GuardedSocket):
            raise TypeError("GuardedRequestHandler needs a GuardedServer")
        admitted = self.server.guard.admit(sock, self.server.ssl_context)
        if admitted is not None:
            self.request = admitted
            super().handle()
