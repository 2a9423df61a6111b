"""From an anomaly map to a mask: the one thresholding rule and the healthy-only operating point.

Torch-free (the Slicer GUI process re-thresholds with it). A mask is::

    brain & (heatmap > threshold), minus 26-connected components smaller than
    ``min_component_ml`` millilitres

optionally with *hysteresis* (``grow_threshold`` below ``threshold``): every 26-connected
component of ``brain & (heatmap > grow_threshold)`` that holds at least one voxel above
``threshold`` is kept whole. The strict threshold decides *where* something is flagged (so
it still controls the false components), the lower one how far a flagged region extends:
a strict healthy threshold alone keeps only a lesion's core. Both thresholds are healthy
percentiles; the grown mask is what the operating point's false components are counted on.

The *operating point* is chosen on held-out **healthy** volumes only, never on lesions:
starting from the method's default healthy percentile, the threshold is raised (to a
higher healthy percentile) until those volumes carry on average at most
``max_false_components`` components of at least ``min_component_ml`` -- every component
on a healthy volume is a false one. Volumes are in millilitres so the rule means the
same at 1 mm and at 2 mm.

The budget is a promise about *new* healthy scans, and a mean over the handful of
calibration volumes (8 of 40 by default) is a noisy estimate of it: a threshold that
just meets the budget there can exceed it on new scans (measured: <= 1 on the
calibration volumes, 1.2 on the lesion-free volumes of a fresh held-out seed). So the rule is applied
to a one-sided Poisson upper confidence bound of the per-volume rate
(``budget_confidence``, default 90 %), not to the raw mean: the margin is large with few
calibration volumes and shrinks as more are given. ``budget_confidence=0`` is the plain
mean.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .lesions import mask_bounding_box

__all__ = [
    "DEFAULT_MIN_COMPONENT_ML",
    "DEFAULT_MAX_FALSE_COMPONENTS",
    "min_component_voxels",
    "smooth_in_mask",
    "standardise_scan",
    "standardisation_stages",
    "remove_small_components",
    "count_components",
    "threshold_mask",
    "grow_into",
    "DEFAULT_BUDGET_CONFIDENCE",
    "false_rate_upper_bound",
    "meets_false_component_budget",
    "select_operating_percentile",
]

#: Smallest reported lesion, mL (0.1 mL: a sphere of ~5.8 mm diameter; 12.5 voxels at 2 mm).
DEFAULT_MIN_COMPONENT_ML = 0.1

#: False components allowed per healthy volume, on average, at the operating point.
DEFAULT_MAX_FALSE_COMPONENTS = 1.0

#: Confidence with which the operating point keeps the budget on new healthy scans
#: (one-sided Poisson upper bound of the calibration volumes' false-component rate).
DEFAULT_BUDGET_CONFIDENCE = 0.9

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, like lesions.find_lesions


def min_component_voxels(min_component_ml: float, voxel_ml: float) -> int:
    """Smallest kept component in voxels: ``ceil(min_component_ml / voxel_ml)`` (1 when 0 mL)."""
    if not min_component_ml >= 0 or not math.isfinite(min_component_ml):
        raise ValueError(f"minimum component volume must be a finite number >= 0 mL, got {min_component_ml}")
    if not voxel_ml > 0 or not math.isfinite(voxel_ml):
        raise ValueError(f"voxel volume must be a finite number > 0 mL, got {voxel_ml}")
    # the small tolerance keeps 0.1 mL / 0.008 mL = 12.5000000001 at 13, and 0.1 / 0.001 at 100
    return max(1, int(math.ceil(min_component_ml / voxel_ml - 1e-9)))


def _labels(mask: np.ndarray) -> Tuple[tuple, np.ndarray, np.ndarray]:
    """``(box, labels, sizes)`` of a non-empty mask's components, labelled inside its
    bounding box only (labelling is the cost; lesions and false blobs are local)."""
    box = mask_bounding_box(mask)
    labels, count = ndimage.label(mask[box], structure=_STRUCTURE)
    return box, labels, np.bincount(labels.ravel(), minlength=count + 1)


def smooth_in_mask(heatmap: np.ndarray, brain_mask: np.ndarray, sigma_mm: float, spacing_mm: Sequence[float],
                   *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Gaussian smoothing (sigma in mm, per-axis voxel spacing) restricted to the brain.

    Normalised convolution: ``G*(h m) / G*m`` inside the mask, 0 outside, so values from
    outside the brain (zeros) do not pull the map down along the brain boundary.
    ``sigma_mm`` 0 returns a float32 copy. ``out`` (float32, may be ``heatmap`` itself:
    smoothing in place) receives the result.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    brain = np.asarray(brain_mask, dtype=bool)
    if out is None:
        out = np.zeros_like(heat)
    elif out.shape != heat.shape or out.dtype != np.float32:
        raise ValueError("smooth_in_mask: out must be float32 of the heatmap's shape")
    if not sigma_mm > 0:
        if out is not heat:
            out[...] = heat
        return out
    sigma = [float(sigma_mm) / float(s) for s in spacing_mm]
    # Slabs along the last axis with a halo of the kernel's radius give exactly the
    # whole-volume result (each output voxel sees the same inputs) while the temporaries
    # stay a slab's size instead of four copies of the volume (large volumes: issue 12).
    # In place, the original planes of the previous slab's end are kept for the next halo.
    nk = heat.shape[-1]
    halo = int(3.0 * sigma[-1] + 0.5)
    slab = max(SMOOTH_SLAB, halo, 1)  # >= halo: the kept planes are all still original
    in_place = np.shares_memory(out, heat)
    kept = None  # original planes [kept_from, k0) when smoothing in place
    kept_from = 0
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        a0, a1 = max(0, k0 - halo), min(nk, k1 + halo)
        block = heat[..., a0:a1]
        if in_place and a0 < k0:
            block = np.concatenate([kept[..., a0 - kept_from:], heat[..., k0:a1]], axis=-1)
        part_brain = brain[..., a0:a1]
        num = np.where(part_brain, block, np.float32(0.0)).astype(np.float32, copy=False)
        del block
        ndimage.gaussian_filter(num, sigma, output=num, mode="constant", truncate=3.0)
        den = part_brain.astype(np.float32)
        ndimage.gaussian_filter(den, sigma, output=den, mode="constant", truncate=3.0)
        inner = slice(k0 - a0, k1 - a0)
        num, den, part_brain = num[..., inner], den[..., inner], part_brain[..., inner]
        if in_place:
            kept_from = max(0, k1 - halo)
            kept = heat[..., kept_from:k1].copy()
        result = np.zeros(num.shape, dtype=np.float32)
        np.divide(num, den, out=result, where=part_brain & (den > 1e-6))
        out[..., k0:k1] = result
    return out


#: Planes per slab of :func:`smooth_in_mask`.
SMOOTH_SLAB = 16


#: Brain voxels used for a scan's percentiles at most (every k-th plane beyond it): exact
#: for any brain up to ~4 M voxels (a 1 mm brain has ~1.3 M), bounded memory above.
STANDARDISE_MAX_VOXELS = 4_000_000


def standardisation_stages(scan_normalise: str) -> Tuple[str, str]:
    """Where a ``MethodParams.scan_normalise`` setting acts: ``(model_space, voxel_grid)``,
    each the :func:`standardise_scan` mode for that stage (``off`` where it does not act).
    ``terms-*`` standardise the fused terms in model space, the others the final voxel-grid map."""
    if scan_normalise.startswith("terms-"):
        return scan_normalise[len("terms-"):], "off"
    return "off", scan_normalise


def standardise_scan(heatmap: np.ndarray, brain_mask: np.ndarray, mode: str) -> np.ndarray:
    """Standardise a scan's map by its own brain-voxel distribution, in place; returns it.

    ``interdecile``: ``(s - median) / (p90 - p10)``; ``upper``: ``(s - median) / (p90 -
    median)``; ``off``: unchanged. Percentiles are over the brain voxels (every k-th plane
    along the last axis when there are more than :data:`STANDARDISE_MAX_VOXELS`); voxels
    outside the brain stay as they are. Why: a healthy scan's whole score distribution
    shifts and widens with acquisition (bias field, contrast, noise), and its tail moves
    with it, so one healthy threshold fits some scans and floods others; lesions occupy a
    small fraction of the brain and barely move the median or the deciles. A flat map
    (zero spread) is only centred.
    """
    if mode == "off":
        return heatmap
    if mode not in ("interdecile", "upper"):
        raise ValueError(f"unknown scan standardisation {mode!r}")
    brain = np.asarray(brain_mask, dtype=bool)
    count = int(np.count_nonzero(brain))
    if count == 0:
        return heatmap
    step = max(1, math.ceil(count / STANDARDISE_MAX_VOXELS))
    values = heatmap[..., ::step][brain[..., ::step]].astype(np.float64)
    p10, p50, p90 = np.percentile(values, [10.0, 50.0, 90.0], overwrite_input=True)
    del values
    spread = (p90 - p10) if mode == "interdecile" else (p90 - p50)
    scale = 1.0 / spread if spread > 1e-12 * max(1.0, abs(p50)) else 1.0
    np.subtract(heatmap, heatmap.dtype.type(p50), out=heatmap, where=brain)
    np.multiply(heatmap, heatmap.dtype.type(scale), out=heatmap, where=brain)
    return heatmap


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Boolean copy of ``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    mask = np.asarray(mask, dtype=bool)
    if min_voxels <= 1 or not mask.any():
        return mask.copy()
    box, labels, sizes = _labels(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    out = np.zeros_like(mask)
    out[box] = keep[labels]
    return out


def count_components(mask: np.ndarray, min_voxels: int = 1) -> int:
    """Number of 26-connected components of ``mask`` with at least ``min_voxels`` voxels."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0
    _, _, sizes = _labels(mask)
    return int((sizes[1:] >= max(1, min_voxels)).sum())


def grow_into(seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The 26-connected components of ``region`` that contain a voxel of ``seeds``
    (seeds outside ``region`` are ignored)."""
    region = np.asarray(region, dtype=bool)
    seeds = np.asarray(seeds, dtype=bool) & region
    out = np.zeros_like(region)
    if not seeds.any():
        return out
    box, labels, sizes = _labels(region)
    keep = np.zeros(len(sizes), dtype=bool)
    keep[np.unique(labels[seeds[box]])] = True
    keep[0] = False
    out[box] = keep[labels]
    return out


def _flagged(heatmap: np.ndarray, brain_mask: np.ndarray, threshold: float,
             grow_threshold: Optional[float]) -> np.ndarray:
    """Brain voxels above ``threshold``, grown to ``grow_threshold`` when it is lower (no size filter)."""
    heatmap = np.asarray(heatmap)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if heatmap.shape != brain_mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and brain mask {brain_mask.shape} differ in shape")
    mask = (heatmap > threshold) & brain_mask
    if grow_threshold is not None and grow_threshold < threshold:
        mask = grow_into(mask, (heatmap > grow_threshold) & brain_mask)
    return mask


def threshold_mask(heatmap: np.ndarray, brain_mask: np.ndarray, threshold: float, min_voxels: int = 1,
                   grow_threshold: Optional[float] = None) -> np.ndarray:
    """The one thresholding rule: brain voxels scoring above ``threshold`` -- grown, when
    ``grow_threshold`` is below it, to the whole connected regions above ``grow_threshold``
    (hysteresis) -- with components of fewer than ``min_voxels`` voxels removed."""
    return remove_small_components(_flagged(heatmap, brain_mask, threshold, grow_threshold), min_voxels)


def false_rate_upper_bound(total: int, n_volumes: int, confidence: float) -> float:
    """Upper confidence bound of a per-volume false-component rate from ``total``
    components counted on ``n_volumes`` volumes.

    Exact one-sided Poisson bound: the rate ``u`` with ``P(X <= total | n_volumes * u) =
    1 - confidence``, i.e. ``chi2.ppf(confidence, 2 * (total + 1)) / (2 * n_volumes)``;
    ``confidence == 0`` gives the plain mean ``total / n_volumes``.
    """
    if n_volumes < 1:
        raise ValueError(f"need at least one volume, got {n_volumes}")
    if total < 0:
        raise ValueError(f"component count must be >= 0, got {total}")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"budget confidence must be in [0, 1), got {confidence}")
    if confidence == 0.0:
        return total / n_volumes
    from scipy.stats import chi2

    return float(chi2.ppf(confidence, 2 * (total + 1))) / (2.0 * n_volumes)


def meets_false_component_budget(total: int, n_volumes: int, max_false_components: float,
                                 confidence: float) -> bool:
    """The budget rule: ``total`` false components on ``n_volumes`` healthy volumes keep
    ``max_false_components`` per volume when their :func:`false_rate_upper_bound` does, or
    when there are none (no calibration set can show better, and with one or two volumes
    even zero has a bound above 1)."""
    return total == 0 or false_rate_upper_bound(total, n_volumes, confidence) <= max_false_components


def select_operating_percentile(
    healthy: Sequence[Tuple[np.ndarray, np.ndarray, float]],
    threshold_at: Callable[[float], float],
    percentiles: Sequence[float],
    *,
    start_percentile: float,
    min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
    max_false_components: float = DEFAULT_MAX_FALSE_COMPONENTS,
    budget_confidence: float = DEFAULT_BUDGET_CONFIDENCE,
    grow_threshold: Optional[float] = None,
) -> Tuple[float, float]:
    """Lowest healthy percentile >= ``start_percentile`` meeting the false-component budget.

    ``healthy`` holds ``(heatmap, brain_mask, voxel_ml)`` of held-out healthy volumes;
    ``threshold_at(p)`` maps a percentile to a score threshold (the calibration table);
    ``percentiles`` are the candidate percentiles (the table's). A candidate meets the
    budget when :func:`false_rate_upper_bound` of its components on these volumes, at
    ``budget_confidence``, is <= ``max_false_components``, or when they carry none.
    Components are counted on the masks :func:`threshold_mask` makes, grown to
    ``grow_threshold`` when one is given.
    Returns ``(percentile, mean false components per healthy volume at it)``. The count falls as the threshold rises
    (up to rare splits of one component into two; never with growth, whose components are
    fixed by ``grow_threshold`` and only drop out), so the candidates are bisected; if
    even the highest candidate exceeds the budget, it is returned with its count
    (callers report it: the budget is then not met).
    """
    if not healthy:
        raise ValueError("the operating point needs at least one healthy volume")
    if not max_false_components >= 0:
        raise ValueError(f"false-component budget must be >= 0, got {max_false_components}")
    cands = sorted(float(p) for p in percentiles if float(p) >= start_percentile and float(p) < 100.0)
    if not cands or cands[0] > start_percentile:
        cands.insert(0, float(start_percentile))
    min_voxels = [min_component_voxels(min_component_ml, v) for _, _, v in healthy]
    false_rate_upper_bound(0, len(healthy), budget_confidence)  # validates the confidence up front
    cache: dict = {}

    def total_false(index: int) -> int:
        if index not in cache:
            thr = threshold_at(cands[index])
            # the size rule is the count's own min_voxels: no filtered copy of each mask
            cache[index] = sum(count_components(_flagged(h, b, thr, grow_threshold), n)
                               for (h, b, _), n in zip(healthy, min_voxels))
        return cache[index]

    def meets(index: int) -> bool:
        return meets_false_component_budget(total_false(index), len(healthy), max_false_components,
                                            budget_confidence)

    def mean_false(index: int) -> float:
        return total_false(index) / len(healthy)

    if meets(0):
        return cands[0], mean_false(0)
    last = len(cands) - 1
    if not meets(last):
        return cands[last], mean_false(last)
    lo, hi = 0, last  # invariant: lo fails the budget, hi meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return cands[hi], mean_false(hi)
