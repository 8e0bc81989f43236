"""A small FHIR R4 server for the tests, on 127.0.0.1 (plain HTTP, or HTTPS with a certificate of a CA the test
makes): it takes transaction Bundles at its base URL, validates every Bundle and every resource in it with
``fhir.resources`` (R4B) before it answers, and applies each ``PUT <Type>?identifier=<system>|<value>`` as a
conditional update (none found: created, one: updated in place with a new version, more: 412), rewriting the
Bundle's ``urn:uuid:`` references to the ids it gave and refusing one that resolves nowhere. It records each
request, checks the ``Authorization`` header it was told to expect (401 otherwise) and can be told to answer the
next requests with an error status (or a redirect to itself) first.

No FHIR server that runs offline here installs from PyPI, npm or Debian (docs/FHIR.md says what was looked at), so
this one stands in for it: what it checks is what a server would refuse.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle


@dataclass
class Received:
    """One request: its method, path, headers and body (parsed JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FHIRStore:
    """What the server holds and was sent; ``failures`` are HTTP statuses answered, in turn, before any work."""

    authorization: str | None = None
    failures: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Resource type -> id -> the resource as stored (``meta.versionId`` counts its updates)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.resources.get(kind, {}).values())

    def find(self, kind: str, system: str, value: str) -> list[dict[str, Any]]:
        return [
            resource
            for resource in self.resources.get(kind, {}).values()
            if any(i.get("system") == system and i.get("value") == value for i in resource.get("identifier", []))
        ]


def _outcome(status: int, text: str) -> tuple[int, dict[str, Any]]:
    issue = {"severity": "error", "code": "processing", "diagnostics": text}
    return status, {"resourceType": "OperationOutcome", "issue": [issue]}


def _rewrite(value: Any, ids: dict[str, str], unresolved: list[str]) -> Any:
    """``value`` with each ``reference`` that names a ``urn:uuid:`` replaced by ``Type/id``."""
    if isinstance(value, list):
        return [_rewrite(item, ids, unresolved) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: _rewrite(item, ids, unresolved) for key, item in value.items()}
    reference = out.get("reference")
    if isinstance(reference, str) and reference.startswith("urn:"):
        if reference in ids:
            out["reference"] = ids[reference]
        else:
            unresolved.append(reference)
    return out


def _conditional(url: str) -> tuple[str, str, str]:
    kind, _, query = url.partition("?")
    (search,) = urllib.parse.parse_qs(query)["identifier"]
    system, _, value = search.partition("|")
    return kind, system, value


def apply_transaction(store: FHIRStore, body: Any) -> tuple[int, dict[str, Any]]:
    """Validate ``body`` and apply it to ``store``: (HTTP status, answer)."""
    Bundle.model_validate(body)  # raises on anything R4(B) does not allow
    if body.get("type") != "transaction":
        return _outcome(400, f"expected a transaction Bundle, got {body.get('type')!r}")
    plan, ids = [], {}
    with store.lock:
        for entry in body.get("entry", []):
            resource, request = entry["resource"], entry["request"]
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            kind, system, value = _conditional(request["url"])
            if request["method"] != "PUT" or kind != resource["resourceType"]:
                return _outcome(400, f"expected PUT {resource['resourceType']}?identifier=..., got {request}")
            if not any(i.get("system") == system and i.get("value") == value for i in resource["identifier"]):
                return _outcome(400, f"{request['url']}: the resource does not carry that identifier")
            found = store.find(kind, system, value)
            if len(found) > 1:
                return _outcome(412, f"{request['url']} matches {len(found)} resources")
            rid = found[0]["id"] if found else f"{kind.lower()}-{sum(map(len, store.resources.values())) + len(plan)}"
            ids[entry["fullUrl"]] = f"{kind}/{rid}"
            plan.append((kind, rid, resource, found[0] if found else None))
        answers = []
        for kind, rid, resource, old in plan:
            unresolved: list[str] = []
            stored = _rewrite(resource, ids, unresolved)
            if unresolved:
                return _outcome(400, f"references that resolve to nothing in the Bundle: {unresolved}")
            version = int(old["meta"]["versionId"]) + 1 if old else 1
            stored.update(id=rid, meta={"versionId": str(version), "lastUpdated": dt.datetime.now(dt.UTC).isoformat()})
            store.resources.setdefault(kind, {})[rid] = stored
            status = "200 OK" if old else "201 Created"
            answers.append({"response": {"status": status, "location": f"{kind}/{rid}/_history/{version}"}})
    return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        if 300 <= status < 400:  # a redirect: to this same server's base URL, which a client must not follow
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/fhir")
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        store: FHIRStore = self.server.store
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with store.lock:
            store.received.append(Received("POST", self.path, dict(self.headers.items()), body))
            failure = store.failures.pop(0) if store.failures else None
        if failure:
            return self._answer(*_outcome(failure, "the test server was told to fail"))
        if store.authorization is not None and self.headers.get("Authorization") != store.authorization:
            return self._answer(*_outcome(401, "not authorised"))
        if self.path != "/fhir" or self.headers.get("Content-Type") != "application/fhir+json":
            return self._answer(*_outcome(400, f"POST {self.path} ({self.headers.get('Content-Type')})"))
        try:
            self._answer(*apply_transaction(store, body))
        except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            self._answer(*_outcome(400, f"invalid: {type(exc).__name__}: {exc}"))


@contextmanager
def fhir_server(store: FHIRStore | None = None, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, FHIRStore]]:
    """A running server: (its base URL, ending in ``/fhir``, and its store)."""
    store = store or FHIRStore()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.store = store  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/fhir", store
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def make_ca_and_server_certificate(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1 it signed, made with ``openssl`` (a missing tool fails the
    test): the CA's PEM file and the server's TLS context."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120)

    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=cxr-triage test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extensions))  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return ca, context
