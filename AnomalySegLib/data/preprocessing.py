"""The one preprocessing path shared by training, calibration and inference.

:func:`prepare_volume` turns a :class:`~AnomalySegLib.io.volume_io.Volume` into square 2D
axial images in [0, 1] plus per-image tissue masks; :func:`to_volume_grid` maps
model-space maps (one per kept slice) back onto the volume's own voxel grid.

Steps (docs/ARCHITECTURE.md, "Preprocessing"):

1. reject NaN/Inf, non-3D and constant volumes (InputError);
2. canonical axial reorientation (permutation + flips only, :mod:`.geometry`);
3. robust intensity normalisation per volume: ``low`` = ``low_percentile`` of all
   voxels maps to 0 and the median (``reference_percentile``) of the foreground (voxels
   above the volume's Otsu threshold) maps to ``reference_level`` (0.5); values are
   clipped to [0, 1]. A central statistic, not a high percentile, fixes the scale:
   a large bright lesion moves a high percentile (and would darken every healthy voxel
   of that scan) but barely moves the median;
4. one square in-plane field of view (FOV) per volume, in millimetres, centred on the
   bounding box of the foreground (voxels above the Otsu threshold, union over all
   slices), side = largest extent * (1 + ``fov_margin``), resampled to
   ``image_size`` x ``image_size`` square pixels with linear interpolation (0 outside
   the volume);
5. per-slice tissue masks (:func:`.brain_mask.tissue_masks`);
6. keep slices whose mask covers at least ``min_brain_fraction`` of the image.

Image orientation (fixed, radiological like Slicer's axial view): ``images[n, r, c]``
has row 0 at the Anterior edge of the FOV (rows run towards Posterior) and column 0
at the patient's Right (columns run towards Left). In canonical index space the
centre of pixel ``(r, c)`` of kept slice ``n`` is::

    i = fov_origin_ij[0] + c * fov_step_ij[0]      (fov_step_ij[0] = -pixel_size_mm / spacing_i)
    j = fov_origin_ij[1] + r * fov_step_ij[1]      (fov_step_ij[1] = -pixel_size_mm / spacing_j)
    k = slice_indices[n]

and its RAS position is ``canonical_affine @ (i, j, k, 1)``.

Resampling is separable (columns move along canonical i only, rows along j only), so
both directions are done with two sparse interpolation matrices instead of a
per-pixel ``map_coordinates`` call; the result is the same as
``scipy.ndimage.map_coordinates(order=1, mode="constant", cval=0)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse
from skimage.filters import threshold_otsu

from .brain_mask import tissue_masks
from ..errors import InputError
from ..io.geometry import AxisReorientation, canonical_reorientation, voxel_spacing
from ..settings import JsonSettings
from ..io.volume_io import Volume

# Coordinates this close outside the grid (float round-off) count as on the edge.
_EDGE_EPS = 1e-6


@dataclass
class PreprocessConfig(JsonSettings):
    """Preprocessing parameters (stored in the model file; training and inference share them)."""

    image_size: int = 224
    low_percentile: float = 1.0
    reference_percentile: float = 50.0
    reference_level: float = 0.5
    fov_margin: float = 0.08
    min_brain_fraction: float = 0.03

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size:
            raise ValueError(f"image_size must be an integer, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if not 0.0 <= self.low_percentile < 100.0 or not 0.0 < self.reference_percentile <= 100.0:
            raise ValueError(
                "need 0 <= low_percentile < 100 and 0 < reference_percentile <= 100, got "
                f"{self.low_percentile} and {self.reference_percentile}"
            )
        if not 0.0 < self.reference_level <= 1.0:
            raise ValueError(f"reference_level must be in (0, 1], got {self.reference_level}")
        if not 0.0 <= self.fov_margin <= 10.0:
            raise ValueError(f"fov_margin must be in [0, 10], got {self.fov_margin}")
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError(f"min_brain_fraction must be in [0, 1), got {self.min_brain_fraction}")


@dataclass
class PreparedVolume:
    """Model-ready axial images of one volume and what is needed to map results back.

    ``images`` float32 ``[N, S, S]`` in [0, 1]; ``masks`` bool ``[N, S, S]``;
    ``slice_indices`` int ``[N]``: canonical axis-2 index of each kept slice. The FOV
    fields follow the module docstring: ``fov_origin_ij`` is the canonical ``(i, j)``
    of the centre of pixel (row 0, col 0), ``fov_step_ij`` the change of ``(i, j)`` per
    column and per row, ``pixel_size_mm`` the square pixel size. ``intensity_low`` /
    ``intensity_high`` are the raw values mapped to 0 and 1.
    """

    images: np.ndarray
    masks: np.ndarray
    slice_indices: np.ndarray
    reorientation: AxisReorientation
    shape: tuple[int, int, int]
    affine: np.ndarray
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    fov_origin_ij: np.ndarray
    fov_step_ij: np.ndarray
    pixel_size_mm: float
    intensity_low: float
    intensity_high: float
    name: str = "volume"

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square model images."""
        return int(self.images.shape[-1])

    @property
    def num_slices(self) -> int:
        """Number of kept slices ``N``."""
        return int(self.images.shape[0])


def _interp_matrix(coords: np.ndarray, n: int, order: int) -> sparse.csr_matrix:
    """Sparse ``[len(coords), n]`` matrix sampling a length-``n`` axis at ``coords``.

    order 1 = linear, order 0 = nearest; coordinates outside ``[0, n - 1]`` give a zero
    row (like ``map_coordinates(mode="constant", cval=0)``).
    """
    x = np.asarray(coords, dtype=np.float64)
    m = x.shape[0]
    valid = (x >= -_EDGE_EPS) & (x <= n - 1 + _EDGE_EPS)
    rows = np.flatnonzero(valid)
    xv = np.clip(x[valid], 0.0, n - 1)
    if order == 0:
        cols = np.minimum(np.floor(xv + 0.5).astype(np.int64), n - 1)
        data = np.ones(rows.shape[0], dtype=np.float32)
    elif order == 1:
        i0 = np.minimum(np.floor(xv).astype(np.int64), max(n - 2, 0))
        w1 = xv - i0  # 0 when n == 1 (xv clipped to 0)
        i1 = np.minimum(i0 + 1, n - 1)
        rows = np.concatenate([rows, rows])
        cols = np.concatenate([i0, i1])
        data = np.concatenate([1.0 - w1, w1]).astype(np.float32)
    else:
        raise ValueError(f"interpolation order must be 0 (nearest) or 1 (linear), got {order}")
    return sparse.csr_matrix((data, (rows, cols)), shape=(m, n), dtype=np.float32)


def _resample_slices(arr: np.ndarray, col_i: np.ndarray, row_j: np.ndarray) -> np.ndarray:
    """Sample every axial slice of a canonical ``(I, J, K)`` array -> ``[K, S, S]`` float32."""
    ni, nj, nk = arr.shape
    wc = _interp_matrix(col_i, ni, 1)  # [S, I]
    wr = _interp_matrix(row_j, nj, 1)  # [S, J]
    s = col_i.shape[0]
    a = wc @ arr.reshape(ni, nj * nk)  # [S_c, J*K]
    a = np.ascontiguousarray(a.reshape(s, nj, nk).transpose(1, 0, 2)).reshape(nj, s * nk)
    b = wr @ a  # [S_r, S_c*K]
    out = np.ascontiguousarray(np.asarray(b, dtype=np.float32).reshape(s, s, nk).transpose(2, 0, 1))
    return out


def _volume_name(volume: Volume) -> str:
    return volume.name if isinstance(volume, Volume) else "volume"


def prepare_volume(volume: Volume, config: Optional[PreprocessConfig] = None) -> PreparedVolume:
    """Preprocess one volume into model-ready axial images (see module docstring).

    Raises InputError for a non-3D, non-finite or constant volume, and when no slice
    has enough tissue ("no brain tissue found in <name> ...").
    """
    cfg = config if config is not None else PreprocessConfig()
    name = _volume_name(volume)
    data = np.asarray(volume.data)
    if data.ndim != 3 or data.size == 0:
        raise InputError(f"{name}: not a 3D volume (shape {data.shape})")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    affine = np.asarray(volume.affine, dtype=np.float64)

    reo = canonical_reorientation(affine, data.shape)
    arr = reo.to_canonical(data)
    caff = reo.canonical_affine(affine)

    vmin, vmax = float(arr.min()), float(arr.max())
    if not vmax > vmin:
        raise InputError(f"{name}: constant volume (every voxel is {vmin:g}); nothing to segment")
    otsu = float(threshold_otsu(arr))
    fg = arr > otsu
    if not fg.any():  # cannot happen for a non-constant volume, but never index empty arrays
        fg = arr > vmin
    low = float(np.percentile(arr, cfg.low_percentile))
    reference = float(np.percentile(arr[fg], cfg.reference_percentile))
    if not reference > low:
        reference = vmax
    # raw value that maps to 1: the reference lands at reference_level
    high = low + (reference - low) / cfg.reference_level
    if not high > low:
        raise InputError(f"{name}: no usable intensity range (percentiles give low = high = {low:g})")

    # Normalise into a new array (arr may be the caller's data).
    norm = np.subtract(arr, np.float32(low), dtype=np.float32)
    norm *= np.float32(1.0 / (high - low))
    np.clip(norm, 0.0, 1.0, out=norm)

    # Square FOV in mm around the foreground bounding box (union over slices).
    proj = fg.any(axis=2)
    ii = np.flatnonzero(proj.any(axis=1))
    jj = np.flatnonzero(proj.any(axis=0))
    si, sj = (float(v) for v in voxel_spacing(caff)[:2])
    extent = max((ii[-1] - ii[0] + 1) * si, (jj[-1] - jj[0] + 1) * sj)
    size = cfg.image_size
    pixel = extent * (1.0 + cfg.fov_margin) / size
    half = (size - 1) / 2.0
    centre_i, centre_j = (ii[0] + ii[-1]) / 2.0, (jj[0] + jj[-1]) / 2.0
    step = np.array([-pixel / si, -pixel / sj])
    origin = np.array([centre_i, centre_j]) - half * step

    s = np.arange(size, dtype=np.float64)
    images = _resample_slices(norm, origin[0] + s * step[0], origin[1] + s * step[1])
    np.clip(images, 0.0, 1.0, out=images)
    masks = tissue_masks(images)
    keep = masks.reshape(masks.shape[0], -1).mean(axis=1) >= cfg.min_brain_fraction
    if cfg.min_brain_fraction == 0.0:
        keep &= masks.reshape(masks.shape[0], -1).any(axis=1)
    if not keep.any():
        raise InputError(
            f"no brain tissue found in {name}: no axial slice has tissue over "
            f"{cfg.min_brain_fraction:.1%} of the field of view (is this a head scan?)"
        )
    idx = np.flatnonzero(keep)
    return PreparedVolume(
        images=np.ascontiguousarray(images[idx]),
        masks=np.ascontiguousarray(masks[idx]),
        slice_indices=idx.astype(np.int64),
        reorientation=reo,
        shape=tuple(int(v) for v in data.shape),  # type: ignore[arg-type]
        affine=affine.copy(),
        canonical_shape=reo.canonical_shape(),
        canonical_affine=caff,
        fov_origin_ij=origin,
        fov_step_ij=step,
        pixel_size_mm=float(pixel),
        intensity_low=low,
        intensity_high=high,
        name=name,
    )


def to_volume_grid(maps: np.ndarray, prepared: PreparedVolume, *, order: int = 1) -> np.ndarray:
    """Map model-space maps ``[N, S, S]`` (one per kept slice) onto the original voxel grid.

    Returns float32 ``(I, J, K)`` in the input volume's index order: each kept slice is
    sampled from its map with interpolation ``order`` (1 linear, 0 nearest), voxels
    outside the FOV and slices not kept are 0, then the reorientation is undone.
    """
    maps = np.asarray(maps)
    n, size = prepared.num_slices, prepared.image_size
    if maps.shape != (n, size, size):
        raise ValueError(f"expected maps of shape {(n, size, size)}, got {maps.shape}")
    maps = maps.astype(np.float32, copy=False)
    ni, nj, nk = prepared.canonical_shape
    origin, step = prepared.fov_origin_ij, prepared.fov_step_ij
    col_of_i = (np.arange(ni) - origin[0]) / step[0]
    row_of_j = (np.arange(nj) - origin[1]) / step[1]
    ci = _interp_matrix(col_of_i, size, order)  # [I, S_c]
    rj = _interp_matrix(row_of_j, size, order)  # [J, S_r]
    m = np.ascontiguousarray(maps.transpose(1, 0, 2)).reshape(size, n * size)  # [S_r, N*S_c]
    t = rj @ m  # [J, N*S_c]
    t = np.ascontiguousarray(np.asarray(t).reshape(nj, n, size).transpose(2, 0, 1)).reshape(size, nj * n)
    u = np.asarray(ci @ t, dtype=np.float32).reshape(ni, nj, n)  # [I, J, N]
    canonical = np.zeros((ni, nj, nk), dtype=np.float32)
    canonical[:, :, prepared.slice_indices] = u
    return prepared.reorientation.from_canonical(canonical)


def brain_mask_in_volume(prepared: PreparedVolume) -> np.ndarray:
    """The kept slices' tissue masks on the original voxel grid (bool ``(I, J, K)``)."""
    return to_volume_grid(prepared.masks.astype(np.float32), prepared, order=1) >= 0.5


def pixel_to_ras(prepared: PreparedVolume, slice_index: int, rows, cols) -> np.ndarray:
    """RAS mm of pixel centres ``(rows, cols)`` on canonical axial slice ``slice_index``.

    ``rows``/``cols`` broadcast together; returns an array of shape ``(..., 3)``.
    """
    rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64))
    i = prepared.fov_origin_ij[0] + cols * prepared.fov_step_ij[0]
    j = prepared.fov_origin_ij[1] + rows * prepared.fov_step_ij[1]
    ijk1 = np.stack([i, j, np.full_like(i, float(slice_index)), np.ones_like(i)], axis=-1)
    return (ijk1 @ prepared.canonical_affine.T)[..., :3]
