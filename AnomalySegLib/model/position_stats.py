"""Position-dependent normal variation of a score, learned from healthy volumes.

Anomaly maps are not equally large everywhere in a healthy brain: attention maps peak
along parts of the brain boundary, residuals along ventricles and the cortex. A single
healthy percentile then flags the same anatomical places in every scan, healthy ones
included, and those places dominate the top of the score range (they drive AUPRC
towards the lesion prevalence). :class:`PositionStats` stores the healthy mean and
standard deviation of a model-space map per *normalised position* and turns a map into
a z-score ``(s - mean(pos)) / std(pos)``.

Normalised position of model-space pixel ``(n, r, c)`` of a prepared volume:
``(z, r / S, c / S)`` with ``z`` the kept slice's rank among the kept slices scaled to
[0, 1] (``0`` = lowest kept slice). The in-plane field of view is already centred and
scaled on each volume's brain (preprocessing), so positions line up across subjects to
within a few millimetres; the statistics are smoothed over neighbouring bins so that
this residual misalignment does not matter. No registration, no lesion data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["PositionStats", "slice_positions", "DEFAULT_GRID"]

#: Bins along (z, rows, columns).
DEFAULT_GRID: Tuple[int, int, int] = (12, 24, 24)

#: Smoothing of the per-bin sums (Gaussian sigma in bins).
_SMOOTH_BINS = 1.0

#: Floor of the standard deviation, as a fraction of its median over the brain: a bin
#: where healthy scores hardly vary must not turn tiny deviations into huge z-scores.
_STD_FLOOR = 0.25


def slice_positions(slice_indices: np.ndarray) -> np.ndarray:
    """Normalised z of kept slices: 0 at the lowest kept index, 1 at the highest."""
    idx = np.asarray(slice_indices, dtype=np.float64)
    lo, hi = float(idx.min()), float(idx.max())
    return np.zeros_like(idx) if hi <= lo else (idx - lo) / (hi - lo)


def _bin_index(z: np.ndarray, size: int, grid: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    nz, ny, nx = grid
    zb = np.minimum((np.asarray(z) * nz).astype(np.int64), nz - 1)
    pix = np.arange(size)
    yb = np.minimum(pix * ny // size, ny - 1)
    xb = np.minimum(pix * nx // size, nx - 1)
    return zb, yb, xb


@dataclass
class PositionStats:
    """Healthy mean / std of a score per normalised position (``[Z, Y, X]`` float32 grids)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], slice_indices: Sequence[np.ndarray],
            grid: Tuple[int, int, int] = DEFAULT_GRID) -> "PositionStats":
        """Statistics of healthy model-space maps ``[N, S, S]`` inside their tissue masks.

        One entry per healthy volume in each sequence. Bins without healthy pixels take
        the values of their neighbours (smoothed sums), or the global ones.
        """
        if not maps:
            raise ValueError("position statistics need at least one healthy volume")
        count = np.zeros(grid, dtype=np.float64)
        total = np.zeros(grid, dtype=np.float64)
        total_sq = np.zeros(grid, dtype=np.float64)
        for m, k, idx in zip(maps, masks, slice_indices):
            m = np.asarray(m, dtype=np.float64)
            k = np.asarray(k, dtype=bool)
            zb, yb, xb = _bin_index(slice_positions(idx), m.shape[-1], grid)
            n_i, r_i, c_i = np.nonzero(k)
            flat = np.ravel_multi_index((zb[n_i], yb[r_i], xb[c_i]), grid)
            values = m[n_i, r_i, c_i]
            count.ravel()[:] += np.bincount(flat, minlength=count.size)
            total.ravel()[:] += np.bincount(flat, weights=values, minlength=count.size)
            total_sq.ravel()[:] += np.bincount(flat, weights=values * values, minlength=count.size)
        if count.sum() == 0:
            raise ValueError("position statistics: the healthy volumes have no tissue pixels")
        global_mean = total.sum() / count.sum()
        global_var = max(total_sq.sum() / count.sum() - global_mean ** 2, 0.0)
        s_count, s_total, s_sq = (ndimage.gaussian_filter(a, _SMOOTH_BINS, mode="nearest")
                                  for a in (count, total, total_sq))
        enough = s_count > 1e-3 * s_count.max()
        mean = np.full(grid, global_mean)
        var = np.full(grid, global_var)
        mean[enough] = s_total[enough] / s_count[enough]
        var[enough] = np.maximum(s_sq[enough] / s_count[enough] - mean[enough] ** 2, 0.0)
        std = np.sqrt(var)
        populated = count > 0
        floor = _STD_FLOOR * float(np.median(std[populated])) if populated.any() else 0.0
        std = np.maximum(std, max(floor, 1e-8))
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))

    def expected(self, size: int, slice_indices: np.ndarray) -> np.ndarray:
        """Healthy mean ``[N, size, size]`` at every model-space pixel of kept slices ``slice_indices``."""
        zb, yb, xb = _bin_index(slice_positions(slice_indices), size, self.mean.shape)
        return self.mean[zb][:, yb][:, :, xb]

    def normalise(self, maps: np.ndarray, masks: np.ndarray, slice_indices: np.ndarray) -> np.ndarray:
        """z-scores ``(maps - mean) / std`` of model-space maps ``[N, S, S]``; 0 outside ``masks``."""
        maps = np.asarray(maps, dtype=np.float32)
        zb, yb, xb = _bin_index(slice_positions(slice_indices), maps.shape[-1], self.mean.shape)
        mean = self.mean[zb][:, yb][:, :, xb]
        std = self.std[zb][:, yb][:, :, xb]
        out = (maps - mean) / std
        out[~np.asarray(masks, dtype=bool)] = 0.0
        return out.astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-able form stored in the model file."""
        return {"grid": list(self.mean.shape), "mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "PositionStats":
        """Inverse of :meth:`to_dict`; validates shapes and values."""
        grid = tuple(int(v) for v in data["grid"])
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"position statistics grid {grid} is malformed")
        mean = np.asarray(data["mean"], dtype=np.float32)
        std = np.asarray(data["std"], dtype=np.float32)
        if mean.size != int(np.prod(grid)) or std.size != mean.size:
            raise ValueError("position statistics do not match their grid")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("position statistics hold non-finite or non-positive values")
        return cls(mean=mean.reshape(grid), std=std.reshape(grid))
