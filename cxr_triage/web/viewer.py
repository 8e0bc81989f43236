"""The study page's viewer: routes for a radiograph's pixels at its own resolution, its heatmap, and the script.

- ``GET /api/instances/{id}/radiograph``: what the browser needs to show the instance (rows, columns, the coding of
  the modality values, the window, MONOCHROME1), or, when the spool file is gone (``[storage]
  spool_retention_days``) or cannot be shown, ``available: false`` with the reason and the 224x224 thumbnail's
  address; whether a heatmap exists.
- ``GET /api/instances/{id}/radiograph.raw``: the pixels, little-endian uint16, row-major (``cxr_triage.web.
  radiograph``; 404 when not available).
- ``GET /api/instances/{id}/heatmap``: the coarse map (``instances.heatmap_path``, written by the worker) as JSON;
  404 when there is none.
- ``GET /static/viewer.js``: the page's script (plain JS and a canvas: zoom, pan, window/level, the overlay).

These are reads under ``/api/``: the application's guard asks for a login unless ``[web] anonymous_read`` and
limits them to ``[web] allowed_networks``. Nothing here writes, except the ``study-viewed`` audit row of the
instance's study that ``audit_view`` leaves for a logged-in reader (once a moment, as the study page does).
Responses with pixels are ``Cache-Control: private, no-store``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.core import db
from cxr_triage.web import radiograph

SCRIPT = Path(__file__).resolve().parent / "templates" / "viewer.js"
NO_STORE = {"Cache-Control": "private, no-store"}


def _instance(reading: Callable[[], AbstractContextManager[Session]], instance_id: int) -> db.Instance:
    with reading() as session:
        instance = session.scalar(select(db.Instance).where(db.Instance.id == instance_id))
        if instance is None:
            raise HTTPException(404, f"no instance {instance_id}")
        session.expunge(instance)
    return instance


def _spool(instance: db.Instance) -> Path:
    if instance.spool_removed_at is not None:
        raise radiograph.Unavailable("the received file is no longer kept (spool retention)")
    return Path(instance.spool_path)


def router(
    reading: Callable[[], AbstractContextManager[Session]], audit_view: Callable[[str, Request], None]
) -> APIRouter:
    """The viewer's routes over ``reading``'s database; ``audit_view(study_uid, request)`` records a view."""
    routes = APIRouter()
    cache = radiograph.Cache()

    @routes.get("/api/instances/{instance_id}/radiograph", summary="How to show an instance's radiograph")
    def describe(instance_id: int, request: Request) -> Response:
        instance = _instance(reading, instance_id)
        audit_view(instance.study_instance_uid, request)
        record: dict[str, Any] = {
            "instance_id": instance.id,
            "study_instance_uid": instance.study_instance_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "heatmap": f"/api/instances/{instance.id}/heatmap" if _heatmap_file(instance) else None,
        }
        try:
            shown = cache.get(_spool(instance))
        except radiograph.Unavailable as exc:
            thumbnail = instance.thumbnail_path is not None and Path(instance.thumbnail_path).is_file()
            record |= {"available": False, "reason": str(exc),
                       "thumbnail": f"/thumbnails/{instance.id}.png" if thumbnail else None}  # fmt: skip
        else:
            record |= {"available": True, **shown.describe(), "pixels": f"/api/instances/{instance.id}/radiograph.raw"}
        return _json(record)

    @routes.get(
        "/api/instances/{instance_id}/radiograph.raw",
        summary="An instance's pixels: modality values coded as little-endian uint16, row-major",
        response_class=Response,
    )
    def pixels(instance_id: int, request: Request) -> Response:
        instance = _instance(reading, instance_id)
        audit_view(instance.study_instance_uid, request)
        try:
            shown = cache.get(_spool(instance))
        except radiograph.Unavailable as exc:
            raise HTTPException(404, str(exc)) from exc
        rows, columns = shown.values.shape
        headers = {**NO_STORE, "X-Rows": str(rows), "X-Columns": str(columns)}
        return Response(shown.pixel_bytes(), media_type="application/octet-stream", headers=headers)

    @routes.get("/api/instances/{instance_id}/heatmap", summary="Where the model looked: the coarse map in [0, 1]")
    def heatmap(instance_id: int) -> Response:
        instance = _instance(reading, instance_id)
        values = radiograph.heatmap(instance.heatmap_path)
        if values is None:
            raise HTTPException(404, f"no heatmap for instance {instance_id}")
        return _json(values)

    @routes.get("/static/viewer.js", include_in_schema=False)
    def script() -> Response:
        return Response(SCRIPT.read_text(encoding="utf-8"), media_type="text/javascript")

    return routes


def _heatmap_file(instance: db.Instance) -> bool:
    return bool(instance.heatmap_path) and Path(str(instance.heatmap_path)).is_file()


def _json(record: dict[str, Any]) -> Response:
    import json

    return Response(json.dumps(record), media_type="application/json", headers=NO_STORE)
