"""The classifier a worker runs: loaded from ``[model] path`` (or the bundled model), reloaded when the file
changes, registered in the database (``cxr_triage.registry``) before it classifies anything.

Without a model (or with an unreadable one before any was loaded) ``current()`` is None and says so loudly, at
most every ``MODEL_WARNING_INTERVAL`` seconds: acknowledged instances stay queued until a model is configured. A
model that becomes unreadable after it was loaded is kept. A failed registration (database unreachable) leaves
the worker without a model until a later call succeeds, so no result names an unregistered model.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.settings import ModelSettings

if TYPE_CHECKING:
    from cxr_triage.inference import Predictor

logger = logging.getLogger(__name__)

MODEL_WARNING_INTERVAL = 300.0
"""Seconds between repeats of the loud no-model warning."""


class ModelStore:
    """Holds the current ``Predictor`` of one worker."""

    def __init__(self, settings: ModelSettings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.predictor: Predictor | None = None
        self._key: tuple[str, float] | None = None
        self._last_warning = 0.0

    def current(self) -> tuple[Predictor | None, bool]:
        """The predictor to use now, and whether it was (re)loaded by this call."""
        from cxr_triage.checkpoint import CheckpointError, load_classifier, resolve_model_path

        configured = self.settings.path
        try:
            path = resolve_model_path(configured or None)
            key = (str(path), path.stat().st_mtime)
            if self.predictor is not None and key == self._key:
                return self.predictor, False
            loaded = load_classifier(path)
        except (CheckpointError, OSError) as exc:
            if self.predictor is not None:
                logger.error("model %s became unusable (%s); keeping the loaded one", configured, exc)
                return self.predictor, False
            if not self._last_warning or time.monotonic() - self._last_warning > MODEL_WARNING_INTERVAL:
                self._last_warning = time.monotonic()
                logger.warning(
                    "NO MODEL - received instances stay queued and nothing is classified until a model is "
                    "configured. %s",
                    exc,
                )
            return None, False
        from cxr_triage import registry
        from cxr_triage.inference import Predictor

        try:
            registry.register_model(self.sessions, loaded)
        except SQLAlchemyError as exc:
            logger.error("cannot register model %s in the database (%s); retrying", loaded.sha256[:12], exc)
            return self.predictor, False
        settings = self.settings
        self.predictor = Predictor(
            loaded, device=settings.device, batch_size=settings.batch_size, precision=settings.precision
        )
        self._key = key
        logger.info(
            "model %s (sha256 %s) loaded from %s on %s in %s",
            loaded.card.model_version,
            loaded.sha256[:12],
            path,
            self.predictor.device,
            self.predictor.precision,
        )
        return self.predictor, True
