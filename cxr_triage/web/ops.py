"""The operations endpoints of the web app: ``/healthz`` for probes and ``/metrics`` for Prometheus.

Neither needs a login (probes and scrapers have none) and neither shows patient data: ``/healthz`` answers 200
when every check of ``cxr_triage.ops.health`` passes and 503 with the failing ones named; ``/metrics`` is the text
exposition of ``cxr_triage.ops.metrics`` (OpenMetrics when the scraper asks for it), switched off with ``[web]
metrics = false``. ``[web] allowed_networks`` applies to them as to every page. Both read the database under
one ``TimedReader``, so a database that hangs makes them answer late by at most ``health.DATABASE_TIMEOUT``
seconds, never hang.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from sqlalchemy import Engine

from cxr_triage.core.settings import Settings
from cxr_triage.ops import health, metrics

NO_CACHE = {"Cache-Control": "no-store"}


def router(settings: Settings, engine: Engine) -> APIRouter:
    """``/healthz`` and, unless ``[web] metrics = false``, ``/metrics`` over ``engine``'s database."""
    reader = health.TimedReader(health.DATABASE_TIMEOUT)
    checker = health.HealthChecker(settings, engine, reader)
    routes = APIRouter(tags=["operations"])

    @routes.get(
        "/healthz",
        summary="Health: database, model, spool space, queue age (200 when all pass, 503 naming the failing)",
        response_model=None,
    )
    def healthz() -> JSONResponse:
        report = checker.check()
        return JSONResponse(report.as_dict(), status_code=200 if report.healthy else 503, headers=NO_CACHE)

    if settings.web.metrics:
        registry = metrics.make_registry(settings, engine, reader)

        @routes.get("/metrics", summary="Prometheus metrics of the whole pipeline", response_class=Response)
        def prometheus_metrics(request: Request) -> Response:
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encode(registry), media_type=content_type, headers=NO_CACHE)

    return routes
