"""Voxel- and lesion-level evaluation of anomaly scores against ground-truth lesion masks.

Metrics (numpy only, all restricted to brain voxels as in the paper):

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

:func:`evaluate_model` runs a model (or a baseline, see :class:`Scorer`) over a test set and
returns a JSON-able dict; :func:`write_report` writes ``results.json``, ``results.md`` and
PNG figures.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
from scipy import ndimage

from .errors import InputError, OutputError
from .progress import CancelCallback, EtaEstimator, ProgressCallback, ProgressEvent, check_cancel, emit

PathLike = Union[str, "os.PathLike[str]"]

#: 26-connectivity, the convention of :mod:`AnomalySegLib.lesions`.
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

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
    gt_labels, n_gt = ndimage.label(t, structure=_STRUCTURE_26)
    sizes = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)[1:]
    hits = np.bincount(gt_labels[p], minlength=n_gt + 1)[1:]
    needed = np.maximum(1, np.ceil(overlap_fraction * sizes - 1e-9))
    detected = hits >= needed
    pred_labels, n_pred = ndimage.label(p, structure=_STRUCTURE_26)
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


def _finite_or_none(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers (recursively)."""
    if isinstance(x, dict):
        return {str(k): _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
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


# --------------------------------------------------------------------------------------
# Scorers: models and baselines behind one interface
# --------------------------------------------------------------------------------------


@runtime_checkable
class Scorer(Protocol):
    """What the harness needs from a method: models and baselines both provide it.

    ``score_volume`` returns an object with ``heatmap`` (float, input voxel grid, 0 outside
    the brain) and ``brain_mask`` (bool, input grid) -- e.g. ``inference.VolumeScores``.
    ``predict_mask`` thresholds it at a healthy-calibrated percentile and returns
    ``(mask, threshold)``; it is only called when ``calibration`` is not None.
    """

    name: str
    version: str
    calibration: Any
    default_percentile: float

    def score_volume(self, volume: Any, *, device: Any = "auto", batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelCallback] = None) -> Any: ...

    def predict_mask(self, scores: Any, percentile: float) -> tuple[np.ndarray, float]: ...


class ModelScorer:
    """Adapter giving an :class:`~AnomalySegLib.model_file.AnomalyModel` the :class:`Scorer` interface.

    Scoring and thresholding go through :mod:`AnomalySegLib.inference`, i.e. exactly the
    code path of ``anomalyseg segment``.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name = str(model.method.method)
        self.version = str(model.version)
        self.calibration = model.calibration
        self.default_percentile = float(model.default_percentile)

    def score_volume(self, volume: Any, *, device: Any = "auto", batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelCallback] = None) -> Any:
        from . import inference

        return inference.score_volume(self.model, volume, device=device, batch_size=batch_size,
                                      progress=progress, cancel=cancel)

    def predict_mask(self, scores: Any, percentile: float) -> tuple[np.ndarray, float]:
        from . import inference

        result = inference.threshold_scores(scores, self.model, percentile=percentile)
        return np.asarray(result.mask, dtype=bool), float(result.threshold)


def as_scorer(method: Any) -> Scorer:
    """Turn a model file path, an ``AnomalyModel`` or a :class:`Scorer` into a :class:`Scorer`."""
    if isinstance(method, (str, Path)):
        from .model_file import load_model

        return ModelScorer(load_model(method))  # on CPU; inference moves it to the device
    if hasattr(method, "predict_mask") and hasattr(method, "score_volume"):
        return method
    if hasattr(method, "network") and hasattr(method, "method"):
        return ModelScorer(method)
    raise TypeError(f"cannot evaluate an object of type {type(method).__name__}")


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------


def _volume_name(path: Path) -> str:
    try:
        from .volume_io import volume_stem

        return volume_stem(path)
    except ImportError:  # pragma: no cover - volume_io is part of the package
        name = Path(path).name
        for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
            if name.endswith(ext):
                return name[: -len(ext)]
        return Path(name).stem


def find_label(image: PathLike, labels_dir: Optional[PathLike] = None, pattern: str = "{name}_label.nii.gz") -> Optional[Path]:
    """The label file of ``image`` (``pattern`` formatted with the image's name) or None."""
    image = Path(image)
    folder = Path(labels_dir) if labels_dir is not None else image.parent
    candidate = folder / pattern.format(name=_volume_name(image))
    return candidate if candidate.is_file() else None


def is_label_file(path: PathLike, pattern: str = "{name}_label.nii.gz") -> bool:
    """True when ``path``'s file name has the shape of ``pattern`` (so it is not an image)."""
    prefix, _, suffix = pattern.partition("{name}")
    name = Path(path).name
    return len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)


def _read_label(path: Path, image: Any) -> np.ndarray:
    from .volume_io import read_volume

    label = read_volume(path)
    data = np.asarray(label.data)
    if data.shape != np.asarray(image.data).shape:
        raise InputError(f"label {path.name} has shape {data.shape}, its image has {np.asarray(image.data).shape}")
    if not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3):
        raise InputError(f"label {path.name} is not on its image's voxel grid (different affine)")
    if not np.all(np.isfinite(data)):
        raise InputError(f"label {path.name} contains NaN or infinite values")
    return data > 0


def _canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient ``arr`` so axes point R, A, S (no resampling) for display."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.apply_orientation(arr, ornt)


def example_slice(volume: Any, heatmap: np.ndarray, pred: Optional[np.ndarray], truth: np.ndarray,
                  k: Optional[int] = None) -> dict:
    """One axial slice (RAS-canonical arrays, ``[x, y]``) for figures: by default the one with
    the largest lesion area. Keys: image, heatmap, truth, pred (or None), slice, aspect."""
    affine = np.asarray(volume.affine)
    img = _canonical(np.asarray(volume.data, dtype=np.float32), affine)
    hm = _canonical(np.asarray(heatmap, dtype=np.float32), affine)
    gt = _canonical(truth.astype(np.uint8), affine)
    pr = _canonical(pred.astype(np.uint8), affine) if pred is not None else None
    if k is None:
        k = int(np.argmax(gt.reshape(-1, gt.shape[2]).sum(axis=0)))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt_axes = np.asarray(_ornt_axes(affine))
    spacing = zooms[ornt_axes]
    return {
        "image": img[:, :, k], "heatmap": hm[:, :, k], "truth": gt[:, :, k],
        "pred": None if pr is None else pr[:, :, k], "slice": k, "aspect": float(spacing[1] / spacing[0]),
    }


def _ornt_axes(affine: np.ndarray) -> list[int]:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    # Output axis j takes input axis i where ornt[i, 0] == j.
    return [int(np.flatnonzero(ornt[:, 0] == j)[0]) for j in range(3)]


def _save_overlay(path: Path, name: str, sl: dict, threshold: Optional[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    extent_kw = {"origin": "lower", "aspect": sl["aspect"]}
    axes[0].imshow(sl["image"].T, cmap="gray", **extent_kw)
    axes[0].set_title(f"{name} (axial {sl['slice']})", fontsize=9)
    hm_img = axes[1].imshow(sl["heatmap"].T, cmap="inferno", **extent_kw)
    axes[1].set_title("anomaly score", fontsize=9)
    fig.colorbar(hm_img, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(sl["image"].T, cmap="gray", **extent_kw)
    axes[2].contour(sl["truth"].T, levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
    if sl["pred"] is not None and sl["pred"].any():
        axes[2].contour(sl["pred"].T, levels=[0.5], colors="red", linewidths=1.0, origin="lower")
    title = "truth (green) vs predicted (red)" if sl["pred"] is not None else "truth (green); not calibrated"
    if threshold is not None:
        title += f"\nthreshold {threshold:.4g}"
    axes[2].set_title(title, fontsize=9)
    for ax in axes:
        ax.invert_xaxis()  # radiological view like Slicer: the patient's right on the left
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report_targets(output_dir: Path) -> list[Path]:
    return [output_dir / "results.json", output_dir / "results.md", output_dir / "pr_curve.png"]


def check_report_writable(output_dir: PathLike, overwrite: bool = False) -> None:
    """Raise OutputError if a report exists in ``output_dir`` (unless ``overwrite``) or it is not writable."""
    output_dir = Path(output_dir)
    if not overwrite:
        existing = [p.name for p in _report_targets(output_dir) if p.exists()]
        if existing:
            raise OutputError(f"{output_dir / existing[0]} exists (use --overwrite to replace it)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {output_dir}: {exc.strerror or exc}") from None
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"output folder {output_dir} is not writable")


def evaluate_model(
    model: Any,
    images: Sequence[PathLike],
    labels: Sequence[Optional[PathLike]],
    *,
    percentile: Optional[float] = None,
    device: Any = "auto",
    output_dir: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    batch_size: int = 16,
    detection_overlap: float = 0.0,
    max_pooled_voxels: int = DEFAULT_MAX_POOLED_VOXELS,
    n_overlays: int = 3,
    overwrite: bool = False,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Evaluate a model or baseline on ``images`` with matching ``labels``.

    ``model`` is an ``AnomalyModel``, a model file path, or any :class:`Scorer`
    (e.g. :class:`~AnomalySegLib.baselines.IntensityBaseline`). ``labels[i]`` is the lesion
    mask of ``images[i]`` (non-zero = lesion, same voxel grid) or None for a lesion-free
    volume; a label with no lesion voxel also makes its volume lesion-free. Lesion volumes
    give the voxel metrics and lesion detection, lesion-free ones the false-positive
    fraction. ``percentile`` (default: the method's) picks the healthy-calibrated
    threshold. With ``output_dir`` the report and figures are written there (refusing to
    replace an earlier report unless ``overwrite``). ``extra`` entries are added to the
    results (e.g. machine information). Returns a JSON-able dict.
    """
    from .volume_io import read_volume

    if len(images) != len(labels):
        raise ValueError("images and labels must have the same length")
    if not images:
        raise InputError("no images to evaluate")
    scorer = as_scorer(model)
    calibrated = scorer.calibration is not None
    pct = float(scorer.default_percentile if percentile is None else percentile)
    if not 0.0 <= pct <= 100.0:
        raise InputError(f"percentile must be between 0 and 100, got {pct}")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_report_writable(out, overwrite)

    n_lesion_guess = max(1, sum(1 for lab in labels if lab is not None))
    pooled = PooledScores(max_negatives_per_volume=max(1, max_pooled_voxels // n_lesion_guess))
    pooled_counts = np.zeros(3, dtype=np.int64)  # tp, fp, fn at the calibrated threshold
    lesion_free_counts = np.zeros(2, dtype=np.int64)  # flagged, brain voxels
    records: list[dict[str, Any]] = []
    overlays: list[tuple[str, dict]] = []
    pooled_index: list[int] = []  # records[pooled_index[j]] is the j-th volume in `pooled`
    threshold: Optional[float] = None
    started = time.monotonic()
    eta = EtaEstimator()
    n = len(images)

    for i, (image_path, label_path) in enumerate(zip(images, labels)):
        check_cancel(cancel)
        image_path = Path(image_path)
        name = _volume_name(image_path)
        emit(progress, ProgressEvent(stage="segment", fraction=i / n, message=f"{name} ({i + 1}/{n})",
                                     step=i, steps=n, eta_s=eta.eta(i / n)))
        t0 = time.monotonic()  # reading + scoring, as a user would wait for it
        volume = read_volume(image_path)
        scores = scorer.score_volume(volume, device=device, batch_size=batch_size, cancel=cancel)
        seconds = time.monotonic() - t0
        truth = _read_label(Path(label_path), volume) if label_path is not None else None
        heatmap = np.asarray(scores.heatmap, dtype=np.float32)
        brain = np.asarray(scores.brain_mask, dtype=bool)
        pred = None
        if calibrated:
            pred, threshold = scorer.predict_mask(scores, pct)
            pred = np.asarray(pred, dtype=bool)
        record: dict[str, Any] = {
            "name": name, "image": str(image_path), "label": None if label_path is None else str(label_path),
            "brain_voxels": int(np.count_nonzero(brain)), "seconds": round(seconds, 4),
        }
        has_lesion = truth is not None and bool(truth.any())
        if not has_lesion:
            record["kind"] = "lesion_free"
            if pred is not None:
                flagged = int(np.count_nonzero(pred & brain))
                lesion_free_counts += (flagged, record["brain_voxels"])
                record["fp_fraction"] = false_positive_fraction(pred, brain)
                det = lesion_detection(pred, np.zeros_like(pred))
                record["false_positive_components"] = det["n_false_positive_components"]
        else:
            record["kind"] = "lesion"
            s_in, y_in = heatmap[brain], truth[brain]
            record["lesion_voxels"] = int(np.count_nonzero(truth))
            record["lesion_voxels_outside_brain"] = int(np.count_nonzero(truth & ~brain))
            curve = score_curve(s_in, y_in)
            record["auprc"] = curve.average_precision()
            record["auroc"] = curve.auroc()
            record["oracle_best_dice"], record["oracle_best_dice_threshold"] = curve.best_dice()
            pooled.add(s_in, y_in)
            pooled_index.append(len(records))
            if pred is not None:
                tp, fp, fn = overlap_counts(pred, truth, brain)
                pooled_counts += (tp, fp, fn)
                record["dice_calibrated"] = dice_from_counts(tp, fp, fn)
                record["precision_calibrated"] = tp / (tp + fp) if tp + fp else float("nan")
                record["recall_calibrated"] = tp / (tp + fn) if tp + fn else float("nan")
                det = lesion_detection(pred, truth, overlap_fraction=detection_overlap)
                record.update({k: det[k] for k in ("n_lesions", "n_detected", "n_false_positive_components")})
                record["lesion_sizes"] = det["lesion_sizes"]
            else:
                record["n_lesions"] = int(ndimage.label(truth, structure=_STRUCTURE_26)[1])
            if out is not None and len(overlays) < n_overlays:
                overlays.append((name, example_slice(volume, heatmap, pred, truth)))
        records.append(record)

    emit(progress, ProgressEvent(stage="segment", fraction=1.0, message="computing metrics"))
    lesion_records = [r for r in records if r["kind"] == "lesion"]
    free_records = [r for r in records if r["kind"] == "lesion_free"]
    curve = pooled.curve()
    oracle_dice, oracle_threshold = curve.best_dice()
    # Per-volume Dice at the dataset-level oracle threshold (the paper's "DICE (mu +- sigma)").
    if math.isfinite(oracle_threshold):
        for idx, value in zip(pooled_index, pooled.dice_at(oracle_threshold)):
            records[idx]["oracle_dice_at_pooled_threshold"] = value

    tp, fp, fn = (int(v) for v in pooled_counts)
    pooled_result: dict[str, Any] = {
        "auprc": curve.average_precision(),
        "auroc": curve.auroc(),
        "oracle_best_dice": oracle_dice,
        "oracle_threshold": oracle_threshold,
        "oracle_threshold_healthy_percentile": (
            float(scorer.calibration.percentile_of(oracle_threshold))
            if calibrated and math.isfinite(oracle_threshold) else None),
        "brain_voxels": int(pooled.n_voxels),
        "lesion_voxels": int(round(curve.n_pos)),
        "subsampled_healthy_voxels": bool(pooled.subsampled),
    }
    if calibrated and lesion_records:
        pooled_result.update({
            "dice_calibrated": dice_from_counts(tp, fp, fn),
            "iou_calibrated": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
            "precision_calibrated": tp / (tp + fp) if tp + fp else float("nan"),
            "recall_calibrated": tp / (tp + fn) if tp + fn else float("nan"),
        })
    n_les = sum(r.get("n_lesions", 0) for r in lesion_records)
    n_det = sum(r.get("n_detected", 0) for r in lesion_records)
    detection = {
        "overlap_fraction": detection_overlap,
        "n_lesions": int(n_les),
        "n_detected": int(n_det) if calibrated else None,
        "detection_rate": (n_det / n_les if n_les else float("nan")) if calibrated else None,
        "false_positive_components_per_volume": (
            mean_std([r.get("n_false_positive_components", float("nan")) for r in lesion_records])
            if calibrated else None),
    }
    lesion_free = {
        "n_volumes": len(free_records),
        "fp_fraction_pooled": (lesion_free_counts[0] / lesion_free_counts[1]
                               if calibrated and lesion_free_counts[1] else float("nan")),
        "fp_fraction_per_volume": mean_std([r.get("fp_fraction", float("nan")) for r in free_records]),
        "expected_fp_fraction": 1.0 - pct / 100.0,
        "false_positive_components_per_volume": mean_std(
            [r.get("false_positive_components", float("nan")) for r in free_records]),
    }
    per_volume = {key: mean_std([r.get(key, float("nan")) for r in lesion_records]) for key in (
        "auprc", "auroc", "dice_calibrated", "oracle_dice_at_pooled_threshold", "oracle_best_dice")}
    results = {
        "method": scorer.name,
        "model_version": scorer.version,
        "calibrated": calibrated,
        "percentile": pct,
        "threshold": threshold,
        "n_volumes": {"lesion": len(lesion_records), "lesion_free": len(free_records)},
        "pooled": pooled_result,
        "per_volume": per_volume,
        "lesion_free": lesion_free,
        "detection": detection,
        "pr_curve": curve.pr_points(),
        "volumes": records,
        "seconds_total": round(time.monotonic() - started, 3),
        "notes": [
            "Voxel metrics use brain voxels only (the method's brain mask), as in the paper.",
            "ORACLE values pick the threshold with the test labels: upper bounds, not achievable results.",
            "Calibrated values use a percentile of scores on lesion-free volumes only (the honest numbers).",
        ],
    }
    results.update(extra or {})
    results = _finite_or_none(results)
    if out is not None:
        figures = []
        for name, sl in overlays:
            path = out / f"overlay_{name}.png"
            _save_overlay(path, name, sl, threshold)
            figures.append(path.name)
        results["figures"] = {"overlays": figures}
        write_report(results, out)
    return results


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def machine_info(device: Any = None) -> dict[str, Any]:
    """Where numbers were measured: CPU, cores, memory, GPU, library versions, git commit."""
    import platform
    import subprocess

    import torch

    from . import __version__

    cpu = platform.processor() or platform.machine()
    memory_gb = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gb": memory_gb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "anomalyseg": __version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if device is not None:
        try:
            from .device import resolve_device

            dev = resolve_device(device)
            info["device"] = str(dev)
            if dev.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(dev)
        except Exception as exc:  # noqa: BLE001 - informational only
            info["device"] = f"{device} ({exc})"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, dict) and "mean" in x:
        if x["mean"] is None:
            return "n/a"
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluation, for comparison tables."""
    pooled = results.get("pooled", {})
    return {
        "method": results.get("method"),
        "AUPRC": pooled.get("auprc"),
        "AUROC": pooled.get("auroc"),
        "Dice (calibrated)": pooled.get("dice_calibrated"),
        "Dice per volume (calibrated)": results.get("per_volume", {}).get("dice_calibrated"),
        "[Dice] ORACLE": pooled.get("oracle_best_dice"),
        "Detection rate": results.get("detection", {}).get("detection_rate"),
        "FP fraction lesion-free": results.get("lesion_free", {}).get("fp_fraction_pooled"),
        "percentile": results.get("percentile"),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table of dict rows (columns = keys of the first row)."""
    if not rows:
        return ""
    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown summary of one :func:`evaluate_model` result."""
    p = results["pooled"]
    pv = results["per_volume"]
    lf = results["lesion_free"]
    det = results["detection"]
    lines = [
        f"# Evaluation: {results['method']}",
        "",
        f"Model: `{results['model_version']}`; lesion volumes: {results['n_volumes']['lesion']}, "
        f"lesion-free volumes: {results['n_volumes']['lesion_free']}; healthy percentile "
        f"{results['percentile']:g} -> threshold {_fmt(results['threshold'], 4)}"
        + ("" if results["calibrated"] else " (model not calibrated: calibrated metrics unavailable)"),
        "",
        "## Dataset level (brain voxels pooled)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUPRC | {_fmt(p.get('auprc'))} |",
        f"| AUROC | {_fmt(p.get('auroc'))} |",
        f"| Dice at healthy-calibrated threshold | {_fmt(p.get('dice_calibrated'))} |",
        f"| IoU at healthy-calibrated threshold | {_fmt(p.get('iou_calibrated'))} |",
        f"| Precision / recall at calibrated threshold | {_fmt(p.get('precision_calibrated'))} / {_fmt(p.get('recall_calibrated'))} |",
        f"| [Dice] ORACLE best over thresholds (uses test labels) | {_fmt(p.get('oracle_best_dice'))} |",
        f"| ORACLE threshold (healthy percentile) | {_fmt(p.get('oracle_threshold'), 4)} ({_fmt(p.get('oracle_threshold_healthy_percentile'), 2)}) |",
        "",
        "## Per volume (mean ± std over lesion volumes)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUPRC | {_fmt(pv['auprc'])} |",
        f"| AUROC | {_fmt(pv['auroc'])} |",
        f"| Dice at calibrated threshold | {_fmt(pv['dice_calibrated'])} |",
        f"| Dice at ORACLE dataset threshold | {_fmt(pv['oracle_dice_at_pooled_threshold'])} |",
        f"| ORACLE best Dice per volume | {_fmt(pv['oracle_best_dice'])} |",
        "",
        "## Lesions and lesion-free volumes (calibrated threshold)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Lesions detected | {_fmt(det.get('n_detected'))} / {det.get('n_lesions')} "
        f"(rate {_fmt(det.get('detection_rate'))}; detected = "
        + (f">= {det.get('overlap_fraction'):.0%} of the lesion predicted" if det.get("overlap_fraction") else ">= 1 voxel predicted")
        + ") |",
        f"| False-positive components per lesion volume | {_fmt(det.get('false_positive_components_per_volume'))} |",
        f"| False-positive fraction on lesion-free volumes (pooled) | {_fmt(lf.get('fp_fraction_pooled'), 4)} "
        f"(expected {_fmt(lf.get('expected_fp_fraction'), 4)}, {lf['n_volumes']} volumes) |",
        "",
        "## Volumes",
        "",
        "| volume | kind | AUPRC | AUROC | Dice (cal.) | ORACLE best Dice | lesions detected | FP fraction | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["volumes"]:
        detected = f"{r['n_detected']}/{r['n_lesions']}" if r.get("n_detected") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['kind']} | {_fmt(r.get('auprc'))} | {_fmt(r.get('auroc'))} | "
            f"{_fmt(r.get('dice_calibrated'))} | {_fmt(r.get('oracle_best_dice'))} | {detected} | "
            f"{_fmt(r.get('fp_fraction'), 4)} | {_fmt(r.get('seconds'), 2)} |")
    lines += ["", "Notes:"] + [f"- {note}" for note in results.get("notes", [])]
    lines += ["", "![precision-recall curve](pr_curve.png)", ""]  # written next to it by write_report
    lines += [f"![{f}]({f})" for f in results.get("figures", {}).get("overlays", [])]
    return "\n".join(lines) + "\n"


def plot_pr_curves(curves: Sequence[tuple[str, dict[str, Any]]], path: PathLike, title: str = "Precision-recall (brain voxels)") -> None:
    """Plot the ``pr_curve`` of several results (``(label, results)`` pairs) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for label, res in curves:
        pr = res.get("pr_curve") or {}
        if pr.get("recall"):
            ap = res.get("pooled", {}).get("auprc")
            ax.step(pr["recall"], pr["precision"], where="pre",
                    label=f"{label} (AUPRC {_fmt(ap)})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], output_dir: PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``pr_curve.png`` into ``output_dir``.

    Each file is written to a temporary name and renamed, so no half-written report is left.
    """
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    paths = dict(zip(("json", "markdown", "pr_curve"), _report_targets(out)))
    results = _finite_or_none(results)
    tmp_json = paths["json"].with_name(".results.json.tmp")
    tmp_json.write_text(json.dumps(results, indent=2) + "\n")
    tmp_md = paths["markdown"].with_name(".results.md.tmp")
    tmp_md.write_text(results_markdown(results))
    tmp_png = paths["pr_curve"].with_name(".pr_curve.tmp.png")
    plot_pr_curves([(results["method"], results)], tmp_png)
    for tmp, final in ((tmp_json, paths["json"]), (tmp_md, paths["markdown"]), (tmp_png, paths["pr_curve"])):
        os.replace(tmp, final)
    return paths
