"""The worklist application: Jinja2 pages for people, a JSON API under ``/api/`` (OpenAPI at ``/docs``).

Everything is limited to ``[web] allowed_networks``. Reads (the worklist, a study, thumbnails, feedback and its
CSV export) need a login unless ``[web] anonymous_read`` (a page sends the browser to ``/login``, the API answers
401); ``/login``, ``/healthz``, ``/metrics``, ``/docs`` and the page script hold no patient data and stay open.
Viewing a study leaves an audit row (``study-viewed``, once per user and study within ``VIEW_AUDIT_MINUTES``).
Every write (log in, log out, feedback) needs a session and its CSRF token (``cxr_triage.web.auth``) and leaves
an audit row. The worklist page refreshes itself from ``/api/worklist``
every ``[web] refresh_seconds`` without reloading. Form posts are ``application/x-www-form-urlencoded`` and read
with the standard library, so no multipart parser is needed. ``/healthz`` and ``/metrics`` (``cxr_triage.web.ops``)
are for probes and Prometheus. The study page's viewer (a radiograph at its own resolution, its heatmap) reads
through ``cxr_triage.web.viewer``'s routes, under the same guard.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cxr_triage import CLASS_NAMES, __version__, log_name
from cxr_triage.core import db
from cxr_triage.core.settings import Settings
from cxr_triage.triage.flags import PRIORITIES
from cxr_triage.web import apidocs, auth, ops, viewer, worklist

logger = logging.getLogger(log_name(__name__))

TEMPLATES = Path(__file__).resolve().parent / "templates"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
OPEN_PATHS = ("/login", "/healthz", "/metrics", "/docs", "/openapi.json", "/static/")
"""Paths without patient data: served without a login (prefixes)."""
VIEW_AUDIT_MINUTES = 10


class FeedbackIn(BaseModel):
    """A radiologist's label for a study (``confirmed`` when it equals the model's)."""

    label: str = Field(description=f"one of {', '.join(CLASS_NAMES)}")
    comment: str | None = Field(default=None, max_length=2000)


def _parse_date(text: str | None, name: str) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise HTTPException(422, f"{name} must be a date (YYYY-MM-DD), not {text!r}") from exc


class _Context:
    """What every route shares: the web settings, the database and the page templates."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.web = settings.web
        self.engine = engine
        self.sessions = db.session_factory(engine)
        self.templates = Jinja2Templates(directory=str(TEMPLATES))

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with db.read_session(self.engine) as session:
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    def who(self, request: Request) -> auth.LoggedIn | None:
        with self.reading() as session:
            return auth.current(session, request.cookies.get(auth.COOKIE))

    def worklist(
        self, priority: str | None, since: str | None, until: str | None, status: str | None = None,
        read: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        if priority and priority not in (*PRIORITIES, "pending"):
            raise HTTPException(422, f"priority must be one of {', '.join(PRIORITIES)} or pending")
        if status and status not in worklist.STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(worklist.STATUSES)}")
        if read and read not in worklist.READ_STATES:
            raise HTTPException(422, f"read must be one of {', '.join(worklist.READ_STATES)}")
        with self.reading() as session:
            return worklist.worklist(
                session, self.web, priority, _parse_date(since, "since"), _parse_date(until, "until"), status, read
            )

    def study(self, uid: str, request: Request | None = None) -> dict[str, Any]:
        with self.reading() as session:
            record = worklist.study_detail(session, uid, self.web)
        if record is None:
            raise HTTPException(404, f"no study {uid}")
        if request is not None:
            self.audit_view(uid, request)
        return record

    def audit_view(self, uid: str, request: Request) -> None:
        """A ``study-viewed`` audit row for a logged-in reader, unless they touched the study a moment ago."""
        user = self.who(request)
        if user is None:
            return
        with self.writing() as session:
            if not auth.recently_audited(session, user.username, uid, VIEW_AUDIT_MINUTES):
                auth.audit(session, "study-viewed", user.username, _client(request), uid)

    def store_feedback(self, uid: str, user: auth.LoggedIn, label: str, comment: str | None, request: Request) -> dict:
        try:
            with self.writing() as session:
                record = worklist.record_feedback(session, uid, user.username, label, comment)
                auth.audit(session, "feedback", user.username, _client(request), uid, {
                    "label_before": record["label_before"], "label_after": label, "feedback_id": record["id"]
                })  # fmt: skip
        except worklist.FeedbackError as exc:
            raise HTTPException(422, str(exc)) from exc
        logger.info("feedback on study %s by %s: %s", uid, user.username, label)
        return record


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    """The application over ``engine``'s database with ``settings.web``."""
    ctx = _Context(settings, engine)
    app = FastAPI(
        title="cxr-triage worklist",
        version=__version__,
        description="Chest X-ray triage results, priorities and radiologist feedback. Research use only: not a "
        "medical device.",
        docs_url=None,  # served by apidocs from a local copy of Swagger UI (the CDN breaks the CSP and offline use)
        redoc_url=None,
    )
    _add_guard(app, ctx)
    _add_api_routes(app, ctx)
    _add_page_routes(app, ctx)
    _add_auth_routes(app, ctx)
    _add_feedback_form_route(app, ctx)
    app.include_router(viewer.router(ctx.reading, ctx.audit_view))  # the study page's radiograph and heatmap
    app.include_router(ops.router(settings, engine))
    app.include_router(apidocs.router(app.title))
    _add_error_handler(app)
    return app


def _add_guard(app: FastAPI, ctx: _Context) -> None:
    """Allowed networks and same-origin writes for every request, security headers on every response."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if not auth.address_allowed(_client(request), ctx.web.allowed_networks):
            return PlainTextResponse("this address may not use the worklist", status_code=403)
        if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(request):
            return PlainTextResponse("cross-site request refused", status_code=403)
        reading = request.method in ("GET", "HEAD") and not ctx.web.anonymous_read and not _open(request.url.path)
        if reading and await run_in_threadpool(ctx.who, request) is None:
            return _login_first(request)
        response: Response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def _add_api_routes(app: FastAPI, ctx: _Context) -> None:
    """The JSON API under ``/api/``."""

    @app.get("/api/worklist", summary="Studies by priority, then arrival")
    def api_worklist(
        priority: str | None = Query(None, description=f"one of {', '.join(PRIORITIES)} or pending"),
        since: str | None = Query(None, description="first arrival on or after this date (YYYY-MM-DD, UTC)"),
        until: str | None = Query(None, description="first arrival on or before this date (YYYY-MM-DD, UTC)"),
        status: str | None = Query(None, description=f"one of {', '.join(worklist.STATUSES)}"),
        read: str | None = Query(None, description="unread (no radiologist feedback yet) or read"),
    ) -> list[dict[str, Any]]:
        return ctx.worklist(priority, since, until, status, read)

    @app.get("/api/studies/{uid}", summary="One study: instances, reasons, SR UIDs, priority and feedback")
    def api_study(uid: str, request: Request) -> dict[str, Any]:
        return ctx.study(uid, request)

    @app.get("/api/feedback", summary="Every radiologist confirmation and correction")
    def api_feedback() -> list[dict[str, Any]]:
        with ctx.reading() as session:
            return worklist.feedback_list(session)

    @app.get("/api/feedback.csv", summary="Feedback as the training module's manifest CSV", response_class=Response)
    def api_feedback_csv() -> Response:
        with ctx.reading() as session:
            text = worklist.feedback_manifest(session)
        return Response(
            text, media_type="text/csv", headers={"Content-Disposition": "attachment; filename=feedback.csv"}
        )

    @app.post("/api/studies/{uid}/feedback", summary="Confirm or correct a study's label (session + X-CSRF-Token)")
    def api_post_feedback(uid: str, body: FeedbackIn, request: Request) -> dict[str, Any]:
        user = ctx.who(request)
        if user is None:
            raise HTTPException(401, "log in first")
        if not auth.csrf_ok(user, request.headers.get("X-CSRF-Token")):
            raise HTTPException(403, "missing or wrong CSRF token")
        return ctx.store_feedback(uid, user, body.label, body.comment, request)


def _add_page_routes(app: FastAPI, ctx: _Context) -> None:
    """The pages for people that only read: the worklist, a study, its thumbnails and the page script."""
    web = ctx.web

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_worklist(
        request: Request, priority: str = "", since: str = "", until: str = "", status: str = "", read: str = "unread"
    ) -> HTMLResponse:
        read = "" if read == "all" else read  # the page shows the unread studies unless asked for all
        rows = ctx.worklist(priority or None, since or None, until or None, status or None, read or None)
        filters = {"priority": priority, "since": since, "until": until, "status": status, "read": read or "all"}
        query = {k: v for k, v in filters.items() if v}
        models = sorted({r["model_version"] or r["priority_model_version"] for r in rows} - {None})
        return ctx.templates.TemplateResponse(request, "worklist.html", {
            "rows": rows, "user": ctx.who(request), "priorities": PRIORITIES, "filters": filters,
            "api_query": "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items() if v != "all"),
            "statuses": worklist.STATUSES, "models": models, "refresh_ms": int(web.refresh_seconds * 1000),
            "patient_fields": web.patient_fields, "viewer": bool(web.viewer_url),
        })  # fmt: skip

    @app.get("/studies/{uid}", response_class=HTMLResponse, include_in_schema=False)
    def page_study(request: Request, uid: str) -> HTMLResponse:
        record = ctx.study(uid, request)
        return ctx.templates.TemplateResponse(request, "study.html", {
            "study": record, "user": ctx.who(request), "classes": CLASS_NAMES, "patient_fields": web.patient_fields,
        })  # fmt: skip

    @app.get("/thumbnails/{instance_id}.png", include_in_schema=False)
    def thumbnail(instance_id: int) -> FileResponse:
        with ctx.reading() as session:
            path = worklist.thumbnail_path(session, instance_id)
        if path is None:
            raise HTTPException(404, "no thumbnail")
        return FileResponse(path, media_type="image/png")

    @app.get("/static/worklist.js", include_in_schema=False)
    def script() -> Response:
        return Response((TEMPLATES / "worklist.js").read_text(encoding="utf-8"), media_type="text/javascript")


def _add_auth_routes(app: FastAPI, ctx: _Context) -> None:
    """Logging in and out: a session cookie, each attempt and logout audited."""
    web = ctx.web

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def page_login(request: Request, next: str = "/", failed: bool = False) -> HTMLResponse:
        return ctx.templates.TemplateResponse(
            request, "login.html", {"next": _local(next), "failed": failed, "user": None}
        )

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await _form(request)
        username, password, target = form.get("username", ""), form.get("password", ""), _local(form.get("next"))
        return await run_in_threadpool(_login, request, username, password, target)

    def _login(request: Request, username: str, password: str, target: str) -> Response:
        with ctx.writing() as session:
            if not auth.verify_password(session, username, password):
                auth.audit(session, "login-failed", username[:64] or None, _client(request))
                return RedirectResponse(f"/login?failed=1&next={quote(target)}", status_code=303)
            token, _ = auth.open_session(session, username.strip(), web.session_hours)
            auth.audit(session, "login", username.strip(), _client(request))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.COOKIE, token, max_age=int(web.session_hours * 3600), httponly=True, samesite="strict",
            secure=web.secure_cookies, path="/",
        )  # fmt: skip
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await _form(request)
        return await run_in_threadpool(_logout, request, form.get("csrf"))

    def _logout(request: Request, csrf: str | None) -> Response:
        user = ctx.who(request)
        if not auth.csrf_ok(user, csrf):
            raise HTTPException(403, "missing or wrong CSRF token")
        with ctx.writing() as session:
            auth.close_session(session, request.cookies.get(auth.COOKIE))
            auth.audit(session, "logout", user.username if user else None, _client(request))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(auth.COOKIE, path="/")
        return response


def _add_feedback_form_route(app: FastAPI, ctx: _Context) -> None:
    """The study page's feedback form: without a session it sends the browser to log in first."""

    @app.post("/studies/{uid}/feedback", include_in_schema=False)
    async def form_feedback(request: Request, uid: str) -> Response:
        form = await _form(request)
        return await run_in_threadpool(_form_feedback, request, uid, form)

    def _form_feedback(request: Request, uid: str, form: dict[str, str]) -> Response:
        user = ctx.who(request)
        if user is None:
            return RedirectResponse(f"/login?next={quote('/studies/' + uid)}", status_code=303)
        if not auth.csrf_ok(user, form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token")
        ctx.store_feedback(uid, user, form.get("label", ""), form.get("comment"), request)
        return RedirectResponse(f"/studies/{quote(uid)}", status_code=303)


def _add_error_handler(app: FastAPI) -> None:
    """Errors as JSON under ``/api/``, as plain text on the pages."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the last value of each)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "expected an application/x-www-form-urlencoded form")
    body = await request.body()
    if len(body) > 64 * 1024:
        raise HTTPException(413, "form too large")
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _same_origin(request: Request) -> bool:
    """A write must come from this site: an Origin (or, without one, a Referer) naming another host is refused."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # no browser sends a cross-site form without Origin; API clients without one need the token
    if origin == "null":
        return False
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "")


def _open(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) or path.startswith(p + "/") for p in OPEN_PATHS)


def _login_first(request: Request) -> Response:
    """An anonymous read: 401 from the API, the login page (then back here) for a page."""
    if request.url.path.startswith("/api/") or request.url.path.startswith("/thumbnails/"):
        return JSONResponse({"detail": "log in first"}, status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(_local(target), safe='')}", status_code=303)


def _local(target: str | None) -> str:
    """Only a path on this site may be a redirect target (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
