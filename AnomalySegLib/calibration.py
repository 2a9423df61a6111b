"""Healthy-only threshold calibration.

The threshold that turns an anomaly map into a mask is a percentile of the scores that
the model gives to brain voxels of *held-out healthy* volumes (paper, Table 2:
p98 for AMCons, p95 for GradCAMCons). No anomalous image is ever used. The model file
stores a quantile table, so any percentile (the Slicer sensitivity slider) maps to a
threshold instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit

if TYPE_CHECKING:  # imported lazily at run time: keeps `import AnomalySegLib.calibration` light
    from .model_file import AnomalyModel
    from .preprocessing import PreparedVolume
    from .volume_io import Volume

#: Percentiles stored in a model: every 0.1 from 0 to 100, plus finer steps near the top
#: where clinically useful thresholds live.
TABLE_PERCENTILES = np.unique(
    np.concatenate([np.linspace(0.0, 100.0, 1001), [99.91, 99.92, 99.93, 99.94, 99.95, 99.96, 99.97, 99.98, 99.99]])
)

#: Cap on the healthy pixel scores kept in memory; beyond it a fixed-seed subsample is used
#: (quantile error ~1e-4 at this size).
MAX_CALIBRATION_PIXELS = 20_000_000


@dataclass
class Calibration:
    """Quantile table of anomaly scores on healthy brain-tissue pixels."""

    percentiles: np.ndarray
    values: np.ndarray
    n_pixels: int
    n_images: int
    n_volumes: int
    source: str = ""

    def threshold(self, percentile: float) -> float:
        """Score above which a pixel is flagged, for a healthy percentile in [0, 100]."""
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {percentile}")
        return float(np.interp(percentile, self.percentiles, self.values))

    def flag(self, heatmap: np.ndarray, brain_mask: np.ndarray, percentile: float) -> "tuple[float, np.ndarray]":
        """``(threshold, mask)``: brain voxels scoring above the percentile's threshold.

        The one thresholding rule (``score > threshold`` inside the brain), shared by
        ``anomalyseg segment``, the baselines and the Slicer module's instant re-threshold.
        """
        threshold = self.threshold(percentile)
        return threshold, (np.asarray(heatmap) > threshold) & np.asarray(brain_mask, dtype=bool)

    def percentile_of(self, score: float) -> float:
        """Healthy percentile of ``score`` (inverse of :meth:`threshold`)."""
        # np.interp needs increasing x: the quantile table is non-decreasing; ties are fine
        return float(np.interp(score, self.values, self.percentiles))

    def to_dict(self) -> dict:
        """JSON-able representation stored in the model file."""
        return {
            "percentiles": [float(p) for p in self.percentiles],
            "values": [float(v) for v in self.values],
            "n_pixels": int(self.n_pixels),
            "n_images": int(self.n_images),
            "n_volumes": int(self.n_volumes),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        """Inverse of :meth:`to_dict`; validates the table."""
        percentiles = np.asarray(data["percentiles"], dtype=np.float64)
        values = np.asarray(data["values"], dtype=np.float64)
        if percentiles.shape != values.shape or percentiles.ndim != 1 or len(percentiles) < 2:
            raise ValueError("calibration table is malformed")
        if np.any(np.diff(percentiles) <= 0) or np.any(np.diff(values) < 0):
            raise ValueError("calibration table is not monotonic")
        return cls(
            percentiles=percentiles,
            values=values,
            n_pixels=int(data["n_pixels"]),
            n_images=int(data["n_images"]),
            n_volumes=int(data["n_volumes"]),
            source=str(data.get("source", "")),
        )

    @classmethod
    def from_scores(cls, scores: np.ndarray, *, n_images: int, n_volumes: int, source: str = "") -> "Calibration":
        """Build the table from a 1-D array of healthy pixel scores."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise InputError("no healthy brain-tissue pixels to calibrate on")
        values = np.percentile(scores, TABLE_PERCENTILES)
        values = np.maximum.accumulate(values)  # guard against float round-off making it non-monotonic
        return cls(TABLE_PERCENTILES.copy(), values, int(scores.size), n_images, n_volumes, source)


def _subsample(scores: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    if scores.size <= limit:
        return scores
    rng = np.random.default_rng(seed)
    return rng.choice(scores, size=limit, replace=False)


def calibrate_prepared(
    model: "AnomalyModel",
    prepared: Sequence["PreparedVolume"],
    *,
    device: str = "auto",
    batch_size: int = 16,
    source: str = "",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> Calibration:
    """Calibrate on already-preprocessed healthy volumes (training reuses its held-out split).

    The scores are taken on each volume's own voxel grid, inside its brain mask: exactly
    the values that :func:`~AnomalySegLib.inference.threshold_scores` compares with the
    threshold, so p98 flags 2 % of the calibration volumes' brain voxels.
    """
    from .inference import score_prepared, scores_on_volume_grid

    if not prepared:
        raise InputError("calibration needs at least one healthy volume")
    collected: list[np.ndarray] = []
    n_images = 0
    for index, item in enumerate(prepared):
        check_cancel(cancel)
        maps = score_prepared(model, item, device=device, batch_size=batch_size, cancel=cancel)
        scores = scores_on_volume_grid(maps, item)
        collected.append(scores.heatmap[scores.brain_mask])
        n_images += len(item.images)
        emit(progress, ProgressEvent("calibrate", (index + 1) / len(prepared),
                                     message=f"healthy volume {index + 1}/{len(prepared)}"))
    scores = _subsample(np.concatenate(collected), MAX_CALIBRATION_PIXELS)
    return Calibration.from_scores(scores, n_images=n_images, n_volumes=len(prepared), source=source)


def calibrate(
    model: "AnomalyModel",
    healthy: Sequence[Union["Volume", str, Path]],
    *,
    device: str = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> Calibration:
    """Score brain-tissue pixels of healthy volumes and return their quantile table.

    ``healthy`` must contain normal scans only; they should not have been used for
    training (scores on training images are optimistically low).
    """
    from .preprocessing import prepare_volume
    from .volume_io import Volume, read_volume

    prepared = []
    names = []
    for index, item in enumerate(healthy):
        check_cancel(cancel)
        volume = item if isinstance(item, Volume) else read_volume(item)
        prepared.append(prepare_volume(volume, model.preprocessing))
        names.append(str(volume.path.name) if volume.path is not None else f"volume{index}")
        emit(progress, ProgressEvent("prepare", (index + 1) / max(len(healthy), 1),
                                     message=f"read {index + 1}/{len(healthy)}"))
    source = f"{len(names)} healthy volume(s): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return calibrate_prepared(model, prepared, device=device, batch_size=batch_size, source=source,
                              progress=progress, cancel=cancel)
