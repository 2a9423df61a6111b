"""Per-image brain-tissue masks (the paper's Otsu + closing mask, plus hole filling and,
on skull-stripped images, the brain's support).

The paper masks each image with an Otsu threshold followed by a morphological
closing (5x5 disk). We also fill holes: dark lesions, ventricles and CSF inside the
head then stay in the mask, so anomalies there can be scored. A dark lesion that touches
the brain's outer edge is not a hole (it is open to the background), so on images with an
all-zero background the mask also takes the brain's support eroded by 2 px
(:func:`brain_support`; stop 23, docs/BENCHMARKS.md). Both are documented deviations from
the paper. Each image is thresholded on its own (the authors' code shares one threshold
across a batch, a known bug we do not reproduce).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk

from ..cpus import worker_threads

#: Structuring element of the closing: a 5x5 disk.
CLOSING_FOOTPRINT = disk(2).astype(bool)

#: Background kept around the foreground's bounding box: twice the closing's radius (the
#: dilation's reach, then the erosion's window) plus one pixel for the hole filling.
_CROP_FRAME = 2 * (CLOSING_FOOTPRINT.shape[0] // 2) + 2


def _framed_box(mask: np.ndarray) -> Tuple[slice, slice]:
    """Bounding box of a non-empty 2D mask plus :data:`_CROP_FRAME` pixels of background
    (clipped to the image): where the closing, hole filling and erosion can change anything."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (slice(max(rows[0] - _CROP_FRAME, 0), rows[-1] + _CROP_FRAME + 1),
            slice(max(cols[0] - _CROP_FRAME, 0), cols[-1] + _CROP_FRAME + 1))


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of one 2D image: Otsu threshold, closing (5x5 disk), hole filling.

    A constant image (including an all-zero one) gives an all-False mask.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"tissue_mask expects one 2D image, got shape {img.shape}")
    img = img.astype(np.float32, copy=False)
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return np.zeros(img.shape, dtype=bool)
    mask = img > threshold_otsu(img)
    # Close and fill inside the foreground's bounding box plus a frame of background: the
    # same result as on the whole image (the closing reaches 2 px beyond the foreground and
    # the frame keeps the outside background connected to the border for the hole filling),
    # at a fraction of the cost when the head fills part of the field of view.
    box = _framed_box(mask)
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = ndimage.binary_fill_holes(closing(mask[box], CLOSING_FOOTPRINT))
    support = brain_support(img, out)
    if support is not None:
        out |= support
    return out


#: Largest brain support, relative to the Otsu tissue mask, still taken for a brain: a
#: support much larger than the tissue is a head, a field of view or background noise.
MAX_SUPPORT_RATIO = 1.5


def brain_support(image: np.ndarray, tissue: np.ndarray) -> Optional[np.ndarray]:
    """The inside of a skull-stripped brain: its non-zero region, holes filled, eroded by
    the closing's radius (2 px: the partial-volume rim at the brain's edge stays out).

    A dark lesion below the slice's Otsu threshold that touches the brain's outer edge (a
    cortical infarct on T1) is open to the background, so neither the closing nor the hole
    filling brings it into the tissue mask; the support does. Only for images whose
    background is exactly 0 all along the image's edge (skull-stripped or brain-extracted,
    as preprocessing delivers them) and whose support is at most :data:`MAX_SUPPORT_RATIO`
    times the tissue mask; None otherwise (then the tissue mask is the paper's rule alone).
    """
    positive = image > 0
    # skull-stripped slices lie inside an all-zero frame (preprocessing's field of view has a
    # margin); a noisy or cropped background (some voxels clipped to 0) does not
    frame = np.concatenate([positive[0], positive[-1], positive[:, 0], positive[:, -1]])
    if frame.any() or not positive.any() or not tissue.any():
        return None
    # Fill and erode inside the non-zero region's bounding box plus a frame of background,
    # as tissue_mask does: the same result as on the whole image (the frame keeps the
    # outside connected for the hole filling and is wider than the erosion's reach), at a
    # third of the whole-slice cost on 224 px slices (docs/BENCHMARKS.md, stop 24).
    box = _framed_box(positive)
    inside = ndimage.binary_erosion(ndimage.binary_fill_holes(positive[box]), CLOSING_FOOTPRINT)
    if inside.sum() > MAX_SUPPORT_RATIO * tissue.sum():
        return None
    support = np.zeros(positive.shape, dtype=bool)
    support[box] = inside
    return support


#: Images per thread below which :func:`tissue_masks` stays in the calling thread.
MIN_IMAGES_PER_THREAD = 16


def tissue_masks(images: np.ndarray, *, threads: Optional[int] = None) -> np.ndarray:
    """Boolean masks ``[N, H, W]`` of a stack of 2D images, each thresholded on its own.

    Images are independent and the histogram, closing and hole filling release the GIL, so
    a volume's slices are split across ``threads`` (default: the usable CPUs, at most 8;
    at least :data:`MIN_IMAGES_PER_THREAD` images each). The result does not depend on it.
    """
    imgs = np.asarray(images)
    if imgs.ndim != 3:
        raise ValueError(f"tissue_masks expects [N, H, W] images, got shape {imgs.shape}")
    out = np.zeros(imgs.shape, dtype=bool)
    count = imgs.shape[0]
    workers = worker_threads() if threads is None else max(1, int(threads))
    workers = min(workers, max(1, count // MIN_IMAGES_PER_THREAD))

    def fill(part: range) -> None:
        for n in part:
            out[n] = tissue_mask(imgs[n])

    if workers == 1:
        fill(range(count))
    else:
        with ThreadPoolExecutor(workers) as pool:  # each thread writes its own images
            list(pool.map(fill, (range(w, count, workers) for w in range(workers))))
    return out
