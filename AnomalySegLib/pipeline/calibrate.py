"""Calibrate a model on held-out healthy volumes: run it, then build the table.

Scores the healthy volumes exactly as ``anomalyseg segment`` does (voxel grid, brain
mask, smoothing) and hands the maps to
:meth:`~AnomalySegLib.segmentation.calibration.Calibration.from_healthy_maps`, which
stores the quantile table and chooses the operating point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from ..data.preprocessing import PreparedVolume, prepare_volume
from ..errors import InputError
from ..io.geometry import voxel_volume_ml
from ..io.volume_io import Volume, read_volume
from ..model.bundle import AnomalyModel
from ..progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit
from ..segmentation.calibration import Calibration
from ..segmentation.postprocess import DEFAULT_MAX_FALSE_COMPONENTS, DEFAULT_MIN_COMPONENT_ML
from .inference import score_prepared, scores_on_volume_grid


def calibrate_prepared(
    model: AnomalyModel,
    prepared: Sequence[PreparedVolume],
    *,
    device: str = "auto",
    batch_size: int = 16,
    source: str = "",
    min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
    max_false_components: float = DEFAULT_MAX_FALSE_COMPONENTS,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> Calibration:
    """Calibrate on already-preprocessed healthy volumes (training reuses its held-out split).

    The scores are taken on each volume's own voxel grid, inside its brain mask: exactly
    the values that :func:`~AnomalySegLib.pipeline.inference.threshold_scores` compares with the
    threshold, so p98 flags 2 % of the calibration volumes' brain voxels. The operating
    point (minimum component volume, default percentile) is chosen on the same healthy
    volumes (:meth:`Calibration.from_healthy_maps`).
    """
    if not prepared:
        raise InputError("calibration needs at least one healthy volume")
    maps: list = []
    n_images = 0
    for index, item in enumerate(prepared):
        check_cancel(cancel)
        raw = score_prepared(model, item, device=device, batch_size=batch_size, cancel=cancel)
        scores = scores_on_volume_grid(raw, item, smoothing_mm=model.method.smoothing_mm,
                                       scan_normalise=model.method.scan_normalise)
        maps.append((scores.heatmap, scores.brain_mask, voxel_volume_ml(item.affine)))
        n_images += len(item.images)
        emit(progress, ProgressEvent("calibrate", (index + 1) / len(prepared),
                                     message=f"healthy volume {index + 1}/{len(prepared)}"))
    return Calibration.from_healthy_maps(
        maps, start_percentile=model.method.default_percentile,
        min_component_ml=min_component_ml, max_false_components=max_false_components,
        grow_percentile=model.method.grow_percentile or None, n_images=n_images, source=source)


def calibrate(
    model: AnomalyModel,
    healthy: Sequence[Union[Volume, str, Path]],
    *,
    device: str = "auto",
    batch_size: int = 16,
    min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
    max_false_components: float = DEFAULT_MAX_FALSE_COMPONENTS,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> Calibration:
    """Score brain-tissue pixels of healthy volumes and return their quantile table.

    ``healthy`` must contain normal scans only; they should not have been used for
    training (scores on training images are optimistically low).
    """
    prepared = []
    names = []
    for index, item in enumerate(healthy):
        check_cancel(cancel)
        volume = item if isinstance(item, Volume) else read_volume(item)
        prepared.append(prepare_volume(volume, model.preprocessing, progress=progress, cancel=cancel))
        names.append(str(volume.path.name) if volume.path is not None else f"volume{index}")
        emit(progress, ProgressEvent("prepare", (index + 1) / max(len(healthy), 1),
                                     message=f"read {index + 1}/{len(healthy)}"))
    source = f"{len(names)} healthy volume(s): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return calibrate_prepared(model, prepared, device=device, batch_size=batch_size, source=source,
                              min_component_ml=min_component_ml, max_false_components=max_false_components,
                              progress=progress, cancel=cancel)
