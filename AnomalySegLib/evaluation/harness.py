"""The evaluation harness: run a model or a baseline over a labelled test set.

:func:`evaluate_model` scores every image with a :class:`Scorer` (a trained
:class:`~AnomalySegLib.model.bundle.AnomalyModel` or a baseline such as
:class:`~AnomalySegLib.pipeline.baselines.IntensityBaseline`: both offer the same
interface), thresholds it at the healthy-calibrated percentile, and returns a JSON-able
dict of the :mod:`.metrics`; with ``output_dir`` it writes the :mod:`.report` and
:mod:`.figures` there.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io.volume_io import read_volume, volume_stem
from ..model.bundle import load_model
from ..progress import CancelCallback, EtaEstimator, ProgressCallback, ProgressEvent, check_cancel, emit
from ..settings import check_percentile
from .figures import example_slice, save_overlay
from .labels import read_label
from .metrics import (
    DEFAULT_MAX_POOLED_VOXELS,
    STRUCTURE_26,
    PooledScores,
    dice_from_counts,
    false_positive_fraction,
    finite_or_none,
    lesion_detection,
    mean_std,
    overlap_counts,
    score_curve,
)
from .report import check_report_writable, write_report

PathLike = Union[str, "os.PathLike[str]"]


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


def as_scorer(method: Any) -> Scorer:
    """A model file path (loaded on the CPU; inference moves it to the device) or a
    :class:`Scorer` (an ``AnomalyModel``, a baseline) as a :class:`Scorer`."""
    if isinstance(method, (str, Path)):
        return load_model(method)
    if hasattr(method, "predict_mask") and hasattr(method, "score_volume"):
        return method
    raise TypeError(f"cannot evaluate an object of type {type(method).__name__}")


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
    (e.g. :class:`~AnomalySegLib.pipeline.baselines.IntensityBaseline`). ``labels[i]`` is the lesion
    mask of ``images[i]`` (non-zero = lesion, same voxel grid) or None for a lesion-free
    volume; a label with no lesion voxel also makes its volume lesion-free. Lesion volumes
    give the voxel metrics and lesion detection, lesion-free ones the false-positive
    fraction. ``percentile`` (default: the method's) picks the healthy-calibrated
    threshold. With ``output_dir`` the report and figures are written there (refusing to
    replace an earlier report unless ``overwrite``). ``extra`` entries are added to the
    results (e.g. machine information). Returns a JSON-able dict.
    """
    if len(images) != len(labels):
        raise ValueError("images and labels must have the same length")
    if not images:
        raise InputError("no images to evaluate")
    scorer = as_scorer(model)
    calibrated = scorer.calibration is not None
    pct = check_percentile(scorer.default_percentile if percentile is None else percentile)
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
        name = volume_stem(image_path)
        emit(progress, ProgressEvent(stage="segment", fraction=i / n, message=f"{name} ({i + 1}/{n})",
                                     step=i, steps=n, eta_s=eta.eta(i / n)))
        t0 = time.monotonic()  # reading + scoring, as a user would wait for it
        volume = read_volume(image_path)
        scores = scorer.score_volume(volume, device=device, batch_size=batch_size, cancel=cancel)
        seconds = time.monotonic() - t0
        truth = read_label(Path(label_path), volume) if label_path is not None else None
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
                record["n_lesions"] = int(ndimage.label(truth, structure=STRUCTURE_26)[1])
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
    results = finite_or_none(results)
    if out is not None:
        figures = []
        for name, sl in overlays:
            path = out / f"overlay_{name}.png"
            save_overlay(path, name, sl, threshold)
            figures.append(path.name)
        results["figures"] = {"overlays": figures}
        write_report(results, out)
    return results
