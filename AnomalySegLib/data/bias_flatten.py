"""Remove a smooth multiplicative intensity trend (a bias field) from a scan's model-space images.

Why: on the benchmark, most false blobs in healthy scans sit where the scan's bias field
makes a whole region 10-20 % brighter than healthy anatomy there (docs/BENCHMARKS.md,
"Bias flattening"). Both fused terms see such a region as hyperintense. N4 removes it
too, but it is fitted to the image alone and flattens large tumours with it (measured,
issue 9). Here the trend is fitted to the log ratio between the scan and the *healthy
mean intensity at each position* (:class:`~AnomalySegLib.model.position_stats.PositionStats`
of the training volumes), so anatomy is not taken for bias, and the fit trims outliers,
so a lesion -- a compact region far off the trend -- does not pull it. Two field shapes
(``MethodParams.bias_field``): a quadratic (cannot bend into a tumour at all, cannot follow
fields with structure at the scale of centimetres either) and a penalised cubic B-spline with
~45 mm knots (follows such fields; its smoothness penalty and the trimming keep it out of
lesions, measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..model.position_stats import DEFAULT_GRID, PositionStats, slice_positions
from ..settings import check_bias_field
from .preprocessing import PreparedVolume

#: Polynomial degree of the ``quadratic`` log field in the three normalised coordinates
#: (10 terms, the usual order of a scanner's receive-coil field over a head).
DEGREE = 2
#: ``spline`` field: cubic B-splines with this many equal intervals along each normalised
#: axis (7 functions per axis, 343 coefficients; knots ~45 mm apart over an adult brain).
SPLINE_INTERVALS = 4
#: Weight of the spline's second-difference (P-spline) penalty per fitted pixel: keeps it
#: from bending into what trimming leaves of a large lesion, and fixes coefficients that
#: no brain pixel supports (corners of the grid).
SPLINE_SMOOTHNESS = 1e-4
#: Trimming: pixels whose residual is further than this many robust standard deviations
#: from the fit's median residual are left out of the next fit (lesions, misaligned edges).
TRIM_SIGMAS = 2.5
ITERATIONS = 4
#: Pixels used for the fit (an even subsample of the eligible ones).
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


def _bspline_weights(t: np.ndarray, intervals: int) -> Tuple[np.ndarray, np.ndarray]:
    """First function index ``[P]`` and the weights ``[P, 4]`` of the four uniform cubic
    B-splines that are non-zero at each normalised coordinate ``t`` in [-1, 1]."""
    u = (np.clip(np.asarray(t, dtype=np.float64), -1.0, 1.0) + 1.0) * (intervals / 2.0)
    first = np.minimum(np.floor(u).astype(np.int64), intervals - 1)
    f = u - first
    weights = np.stack([(1 - f) ** 3, 3 * f ** 3 - 6 * f ** 2 + 4, -3 * f ** 3 + 3 * f ** 2 + 3 * f + 1, f ** 3],
                       axis=-1) / 6.0
    return first, weights


def _bspline_matrix(t: np.ndarray, intervals: int) -> np.ndarray:
    """Dense ``[P, intervals + 3]`` matrix of the cubic B-splines at coordinates ``t``."""
    first, weights = _bspline_weights(t, intervals)
    out = np.zeros((len(first), intervals + 3))
    for k in range(4):
        out[np.arange(len(first)), first + k] = weights[:, k]
    return out


class _SplineDesign:
    """The tensor-product cubic B-splines at the fitted pixels, kept as each pixel's 64
    non-zero weights, grouped by knot cell (the pixels of a cell share their 64
    coefficients; coefficients in (z, y, x) C order).

    The normal equations and predictions are dense products per cell, far faster than a
    sparse design with 64 non-zeros a row.
    """

    def __init__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, intervals: int) -> None:
        n = intervals + 3
        self.size = n ** 3
        (fz, wz), (fy, wy), (fx, wx) = (_bspline_weights(c, intervals) for c in (z, y, x))
        cell = (fz * intervals + fy) * intervals + fx
        self.order = np.argsort(cell, kind="stable")
        wz, wy, wx, cell = wz[self.order], wy[self.order], wx[self.order], cell[self.order]
        # float32: half the memory traffic; the normal equations are summed in float64
        wz, wy, wx = (w.astype(np.float32) for w in (wz, wy, wx))
        self.weights = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(len(z), 64)
        offsets = ((np.arange(4)[:, None, None] * n + np.arange(4)[None, :, None]) * n
                   + np.arange(4)[None, None, :]).ravel()
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
        ends = np.r_[starts[1:], len(cell)]
        first = (fz[self.order] * n + fy[self.order]) * n + fx[self.order]
        #: (pixel slice in cell order, the cell's 64 coefficient indices)
        self.cells = [(slice(a, b), first[a] + offsets) for a, b in zip(starts, ends)]

    def normal_equations(self, keep: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``A.T @ A`` and ``A.T @ target`` over the kept pixels."""
        keep, target = keep[self.order], target[self.order]
        normal, rhs = np.zeros((self.size, self.size)), np.zeros(self.size)
        for rows, cols in self.cells:
            w = self.weights[rows][keep[rows]]
            normal[np.ix_(cols, cols)] += (w.T @ w).astype(np.float64)
            rhs[cols] += w.T.astype(np.float64) @ target[rows][keep[rows]]
        return normal, rhs

    def predict(self, coef: np.ndarray) -> np.ndarray:
        """The fitted log field at the pixels (in their original order)."""
        out = np.empty(len(self.order))
        for rows, cols in self.cells:
            out[self.order[rows]] = self.weights[rows] @ coef[cols]
        return out


class _DenseDesign:
    """A dense design matrix (the polynomial's), with the interface of :class:`_SplineDesign`."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix, self.size = matrix, matrix.shape[1]

    def normal_equations(self, keep: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        a = self.matrix[keep]
        return a.T @ a, a.T @ target[keep]

    def predict(self, coef: np.ndarray) -> np.ndarray:
        return self.matrix @ coef


def _spline_penalty(intervals: int) -> np.ndarray:
    """Sum of squared second differences of the coefficient grid along each axis (P-spline)."""
    n = intervals + 3
    d = np.diff(np.eye(n), 2, axis=0)
    dtd, eye = d.T @ d, np.eye(n)
    return np.kron(np.kron(dtd, eye), eye) + np.kron(np.kron(eye, dtd), eye) + np.kron(np.kron(eye, eye), dtd)


def _trimmed_fit(design, target: np.ndarray, penalty: Optional[np.ndarray] = None) -> np.ndarray:
    """Least squares of ``target`` on ``design``, refitted without the pixels further than
    :data:`TRIM_SIGMAS` robust sigmas from the fit; ``penalty`` (a quadratic form on the
    coefficients) is weighted by the number of pixels kept."""
    keep = np.ones(target.size, dtype=bool)
    coef = np.zeros(design.size)
    for _ in range(ITERATIONS):
        normal, rhs = design.normal_equations(keep, target)
        if penalty is not None:
            normal = normal + keep.sum() * penalty
        coef = np.linalg.lstsq(normal, rhs, rcond=None)[0]
        residual = target - design.predict(coef)
        centre = np.median(residual[keep])
        spread = 1.4826 * np.median(np.abs(residual[keep] - centre))
        if not spread > 0:
            break
        keep = np.abs(residual - centre) <= TRIM_SIGMAS * spread
        if keep.sum() < design.size * 10:
            break
    return coef


def fit_bias_field(images: np.ndarray, masks: np.ndarray, slice_indices: np.ndarray,
                   reference: PositionStats, *, seed: int = 0, model: str = "quadratic") -> np.ndarray:
    """Multiplicative field ``[N, S, S]`` (float32, 1 = no change) of model-space ``images``.

    ``reference`` holds the healthy mean intensity per position; ``model`` is the field's
    shape (:data:`~AnomalySegLib.settings.BIAS_FIELDS`); ``seed`` offsets the even
    subsample taken when more than :data:`MAX_FIT_PIXELS` pixels are usable. Returns all
    ones when the brain has too few usable pixels for a fit.
    """
    check_bias_field(model, "bias field model")
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
    target = np.log(images[n_i, r_i, c_i].astype(np.float64)) - np.log(expected[n_i, r_i, c_i].astype(np.float64))
    log_field = np.zeros(images.shape, dtype=np.float32)
    if model == "spline":
        k = SPLINE_INTERVALS
        n = k + 3
        coef = _trimmed_fit(_SplineDesign(z[n_i], y[r_i], x[c_i], k), target,
                            SPLINE_SMOOTHNESS * _spline_penalty(k) + 1e-9 * np.eye(n ** 3))
        # separable evaluation: contract x, then y, then z (no per-pixel design at full size)
        grid = coef.reshape(n, n, n)
        grid = np.tensordot(grid, _bspline_matrix(x, k), axes=(2, 1))  # (nz, ny, cols)
        grid = np.tensordot(grid, _bspline_matrix(y, k), axes=(1, 1))  # (nz, cols, rows)
        planes = grid.transpose(0, 2, 1).astype(np.float32)  # (nz, rows, cols)
        bz = _bspline_matrix(z, k).astype(np.float32)  # (N, nz)
        for j in range(n):  # n full-size passes, no [N, S, S, n] array
            log_field += bz[:, j, None, None] * planes[j][None]
    else:
        coef = _trimmed_fit(_DenseDesign(_basis(z[n_i], y[r_i], x[c_i])), target)
        # evaluated per power of z: an in-plane polynomial [S, S] for each, then DEGREE + 1
        # full-size passes (no [N, S, S, terms] array, nor one pass per term, at 224 px)
        planes = np.zeros((DEGREE + 1, images.shape[1], images.shape[2]))
        for c, (i, j, k) in zip(coef, _exponents()):
            planes[i] += c * np.outer(y ** j, x ** k)
        for i in range(DEGREE + 1):
            log_field += (z ** i).astype(np.float32)[:, None, None] * planes[i].astype(np.float32)[None]
    np.exp(log_field, out=log_field)
    return np.clip(log_field, *FIELD_RANGE, out=log_field)


def flatten_bias(images: np.ndarray, masks: np.ndarray, slice_indices: np.ndarray,
                 reference: PositionStats, model: str = "quadratic") -> np.ndarray:
    """``images`` divided by their :func:`fit_bias_field` (a new float32 array; 0 stays 0)."""
    field = fit_bias_field(images, masks, slice_indices, reference, model=model)
    return (np.asarray(images, dtype=np.float32) / field).astype(np.float32)


def fit_flattened_intensity_stats(volumes: Sequence[PreparedVolume],
                                  grid: Tuple[int, int, int] = DEFAULT_GRID,
                                  model: str = "quadratic") -> PositionStats:
    """Healthy intensity statistics of bias-flattened images, in two passes: fitted on the
    raw images, used to flatten them, fitted again on the flattened images -- so they
    describe anatomy, not anatomy plus the healthy scans' own fields."""
    masks, indices = [v.masks for v in volumes], [v.slice_indices for v in volumes]
    raw = PositionStats.fit([v.images for v in volumes], masks, indices, grid=grid)
    return PositionStats.fit([flatten_bias(v.images, v.masks, v.slice_indices, raw, model) for v in volumes],
                             masks, indices, grid=grid)
