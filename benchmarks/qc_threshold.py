"""The QC score's agreement scale and threshold, fitted on per-case rows (benchmarks/qc_calibration.py): the
threshold is picked for recall, and the rule is checked by leave-one-out on the same cases."""

from __future__ import annotations

import math
from typing import Any

FAILURE_DICE = (0.85, 0.88)  # a mask under these Dice counts as a failure the flag should catch


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Area under the ROC curve for `positive` cases scoring LOWER (ties count half); None without both."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((p < n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def precision_recall(scores: list[float], dice: list[float], threshold: float, bound: float) -> dict:
    flagged = [s < threshold for s in scores]
    failed = [d < bound for d in dice]
    tp = sum(f and g for f, g in zip(flagged, failed))
    return {"flagged": sum(flagged), "failures": sum(failed), "true_positives": tp,
            "precision": tp / sum(flagged) if any(flagged) else None,
            "recall": tp / sum(failed) if any(failed) else None}


def choose_threshold(scores: list[float], dice: list[float], bound: float, recall: float) -> float:
    """The lowest cut that flags at least `recall` of the cases under `bound` (a flag asks a person to look,
    so missing a failure costs more than a false alarm): halfway between the score of the last failure it
    must catch and the next score above it."""
    fails = sorted(s for s, d in zip(scores, dice) if d < bound)
    if not fails:
        return 0.0
    must = fails[math.ceil(recall * len(fails) - 1e-9) - 1]
    above = [s for s in scores if s > must]
    return (must + min(above)) / 2 if above else min(must + 1e-4, 1.0)


# Training-fold recall targets tried; the shipped rule is the smallest whose leave-one-out recall reaches
# RECALL_GOAL (a target of 0.9 on 63 cases misses a held-out failure when only 9 of 10 must be caught).
RECALL_TARGETS = (0.9, 0.95, 1.0)
RECALL_GOAL = 0.9


def _fit(rows: list[dict], reference: dict, feature: str, target: float) -> tuple[Any, float]:
    """The reference (agreement scale) and threshold fitted on `rows` alone."""
    from dtml_deploy.qc import QCReference, score

    # 0.0 where the heads agree on half the band (a Dice of 0.5), 1.0 for the best fitted case: nothing
    # saturates, so the threshold can sit between good and failed cases instead of among ties at 1.
    scale = (0.5, min(float(max(r[feature] for r in rows)), 1.0))
    keep = ("volume_ml", "intensity_quantiles", "intensity_distance", "point_mass", "smoothness")
    ref = QCReference.from_dict({**{k: reference[k] for k in keep}, "agreement_feature": feature,
                                 "agreement_scale": list(scale), "threshold": 0.0})
    scores = [score(r, ref).score for r in rows]
    return ref, round(choose_threshold(scores, [r["dice"] for r in rows], FAILURE_DICE[0], target), 4)


def leave_one_out(rows: list[dict], reference: dict, feature: str, target: float) -> dict:
    """Each case flagged (or not) by a scale and threshold fitted on the other cases; recall and precision
    of those held-out decisions."""
    from dataclasses import replace

    from dtml_deploy.qc import score

    flags = []
    for i, row in enumerate(rows):
        ref, threshold = _fit(rows[:i] + rows[i + 1:], reference, feature, target)
        flags.append(score(row, replace(ref, threshold=threshold)).flagged)
    out = {"training_recall_target": target}
    for bound in FAILURE_DICE:
        failed = [r["dice"] < bound for r in rows]
        tp = sum(f and g for f, g in zip(flags, failed))
        out[f"dice<{bound}"] = {"flagged": sum(flags), "failures": sum(failed), "true_positives": tp,
                                "precision": tp / sum(flags) if any(flags) else None,
                                "recall": tp / sum(failed) if any(failed) else None}
    return out


def calibrate(rows: list[dict], reference: dict, feature: str) -> tuple[dict, dict]:
    """Fit the agreement part's scale and the threshold on `rows` (one head, one configuration), the
    threshold for recall: its rule is the smallest training target whose leave-one-out recall reaches
    RECALL_GOAL, then fitted on all rows."""
    from dataclasses import replace

    from dtml_deploy.qc import score

    cv = [leave_one_out(rows, reference, feature, t) for t in RECALL_TARGETS]
    key = f"dice<{FAILURE_DICE[0]}"
    chosen = next((c for c in cv if (c[key]["recall"] or 0) >= RECALL_GOAL), cv[-1])
    ref, threshold = _fit(rows, reference, feature, chosen["training_recall_target"])
    scores = [score(r, ref).score for r in rows]
    dice = [r["dice"] for r in rows]
    result = {"feature": feature, "agreement_scale": list(ref.agreement_scale), "threshold": threshold,
              "rule": f"the lowest threshold that flags {chosen['training_recall_target']:.0%} of the fitted "
                      f"cases' failures (Dice < {FAILURE_DICE[0]}); that target is the smallest of "
                      f"{list(RECALL_TARGETS)} whose leave-one-out recall reaches {RECALL_GOAL}",
              "cross_validated": chosen, "cross_validated_targets": cv,
              "auroc": {f"dice<{d}": auroc(scores, [x < d for x in dice]) for d in FAILURE_DICE},
              "at_threshold": {f"dice<{d}": precision_recall(scores, dice, threshold, d) for d in FAILURE_DICE}}
    return result, replace(ref, threshold=threshold).to_dict()
