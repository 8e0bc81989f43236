"""``[fhir]`` as typed settings (``FHIRSettings``), beside ``cxr_triage.core.settings`` which holds it as
``Settings.fhir``: plain values, checked once when the configuration is loaded. The destinations are
``cxr_triage.core.endpoints.FHIRDestination`` values (base URL, where the secrets are, the CA bundle); the secrets
themselves are read only when a report is sent (``cxr_triage.outputs.fhir``). Nothing here changes state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self

from cxr_triage.core.config import ConfigError
from cxr_triage.core.endpoints import FHIRDestination


@dataclass(frozen=True)
class FHIRSettings:
    """``[fhir]``: a finished study's FHIR R4 DiagnosticReport, its Observations and the model's Device, sent as a
    transaction of conditional updates to each destination (``cxr_triage.outputs.fhir``)."""

    destinations: tuple[FHIRDestination, ...] = ()
    identifier_system: str = "urn:cxr-triage"
    patient_identifier_system: str = ""
    timeout: float = 30.0
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "destinations", tuple(self.destinations))
        for name in ("identifier_system", "patient_identifier_system"):
            value = getattr(self, name)
            if not isinstance(value, str) or any(ch.isspace() or ch in "|," for ch in value):
                raise ValueError(f"{name} = {value!r}: an absolute URI without spaces, '|' or ','")
            if (value or name == "identifier_system") and ":" not in value.strip(":"):
                raise ValueError(f"{name} = {value!r}: an absolute URI (urn:..., https://...)")
        if self.max_attempts < 1 or self.timeout <= 0 or self.backoff_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("max_attempts must be >= 1, timeout > 0, backoff_seconds and backoff_max_seconds >= 0")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Self:
        """The ``[fhir]`` table with its destinations parsed; whether their secrets can be read is checked when a
        command that sends starts (``cxr_triage.outputs.fhir.check_settings``)."""
        destinations = []
        for index, entry in enumerate(table.get("destinations", ())):
            try:
                destinations.append(FHIRDestination.from_mapping(entry))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"[fhir] destinations[{index}]: {exc}") from exc
        if len({str(d) for d in destinations}) != len(destinations):
            raise ConfigError("[fhir] destinations: a base URL is named twice")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in table.items() if k in known}
        try:
            return cls(**{**values, "destinations": tuple(destinations)})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[fhir] {exc}") from exc

    def destination(self, text: str) -> FHIRDestination | None:
        """The configured destination whose base URL is ``text``, None if it is not configured."""
        return next((d for d in self.destinations if str(d) == text), None)
