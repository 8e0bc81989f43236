"""Whether a retraining run's challenger replaces the champion (``decide``): better macro AUC by ``[retrain]
margin`` on the same fixed evaluation set, and no class's sensitivity lower by more than ``sensitivity_tolerance``;
the reason names the figures. Pure: the job (``cxr_triage.retrain.retraining``) acts on the ``Decision``.
It stands in the ml room, beside the registry it decides for, so that the training package may apply the same rule
(``python -m training compare``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxr_triage import CLASS_NAMES


@dataclass(frozen=True)
class Decision:
    """Whether the challenger replaces the champion, and why (the figures)."""

    promote: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def decide(champion: dict[str, Any], challenger: dict[str, Any], margin: float, tolerance: float) -> Decision:
    """Promote when ``challenger``'s macro AUC >= ``champion``'s + ``margin`` (and is higher) and no class's
    sensitivity falls by more than ``tolerance``; both are ``training.retrain`` summaries of the SAME fixed set."""
    before, after = champion.get("macro_auc"), challenger.get("macro_auc")
    figures: dict[str, Any] = {"margin": margin, "sensitivity_tolerance": tolerance}
    if before is None or after is None:
        return Decision(False, "macro AUC is undefined on the evaluation set (a class has no image there)", figures)
    gain = after - before
    figures.update(champion_macro_auc=before, challenger_macro_auc=after, macro_auc_gain=gain, sensitivity={})
    problems = []
    auc_text = f"macro AUC {before:.4f} -> {after:.4f} ({gain:+.4f}"
    if gain < margin or gain <= 0:
        problems.append(f"{auc_text}, less than the margin {margin:g})")
    changes = []
    for name in CLASS_NAMES:
        was = champion["per_class"][name]["sensitivity"]
        now = challenger["per_class"][name]["sensitivity"]
        figures["sensitivity"][name] = {"champion": was, "challenger": now, "change": now - was}
        changes.append(f"{name} {was:.3f} -> {now:.3f}")
        if was - now > tolerance + 1e-12:
            problems.append(
                f"{name} sensitivity fell {was - now:.4f} ({was:.3f} -> {now:.3f}), more than {tolerance:g}"
            )
    if problems:
        return Decision(False, "; ".join(problems), figures)
    return Decision(
        True,
        f"{auc_text} >= margin {margin:g}); sensitivity {', '.join(changes)} (none fell more than {tolerance:g})",
        figures,
    )
