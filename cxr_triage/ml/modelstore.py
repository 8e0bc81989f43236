"""The classifier a worker runs: the model registry's champion (``cxr_triage.ml.registry``), swapped between batches.

``current()`` is asked once per claimed batch. At most every ``[model] reload_interval`` seconds (on every call
while the worker has no model) it looks at two things:

1. the configured checkpoint (``[model] path``, else the bundled model): when its file is new or changed and the
   registry does not know its sha256, it is checked, copied into ``[model] models_dir`` and promoted with the
   reason "configured" (deploying a model by configuration is a promotion); a file the registry knows already
   changes nothing, so a promotion or rollback made with ``cxr-triage models`` outlives a restart;
2. the champion: when it is not the model loaded, its file (``registry.model_file``) is loaded, checked against
   the registered sha256 and used from the next batch on. A batch that has started finishes with the model it
   started with (``pipeline.Classified.model``), and nothing queued is touched, so a swap loses no work; the
   listener runs apart from the workers and never notices.

Without a model (no champion, or an unreadable one before any was loaded) ``current()`` is None and says so
loudly, at most every ``MODEL_WARNING_INTERVAL`` seconds: acknowledged instances stay queued until a model is
configured. A champion that cannot be loaded after another model was loaded leaves that one running, with an
error in the log. While the registry cannot be read (database unreachable) the loaded model is kept; a worker
that has none stays without one until a read succeeds, so no result names an unregistered model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core.settings import ModelSettings
from cxr_triage.ml import registry

if TYPE_CHECKING:
    from cxr_triage.ml.checkpoint import LoadedModel
    from cxr_triage.ml.inference import Predictor

logger = logging.getLogger(log_name(__name__))

MODEL_WARNING_INTERVAL = 300.0
"""Seconds between repeats of the loud no-model warning."""


class ModelStore:
    """Holds the current ``Predictor`` of one worker."""

    def __init__(self, settings: ModelSettings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.predictor: Predictor | None = None
        self._next_check = 0.0
        self._configured_key: tuple[str, int, int] | None = None
        self._configured_problem = ""
        self._reported_problem = ""
        self._fresh: LoadedModel | None = None  # the configured file just deployed, to load it only once
        self._failed: tuple[str, str] | None = None  # (sha256, why) of the champion that last failed to load
        self._last_warning = 0.0

    def current(self) -> tuple[Predictor | None, bool]:
        """The predictor to use now, and whether it was (re)loaded by this call."""
        now = time.monotonic()
        if self.predictor is not None and now < self._next_check:
            return self.predictor, False
        self._next_check = now + self.settings.reload_interval
        try:
            self._deploy_configured()
            target = registry.champion(self.sessions)
        except SQLAlchemyError as exc:
            logger.error("cannot read the model registry in the database (%s); retrying", exc)
            return self.predictor, False
        if target is None:
            return self._without_model(self._configured_problem or "the model registry has no champion")
        if self._configured_problem and self._configured_problem != self._reported_problem:
            logger.warning("%s; the registry's champion, version %d, runs", self._configured_problem, target.id)
        self._reported_problem = self._configured_problem
        if self.predictor is not None and self.predictor.loaded.sha256 == target.sha256:
            return self.predictor, False
        loaded = self._load(target)
        if loaded is None:
            return self._without_model(self._failed[1] if self._failed else "")
        return self._use(loaded, target), True

    def _deploy_configured(self) -> None:
        """Register and promote the configured checkpoint if its file is new to the registry (module docstring)."""
        from cxr_triage.files import file_sha256
        from cxr_triage.ml.checkpoint import CheckpointError, load_classifier, resolve_model_path

        configured = self.settings.path
        try:
            path = resolve_model_path(configured or None)
            stat = path.stat()
        except (CheckpointError, OSError) as exc:
            self._configured_key, self._configured_problem = None, str(exc)
            return
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key == self._configured_key:
            return
        try:
            known = registry.find(self.sessions, file_sha256(path))
            if known is None or registry.champion(self.sessions) is None:
                loaded = load_classifier(path)
                stored = registry.store_model_file(path, self.settings.models_dir)
                version_id, promoted = registry.deploy_configured(self.sessions, loaded, stored)
                if promoted:
                    self._fresh = dataclasses.replace(loaded, path=stored)
                    logger.info(
                        "configured model %s (sha256 %s) from %s is registered as version %d and is the champion",
                        loaded.card.model_version,
                        loaded.sha256[:12],
                        path,
                        version_id,
                    )
        except (CheckpointError, OSError) as exc:
            self._configured_key, self._configured_problem = key, str(exc)
            logger.error("configured model %s is not usable (%s); the registry's champion stays", path, exc)
            return
        self._configured_key, self._configured_problem = key, ""

    def _load(self, target: registry.RegisteredModel) -> LoadedModel | None:
        """The champion's checkpoint, loaded and checked against its registered sha256; None (logged) if it can't."""
        from cxr_triage.ml.checkpoint import CheckpointError, load_classifier

        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh.sha256 == target.sha256:
            return fresh
        path = registry.model_file(target, self.settings.models_dir)
        why = ""
        if path is None:
            why = (
                f"the champion, version {target.id} ({target.version}), has no file with sha256 {target.sha256[:12]} "
                f"at {target.path} or in {self.settings.models_dir}"
            )
        else:
            try:
                loaded = load_classifier(path)
            except (CheckpointError, OSError) as exc:
                why = f"the champion, version {target.id} ({target.version}), cannot be loaded: {exc}"
            else:
                if loaded.sha256 == target.sha256:
                    self._failed = None
                    return loaded
                why = f"the champion's file {path} changed while it was loaded"
        if self._failed != (target.sha256, why):
            self._failed = (target.sha256, why)
            if self.predictor is not None:
                logger.error("%s; keeping model %s", why, self.predictor.model_version)
        return None

    def _use(self, loaded: LoadedModel, target: registry.RegisteredModel) -> Predictor:
        from cxr_triage.ml.inference import Predictor

        settings = self.settings
        previous = self.predictor
        self.predictor = Predictor(
            loaded, device=settings.device, batch_size=settings.batch_size, precision=settings.precision
        )
        logger.info(
            "model %s (sha256 %s, registry version %d, the champion) loaded from %s on %s in %s%s",
            loaded.card.model_version,
            loaded.sha256[:12],
            target.id,
            loaded.path,
            self.predictor.device,
            self.predictor.precision,
            f"; replaces {previous.model_version} from the next batch" if previous is not None else "",
        )
        return self.predictor

    def _without_model(self, why: str) -> tuple[Predictor | None, bool]:
        if self.predictor is not None:
            return self.predictor, False
        if not self._last_warning or time.monotonic() - self._last_warning > MODEL_WARNING_INTERVAL:
            self._last_warning = time.monotonic()
            logger.warning(
                "NO MODEL - received instances stay queued and nothing is classified until a model is configured. %s",
                why,
            )
        return None, False
