"""Connected lesion components of a binary mask, measured in physical units."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from .geometry import voxel_volume_ml


@dataclass
class Lesion:
    """One 26-connected component of an anomaly mask."""

    label: int
    voxel_count: int
    volume_ml: float
    centroid_ras: tuple
    max_score: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-able dict (rounded for reports)."""
        data = asdict(self)
        data["volume_ml"] = round(self.volume_ml, 4)
        data["centroid_ras"] = [round(float(c), 2) for c in self.centroid_ras]
        if self.max_score is not None:
            data["max_score"] = float(self.max_score)
        return data


def find_lesions(mask: np.ndarray, affine: np.ndarray, heatmap: Optional[np.ndarray] = None) -> list:
    """Label the 26-connected components of ``mask`` and measure them, largest first.

    ``affine`` maps voxel indices to RAS millimetres (so volumes are in mL whatever the
    voxel size, and centroids are scanner coordinates a clinician can navigate to).
    """
    mask = np.asarray(mask) > 0
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxel_ml = voxel_volume_ml(affine)
    sizes = ndimage.sum_labels(np.ones_like(labels, dtype=np.int64), labels, index)
    centroids = ndimage.center_of_mass(mask, labels, index)
    maxima = ndimage.maximum(heatmap, labels, index) if heatmap is not None else [None] * count
    lesions = []
    for lab, size, centroid, peak in zip(index, sizes, centroids, maxima):
        ras = affine @ np.append(np.asarray(centroid, dtype=np.float64), 1.0)
        lesions.append(
            Lesion(
                label=int(lab),
                voxel_count=int(size),
                volume_ml=float(size) * voxel_ml,
                centroid_ras=tuple(float(v) for v in ras[:3]),
                max_score=None if peak is None else float(peak),
            )
        )
    lesions.sort(key=lambda lesion: (-lesion.voxel_count, lesion.label))
    return lesions
