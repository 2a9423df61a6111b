"""Inference: anomaly maps on the input's own voxel grid, thresholds, lesions.

For the attention methods only the encoder up to the attention stage runs (AMCons) or
the encoder alone (GradCAMCons needs d z_mu / d A); the decoder never runs for them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .errors import AnomalySegError, ModelFileError
from .lesions import Lesion, find_lesions
from .methods import anomaly_scores
from .preprocessing import PreparedVolume, brain_mask_in_volume, prepare_volume, to_volume_grid
from .progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit
from .volume_io import Volume

if TYPE_CHECKING:
    from .model_file import AnomalyModel


def resolve_device(spec: "str | torch.device" = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device, checking CUDA is there."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AnomalySegError("CUDA was requested but PyTorch sees no CUDA GPU here; use --device cpu or auto")
        return torch.device(text)
    raise AnomalySegError(f"unknown device {spec!r}: use auto, cpu or cuda")


def autocast_for(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def score_prepared(
    model: "AnomalyModel",
    prepared: PreparedVolume,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    cancel: Optional[CancelCallback] = None,
    on_batch=None,
) -> np.ndarray:
    """Anomaly maps [N, S, S] (model space) for the kept slices of a prepared volume."""
    dev = resolve_device(device)
    network = model.network.to(dev).eval()
    count = len(prepared.images)
    out = np.zeros(prepared.images.shape, dtype=np.float32)
    for start in range(0, count, batch_size):
        check_cancel(cancel)
        stop = min(start + batch_size, count)
        x = torch.from_numpy(np.ascontiguousarray(prepared.images[start:stop], dtype=np.float32)).unsqueeze(1).to(dev)
        m = torch.from_numpy(np.ascontiguousarray(prepared.masks[start:stop])).to(dev)
        with autocast_for(dev):
            scores = anomaly_scores(network, x, m, model.method.method)
        out[start:stop] = scores.detach().float().cpu().numpy()
        if on_batch is not None:
            on_batch(stop, count)
    return out


@dataclass
class VolumeScores:
    """An anomaly map on the input's voxel grid (0 outside the brain) and the brain mask."""

    heatmap: np.ndarray
    brain_mask: np.ndarray
    volume: Optional[Volume] = None


def scores_on_volume_grid(maps: np.ndarray, prepared: PreparedVolume, volume: Optional[Volume] = None) -> VolumeScores:
    """Model-space maps [N, S, S] -> anomaly map on the input's voxel grid, 0 outside the brain.

    The one place where maps leave model space: inference, calibration and the baselines
    all threshold/calibrate exactly these voxel values.
    """
    brain = brain_mask_in_volume(prepared)
    heatmap = to_volume_grid(maps, prepared, order=1).astype(np.float32)
    heatmap[~brain] = 0.0
    return VolumeScores(heatmap=heatmap, brain_mask=brain, volume=volume)


def score_volume(
    model: "AnomalyModel",
    volume: Volume,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> VolumeScores:
    """Preprocess ``volume`` exactly as in training, score it, map the scores back."""
    emit(progress, ProgressEvent("prepare", 0.0, message="preprocessing"))
    prepared = prepare_volume(volume, model.preprocessing)

    def on_batch(done: int, total: int) -> None:
        emit(progress, ProgressEvent("segment", 0.05 + 0.9 * done / total, step=done, steps=total,
                                     message=f"slice {done}/{total}"))

    maps = score_prepared(model, prepared, device=device, batch_size=batch_size, cancel=cancel, on_batch=on_batch)
    scores = scores_on_volume_grid(maps, prepared, volume)
    emit(progress, ProgressEvent("segment", 1.0, message="scored"))
    return scores


@dataclass
class SegmentationResult:
    """A thresholded anomaly map with its lesions, on the input's voxel grid."""

    heatmap: np.ndarray
    mask: np.ndarray
    threshold: float
    percentile: float
    lesions: list = field(default_factory=list)
    total_volume_ml: float = 0.0
    model_version: str = ""

    def report(self) -> dict:
        """JSON-able summary (the ``NAME_report.json`` content, without file paths)."""
        return {
            "model_version": self.model_version,
            "percentile": float(self.percentile),
            "threshold": float(self.threshold),
            "lesion_count": len(self.lesions),
            "total_volume_ml": round(float(self.total_volume_ml), 4),
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


def threshold_for(model: "AnomalyModel", percentile: Optional[float]) -> "tuple[float, float]":
    """(percentile, threshold) from the model's healthy calibration."""
    if model.calibration is None:
        raise ModelFileError("this model is not calibrated: run `anomalyseg calibrate MODEL HEALTHY...` first")
    pct = model.method.default_percentile if percentile is None else float(percentile)
    if not 0.0 < pct < 100.0:
        raise AnomalySegError(f"--percentile must be between 0 and 100 (exclusive), got {pct}")
    return pct, model.calibration.threshold(pct)


def threshold_scores(scores: VolumeScores, model: "AnomalyModel", *, percentile: Optional[float] = None) -> SegmentationResult:
    """Mask = brain voxels whose score exceeds the healthy-percentile threshold (no network run)."""
    pct, _ = threshold_for(model, percentile)
    threshold, mask = model.calibration.flag(scores.heatmap, scores.brain_mask, pct)
    lesions: list[Lesion] = find_lesions(mask, scores.volume.affine, scores.heatmap)
    return SegmentationResult(
        heatmap=scores.heatmap,
        mask=mask.astype(np.uint8),
        threshold=threshold,
        percentile=pct,
        lesions=lesions,
        total_volume_ml=float(sum(lesion.volume_ml for lesion in lesions)),
        model_version=model.version,
    )


def segment_volume(
    model: "AnomalyModel",
    volume: Volume,
    *,
    percentile: Optional[float] = None,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> SegmentationResult:
    """Score and threshold one volume (checks calibration before any heavy work)."""
    threshold_for(model, percentile)
    scores = score_volume(model, volume, device=device, batch_size=batch_size, progress=progress, cancel=cancel)
    return threshold_scores(scores, model, percentile=percentile)
