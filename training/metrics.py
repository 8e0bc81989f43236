"""Classification metrics, written out with torch only (no scikit-learn).

Conventions (the paper does not say how it averages its specificity):

- per class, one-vs-rest: precision = TP / (TP + FP), recall (sensitivity) = TP / (TP + FN),
  specificity = TN / (TN + FP), F1 = 2PR / (P + R); a ratio with a zero denominator is 0;
- "macro" is the unweighted mean over classes; accuracy is the fraction of correct top-1 predictions;
- AUC is one-vs-rest ROC AUC from the class's softmax probability, computed as the Mann-Whitney statistic with
  ties counted one half (exactly the trapezoidal area under the ROC curve); macro AUC is the mean over classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; rows are true classes, columns predicted classes."""
    idx = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` mask (average ranks for ties); nan if one class is absent."""
    scores = scores.double().cpu()
    positive = positive.bool().cpu()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average rank (1-based) over runs of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(scores: torch.Tensor, positive: torch.Tensor) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = scores.double().cpu()
    positive = positive.bool().cpu()
    order = torch.argsort(scores, descending=True)
    s, p = scores[order], positive[order].double()
    tps, fps = torch.cumsum(p, 0), torch.cumsum(1 - p, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # keep the last index of each run of equal scores
    n_pos, n_neg = max(p.sum().item(), 1.0), max((1 - p).sum().item(), 1.0)
    fpr = [0.0] + (fps[last] / n_neg).tolist()
    tpr = [0.0] + (tps[last] / n_pos).tolist()
    return fpr, tpr


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_metrics(labels: torch.Tensor, probabilities: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/specificity/F1/AUC, and the confusion matrix (plain JSON)."""
    labels = labels.long().cpu()
    probabilities = probabilities.float().cpu()
    c = len(class_names)
    preds = probabilities.argmax(1)
    cm = confusion_matrix(labels, preds, c)
    total = int(cm.sum())
    per_class: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(class_names):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = total - tp - fn - fp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_class[name] = {
            "support": tp + fn,
            "precision": precision,
            "recall": recall,
            "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * precision * recall, precision + recall),
            "auc": binary_auc(probabilities[:, k], labels == k),
        }
    keys = ("precision", "recall", "sensitivity", "specificity", "f1", "auc")
    macro = {key: sum(float(per_class[n][key]) for n in class_names) / c for key in keys}
    return {
        "images": total,
        "accuracy": _ratio(int(cm.diag().sum()), total),
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def per_source_metrics(
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    sources: torch.Tensor,
    source_names: Sequence[str],
    class_names: Sequence[str],
) -> dict[str, dict]:
    """Accuracy and what each true class was called, per source data set.

    ``called`` is ``{true class: {predicted class: share}}`` over that source's images of the true class: for
    adult normal images from one hospital, ``called["normal"]["covid"]`` is the share wrongly called COVID-19.
    """
    predictions = probabilities.argmax(1)
    out: dict[str, dict] = {}
    for s, name in enumerate(source_names):
        keep = sources == s
        n = int(keep.sum())
        if n == 0:
            continue
        y, p = labels[keep], predictions[keep]
        called: dict[str, dict[str, float]] = {}
        for c, cname in enumerate(class_names):
            of_class = p[y == c]
            if len(of_class):
                called[cname] = {
                    k: round(float((of_class == j).sum()) / len(of_class), 4) for j, k in enumerate(class_names)
                }
        out[name or "(unnamed)"] = {
            "images": n,
            "accuracy": float((y == p).float().mean()),
            "counts": {cname: int((y == c).sum()) for c, cname in enumerate(class_names)},
            "called": called,
        }
    return out
