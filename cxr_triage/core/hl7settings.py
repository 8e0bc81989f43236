"""``[hl7]`` as typed settings (``Settings.hl7``): HL7 v2.5.1 ORU^R01 results to the RIS over MLLP, the site's codes.

Its own module so that ``cxr_triage.core.settings`` stays one screenful per section; ``Settings.from_values``
builds it with ``HL7Settings.from_table``, which raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from cxr_triage.core.config import ConfigError
from cxr_triage.core.endpoints import HL7Code, HL7Destination, check_token

HL7_PRIORITIES: tuple[str, ...] = ("urgent", "priority", "review", "routine")
"""The worklist priorities (``cxr_triage.triage.flags.PRIORITIES``) that ``[hl7] priorities`` and
``abnormal_flags`` map."""
HL7_CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")
"""The classifier's classes (``cxr_triage.CLASS_NAMES``) that ``[hl7] probability_codes`` and ``finding_values`` map."""


@dataclass(frozen=True)
class HL7Settings:
    """``[hl7]``: HL7 v2.5.1 ORU^R01 results to the RIS over MLLP (``cxr_triage.outputs.hl7``), with the site's
    codes."""

    destinations: tuple[HL7Destination, ...] = ()
    sending_application: str = "CXR_TRIAGE"
    sending_facility: str = ""
    processing_id: str = "P"
    timeout: float = 30.0
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    procedure_code: HL7Code = HL7Code("399208008", "Plain chest X-ray", "SCT")
    finding_code: HL7Code = HL7Code("121071", "Finding", "DCM")
    probability_codes: Mapping[str, HL7Code] = field(
        default_factory=lambda: {
            "covid": HL7Code("CXRT-P-COVID", "Probability of COVID-19", "99CXRT"),
            "normal": HL7Code("CXRT-P-NORMAL", "Probability of normal", "99CXRT"),
            "pneumonia": HL7Code("CXRT-P-PNEUMONIA", "Probability of pneumonia", "99CXRT"),
        }
    )
    finding_values: Mapping[str, HL7Code] = field(
        default_factory=lambda: {
            "covid": HL7Code("840539006", "COVID-19", "SCT"),
            "normal": HL7Code("17621005", "Normal", "SCT"),
            "pneumonia": HL7Code("233604007", "Pneumonia", "SCT"),
        }
    )
    priorities: Mapping[str, str] = field(
        default_factory=lambda: {"urgent": "S", "priority": "A", "review": "R", "routine": "R"}
    )
    abnormal_flags: Mapping[str, str] = field(
        default_factory=lambda: {"urgent": "A", "priority": "A", "review": "", "routine": "N"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "destinations", tuple(self.destinations))
        object.__setattr__(self, "sending_application", check_token(self.sending_application, "sending_application"))
        facility = check_token(self.sending_facility, "sending_facility", allow_empty=True)
        object.__setattr__(self, "sending_facility", facility)
        if self.processing_id not in ("P", "T", "D"):
            raise ValueError(f"processing_id = {self.processing_id!r}: P (production), T (training) or D (debugging)")
        if self.max_attempts < 1 or self.timeout <= 0 or self.backoff_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("max_attempts must be >= 1, timeout > 0, backoff_seconds and backoff_max_seconds >= 0")
        mapped = {"probability_codes": HL7_CLASSES, "finding_values": HL7_CLASSES}
        mapped.update(priorities=HL7_PRIORITIES, abnormal_flags=HL7_PRIORITIES)
        for name, keys in mapped.items():
            given = getattr(self, name)
            if set(given) != set(keys):
                raise ValueError(f"{name} must name exactly {', '.join(keys)}; got {', '.join(sorted(given))}")
        priorities = {p: check_token(self.priorities[p], f"priorities.{p}") for p in HL7_PRIORITIES}
        flags = {p: check_token(self.abnormal_flags[p], f"abnormal_flags.{p}", 5, True) for p in HL7_PRIORITIES}
        object.__setattr__(self, "priorities", priorities)
        object.__setattr__(self, "abnormal_flags", flags)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Self:
        """The ``[hl7]`` table: destinations and codes parsed. Whether the codes fit a message is checked when a
        command that sends HL7 starts (``cxr_triage.outputs.hl7.check_settings``), not here: settings hold values."""
        converted: dict[str, Any] = {}
        what = "destinations"
        try:
            destinations = []
            for index, entry in enumerate(table.get("destinations", ())):
                what = f"destinations[{index}]"
                destinations.append(HL7Destination.from_mapping(entry))
            converted["destinations"] = tuple(destinations)
            for what in ("procedure_code", "finding_code"):
                if what in table:
                    converted[what] = HL7Code.parse(table[what])
            for what in ("probability_codes", "finding_values"):
                if what in table:
                    converted[what] = {k: HL7Code.parse(v) for k, v in dict(table[what]).items()}
            for what in ("priorities", "abnormal_flags"):
                if what in table:
                    converted[what] = {k: str(v) for k, v in dict(table[what]).items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[hl7] {what}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{**{k: v for k, v in table.items() if k in known}, **converted})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[hl7] {exc}") from exc

    def destination(self, text: str) -> HL7Destination | None:
        """The configured destination named ``text`` (``APPLICATION@host:port``), None if it is not configured."""
        return next((d for d in self.destinations if str(d) == text), None)
