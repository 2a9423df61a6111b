"""Inference: a model's anomaly map on the input's own voxel grid, then its segmentation.

For the attention methods only the encoder up to the attention stage runs (AMCons) or
the encoder alone (GradCAMCons needs d z_mu / d A); the decoder never runs for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..data.preprocessing import PreparedVolume, brain_mask_in_volume, prepare_volume, to_volume_grid
from ..data.bias_flatten import flatten_bias
from ..errors import ModelFileError
from ..io.geometry import voxel_spacing
from ..io.volume_io import Volume
from ..nn.device import resolve_device
from ..nn.methods import anomaly_scores
from ..nn.speed import (configure_cpu_allocator, configure_cpu_threads, inference_autocast, inference_dtype,
                        inference_network)
from ..progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit
from ..segmentation.calibration import resolve_percentile
from ..segmentation.postprocess import smooth_in_mask, standardisation_stages, standardise_scan
from ..segmentation.segment import SegmentationResult, segment_heatmap

if TYPE_CHECKING:
    from ..model.bundle import AnomalyModel


def score_prepared(
    model: "AnomalyModel",
    prepared: PreparedVolume,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    cancel: Optional[CancelCallback] = None,
    on_batch=None,
    normalise: bool = True,
) -> np.ndarray:
    """Anomaly maps [N, S, S] (model space) for the kept slices of a prepared volume.

    When the model has :class:`~AnomalySegLib.model.position_stats.PositionStats` the maps are
    their healthy z-scores (``normalise=False`` gives the raw maps, to fit them).
    """
    dev = resolve_device(device)
    model.network.to(dev).eval()
    # BatchNorm folded, channels-last, cached per model while its weights are unchanged
    dtype = inference_dtype(dev, model.name)  # bfloat16 only for amcons on CPUs with native bf16
    network = inference_network(model.network, dev, dtype=dtype)
    if dev.type == "cpu":
        configure_cpu_threads()
        configure_cpu_allocator()
    images = prepared.images
    flatten = model.method.bias_flatten
    # needed for the network's input ("all") or for the fused intensity term (normalised maps only)
    needed = flatten == "all" or (flatten == "intensity" and normalise and model.method.fuse_intensity > 0)
    if needed and model.intensity_stats is not None:
        # one field per scan, against the healthy intensity at each position (data/bias_flatten.py)
        images = flatten_bias(images, prepared.masks, prepared.slice_indices, model.intensity_stats,
                              model.method.bias_field)
    network_input = images if flatten == "all" else prepared.images
    count = len(images)
    out = np.zeros(images.shape, dtype=np.float32)
    # the agree-* fusion needs the sign of the network's residual x - f(x)
    signed = bool(normalise and model.method.fuse_intensity > 0 and model.method.intensity_term.startswith("agree"))
    for start in range(0, count, batch_size):
        check_cancel(cancel)
        stop = min(start + batch_size, count)
        x = torch.from_numpy(np.ascontiguousarray(network_input[start:stop], dtype=np.float32)).unsqueeze(1)
        x = x.to(dev, dtype)
        m = torch.from_numpy(np.ascontiguousarray(prepared.masks[start:stop])).to(dev)
        with inference_autocast(dev, model.name):  # CUDA mixed precision (nn/speed.py)
            scores = anomaly_scores(network, x, m, model.name, signed=signed)
        out[start:stop] = scores.detach().float().cpu().numpy()
        if on_batch is not None:
            on_batch(stop, count)
    sign = None
    if signed:
        sign, out = np.sign(out), np.abs(out)
    # per-scan standardisation of the (fused) terms, when the setting acts in model space
    mode = standardisation_stages(model.method.scan_normalise)[0] if normalise else "off"
    z_scored = model.position_stats is not None and normalise
    if z_scored:
        out = model.position_stats.normalise(out, prepared.masks, prepared.slice_indices)
    standardise_scan(out, prepared.masks, mode)
    w = float(model.method.fuse_intensity)
    if z_scored and w > 0 and model.intensity_stats is not None:
        z_int = standardise_scan(
            model.intensity_stats.normalise(images, prepared.masks, prepared.slice_indices),
            prepared.masks, mode)
        out = (out + w * intensity_deviation(z_int, model.method.intensity_term, sign)) / (1.0 + w)
    return out


def intensity_deviation(z: np.ndarray, term: str, residual_sign: Optional[np.ndarray] = None) -> np.ndarray:
    """The fusion's intensity term (``MethodParams.intensity_term``) from intensity z-scores:
    ``|z|`` (``abs-*``), ``max(z, 0)`` (``bright-*``: hyperintense deviations only), or
    (``agree-*``) ``|z|`` where the intensity deviates in the direction of the network's
    signed residual ``x - f(x)`` and 0 elsewhere."""
    if term.startswith("agree"):
        return np.where(np.sign(z) == residual_sign, np.abs(z), 0.0)
    return np.abs(z) if term.startswith("abs") else np.maximum(z, 0.0)


@dataclass
class VolumeScores:
    """An anomaly map on the input's voxel grid (0 outside the brain) and the brain mask."""

    heatmap: np.ndarray
    brain_mask: np.ndarray
    volume: Optional[Volume] = None
    #: The raw-input step's record (input check, brain extraction, bias correction) and
    #: the extracted brain on the input grid (None when extraction did not run).
    raw_input: Optional[dict] = None
    extracted_brain: Optional[np.ndarray] = None


def scores_on_volume_grid(maps: np.ndarray, prepared: PreparedVolume, volume: Optional[Volume] = None,
                          *, smoothing_mm: float = 0.0, scan_normalise: str = "off") -> VolumeScores:
    """Model-space maps [N, S, S] -> anomaly map on the input's voxel grid, 0 outside the brain.

    The one place where maps leave model space: inference, calibration and the baselines
    all threshold/calibrate exactly these voxel values. ``smoothing_mm`` > 0 smooths the
    map inside the brain (:func:`.postprocess.smooth_in_mask`, sigma in mm); then
    ``scan_normalise`` standardises it by the scan's own brain-voxel distribution
    (:func:`.postprocess.standardise_scan`).
    """
    brain = brain_mask_in_volume(prepared)
    heatmap = to_volume_grid(maps, prepared, order=1)  # float32, a new array
    heatmap[~brain] = 0.0
    if smoothing_mm > 0:
        heatmap = smooth_in_mask(heatmap, brain, smoothing_mm, voxel_spacing(prepared.affine), out=heatmap)
    standardise_scan(heatmap, brain, standardisation_stages(scan_normalise)[1])  # terms-*: in score_prepared
    return VolumeScores(heatmap=heatmap, brain_mask=brain, volume=volume, raw_input=prepared.raw_input,
                        extracted_brain=prepared.extracted_brain)


def score_volume(
    model: "AnomalyModel",
    volume: Volume,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> VolumeScores:
    """Preprocess ``volume`` exactly as in training, score it, map the scores back."""
    prepared = prepare_for_scoring(model, volume, progress=progress, cancel=cancel)
    return score_prepared_volume(model, prepared, volume, device=device, batch_size=batch_size,
                                 progress=progress, cancel=cancel)


def prepare_for_scoring(model: "AnomalyModel", volume: Volume, *, progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelCallback] = None) -> PreparedVolume:
    """The model's preprocessing of ``volume`` (first step of :func:`score_volume`)."""
    emit(progress, ProgressEvent("prepare", 0.0, message="preprocessing"))
    return prepare_volume(volume, model.preprocessing, progress=progress, cancel=cancel)


def score_prepared_volume(
    model: "AnomalyModel",
    prepared: PreparedVolume,
    volume: Volume,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> VolumeScores:
    """Score a volume already preprocessed (:func:`prepare_for_scoring`) and map the scores back.

    Only ``volume``'s geometry is used: a caller short of memory passes
    ``volume.grid_only()`` so the input's voxels are not alive beside the full-size map.
    """

    def on_batch(done: int, total: int) -> None:
        emit(progress, ProgressEvent("segment", 0.05 + 0.9 * done / total, step=done, steps=total,
                                     message=f"slice {done}/{total}"))

    maps = score_prepared(model, prepared, device=device, batch_size=batch_size, cancel=cancel, on_batch=on_batch)
    scores = scores_on_volume_grid(maps, prepared, volume, smoothing_mm=model.method.smoothing_mm,
                                   scan_normalise=model.method.scan_normalise)
    emit(progress, ProgressEvent("segment", 1.0, message="scored"))
    return scores


def threshold_for(model: "AnomalyModel", percentile: Optional[float]) -> "tuple[float, float]":
    """(percentile, threshold) from the model's healthy calibration; ``None`` = its operating point."""
    if model.calibration is None:
        raise ModelFileError("this model is not calibrated: run `anomalyseg calibrate MODEL HEALTHY...` first")
    pct = resolve_percentile(percentile, model.calibration, model.method.default_percentile)
    return pct, model.calibration.threshold(pct)


def threshold_scores(scores: VolumeScores, model: "AnomalyModel", *, percentile: Optional[float] = None) -> SegmentationResult:
    """Mask and lesions of scored volume at a healthy percentile (no network run)."""
    pct, _ = threshold_for(model, percentile)
    return segment_heatmap(scores.heatmap, scores.brain_mask, scores.volume.affine, model.calibration, pct,
                           fallback_percentile=model.method.default_percentile, model_version=model.version)


def segment_volume(
    model: "AnomalyModel",
    volume: Volume,
    *,
    percentile: Optional[float] = None,
    device: "str | torch.device" = "auto",
    batch_size: int = 16,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> SegmentationResult:
    """Score and threshold one volume (checks calibration before any heavy work)."""
    threshold_for(model, percentile)
    scores = score_volume(model, volume, device=device, batch_size=batch_size, progress=progress, cancel=cancel)
    return threshold_scores(scores, model, percentile=percentile)
