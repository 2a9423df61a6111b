"""Remove a smooth multiplicative intensity trend (a bias field) from a scan's model-space images.

Why: on the benchmark, most false blobs in healthy scans sit where the scan's bias field
makes a whole region 10-20 % brighter than healthy anatomy there (docs/BENCHMARKS.md,
"Bias flattening"). Both fused terms see such a region as hyperintense. N4 removes it
too, but it is fitted to the image alone and flattens large tumours with it (measured,
issue 9). Here the trend is fitted to the log ratio between the scan and the *healthy
mean intensity at each position* (:class:`~AnomalySegLib.model.position_stats.PositionStats`
of the training volumes), so anatomy is not taken for bias, and the fit is a
low-order polynomial with outlier trimming, so a lesion -- a compact region far off the
trend -- does not pull it: a quadratic over the whole brain cannot bend into a tumour.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ..model.position_stats import DEFAULT_GRID, PositionStats, slice_positions
from .preprocessing import PreparedVolume

#: Polynomial degree of the log field in the three normalised coordinates (quadratic:
#: 10 terms, the usual order of a scanner's receive-coil field over a head).
DEGREE = 2
#: Trimming: pixels whose residual is further than this many robust standard deviations
#: from the fit's median residual are left out of the next fit (lesions, misaligned edges).
TRIM_SIGMAS = 2.5
ITERATIONS = 4
#: Pixels used for the fit (an even subsample of the eligible ones; the fit has 10
#: parameters).
MAX_FIT_PIXELS = 200_000
#: Only pixels whose healthy mean is at least this quantile of the brain's healthy means
#: take part: the log ratio is noisy on dark CSF.
REFERENCE_QUANTILE = 0.25
#: The field is clipped to this range (a factor of 2 either way is not a bias field any more).
FIELD_RANGE = (0.5, 2.0)


def _exponents() -> list:
    """(i, j, k) of the monomials z^i y^j x^k of total degree <= :data:`DEGREE`."""
    return [(i, j, d - i - j) for d in range(DEGREE + 1) for i in range(d + 1) for j in range(d + 1 - i)]


def _basis(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The monomials at pixels with coordinates ``(z, y, x)`` (1-D, equal length), as columns."""
    return np.stack([z ** i * y ** j * x ** k for i, j, k in _exponents()], axis=-1)


def _coordinates(shape, slice_indices):
    """Normalised (z, y, x) in [-1, 1] for every pixel of ``[N, S, S]`` images."""
    n, rows, cols = shape
    z = 2.0 * slice_positions(slice_indices) - 1.0
    y = 2.0 * (np.arange(rows) + 0.5) / rows - 1.0
    x = 2.0 * (np.arange(cols) + 0.5) / cols - 1.0
    return z, y, x


def fit_bias_field(images: np.ndarray, masks: np.ndarray, slice_indices: np.ndarray,
                   reference: PositionStats, *, seed: int = 0) -> np.ndarray:
    """Multiplicative field ``[N, S, S]`` (float32, 1 = no change) of model-space ``images``.

    ``reference`` holds the healthy mean intensity per position; ``seed`` offsets the even
    subsample taken when more than :data:`MAX_FIT_PIXELS` pixels are usable. Returns all
    ones when the brain has too few usable pixels for a fit.
    """
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    expected = reference.expected(images.shape[-1], slice_indices)
    ones = np.ones(images.shape, dtype=np.float32)
    if not masks.any():
        return ones
    brain_means = expected[masks]
    step = max(1, brain_means.size // MAX_FIT_PIXELS)
    floor = np.quantile(brain_means[::step], REFERENCE_QUANTILE)  # a strided sample is plenty
    del brain_means
    usable = masks & (expected >= floor) & (images > 1e-3) & (expected > 1e-3)
    flat = np.flatnonzero(usable)
    if flat.size < 100:
        return ones
    if flat.size > MAX_FIT_PIXELS:
        # an even spread over the brain (every k-th usable pixel, offset by the seed)
        step = flat.size // MAX_FIT_PIXELS
        flat = flat[seed % step::step]
    n_i, r_i, c_i = np.unravel_index(flat, images.shape)
    z, y, x = _coordinates(images.shape, slice_indices)
    design = _basis(z[n_i], y[r_i], x[c_i])
    target = np.log(images[n_i, r_i, c_i].astype(np.float64)) - np.log(expected[n_i, r_i, c_i].astype(np.float64))
    keep = np.ones(target.size, dtype=bool)
    coef = np.zeros(design.shape[1])
    for _ in range(ITERATIONS):
        a = design[keep]
        # normal equations: 10 x 10, well conditioned for monomials of coordinates in [-1, 1]
        coef = np.linalg.lstsq(a.T @ a, a.T @ target[keep], rcond=None)[0]
        residual = target - design @ coef
        centre = np.median(residual[keep])
        spread = 1.4826 * np.median(np.abs(residual[keep] - centre))
        if not spread > 0:
            break
        keep = np.abs(residual - centre) <= TRIM_SIGMAS * spread
        if keep.sum() < design.shape[1] * 10:
            break
    # evaluated per power of z: an in-plane polynomial [S, S] for each, then DEGREE + 1
    # full-size passes (no [N, S, S, terms] array, nor one pass per term, at 224 px)
    planes = np.zeros((DEGREE + 1, images.shape[1], images.shape[2]))
    for c, (i, j, k) in zip(coef, _exponents()):
        planes[i] += c * np.outer(y ** j, x ** k)
    log_field = np.zeros(images.shape, dtype=np.float32)
    for i in range(DEGREE + 1):
        log_field += (z ** i).astype(np.float32)[:, None, None] * planes[i].astype(np.float32)[None]
    np.exp(log_field, out=log_field)
    return np.clip(log_field, *FIELD_RANGE, out=log_field)


def flatten_bias(images: np.ndarray, masks: np.ndarray, slice_indices: np.ndarray,
                 reference: PositionStats) -> np.ndarray:
    """``images`` divided by their :func:`fit_bias_field` (a new float32 array; 0 stays 0)."""
    return (np.asarray(images, dtype=np.float32) / fit_bias_field(images, masks, slice_indices, reference)).astype(np.float32)


def fit_flattened_intensity_stats(volumes: Sequence[PreparedVolume],
                                  grid: Tuple[int, int, int] = DEFAULT_GRID) -> PositionStats:
    """Healthy intensity statistics of bias-flattened images, in two passes: fitted on the
    raw images, used to flatten them, fitted again on the flattened images -- so they
    describe anatomy, not anatomy plus the healthy scans' own fields."""
    masks, indices = [v.masks for v in volumes], [v.slice_indices for v in volumes]
    raw = PositionStats.fit([v.images for v in volumes], masks, indices, grid=grid)
    return PositionStats.fit([flatten_bias(v.images, v.masks, v.slice_indices, raw) for v in volumes],
                             masks, indices, grid=grid)
