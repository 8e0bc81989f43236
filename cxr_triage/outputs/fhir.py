"""A finished study's FHIR R4 DiagnosticReport, with its Observations and the model's Device, sent to each
``[fhir]`` destination as one transaction of conditional updates, with retries and a dead letter.

When ``studies.aggregate_studies`` completes a study (the moment its HL7 ORU^R01 is queued; again after new
instances), ``enqueue`` adds one ``fhir_reports`` row per ``[fhir] destinations`` entry in the same transaction,
holding the Bundle (``cxr_triage.outputs.fhirreport``; a newer row supersedes the study's unsent older one). The
housekeeping sends due rows (``process_due``): ``POST <base URL>`` with the Bundle (``application/fhir+json``), the
destination's bearer token or basic credentials read from its environment variable or file at that moment, TLS
verified against its ``tls_ca_file``, ``[fhir] timeout`` for the connection and the answer. An answer 2xx whose
transaction-response entries are all 2xx is success; anything else (refused, timed out, 4xx/5xx with the
server's OperationOutcome, an entry that failed) is retried and dead-lettered like the other outputs
(``cxr_triage.outputs.delivery``); ``cxr-triage forward --retry`` resends dead ones. The conditional updates make a
resend, or the Bundle of a re-aggregated study, update the same resources instead of adding new ones.

Secrets are never logged, stored in a row or held in the settings: only the names of their variables and files.
HTTP uses the standard library's ``urllib`` (as ``cxr_triage.outputs.orthanc``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.endpoints import FHIRDestination, client_tls_context
from cxr_triage.outputs import delivery
from cxr_triage.outputs.fhirreport import bundle_json
from cxr_triage.outputs.hl7report import ReportError, read_report, sample_report

if TYPE_CHECKING:
    from cxr_triage.core.fhirsettings import FHIRSettings
    from cxr_triage.core.settings import Settings

logger = logging.getLogger(log_name(__name__))

MAX_PER_ROUND = 10
"""Most Bundles sent in one round; each may take up to twice ``[fhir] timeout``."""
ERROR_BODY_CHARS = 300
CONTENT_TYPE = "application/fhir+json"


class FHIRError(RuntimeError):
    """A Bundle was not accepted, or could not be sent; the message says why (never a secret), ``status`` the HTTP
    status of the answer (None when none came)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused, not followed: urllib would resend the Authorization header to wherever a redirect
    points and turn the POST into a GET; a moved server is a configuration change."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def _secret(variable: str, file: str, what: str) -> str:
    """The secret in the environment variable ``variable`` or the file ``file`` (stripped); FHIRError naming the
    variable or file, never the value, when it is missing or empty."""
    if variable:
        value = os.environ.get(variable, "").strip()
        if not value:
            raise FHIRError(f"the {what} variable {variable} is not set or empty")
        return value
    try:
        value = Path(file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FHIRError(f"cannot read the {what} file {file}: {type(exc).__name__}") from exc
    if not value:
        raise FHIRError(f"the {what} file {file} is empty")
    return value


def authorization(destination: FHIRDestination) -> str | None:
    """The ``Authorization`` header for ``destination`` (None: none configured), its secret read now."""
    if destination.bearer_token_env or destination.bearer_token_file:
        token = _secret(destination.bearer_token_env, destination.bearer_token_file, "bearer token")
        return f"Bearer {token}"
    if destination.username:
        password = _secret(destination.password_env, destination.password_file, "password")
        pair = f"{destination.username}:{password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


def tls_context(destination: FHIRDestination) -> ssl.SSLContext | None:
    """The TLS context of an ``https`` destination: its CA bundle, else the system's trust store."""
    if not destination.url.startswith("https:"):
        return None
    return client_tls_context(destination.tls_ca_file)


def _failed_entries(answer: bytes) -> list[str]:
    """The entries of a transaction-response that did not succeed, as text; a body that is not one is an error."""
    try:
        bundle = json.loads(answer or b"{}")
    except ValueError as exc:
        raise FHIRError(f"the answer is not JSON: {answer[:ERROR_BODY_CHARS]!r}") from exc
    if not isinstance(bundle, dict) or (bundle.get("resourceType"), bundle.get("type")) != (
        "Bundle",
        "transaction-response",
    ):
        raise FHIRError(f"the answer is not a transaction-response Bundle: {answer[:ERROR_BODY_CHARS]!r}")
    statuses = [str((entry.get("response") or {}).get("status", "")) for entry in bundle.get("entry") or ()]
    return [f"entry {index}: {status or 'no status'}" for index, status in enumerate(statuses) if status[:1] != "2"]


def send_bundle(destination: FHIRDestination, bundle: str, timeout: float) -> tuple[int, str]:
    """POST ``bundle`` to ``destination``'s base URL: (HTTP status, what the server said). Raises FHIRError."""
    headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
    if header := authorization(destination):
        headers["Authorization"] = header
    request = urllib.request.Request(destination.url, data=bundle.encode("utf-8"), method="POST", headers=headers)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls_context(destination)), _NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            status, answer = int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
        moved = f" (redirected to {exc.headers.get('Location')}: set that URL)" if 300 <= exc.code < 400 else ""
        raise FHIRError(f"HTTP {exc.code} from {destination}{moved}: {detail}", exc.code) from exc
    except urllib.error.URLError as exc:
        raise FHIRError(f"{destination}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise FHIRError(f"{destination}: {exc or type(exc).__name__}") from exc
    try:
        failed = _failed_entries(answer)
    except FHIRError as exc:
        raise FHIRError(f"HTTP {status} from {destination}: {exc}", status) from exc
    if failed:
        raise FHIRError(
            f"HTTP {status} from {destination}, but not every update succeeded: {'; '.join(failed)}", status
        )
    return status, f"accepted (HTTP {status})"


TRIAL_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def check_settings(settings: Settings) -> None:
    """A start-up check of the commands that send (``serve``, ``worker``, ``forward``): every destination's secret
    can be read and its CA bundle loaded, and a trial Bundle builds, so that a mistake stops the start-up rather
    than the first result."""
    fhir = settings.fhir
    for index, destination in enumerate(fhir.destinations):
        try:
            authorization(destination)
            tls_context(destination)
        except (FHIRError, OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[fhir] destinations[{index}] ({destination}): {exc}") from exc
    if fhir.destinations:
        try:
            bundle_json(sample_report(), fhir, TRIAL_TIME)
        except ValueError as exc:
            raise ConfigError(f"[fhir] a trial report cannot be built: {exc}") from exc


def enqueue(session: Session, study: db.Study, settings: FHIRSettings, now: dt.datetime) -> int:
    """Queue the Bundle of the just-aggregated ``study`` for every ``[fhir]`` destination (inside the aggregation's
    transaction); the number of rows added. A Bundle that cannot be built is added dead, with the reason."""
    if not settings.destinations:
        return 0
    bundle, problem = None, ""
    try:
        bundle = bundle_json(read_report(session, study), settings, now)
    except (ReportError, ValueError) as exc:
        problem = str(exc)
    except Exception as exc:  # an unexpected value must not stop the aggregation of every study after it
        logger.exception("building the FHIR report of study %s failed", study.study_instance_uid)
        problem = f"{type(exc).__name__}: {exc}"
    if bundle is None:
        logger.error("FHIR report of study %s not sent: %s", study.study_instance_uid, problem)
    for destination in settings.destinations:
        delivery.supersede(session, db.FHIRReport, study.id, str(destination), now)
        dead_because = None if bundle else f"cannot build the FHIR Bundle: {problem}"
        columns = {"study_id": study.id, "destination": str(destination), "bundle": bundle}
        session.add(delivery.new_row(db.FHIRReport, now, dead_because, **columns))
    return len(settings.destinations)


@dataclass(frozen=True)
class FHIROutcome:
    row_id: int
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    http_status: int | None
    detail: str


OUTBOX: delivery.Outbox[db.FHIRReport, FHIROutcome] = delivery.Outbox(
    "fhir",
    db.FHIRReport,
    lambda r, uid, detail: FHIROutcome(r.id, uid, r.destination, r.state, r.attempts, r.http_status, detail),
    logger,
    sent="FHIR report of study %(study_instance_uid)s accepted by %(destination)s",
    about="FHIR report of study %(study_instance_uid)s to %(destination)s",
    answer="http_status",
)
as_record = OUTBOX.as_record
"""A FHIR report's outcome as ``cxr-triage forward`` prints it."""
listed = OUTBOX.listed
"""Every FHIR report, oldest first, as ``cxr-triage forward`` lists it."""


def _attempt(settings: FHIRSettings, name: str, bundle: str) -> tuple[bool, int | None, str]:
    destination = settings.destination(name)
    if destination is None:
        return False, None, f"{name} is no longer an [fhir] destination"
    try:
        status, detail = send_bundle(destination, bundle, settings.timeout)
    except FHIRError as exc:
        return False, exc.status, str(exc)
    except (ValueError, ssl.SSLError) as exc:
        return False, None, f"{name}: {type(exc).__name__}: {exc}"
    return True, status, detail


def process_due(
    sessions: sessionmaker[Session],
    settings: FHIRSettings,
    now: dt.datetime | None = None,
    force: bool = False,
    exclude: Collection[int] = (),
) -> list[FHIROutcome]:
    """Send one round of the Bundles that are due (pending ones not in ``exclude`` when ``force``); one outcome per
    row. A destination that could not be reached is not tried again in the same round."""
    now = now or db.utcnow()
    lease = dt.timedelta(seconds=2 * settings.timeout * MAX_PER_ROUND + 60)
    columns = (db.FHIRReport.id, db.FHIRReport.destination, db.FHIRReport.bundle, db.Study.study_instance_uid)
    rows = OUTBOX.claim(sessions, now, lease, force, MAX_PER_ROUND, exclude, *columns)
    attempts: list[delivery.Attempt] = []
    unreachable: dict[str, str] = {}
    for row_id, destination, bundle, study_uid in rows:
        if destination in unreachable:
            detail = f"not sent: {unreachable[destination]} (earlier in this round)"
            attempts.append(delivery.Attempt(row_id, study_uid, False, None, detail))
            continue
        ok, status, detail = _attempt(settings, destination, bundle or "")
        if not ok and status is None:
            unreachable[destination] = detail
        attempts.append(delivery.Attempt(row_id, study_uid, ok, status, detail))
    return OUTBOX.record(sessions, settings, attempts)


def unbuilt(session: Session) -> int:
    """Bundles that could not be built: dead for good (``forward --retry`` cannot send what does not exist)."""
    return delivery.unbuilt(session, db.FHIRReport)
