"""Worklist priorities: the rules that turn results into a suggested reading priority.

IHE's AI Results profile has the AI publish coded findings and leaves the ordering of the reading list to the
worklist manager, so cxr-triage suggests a priority and says which rule raised it:

| priority | rule | when (``[triage]`` thresholds) |
|---|---|---|
| ``urgent`` | ``covid`` | P(COVID-19) >= ``covid_threshold`` |
| ``priority`` | ``pneumonia`` | P(pneumonia) >= ``pneumonia_threshold`` |
| ``review`` | ``low-confidence`` | the highest class probability < ``review_below`` |
| ``review`` | ``refused`` / ``failed`` | an instance was refused (not a frontal chest radiograph) or failed |
| ``routine`` | ``routine`` | otherwise |

The rules are tried in that order for each instance; a study's priority is its most urgent instance's (the first
such instance when several tie). Each flag keeps the thresholds and the model version that raised it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cxr_triage import CLASS_NAMES
from cxr_triage.core import db
from cxr_triage.core.settings import TriageSettings

PRIORITIES: tuple[str, ...] = ("urgent", "priority", "review", "routine")
"""Most urgent first: the worklist's sort order."""
RANK = {name: index for index, name in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class Flag:
    """A suggested priority and why."""

    priority: str
    rule: str
    reason: str
    thresholds: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None

    def __post_init__(self) -> None:
        if self.priority not in RANK:
            raise ValueError(f"unknown priority {self.priority!r}; expected one of {', '.join(PRIORITIES)}")


def thresholds(triage: TriageSettings) -> dict[str, float]:
    return {
        "covid_threshold": triage.covid_threshold,
        "pneumonia_threshold": triage.pneumonia_threshold,
        "review_below": triage.review_below,
    }


THRESHOLD_PRIORITIES = {"covid": "urgent", "pneumonia": "priority"}
"""The classes with a ``[triage]`` threshold, in the order they are tried, and the priority each raises."""


def over_thresholds(probabilities: Mapping[str, float], triage: TriageSettings) -> list[tuple[str, str]]:
    """``(class, reason)`` for each class of ``THRESHOLD_PRIORITIES`` whose probability reaches its threshold, in
    that order: the one rule behind both an instance's flag (``flag_for``) and its priority (``instance_flag``)."""
    limits = {"covid": triage.covid_threshold, "pneumonia": triage.pneumonia_threshold}
    found = []
    for name in THRESHOLD_PRIORITIES:
        p = float(probabilities.get(name, 0.0))
        if p >= limits[name]:
            found.append((name, f"P({name})={p:.3f} >= {limits[name]:.3f}"))
    return found


def flag_for(probabilities: Mapping[str, float], triage: TriageSettings) -> tuple[bool, str | None]:
    """The worklist flag of a classified instance: P(covid) or P(pneumonia) at or above its threshold; why."""
    reasons = [reason for _, reason in over_thresholds(probabilities, triage)]
    return bool(reasons), "; ".join(reasons) or None


def instance_flag(probabilities: Mapping[str, float], triage: TriageSettings, model_version: str | None) -> Flag:
    """The priority of one classified instance (module docstring)."""
    limits = thresholds(triage)
    top_name, top = max(((k, float(v)) for k, v in probabilities.items()), key=lambda kv: kv[1])
    for name, reason in over_thresholds(probabilities, triage)[:1]:
        return Flag(THRESHOLD_PRIORITIES[name], name, reason, limits, model_version)
    if top < triage.review_below:
        reason = f"highest probability P({top_name})={top:.3f} < {triage.review_below:.3f}"
        return Flag("review", "low-confidence", reason, limits, model_version)
    return Flag("routine", "routine", f"P({top_name})={top:.3f}", limits, model_version)


def refused_flag(reason: str, triage: TriageSettings) -> Flag:
    return Flag("review", "refused", f"refused: {reason}", thresholds(triage))


def failed_flag(error: str, triage: TriageSettings) -> Flag:
    return Flag("review", "failed", f"failed: {error}", thresholds(triage))


def most_urgent(flags: Iterable[Flag]) -> Flag | None:
    """The study's flag: the most urgent of its instances' (the first of equals); None without any."""
    best: Flag | None = None
    for flag in flags:
        if best is None or RANK[flag.priority] < RANK[best.priority]:
            best = flag
    return best


LABEL_SEVERITY = {"covid": 2, "pneumonia": 1, "normal": 0}
"""Order used to pick a study's worst label."""


def worst_and_highest(
    predictions: Iterable[db.PredictionRecord],
) -> tuple[db.PredictionRecord | None, dict[str, float]]:
    """Over the newest predictions of a study's instances: the one with the worst label (the first of equals), and
    the highest probability of each class. The study aggregate and the worklist both summarise a study with it."""
    worst: db.PredictionRecord | None = None
    highest = {name: 0.0 for name in CLASS_NAMES}
    for prediction in predictions:
        for name, p in prediction.probabilities.items():
            highest[name] = max(highest.get(name, 0.0), float(p))
        if worst is None or LABEL_SEVERITY.get(prediction.label, 0) > LABEL_SEVERITY.get(worst.label, 0):
            worst = prediction
    return worst, highest


def as_record(flag: Flag) -> dict[str, Any]:
    return {
        "priority": flag.priority,
        "rule": flag.rule,
        "reason": flag.reason,
        "thresholds": dict(flag.thresholds),
        "model_version": flag.model_version,
    }
