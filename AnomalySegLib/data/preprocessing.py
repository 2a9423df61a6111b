"""The one preprocessing path shared by training, calibration and inference.

:func:`prepare_volume` turns a :class:`~AnomalySegLib.io.volume_io.Volume` into square 2D
axial images in [0, 1] plus per-image tissue masks; :func:`to_volume_grid` maps
model-space maps (one per kept slice) back onto the volume's own voxel grid.

Steps (docs/ARCHITECTURE.md, "Preprocessing"):

0. raw input (:func:`.raw_input.prepare_raw_input`): input check (skull present?), brain
   extraction (``config.brain_extraction``: auto | deepbet | off) and N4 bias correction
   (``config.bias_correction``); voxels outside an extracted brain are set to 0. With the
   defaults a skull-stripped volume passes through unchanged;
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
   slices, without specks under 1% of the head's projection: an isolated outlier voxel
   moves neither the FOV nor, capped for the Otsu threshold, the normalisation), side = largest extent * (1 + ``fov_margin``), resampled to
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
from scipy import ndimage, sparse
from skimage.filters import threshold_otsu

from .brain_mask import tissue_masks
from .raw_input import prepare_raw_input, resolve_brain_extraction
from ..errors import InputError
from ..io.geometry import AxisReorientation, canonical_reorientation, voxel_spacing
from ..settings import JsonSettings
from ..io.volume_io import Volume
from ..progress import CancelCallback, ProgressCallback

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
    #: ``auto`` (extract the brain when the input check finds a skull), ``deepbet``
    #: (always), ``off`` (never; a scan with a skull is refused). Model files written
    #: before this field read as ``auto``: on skull-stripped data nothing changes.
    brain_extraction: str = "auto"
    #: N4 bias-field correction before the normalisation (off: see docs/BENCHMARKS.md).
    bias_correction: bool = False

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
        self.brain_extraction = resolve_brain_extraction(self.brain_extraction)
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"bias_correction must be true or false, got {self.bias_correction!r}")


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
    #: The raw-input step's record (input check, extraction, bias correction; JSON-able)
    #: and the extracted brain (bool, the input's voxel grid) or None when not extracted.
    raw_input: Optional[dict] = None
    extracted_brain: Optional[np.ndarray] = None

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


#: Percentile above which a voxel may be an outlier, and how far (in multiples of the
#: ``low``..p99.9 range) above it the maximum must lie to be capped for the Otsu threshold.
OUTLIER_PERCENTILE = 99.9
OUTLIER_FACTOR = 3.0

#: Foreground components of the in-plane projection smaller than this share of the largest
#: one (isolated bright voxels outside the head) do not widen the field of view.
MIN_FOV_COMPONENT_FRACTION = 0.01


def _head_projection(proj: np.ndarray) -> np.ndarray:
    """The in-plane foreground projection without specks far from the head.

    The field of view is the bounding box of the foreground; one bright voxel in a corner
    would otherwise stretch it to the whole slice and change every model input. Only the
    8-connected components of at least :data:`MIN_FOV_COMPONENT_FRACTION` of the largest
    one are kept (a clean head projects to one component: unchanged).
    """
    labels, count = ndimage.label(proj, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return proj
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_FOV_COMPONENT_FRACTION * sizes.max()) + 1
    return np.isin(labels, keep)


def _volume_name(volume: Volume) -> str:
    return volume.name if isinstance(volume, Volume) else "volume"


def prepare_volume(volume: Volume, config: Optional[PreprocessConfig] = None, *,
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelCallback] = None) -> PreparedVolume:
    """Preprocess one volume into model-ready axial images (see module docstring).

    Raises InputError for a non-3D, non-finite or constant volume, for a scan with its
    skull when ``config.brain_extraction`` is ``off``, and when no slice has enough
    tissue ("no brain tissue found in <name> ..."). ``progress`` / ``cancel`` reach the
    brain extraction and bias correction (stages ``skullstrip`` and ``bias``).
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
    # Step 0 (data/raw_input.py): input check, brain extraction, bias correction; on a
    # skull-stripped volume with the default settings the data pass through unchanged.
    raw = prepare_raw_input(data, affine, brain_extraction=cfg.brain_extraction,
                            bias_correction=cfg.bias_correction, name=name, progress=progress, cancel=cancel)
    arr = reo.to_canonical(raw.data)
    caff = reo.canonical_affine(affine)

    vmin, vmax = float(arr.min()), float(arr.max())
    if not vmax > vmin:
        raise InputError(f"{name}: constant volume (every voxel is {vmin:g}); nothing to segment")
    low, top = (float(v) for v in np.percentile(arr, [cfg.low_percentile, OUTLIER_PERCENTILE]))
    # An isolated extreme voxel (a hot pixel, a marker, a corrupted corner) must not set the
    # foreground threshold: when the maximum lies far above the 99.9th percentile, Otsu runs
    # on values capped there (a clean volume never reaches this branch: unchanged result).
    cap = top + OUTLIER_FACTOR * (top - low)
    otsu = float(threshold_otsu(np.minimum(arr, np.float32(cap)) if vmax > cap else arr))
    fg = arr > otsu
    if not fg.any():  # cannot happen for a non-constant volume, but never index empty arrays
        fg = arr > vmin
    raw_proj = fg.any(axis=2)
    proj = _head_projection(raw_proj)
    if not np.array_equal(proj, raw_proj):  # specks outside the head: not foreground either
        fg &= proj[:, :, None]
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
        raw_input=raw.report,
        extracted_brain=raw.brain_mask,
    )


#: Kept slices mapped back per chunk in :func:`to_volume_grid` (bounds its temporaries).
GRID_CHUNK_SLICES = 16


def to_volume_grid(maps: np.ndarray, prepared: PreparedVolume, *, order: int = 1,
                   threshold: Optional[float] = None) -> np.ndarray:
    """Map model-space maps ``[N, S, S]`` (one per kept slice) onto the original voxel grid.

    Returns float32 ``(I, J, K)`` in the input volume's index order: each kept slice is
    sampled from its map with interpolation ``order`` (1 linear, 0 nearest), voxels
    outside the FOV and slices not kept are 0, then the reorientation is undone. With
    ``threshold`` the result is the bool ``value >= threshold`` instead.

    Slices are mapped in chunks straight into the output (through a canonical view of
    it), so the only full-size array is the result itself (large volumes: issue 12).
    """
    maps = np.asarray(maps)
    n, size = prepared.num_slices, prepared.image_size
    if maps.shape != (n, size, size):
        raise ValueError(f"expected maps of shape {(n, size, size)}, got {maps.shape}")
    ni, nj, nk = prepared.canonical_shape
    origin, step = prepared.fov_origin_ij, prepared.fov_step_ij
    col_of_i = (np.arange(ni) - origin[0]) / step[0]
    row_of_j = (np.arange(nj) - origin[1]) / step[1]
    ci = _interp_matrix(col_of_i, size, order)  # [I, S_c]
    rj = _interp_matrix(row_of_j, size, order)  # [J, S_r]
    out = np.zeros(prepared.shape, dtype=bool if threshold is not None else np.float32)
    canonical = prepared.reorientation.canonical_view(out)  # [I, J, K] view of out
    for start in range(0, n, GRID_CHUNK_SLICES):
        chunk = maps[start:start + GRID_CHUNK_SLICES].astype(np.float32, copy=False)
        c = chunk.shape[0]
        m = np.ascontiguousarray(chunk.transpose(1, 0, 2)).reshape(size, c * size)  # [S_r, c*S_c]
        t = rj @ m  # [J, c*S_c]
        t = np.ascontiguousarray(np.asarray(t).reshape(nj, c, size).transpose(2, 0, 1)).reshape(size, nj * c)
        u = np.asarray(ci @ t, dtype=np.float32).reshape(ni, nj, c)  # [I, J, c]
        ks = prepared.slice_indices[start:start + c]
        canonical[:, :, ks] = (u >= threshold) if threshold is not None else u
    return out


def brain_mask_in_volume(prepared: PreparedVolume) -> np.ndarray:
    """The kept slices' tissue masks on the original voxel grid (bool ``(I, J, K)``),
    within the extracted brain when extraction ran (so maps are 0 outside it)."""
    brain = to_volume_grid(prepared.masks, prepared, order=1, threshold=0.5)
    if prepared.extracted_brain is not None:
        brain &= prepared.extracted_brain
    return brain


def pixel_to_ras(prepared: PreparedVolume, slice_index: int, rows, cols) -> np.ndarray:
    """RAS mm of pixel centres ``(rows, cols)`` on canonical axial slice ``slice_index``.

    ``rows``/``cols`` broadcast together; returns an array of shape ``(..., 3)``.
    """
    rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64))
    i = prepared.fov_origin_ij[0] + cols * prepared.fov_step_ij[0]
    j = prepared.fov_origin_ij[1] + rows * prepared.fov_step_ij[1]
    ijk1 = np.stack([i, j, np.full_like(i, float(slice_index)), np.ones_like(i)], axis=-1)
    return (ijk1 @ prepared.canonical_affine.T)[..., :3]
