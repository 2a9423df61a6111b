"""Voxel- and lesion-level metrics of anomaly scores against ground-truth lesion masks.

Numpy only, all restricted to brain voxels as in the paper:

* **AUPRC** -- average precision, step-wise like scikit-learn's ``average_precision_score``:
  ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score values (ties form one step).
* **AUROC** -- Mann-Whitney statistic, ties counted one half (= trapezoidal ROC area).
* **Dice at the healthy-calibrated threshold** -- the honest number: the threshold is a
  percentile of scores on lesion-free volumes and never sees a lesion.
* **Oracle best Dice** -- the maximum Dice over all thresholds, found *with* the labels
  (the paper's "operative point"). It is an upper bound, not an achievable result, and
  every key holding it contains the word ``oracle``.
* **False-positive fraction** on lesion-free volumes: flagged brain voxels / brain voxels
  (expected to be about ``1 - percentile/100`` if the calibration generalises).
* **Per-lesion detection rate**: a ground-truth 26-connected component counts as detected
  when at least one voxel of it (or a configurable fraction) lies in the predicted mask.

Pooled ("dataset-level") metrics concatenate the brain voxels of all lesion volumes. To
bound memory, each volume contributes all its lesion voxels and at most a fixed number of
healthy voxels, drawn deterministically; sampled healthy voxels carry the weight
``n_healthy / n_kept`` so the pooled curves stay unbiased (exact when nothing is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

#: 26-connectivity, the convention of :mod:`AnomalySegLib.segmentation.lesions`.
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: Default cap on the number of voxels kept for the pooled curves (about 100 MB).
DEFAULT_MAX_POOLED_VOXELS = 20_000_000

# --------------------------------------------------------------------------------------
# Threshold-free curve metrics
# --------------------------------------------------------------------------------------


@dataclass
class ScoreCurve:
    """Cumulative (weighted) counts at each distinct score, highest score first.

    Predicting ``score >= thresholds[i]`` gives ``tp[i]`` true and ``fp[i]`` false positives.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: float
    n_neg: float

    def average_precision(self) -> float:
        """Step-wise area under the precision-recall curve; NaN without positives."""
        if self.n_pos <= 0:
            return float("nan")
        precision = self.tp / np.maximum(self.tp + self.fp, np.finfo(float).tiny)
        recall_steps = np.diff(np.concatenate(([0.0], self.tp))) / self.n_pos
        return float(np.sum(recall_steps * precision))

    def auroc(self) -> float:
        """Probability that a lesion voxel outscores a healthy one (ties count 1/2)."""
        if self.n_pos <= 0 or self.n_neg <= 0:
            return float("nan")
        tpr = np.concatenate(([0.0], self.tp / self.n_pos))
        fpr = np.concatenate(([0.0], self.fp / self.n_neg))
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))

    def best_dice(self) -> tuple[float, float]:
        """ORACLE: the highest Dice over all thresholds and the threshold reaching it.

        Uses the labels to pick the threshold, so it is an upper bound. Returns
        ``(nan, nan)`` without positives.
        """
        if self.n_pos <= 0 or self.thresholds.size == 0:
            return float("nan"), float("nan")
        dice = 2.0 * self.tp / (self.tp + self.fp + self.n_pos)
        best = int(np.argmax(dice))
        return float(dice[best]), float(self.thresholds[best])

    def pr_points(self, max_points: int = 400) -> dict[str, list[float]]:
        """Precision/recall pairs for plotting, thinned to about ``max_points``."""
        if self.n_pos <= 0 or self.thresholds.size == 0:
            return {"recall": [], "precision": [], "threshold": []}
        precision = self.tp / np.maximum(self.tp + self.fp, np.finfo(float).tiny)
        recall = self.tp / self.n_pos
        idx = np.unique(np.linspace(0, recall.size - 1, min(max_points, recall.size)).round().astype(int))
        return {
            "recall": [round(float(v), 6) for v in recall[idx]],
            "precision": [round(float(v), 6) for v in precision[idx]],
            "threshold": [float(v) for v in self.thresholds[idx]],
        }


def _as_1d(scores: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray]):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if weights is None:
        w = None
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != s.shape:
            raise ValueError("weights and scores differ in size")
    return s, y, w


def score_curve(scores: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> ScoreCurve:
    """Build the :class:`ScoreCurve` of ``scores`` against boolean ``labels``.

    ``weights`` (optional, one per voxel) lets a subsample stand in for the full set.
    """
    s, y, w = _as_1d(scores, labels, weights)
    if s.size == 0:
        empty = np.zeros(0)
        return ScoreCurve(empty, empty, empty, 0.0, 0.0)
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    y = y[order]
    w = np.ones_like(s) if w is None else w[order]
    tp = np.cumsum(w * y)
    fp = np.cumsum(w * ~y)
    # The last index of each run of equal scores: one threshold per distinct value.
    last = np.concatenate((np.flatnonzero(np.diff(s)), [s.size - 1]))
    return ScoreCurve(s[last], tp[last], fp[last], float(tp[-1]), float(fp[-1]))


def average_precision(scores: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Average precision (AUPRC), ``sum_n (R_n - R_{n-1}) P_n``; NaN without positives."""
    return score_curve(scores, labels, weights).average_precision()


def auroc(scores: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Area under the ROC curve (Mann-Whitney, ties 1/2); NaN if a class is missing."""
    return score_curve(scores, labels, weights).auroc()


def oracle_best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """ORACLE best Dice over all thresholds ``score >= t`` and that ``t`` (uses the labels)."""
    return score_curve(scores, labels).best_dice()


# --------------------------------------------------------------------------------------
# Mask metrics
# --------------------------------------------------------------------------------------


def overlap_counts(pred: np.ndarray, truth: np.ndarray, within: Optional[np.ndarray] = None) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` voxel counts of boolean masks, optionally only inside ``within``."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    if within is not None:
        m = np.asarray(within, dtype=bool)
        p = p & m
        t = t & m
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """``2TP / (2TP + FP + FN)``; 1.0 when both masks are empty."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else float(2 * tp / denom)


def dice(pred: np.ndarray, truth: np.ndarray, within: Optional[np.ndarray] = None) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    return dice_from_counts(*overlap_counts(pred, truth, within))


def false_positive_fraction(pred: np.ndarray, brain_mask: np.ndarray) -> float:
    """Fraction of brain voxels flagged in a lesion-free volume (NaN for an empty brain)."""
    brain = np.asarray(brain_mask, dtype=bool)
    n = int(np.count_nonzero(brain))
    if n == 0:
        return float("nan")
    return float(np.count_nonzero(np.asarray(pred, dtype=bool) & brain) / n)


def lesion_detection(pred: np.ndarray, truth: np.ndarray, *, overlap_fraction: float = 0.0) -> dict[str, Any]:
    """Per-lesion detection on 26-connected ground-truth components.

    A component of ``truth`` is detected when the predicted mask covers at least one of
    its voxels and at least ``overlap_fraction`` of them. Also counts predicted components
    touching no lesion (false-positive components).
    """
    if not 0.0 <= overlap_fraction <= 1.0:
        raise ValueError("overlap_fraction must be in [0, 1]")
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    gt_labels, n_gt = ndimage.label(t, structure=STRUCTURE_26)
    sizes = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)[1:]
    hits = np.bincount(gt_labels[p], minlength=n_gt + 1)[1:]
    needed = np.maximum(1, np.ceil(overlap_fraction * sizes - 1e-9))
    detected = hits >= needed
    pred_labels, n_pred = ndimage.label(p, structure=STRUCTURE_26)
    touching = np.unique(pred_labels[t & p])
    n_fp_components = n_pred - int(np.count_nonzero(touching))
    return {
        "n_lesions": int(n_gt),
        "n_detected": int(np.count_nonzero(detected)),
        "lesion_sizes": [int(v) for v in sizes],
        "lesion_detected": [bool(v) for v in detected],
        "n_pred_components": int(n_pred),
        "n_false_positive_components": int(n_fp_components),
    }


# --------------------------------------------------------------------------------------
# Pooled accumulation
# --------------------------------------------------------------------------------------


class PooledScores:
    """Collects brain-voxel scores of many volumes for dataset-level curves.

    All lesion voxels are kept; healthy voxels beyond ``max_negatives_per_volume`` are
    subsampled deterministically (seeded by the volume's index) and weighted so the curves
    estimate the full-data ones without bias.
    """

    def __init__(self, max_negatives_per_volume: Optional[int] = None, seed: int = 0) -> None:
        self.max_negatives = max_negatives_per_volume
        self.seed = seed
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self.subsampled = False
        self.n_voxels = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add one volume's brain-voxel ``scores`` and boolean ``labels`` (1-D)."""
        s = np.asarray(scores, dtype=np.float32).ravel()
        y = np.asarray(labels, dtype=bool).ravel()
        self.n_voxels += s.size
        neg = np.flatnonzero(~y)
        weight = 1.0
        if self.max_negatives is not None and neg.size > self.max_negatives:
            rng = np.random.default_rng([self.seed, len(self._scores)])
            kept_neg = np.sort(rng.choice(neg, size=self.max_negatives, replace=False))
            weight = neg.size / self.max_negatives
            keep = np.concatenate((np.flatnonzero(y), kept_neg))
            s, y = s[keep], y[keep]
            self.subsampled = True
        w = np.where(y, 1.0, weight).astype(np.float32)
        self._scores.append(s)
        self._labels.append(y)
        self._weights.append(w)

    def dice_at(self, threshold: float) -> list[float]:
        """Dice of ``score >= threshold`` for each added volume, in order of addition.

        Exact for volumes kept whole; estimated from the weighted sample otherwise.
        """
        result = []
        for s, y, w in zip(self._scores, self._labels, self._weights):
            hit = s >= threshold
            tp = float(np.count_nonzero(hit & y))
            fp = float(np.sum(w[hit & ~y], dtype=np.float64))
            fn = float(np.count_nonzero(y)) - tp
            result.append(dice_from_counts(tp, fp, fn))
        return result

    def curve(self) -> ScoreCurve:
        """The dataset-level :class:`ScoreCurve`."""
        if not self._scores:
            return score_curve(np.zeros(0), np.zeros(0, bool))
        weights = np.concatenate(self._weights) if self.subsampled else None
        return score_curve(np.concatenate(self._scores), np.concatenate(self._labels), weights)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the finite values (population std); None when empty."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def finite_or_none(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers (recursively)."""
    if isinstance(x, dict):
        return {str(k): finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def format_value(x: Any, digits: int = 3) -> str:
    """A number, a ``mean_std`` dict or None as table text (``n/a`` when missing)."""
    if x is None:
        return "n/a"
    if isinstance(x, dict) and "mean" in x:
        if x["mean"] is None:
            return "n/a"
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)
