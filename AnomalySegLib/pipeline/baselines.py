"""Model-free baselines evaluated through the same harness as the trained models.

:class:`IntensityBaseline` scores each brain voxel by its preprocessed intensity (the
volume's robust [0, 1] normalisation, exactly the images the networks see). It answers
"would plain thresholding do as well?": a bright FLAIR lesion is often separable by
intensity alone. Like the models it is calibrated on healthy volumes only: the
threshold is a percentile of its scores on healthy brain pixels (a
:class:`~AnomalySegLib.segmentation.calibration.Calibration`), never tuned on lesions.

Modes:

* ``bright``: score = normalised intensity (hyperintense lesions, e.g. FLAIR);
* ``dark``: score = max(m - intensity, 0), m = median healthy brain intensity;
* ``abs``: score = |intensity - m| (either direction);
* ``zscore``: score = |z| of the intensity against healthy per-position statistics
  (:mod:`.position_stats`, fitted on the ``reference`` volumes) -- the intensity half of
  the ``dae`` fusion alone, so the benchmark shows what the network adds to it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..settings import SCAN_NORMALISATIONS, check_bias_field, check_percentile
from ..segmentation.calibration import Calibration, default_percentile, resolve_percentile
from ..errors import InputError
from ..io.geometry import voxel_volume_ml
from .inference import VolumeScores, scores_on_volume_grid
from ..data.bias_flatten import fit_flattened_intensity_stats, flatten_bias
from ..model.position_stats import PositionStats
from ..segmentation.postprocess import (DEFAULT_MAX_FALSE_COMPONENTS, DEFAULT_MIN_COMPONENT_ML,
                                        standardisation_stages, standardise_scan)
from ..data.preprocessing import PreparedVolume, PreprocessConfig, prepare_volume
from ..progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit
from ..io.volume_io import Volume, read_volume

INTENSITY_MODES = ("bright", "dark", "abs", "zscore")

VolumeLike = Union[Volume, str, Path]


def _as_volume(item: VolumeLike) -> Volume:
    return item if isinstance(item, Volume) else read_volume(item)


class IntensityBaseline:
    """Healthy-calibrated intensity thresholding (a :class:`~AnomalySegLib.evaluation.harness.Scorer`, like a model).

    Build it with :meth:`fit` on healthy volumes, then use :meth:`score_volume` and
    :meth:`predict_mask` like a model (same preprocessing, brain mask, mapping back to the
    input grid and ``score > threshold`` rule as :mod:`AnomalySegLib.pipeline.inference`).
    """

    def __init__(self, mode: str = "bright", preprocessing: Optional[PreprocessConfig] = None,
                 *, healthy_median: Optional[float] = None, calibration: Optional[Calibration] = None,
                 default_percentile: float = 98.0, smoothing_mm: float = 0.0, scan_normalise: str = "off",
                 min_component_ml: Optional[float] = None, max_false_components: Optional[float] = None,
                 grow_percentile: float = 0.0, bias_flatten: bool = False,
                 bias_field: str = "quadratic") -> None:
        if mode not in INTENSITY_MODES:
            raise ValueError(f"unknown intensity mode {mode!r}; choose one of {', '.join(INTENSITY_MODES)}")
        if mode in ("dark", "abs") and calibration is not None and healthy_median is None:
            raise ValueError(f"mode {mode!r} needs the healthy median intensity")
        self.position_stats: Optional[PositionStats] = None
        self.mode = mode
        self.preprocessing = preprocessing if preprocessing is not None else PreprocessConfig()
        self.healthy_median = healthy_median
        self.calibration = calibration
        self._default_percentile = float(default_percentile)
        # the same post-processing and operating-point rule as a trained model (fair comparison)
        self.smoothing_mm = float(smoothing_mm)
        if scan_normalise not in SCAN_NORMALISATIONS:
            raise ValueError(f"scan_normalise must be one of {', '.join(SCAN_NORMALISATIONS)}, got {scan_normalise!r}")
        self.scan_normalise = scan_normalise
        #: hysteresis percentile of the mask (0 = off), as MethodParams.grow_percentile
        self.grow_percentile = 0.0 if not grow_percentile else check_percentile(grow_percentile, "grow percentile")
        #: divide out each scan's smooth bias field against the healthy intensity per position
        #: (as a model with MethodParams.bias_flatten; statistics fitted on the reference volumes)
        self.bias_flatten = bool(bias_flatten)
        #: the flattened field's shape (as MethodParams.bias_field)
        self.bias_field = check_bias_field(bias_field)
        self.flatten_stats: Optional[PositionStats] = None
        self.min_component_ml = DEFAULT_MIN_COMPONENT_ML if min_component_ml is None else float(min_component_ml)
        self.max_false_components = (DEFAULT_MAX_FALSE_COMPONENTS if max_false_components is None
                                     else float(max_false_components))

    @classmethod
    def like_model(cls, model: Any, mode: str = "bright") -> "IntensityBaseline":
        """An unfitted baseline with ``model``'s preprocessing, map smoothing, per-scan
        standardisation, mask growth, bias flattening (same field shape), minimum lesion volume
        and operating-point rule: a fair comparison differs from the model only in its scores.
        ``model`` is an :class:`~AnomalySegLib.model.bundle.AnomalyModel` (calibrated or not)."""
        calibration = getattr(model, "calibration", None)
        return cls(mode, model.preprocessing, default_percentile=model.method.default_percentile,
                   smoothing_mm=model.method.smoothing_mm, scan_normalise=model.method.scan_normalise,
                   grow_percentile=model.method.grow_percentile,
                   min_component_ml=None if calibration is None else calibration.min_component_ml,
                   max_false_components=None if calibration is None else calibration.max_false_components,
                   bias_flatten=model.method.bias_flatten != "off", bias_field=model.method.bias_field)

    @property
    def default_percentile(self) -> float:
        """The calibration's operating percentile once fitted, else the starting percentile."""
        return default_percentile(self.calibration, self._default_percentile)

    # -- identity ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``intensity`` for the bright mode, ``intensity-dark`` / ``intensity-abs`` otherwise."""
        return "intensity" if self.mode == "bright" else f"intensity-{self.mode}"

    @property
    def version(self) -> str:
        """Library version / name / digest of the calibration (like a model's version)."""
        identity = (self.mode, self.healthy_median, self.preprocessing.to_dict(), self.smoothing_mm)
        if self.scan_normalise != "off":  # digests of baselines without it stay as they were
            identity += (self.scan_normalise,)
        if self.bias_flatten:
            identity += ("bias_flatten",) if self.bias_field == "quadratic" else ("bias_flatten", self.bias_field)
        digest = hashlib.sha256(repr(identity).encode())
        if self.calibration is not None:
            digest.update(np.asarray(self.calibration.values, dtype=np.float64).tobytes())
        return f"{__version__}/{self.name}/{digest.hexdigest()[:12]}"

    # -- scoring ----------------------------------------------------------------------
    def _transform(self, images: np.ndarray) -> np.ndarray:
        if self.mode == "bright":
            return images.astype(np.float32, copy=True)
        if self.healthy_median is None:
            raise InputError(f"the {self.name} baseline is not fitted: call fit() on healthy volumes first")
        m = np.float32(self.healthy_median)
        if self.mode == "dark":
            return np.maximum(m - images, 0.0).astype(np.float32)
        return np.abs(images - m).astype(np.float32)

    def score_prepared(self, prepared: PreparedVolume) -> np.ndarray:
        """Scores ``[N, S, S]`` in model space, 0 outside the tissue masks."""
        if self.mode == "zscore":
            if self.position_stats is None:
                raise InputError("the intensity-zscore baseline is not fitted: call fit() on healthy volumes first")
            return np.abs(self.position_stats.normalise(prepared.images, prepared.masks, prepared.slice_indices))
        images = prepared.images
        if self.bias_flatten:
            if self.flatten_stats is None:
                raise InputError(f"the {self.name} baseline is not fitted: call fit() on healthy volumes first")
            images = flatten_bias(images, prepared.masks, prepared.slice_indices, self.flatten_stats, self.bias_field)
        scores = self._transform(images)
        scores[~prepared.masks] = 0.0
        return standardise_scan(scores, prepared.masks, standardisation_stages(self.scan_normalise)[0])

    def score_volume(self, volume: VolumeLike, *, device: Any = "auto", batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelCallback] = None) -> VolumeScores:
        """Scores on the input voxel grid; ``device``/``batch_size`` are accepted and unused."""
        check_cancel(cancel)
        volume = _as_volume(volume)
        emit(progress, ProgressEvent("prepare", 0.0, message="preprocessing"))
        prepared = prepare_volume(volume, self.preprocessing, progress=progress, cancel=cancel)
        scores = scores_on_volume_grid(self.score_prepared(prepared), prepared, volume, smoothing_mm=self.smoothing_mm,
                                       scan_normalise=self.scan_normalise)
        emit(progress, ProgressEvent("segment", 1.0, message="scored"))
        return scores

    def _calibrated_percentile(self, percentile: Optional[float]) -> float:
        if self.calibration is None:
            raise InputError(f"the {self.name} baseline is not calibrated: call fit() on healthy volumes first")
        return resolve_percentile(percentile, self.calibration, self._default_percentile)

    def threshold(self, percentile: Optional[float] = None) -> float:
        """Score threshold at a healthy percentile (default: :attr:`default_percentile`)."""
        pct = self._calibrated_percentile(percentile)
        return self.calibration.threshold(pct)

    def predict_mask(self, scores: VolumeScores, percentile: Optional[float] = None) -> tuple[np.ndarray, float]:
        """``(mask, threshold)``: brain voxels scoring above the healthy-percentile threshold."""
        pct = self._calibrated_percentile(percentile)
        voxel_ml = voxel_volume_ml(scores.volume.affine) if scores.volume is not None else None
        return self.calibration.flag(scores.heatmap, scores.brain_mask, pct, voxel_ml=voxel_ml)

    # -- fitting ----------------------------------------------------------------------
    def fit(self, healthy: Sequence[VolumeLike], *, reference: Optional[Sequence[VolumeLike]] = None,
            progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelCallback] = None) -> "IntensityBaseline":
        """Calibrate on healthy volumes (lesion-free only); returns ``self``.

        ``reference`` (default: ``healthy``) gives the healthy median intensity used by the
        ``dark``/``abs`` modes; pass the training volumes there to keep it apart from the
        calibration volumes, as for a trained model.
        """
        if not healthy:
            raise InputError("the intensity baseline needs at least one healthy volume to calibrate on")
        prepared = self._prepare_all(healthy, progress, cancel, "calibrate")
        if self.bias_flatten or self.mode != "bright":  # both are fitted on the reference volumes
            ref = prepared if reference is None else self._prepare_all(reference, None, cancel, "prepare")
        if self.bias_flatten:
            self.flatten_stats = fit_flattened_intensity_stats(ref, model=self.bias_field)  # as a model's (fit_position_stats)
        if self.mode != "bright":
            pixels = np.concatenate([p.images[p.masks] for p in ref])
            self.healthy_median = float(np.median(pixels))
            if self.mode == "zscore":
                self.position_stats = PositionStats.fit([p.images for p in ref], [p.masks for p in ref],
                                                        [p.slice_indices for p in ref])
        # voxel-grid values inside the brain: the same values predict_mask thresholds
        maps = []
        for p in prepared:
            scores = scores_on_volume_grid(self.score_prepared(p), p, smoothing_mm=self.smoothing_mm,
                                           scan_normalise=self.scan_normalise)
            maps.append((scores.heatmap, scores.brain_mask, voxel_volume_ml(p.affine)))
        names = [p.name for p in prepared]
        source = f"{len(names)} healthy volume(s): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        self.calibration = Calibration.from_healthy_maps(
            maps, start_percentile=self._default_percentile, min_component_ml=self.min_component_ml,
            max_false_components=self.max_false_components, grow_percentile=self.grow_percentile or None,
            n_images=int(sum(p.num_slices for p in prepared)), source=source)
        return self

    def _prepare_all(self, items: Sequence[VolumeLike], progress, cancel, stage: str) -> list[PreparedVolume]:
        out = []
        for index, item in enumerate(items):
            check_cancel(cancel)
            out.append(prepare_volume(_as_volume(item), self.preprocessing, cancel=cancel))
            emit(progress, ProgressEvent(stage, (index + 1) / len(items), message=f"healthy volume {index + 1}/{len(items)}"))
        return out

    # -- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able state (mode, preprocessing, median, calibration table)."""
        return {
            "baseline": "intensity",
            "mode": self.mode,
            "preprocessing": self.preprocessing.to_dict(),
            "healthy_median": self.healthy_median,
            "default_percentile": self._default_percentile,
            "smoothing_mm": self.smoothing_mm,
            "scan_normalise": self.scan_normalise,
            "grow_percentile": self.grow_percentile,
            "min_component_ml": self.min_component_ml,
            "max_false_components": self.max_false_components,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "position_stats": None if self.position_stats is None else self.position_stats.to_dict(),
            "bias_flatten": self.bias_flatten,
            "bias_field": self.bias_field,
            "flatten_stats": None if self.flatten_stats is None else self.flatten_stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "IntensityBaseline":
        """Inverse of :meth:`to_dict`."""
        if data.get("baseline") != "intensity":
            raise ValueError("not an intensity-baseline description")
        cal = data.get("calibration")
        baseline = cls(
            mode=data["mode"],
            preprocessing=PreprocessConfig.from_dict(data["preprocessing"]),
            healthy_median=data.get("healthy_median"),
            calibration=Calibration.from_dict(cal) if cal else None,
            default_percentile=float(data.get("default_percentile", 98.0)),
            smoothing_mm=float(data.get("smoothing_mm", 0.0)),
            scan_normalise=str(data.get("scan_normalise", "off")),
            grow_percentile=float(data.get("grow_percentile", 0.0) or 0.0),
            min_component_ml=data.get("min_component_ml"),
            max_false_components=data.get("max_false_components"),
            bias_flatten=bool(data.get("bias_flatten", False)),
            bias_field=str(data.get("bias_field", "quadratic")),
        )
        flat = data.get("flatten_stats")
        baseline.flatten_stats = PositionStats.from_dict(flat) if flat else None
        stats = data.get("position_stats")
        baseline.position_stats = PositionStats.from_dict(stats) if stats else None
        return baseline
