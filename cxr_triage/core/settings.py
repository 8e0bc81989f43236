"""Typed settings: the configuration (``cxr_triage.core.config``) as one frozen dataclass per section, checked once.

``load_settings`` reads the TOML defaults, the file and the environment (``cxr_triage.core.config``), then builds
``Settings``; every section validates its values at construction and a bad value raises ``ConfigError`` naming
the key (``[forward] destinations[1]: destination port must be ...``). The forwarding destinations are parsed and
the TLS files of the listener and of forwarding are loaded here too, so that a mistake stops ``serve`` at start-up
instead of failing the first report hours later. Components take the section they need (the listener its
``ListenerSettings``, the recorder ``SRSettings`` and ``ForwardSettings``, ...).

Settings are plain values (picklable): ``serve`` hands them to its worker processes. TLS contexts are therefore
not stored but built on demand by ``server_tls_context`` / ``client_tls_context``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

from cxr_triage import PRECISIONS
from cxr_triage.core.config import ConfigError, load_config, merge
from cxr_triage.core.dicomweb import DicomwebSettings
from cxr_triage.core.endpoints import (
    Destination,
    OrthancEndpoint,
    client_tls_context,
    validate_ae_title,
)
from cxr_triage.core.fhirsettings import FHIRSettings
from cxr_triage.core.hl7settings import HL7Settings

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"[{section}] {name} = {value!r}: must be {bound}")


def _from_table(cls: type[Any], section: str, table: Mapping[str, Any], **converted: Any) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in table.items() if k in known}
    values.update(converted)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] {exc}") from exc


@dataclass(frozen=True)
class ListenerSettings:
    """``[listener]``: the DICOM SCP."""

    ae_title: str = "CXR_TRIAGE"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 32
    max_pdu: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    association_request_timeout: float = 5.0
    max_connections_per_peer: int = 32
    allowed_calling_aes: tuple[str, ...] = ()
    require_called_ae: bool = True
    tls_enabled: bool = False
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_file: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "ae_title"))
        object.__setattr__(
            self,
            "allowed_calling_aes",
            tuple(validate_ae_title(a, "allowed_calling_aes entry") for a in self.allowed_calling_aes),
        )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port = {self.port}: must be within 0-65535 (0: any free port)")
        if self.max_associations < 1:
            raise ValueError(f"max_associations = {self.max_associations}: must be >= 1")
        if self.max_pdu < 0:
            raise ValueError(f"max_pdu = {self.max_pdu}: must be >= 0 (0 = unlimited)")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "association_request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0")
        if self.max_connections_per_peer < 1:
            raise ValueError(f"max_connections_per_peer = {self.max_connections_per_peer}: must be >= 1")
        if self.tls_enabled and (not self.tls_certificate or not self.tls_private_key):
            raise ValueError("tls_enabled needs tls_certificate and tls_private_key")

    def server_tls_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None when TLS is off (client certificates required with a CA file)."""
        if not self.tls_enabled:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile=self.tls_certificate, keyfile=self.tls_private_key)
        if self.tls_ca_file:
            context.load_verify_locations(cafile=self.tls_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class StorageSettings:
    """``[storage]``: the spool of received instances and the folder of Structured Reports."""

    spool_dir: Path = Path("var/spool")
    sr_dir: Path = Path("var/sr")
    thumbnail_dir: Path = Path("var/thumbnails")
    min_free_mb: float = 512.0
    spool_retention_days: float = 7.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        object.__setattr__(self, "sr_dir", Path(self.sr_dir))
        object.__setattr__(self, "thumbnail_dir", Path(self.thumbnail_dir))
        if self.min_free_mb < 0 or self.spool_retention_days < 0:
            raise ValueError("min_free_mb and spool_retention_days must be >= 0")


@dataclass(frozen=True)
class DatabaseSettings:
    """``[database]``: the SQLAlchemy URL."""

    url: str = "sqlite:///var/cxr-triage.sqlite"
    echo: bool = False

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ValueError("url is empty")


@dataclass(frozen=True)
class ModelSettings:
    """``[model]``: which classifier runs where, and how."""

    path: str = ""
    device: str = "auto"
    batch_size: int = 16
    precision: str = "auto"
    models_dir: Path = Path("var/models")
    """The model registry's files (``cxr_triage.ml.registry``); ``""`` in the file: beside ``[storage] spool_dir``."""
    reload_interval: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        if self.reload_interval <= 0:
            raise ValueError(f"reload_interval = {self.reload_interval}: must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size}: must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        base = self.device.split(":", 1)[0]
        if base not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device = {self.device!r}: expected auto, cpu, cuda or cuda:N")


def _model_settings(model: Mapping[str, Any], storage: Mapping[str, Any]) -> ModelSettings:
    """``[model]``, an empty ``models_dir`` put beside the spool folder (``var/models`` by default)."""
    table = dict(model)
    if not str(table.get("models_dir") or ""):
        table["models_dir"] = Path(str(storage.get("spool_dir") or StorageSettings.spool_dir)).parent / "models"
    settings: ModelSettings = _from_table(ModelSettings, "model", table)
    return settings


AUTO = "auto"
"""A ``[worker]`` count chosen from the machine's cores (``cxr_triage.triage.worker.worker_layout``)."""


@dataclass(frozen=True)
class WorkerSettings:
    """``[worker]``: queue claims, leases, retries and the study quiet period."""

    processes: int | str = AUTO
    threads: int | str = AUTO
    poll_interval: float = 0.5
    claim_batch: int = 16
    lease_seconds: float = 600.0
    max_attempts: int = 3
    study_quiet_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name, minimum in (("processes", 0), ("threads", 1)):
            value = getattr(self, name)
            if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                raise ValueError(f'{name} = {value!r}: must be "auto" or a whole number >= {minimum}')
        if self.claim_batch < 1 or self.max_attempts < 1:
            raise ValueError("claim_batch and max_attempts must be >= 1")
        if self.poll_interval <= 0 or self.lease_seconds <= 0 or self.study_quiet_seconds < 0:
            raise ValueError("poll_interval and lease_seconds must be > 0, study_quiet_seconds >= 0")


@dataclass(frozen=True)
class TriageSettings:
    """``[triage]``: the probability thresholds of the worklist priorities (``cxr_triage.triage.flags``)."""

    covid_threshold: float = 0.5
    pneumonia_threshold: float = 0.5
    review_below: float = 0.6

    def __post_init__(self) -> None:
        for name in ("covid_threshold", "pneumonia_threshold", "review_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be within 0-1")


@dataclass(frozen=True)
class GateSettings:
    """``[gate]``: the typicality gate that refuses images unlike a chest radiograph (``cxr_triage.ml.gate``)."""

    enabled: bool = True
    path: str = ""
    false_refusal_rate: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.false_refusal_rate < 0.5:
            raise ValueError(f"false_refusal_rate = {self.false_refusal_rate}: must be between 0 and 0.5")


@dataclass(frozen=True)
class HeatmapSettings:
    """``[heatmap]``: where the model looked (``cxr_triage.ml.heatmap``, docs/HEATMAP.md)."""

    enabled: bool = True
    method: str = "gradcam"
    dir: str = ""  # the worker's 14x14 maps (.npy); empty: "heatmaps" beside [storage] thumbnail_dir
    pacs_object: str = "secondary-capture"  # filed with each SR (outputs.heatmapobject), or "none"
    opacity: float = 0.4
    series_description: str = "cxr-triage AI heatmap NOT FOR DIAGNOSIS"

    def __post_init__(self) -> None:
        if self.method != "gradcam":
            raise ValueError(f"method = {self.method!r}: expected gradcam")
        if self.pacs_object not in ("secondary-capture", "none") or not 0.0 < self.opacity <= 1.0:
            raise ValueError(f"pacs_object = {self.pacs_object!r} (secondary-capture, none), opacity in (0, 1]")

    def folder(self, storage: StorageSettings) -> Path:
        """Where the worker stores the maps: ``dir``, or ``heatmaps`` beside the thumbnails."""
        return Path(self.dir) if self.dir else Path(storage.thumbnail_dir).parent / "heatmaps"


@dataclass(frozen=True)
class SRSettings:
    """``[sr]``: the Structured Report written for each classified instance."""

    enabled: bool = True
    institution_name: str = ""
    manufacturer: str = "cxr-triage project"
    series_description: str = "cxr-triage AI triage (research use only)"


@dataclass(frozen=True)
class ForwardSettings:
    """``[forward]``: where the Structured Reports go, and how failures are retried."""

    destinations: tuple[Destination, ...] = ()
    calling_ae_title: str = "CXR_TRIAGE"
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    timeout: float = 30.0
    tls_ca_file: str = ""
    tls_certificate: str = ""
    tls_private_key: str = ""
    orthanc: tuple[OrthancEndpoint, ...] = ()
    """The destinations that are Orthanc (``orthanc_url`` in their entry): their priority goes in as metadata."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "calling_ae_title", validate_ae_title(self.calling_ae_title, "calling_ae_title"))
        if self.max_attempts < 1 or self.timeout <= 0 or self.backoff_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("max_attempts must be >= 1, timeout > 0, backoff_seconds and backoff_max_seconds >= 0")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Self:
        parsed, orthanc = [], []
        for index, entry in enumerate(table.get("destinations", ())):
            try:
                is_table = isinstance(entry, Mapping)
                dicom = {k: v for k, v in entry.items() if not k.startswith("orthanc_")} if is_table else entry
                parsed.append(Destination.from_mapping(dicom))
                rest = {k.removeprefix("orthanc_"): v for k, v in entry.items() if k.startswith("orthanc_")}
                if set(rest) - {"url", "username", "password"}:
                    raise ValueError(f"unknown keys {sorted(set(rest) - {'url', 'username', 'password'})}")
                if rest:
                    if "url" not in rest:
                        raise ValueError("orthanc_username / orthanc_password need orthanc_url")
                    orthanc.append(OrthancEndpoint(destination=str(parsed[-1]), **rest))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"[forward] destinations[{index}]: {exc}") from exc
        settings: Self = _from_table(cls, "forward", table, destinations=tuple(parsed), orthanc=tuple(orthanc))
        if any(d.tls for d in settings.destinations):
            try:
                settings.client_tls_context()
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"[forward] tls_*: cannot load the TLS files: {exc}") from exc
        return settings

    def client_tls_context(self) -> ssl.SSLContext:
        """The client TLS context for destinations with ``tls = true``."""
        return client_tls_context(self.tls_ca_file, self.tls_certificate, self.tls_private_key)

    def destination(self, text: str) -> Destination:
        """``AE@host:port`` (how a forward row names its destination) back to a Destination: the configured one of
        that name, with its ``tls`` setting, else a plain one (a destination removed from the configuration)."""
        for destination in self.destinations:
            if str(destination) == text:
                return destination
        ae_title, _, rest = text.partition("@")
        host, _, port = rest.rpartition(":")
        return Destination(ae_title=ae_title, host=host, port=int(port))


WEB_PATIENT_FIELDS: tuple[str, ...] = (
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientAge",
    "StudyDescription",
)
"""Header attributes the worklist may show, when ``[web] patient_fields`` lists them."""


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: the worklist page and its JSON API (``cxr-triage web``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    allowed_networks: tuple[str, ...] = ()
    refresh_seconds: float = 10.0
    session_hours: float = 8.0
    secure_cookies: bool = False
    patient_fields: tuple[str, ...] = ("AccessionNumber",)
    metrics: bool = True
    max_queue_age_seconds: float = 300.0
    anonymous_read: bool = False
    viewer_url: str = ""

    def __post_init__(self) -> None:
        import ipaddress

        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "patient_fields", tuple(self.patient_fields))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port = {self.port}: must be within 0-65535")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks entry {network!r}: {exc}") from exc
        unknown = sorted(set(self.patient_fields) - set(WEB_PATIENT_FIELDS))
        if unknown:
            raise ValueError(f"patient_fields {unknown}: allowed are {', '.join(WEB_PATIENT_FIELDS)}")
        if self.viewer_url and "{StudyInstanceUID}" not in self.viewer_url:
            raise ValueError(f"viewer_url = {self.viewer_url!r}: must contain {{StudyInstanceUID}}")
        if self.viewer_url and not self.viewer_url.startswith(("http://", "https://", "/")):
            raise ValueError(f"viewer_url = {self.viewer_url!r}: must be an http(s) URL or a path on this site")
        if self.refresh_seconds <= 0 or self.session_hours <= 0 or self.max_queue_age_seconds <= 0:
            raise ValueError("refresh_seconds, session_hours and max_queue_age_seconds must be > 0")


@dataclass(frozen=True)
class RetrainSettings:
    """``[retrain]``: scheduled retraining with champion/challenger promotion (``cxr_triage.retrain.retraining``)."""

    enabled: bool = False
    schedule: str = "0 2 * * 0"
    timezone: str = ""
    min_new_labels: int = 100
    replay_ratio: float = 2.0
    head_epochs: int = 1
    head_learning_rate: float = 1e-4
    epochs: int = 2
    learning_rate: float = 3e-5
    batch_size: int = 16
    validation_images: int = 512
    margin: float = 0.005
    sensitivity_tolerance: float = 0.02
    base_pack: str = ""
    eval_manifest: str = ""
    work_dir: Path = Path("var/retrain")
    device: str = "auto"
    precision: str = "auto"
    timeout: float = 7200.0
    lock_seconds: float = 60.0
    nice: int = 10
    python: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(self.work_dir))
        try:
            self.trigger()
        except (ValueError, KeyError, LookupError) as exc:
            raise ValueError(f"schedule = {self.schedule!r} / timezone = {self.timezone!r}: {exc}") from exc
        if self.min_new_labels < 1 or self.batch_size < 1 or self.validation_images < 1:
            raise ValueError("min_new_labels, batch_size and validation_images must be >= 1")
        if self.head_epochs < 0 or self.epochs < 0 or self.head_epochs + self.epochs < 1:
            raise ValueError("head_epochs and epochs must be >= 0, and at least one of them >= 1")
        if self.replay_ratio < 0 or self.learning_rate <= 0 or self.head_learning_rate <= 0 or self.margin < 0:
            raise ValueError("replay_ratio and margin must be >= 0, learning_rate and head_learning_rate > 0")
        if not 0.0 <= self.sensitivity_tolerance <= 1.0:
            raise ValueError(f"sensitivity_tolerance = {self.sensitivity_tolerance}: must be within 0-1")
        if self.timeout <= 0 or self.lock_seconds < 3:
            raise ValueError("timeout must be > 0 and lock_seconds >= 3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.device.split(":", 1)[0] not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device = {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not -20 <= self.nice <= 19:
            raise ValueError(f"nice = {self.nice}: must be within -20..19")
        if self.enabled and not self.base_pack:
            raise ValueError("enabled needs base_pack (the pack of the base data: replay and the evaluation set)")

    def trigger(self) -> Any:
        """The schedule as an APScheduler ``CronTrigger`` (standard five-field crontab: minute hour day month
        day-of-week, Sunday = 0), in ``timezone`` (an IANA name; empty: this machine's local zone)."""
        from cxr_triage.core.schedlock import crontab_trigger

        return crontab_trigger(self.schedule, self.timezone)


@dataclass(frozen=True)
class LoggingSettings:
    """``[logging]``."""

    level: str = "INFO"

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", self.level.upper())
        if self.level not in LOG_LEVELS:
            raise ValueError(f"level = {self.level!r}: expected one of {', '.join(LOG_LEVELS)}")


@dataclass(frozen=True)
class Settings:
    """The whole configuration, typed; ``values`` keeps the plain tables (what ``status --json`` reports)."""

    listener: ListenerSettings = field(default_factory=ListenerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    triage: TriageSettings = field(default_factory=TriageSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    sr: SRSettings = field(default_factory=SRSettings)
    heatmap: HeatmapSettings = field(default_factory=HeatmapSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    hl7: HL7Settings = field(default_factory=HL7Settings)
    fhir: FHIRSettings = field(default_factory=FHIRSettings)
    dicomweb: DicomwebSettings = field(default_factory=DicomwebSettings)
    web: WebSettings = field(default_factory=WebSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: Path | None = None
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_values(cls, values: Mapping[str, Mapping[str, Any]], source: Path | None = None) -> Self:
        """Typed settings from configuration tables (``cxr_triage.core.config``'s output, or a test's dict)."""
        listener = dict(values["listener"])
        listener["allowed_calling_aes"] = tuple(listener.get("allowed_calling_aes", ()))
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            listener[name] = float(listener[name])
        settings = cls(
            listener=_from_table(ListenerSettings, "listener", listener),
            storage=_from_table(StorageSettings, "storage", values["storage"]),
            database=_from_table(DatabaseSettings, "database", values["database"]),
            model=_model_settings(values["model"], values["storage"]),
            worker=_from_table(WorkerSettings, "worker", values["worker"]),
            triage=_from_table(TriageSettings, "triage", values["triage"]),
            gate=_from_table(GateSettings, "gate", values.get("gate", {})),
            sr=_from_table(SRSettings, "sr", values["sr"]),
            heatmap=_from_table(HeatmapSettings, "heatmap", values.get("heatmap", {})),
            forward=ForwardSettings.from_table(values["forward"]),
            hl7=HL7Settings.from_table(values.get("hl7", {})),
            fhir=FHIRSettings.from_table(values.get("fhir", {})),
            dicomweb=DicomwebSettings.from_config(values.get("dicomweb", {})),
            web=_from_table(WebSettings, "web", values["web"]),
            retrain=_from_table(RetrainSettings, "retrain", values.get("retrain", {})),
            logging=_from_table(LoggingSettings, "logging", values["logging"]),
            source=source,
            values={k: dict(v) for k, v in values.items()},
        )
        if settings.listener.tls_enabled:
            try:
                settings.listener.server_tls_context()
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[listener] tls_*: cannot load the TLS files: {exc}") from exc
        return settings

    def with_values(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some keys replaced (``with_values(model={"path": p})``), checked like a file's keys."""
        return Settings.from_values(merge(dict(self.values), sections, "command line"), self.source)

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the file at ``path`` (if any), then the environment, as checked ``Settings``."""
    config = load_config(path, environ)
    return Settings.from_values(config.values, config.source)
