"""A finished study's priority as Orthanc user metadata, so that Orthanc's users see the triage result on the study.

A ``[forward] destinations`` entry with ``orthanc_url`` (plus ``orthanc_username`` / ``orthanc_password`` for
HTTP basic authentication) is an Orthanc. When ``studies.aggregate_studies`` completes a study, ``enqueue`` adds
one ``orthanc_metadata`` row per such destination (in the aggregation's transaction; a newer one supersedes an
unsent older one); the housekeeping sends due rows (``process_due``): the study is found with
``POST /tools/lookup`` (its Study Instance UID) and each value is set with ``PUT /studies/{id}/metadata/{name}``.
A failure (Orthanc down, the study not there yet, a name Orthanc does not know) is retried with ``[forward]``'s
backoff and dead-lettered after ``max_attempts``, like SR forwarding (``cxr_triage.outputs.delivery``).

User metadata must be declared in Orthanc's configuration (``"UserMetadata"``, supported by Orthanc 1.10 as Debian
ships it; deploy/orthanc/orthanc.json declares the names of ``METADATA``). Labels (Orthanc >= 1.12) would be one
more request per study, ``PUT /studies/{id}/labels/cxr-triage-urgent`` after removing the other priorities'
labels (``DELETE``); deploy/README.md says how.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.endpoints import OrthancEndpoint
from cxr_triage.outputs import delivery

if TYPE_CHECKING:
    from cxr_triage.core.settings import ForwardSettings

logger = logging.getLogger(log_name(__name__))

METADATA = ("CxrTriagePriority", "CxrTriageFinding", "CxrTriageReason", "CxrTriageModel")
"""The user metadata names set on a study: priority (urgent, priority, review, routine), the worst label (or
"not classified"), the priority's rule and reason, the model version."""
MAX_PER_ROUND = 20
ERROR_BODY_CHARS = 300


class OrthancError(RuntimeError):
    """A REST call failed; the message says which and why."""


def _request(
    endpoint: OrthancEndpoint, method: str, path: str, body: bytes, timeout: float, tls: ssl.SSLContext | None
) -> bytes:
    headers = {"Content-Type": "text/plain"}
    if endpoint.username:
        token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(endpoint.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
        raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
    except urllib.error.URLError as exc:
        raise OrthancError(f"{method} {endpoint.url}{path}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise OrthancError(f"{method} {endpoint.url}{path}: {exc}") from exc


def find_study(endpoint: OrthancEndpoint, study_uid: str, timeout: float, tls: ssl.SSLContext | None) -> str:
    """Orthanc's ID of the study with this Study Instance UID; OrthancError when Orthanc does not hold it."""
    found = json.loads(_request(endpoint, "POST", "/tools/lookup", study_uid.encode("ascii"), timeout, tls) or b"[]")
    ids = [item.get("ID") for item in found if isinstance(item, dict) and item.get("Type") == "Study"]
    if not ids:
        raise OrthancError(f"Orthanc at {endpoint.url} has no study {study_uid} (yet)")
    return str(ids[0])


def set_study_metadata(
    endpoint: OrthancEndpoint,
    study_uid: str,
    values: Mapping[str, str],
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> str:
    """Set ``values`` (name -> text) as the study's user metadata; Orthanc's study ID. Raises OrthancError."""
    study = find_study(endpoint, study_uid, timeout, tls)
    for name, value in values.items():
        try:
            _request(endpoint, "PUT", f"/studies/{study}/metadata/{name}", value.encode("utf-8"), timeout, tls)
        except OrthancError as exc:
            hint = f' (is {name} declared in Orthanc\'s "UserMetadata"?)' if "HTTP 4" in str(exc) else ""
            raise OrthancError(f"{exc}{hint}") from exc
    return study


def study_values(study: db.Study) -> dict[str, str]:
    """The metadata of ``study`` (``METADATA``), as text."""
    reason = study.priority_reason or ""
    if study.priority_rule == "failed":
        reason = "failed: processing failed (cxr-triage results has the error)"
    return {
        "CxrTriagePriority": study.priority or "review",
        "CxrTriageFinding": study.label or "not classified",
        "CxrTriageReason": reason,
        "CxrTriageModel": study.priority_model_version or "",
    }


def enqueue(session: Session, study: db.Study, forwarding: ForwardSettings, now: dt.datetime) -> int:
    """Queue the metadata of the just-aggregated ``study`` for every Orthanc destination; the number added."""
    values = study_values(study)
    for endpoint in forwarding.orthanc:
        delivery.supersede(session, db.OrthancMetadata, study.id, endpoint.destination, now)
        columns = {"study_id": study.id, "destination": endpoint.destination, "values": values}
        session.add(delivery.new_row(db.OrthancMetadata, now, **columns))
    return len(forwarding.orthanc)


@dataclass(frozen=True)
class OrthancOutcome:
    row_id: int
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    detail: str


OUTBOX: delivery.Outbox[db.OrthancMetadata, OrthancOutcome] = delivery.Outbox(
    "orthanc",
    db.OrthancMetadata,
    lambda u, uid, detail: OrthancOutcome(u.id, uid, u.destination, u.state, u.attempts, detail),
    logger,
    sent="priority of study %(study_instance_uid)s set in Orthanc %(destination)s",
    about="Orthanc metadata of study %(study_instance_uid)s on %(destination)s",
    listing=lambda u: {"values": u.values},
)
as_record = OUTBOX.as_record
"""An Orthanc update's outcome as ``cxr-triage forward`` prints it."""
listed = OUTBOX.listed
"""Every Orthanc update, oldest first, as ``cxr-triage forward`` lists it."""


def _tls(forwarding: ForwardSettings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=forwarding.tls_ca_file or None)


def process_due(
    sessions: sessionmaker[Session],
    forwarding: ForwardSettings,
    now: dt.datetime | None = None,
    force: bool = False,
    exclude: Collection[int] = (),
) -> list[OrthancOutcome]:
    """Set one round of the metadata that is due (pending rows not in ``exclude`` when ``force``) in Orthanc; one
    outcome per row."""
    now = now or db.utcnow()
    lease = dt.timedelta(seconds=(len(METADATA) + 1) * forwarding.timeout * MAX_PER_ROUND + 60)
    columns = (db.OrthancMetadata.id, db.OrthancMetadata.destination, db.OrthancMetadata.values)
    rows = OUTBOX.claim(sessions, now, lease, force, MAX_PER_ROUND, exclude, *columns, db.Study.study_instance_uid)
    endpoints = {endpoint.destination: endpoint for endpoint in forwarding.orthanc}
    tls: ssl.SSLContext | None = None
    attempts: list[delivery.Attempt] = []
    for update_id, destination, values, study_uid in rows:
        endpoint = endpoints.get(destination)
        try:
            if endpoint is None:
                raise OrthancError(f"{destination} is no longer a [forward] destination with an orthanc_url")
            if endpoint.url.startswith("https:") and tls is None:
                tls = _tls(forwarding)
            study = set_study_metadata(endpoint, study_uid, values, forwarding.timeout, tls)
            attempts.append(delivery.Attempt(update_id, study_uid, True, None, f"set on Orthanc study {study}"))
        except (OrthancError, ValueError, OSError, ssl.SSLError) as exc:
            attempts.append(delivery.Attempt(update_id, study_uid, False, None, str(exc)))
    return OUTBOX.record(sessions, forwarding, attempts)
