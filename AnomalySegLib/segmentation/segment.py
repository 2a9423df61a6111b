"""From a voxel-grid anomaly map to a segmentation: the one path (torch-free).

``anomalyseg segment``, the baselines, the Slicer module (instant re-threshold) and the
batch script all call :func:`segment_heatmap`: the percentile is resolved
(:func:`.calibration.resolve_percentile`), the map thresholded by the calibration's rule
(:meth:`.Calibration.flag`) and the lesions listed (:func:`.lesions.find_lesions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..io.geometry import voxel_volume_ml
from .calibration import Calibration, resolve_percentile
from .lesions import find_lesions

__all__ = ["SegmentationResult", "segment_heatmap"]


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
    min_component_ml: float = 0.0

    def report(self) -> dict:
        """JSON-able summary (the ``NAME_report.json`` content, without file paths)."""
        return {
            "model_version": self.model_version,
            "percentile": float(self.percentile),
            "threshold": float(self.threshold),
            "min_component_ml": float(self.min_component_ml),
            "lesion_count": len(self.lesions),
            "total_volume_ml": round(float(self.total_volume_ml), 4),
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


def segment_heatmap(
    heatmap: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    calibration: Calibration,
    percentile: Optional[float],
    *,
    fallback_percentile: float,
    model_version: str = "",
) -> SegmentationResult:
    """Threshold a voxel-grid anomaly map and list its lesions (no network run).

    The one path from map to mask and lesion list, for ``anomalyseg segment``, the
    baselines, the Slicer module and the batch script. ``percentile`` None means the
    calibration's operating point (or ``fallback_percentile`` for calibrations without one).
    """
    pct = resolve_percentile(percentile, calibration, fallback_percentile)
    mask, threshold = calibration.flag(heatmap, brain_mask, pct, voxel_ml=voxel_volume_ml(affine))
    lesions = find_lesions(mask, affine, heatmap)
    return SegmentationResult(
        heatmap=heatmap,
        mask=mask.astype(np.uint8),
        threshold=threshold,
        percentile=pct,
        lesions=lesions,
        total_volume_ml=float(sum(lesion.volume_ml for lesion in lesions)),
        model_version=model_version,
        min_component_ml=float(calibration.min_component_ml),
    )
