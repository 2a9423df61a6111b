"""The healthy calibration table and its operating point (torch-free).

The threshold that turns an anomaly map into a mask is a percentile of the scores that
the model gives to brain voxels of *held-out healthy* volumes (paper, Table 2:
p98 for AMCons, p95 for GradCAMCons). No anomalous image is ever used. The model file
stores a quantile table, so any percentile (the Slicer sensitivity slider) maps to a
threshold instantly. Running a model on healthy volumes to build the table is
:mod:`AnomalySegLib.pipeline.calibrate`; this module is what the Slicer GUI process needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..settings import check_percentile
from .postprocess import (
    DEFAULT_BUDGET_CONFIDENCE,
    DEFAULT_MAX_FALSE_COMPONENTS,
    DEFAULT_MIN_COMPONENT_ML,
    meets_false_component_budget,
    min_component_voxels,
    select_operating_percentile,
    threshold_mask,
)

#: Percentiles stored in a model: every 0.1 from 0 to 100, plus finer steps near the top
#: where clinically useful thresholds live. The operating point of the default method sits
#: at or above p99.97 on every cohort measured, so the table goes on to p99.999: a table that
#: stopped at p99.99 left the false-component budget unmet whenever even p99.99 flagged
#: too much (docs/BENCHMARKS.md). Held-out healthy volumes hold ~10^6 brain voxels, so
#: p99.999 is still an order statistic of ~10 voxels, not an extrapolation.
TABLE_PERCENTILES = np.unique(
    np.concatenate([np.linspace(0.0, 100.0, 1001), [99.91, 99.92, 99.93, 99.94, 99.95, 99.96, 99.97, 99.98, 99.99],
                    [99.992, 99.994, 99.995, 99.996, 99.997, 99.998, 99.999]])
)

#: Cap on the healthy pixel scores kept in memory; beyond it a fixed-seed subsample is used
#: (quantile error ~1e-4 at this size).
MAX_CALIBRATION_PIXELS = 20_000_000


@dataclass
class Calibration:
    """Quantile table of anomaly scores on healthy brain-tissue pixels."""

    percentiles: np.ndarray
    values: np.ndarray
    n_pixels: int
    n_images: int
    n_volumes: int
    source: str = ""
    #: Default healthy percentile chosen on held-out healthy volumes so that they carry on
    #: average <= ``max_false_components`` components of >= ``min_component_ml``
    #: (:func:`.postprocess.select_operating_percentile`); None for files without one.
    operating_percentile: Optional[float] = None
    #: Components smaller than this (mL) are dropped from every mask (0 = keep all).
    min_component_ml: float = 0.0
    max_false_components: Optional[float] = None
    #: Mean false components per held-out healthy volume measured at the operating point.
    false_components_per_volume: Optional[float] = None
    #: Confidence of the upper bound held to the budget (0 = the plain mean; None for
    #: files calibrated before the margin existed, which used the plain mean).
    budget_confidence: Optional[float] = None
    #: Hysteresis: flagged regions extend to the connected brain voxels above this healthy
    #: percentile's threshold (:func:`.postprocess.threshold_mask`); None = plain
    #: thresholding (files calibrated before it existed).
    grow_percentile: Optional[float] = None

    def __post_init__(self) -> None:
        # a table that is not finite and monotone gives NaN thresholds and empty masks:
        # refuse it wherever it comes from (a file, a worker message, a calibration run)
        self.percentiles = np.asarray(self.percentiles, dtype=np.float64)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.percentiles.shape != self.values.shape or self.percentiles.ndim != 1 or len(self.percentiles) < 2:
            raise ValueError("calibration table is malformed")
        if not (np.all(np.isfinite(self.values)) and np.all(np.isfinite(self.percentiles))):
            raise ValueError("calibration table holds non-finite thresholds")
        if np.any(np.diff(self.percentiles) <= 0) or np.any(np.diff(self.values) < 0):
            raise ValueError("calibration table is not monotonic")
        if self.grow_percentile is not None:
            self.grow_percentile = check_percentile(self.grow_percentile, "calibration grow percentile")

    def grow_threshold(self) -> Optional[float]:
        """Score down to which flagged regions grow (None: no growth)."""
        return None if self.grow_percentile is None else self.threshold(self.grow_percentile)

    def default_percentile(self, fallback: float) -> float:
        """The operating percentile when the calibration has one, else ``fallback``."""
        return float(self.operating_percentile) if self.operating_percentile is not None else float(fallback)

    def meets_budget(self) -> Optional[bool]:
        """Whether the operating point kept the false-component budget on the calibration
        volumes under the stored rule (None when the file has no operating point)."""
        if self.max_false_components is None or self.false_components_per_volume is None:
            return None
        total = int(round(self.false_components_per_volume * self.n_volumes))
        return meets_false_component_budget(total, max(self.n_volumes, 1), self.max_false_components,
                                            self.budget_confidence or 0.0)

    def threshold(self, percentile: float) -> float:
        """Score above which a pixel is flagged, for a healthy percentile (:func:`.check_percentile`)."""
        return float(np.interp(check_percentile(percentile), self.percentiles, self.values))

    def flag(self, heatmap: np.ndarray, brain_mask: np.ndarray, percentile: float,
             *, voxel_ml: Optional[float] = None) -> "tuple[np.ndarray, float]":
        """``(mask, threshold)``: brain voxels scoring above the percentile's threshold,
        grown to :attr:`grow_percentile`'s threshold when it is lower (hysteresis), without
        components smaller than :attr:`min_component_ml`.

        The one thresholding rule (:func:`.postprocess.threshold_mask`), shared by
        ``anomalyseg segment``, the baselines and the Slicer module's instant re-threshold.
        ``voxel_ml`` (one voxel's volume) is needed when the calibration has a minimum
        component volume.
        """
        threshold = self.threshold(percentile)
        min_voxels = 1
        if self.min_component_ml > 0:
            if voxel_ml is None:
                raise ValueError("this calibration drops small components: pass voxel_ml (one voxel's volume in mL)")
            min_voxels = min_component_voxels(self.min_component_ml, voxel_ml)
        return threshold_mask(heatmap, brain_mask, threshold, min_voxels, self.grow_threshold()), threshold

    def percentile_of(self, score: float) -> float:
        """Healthy percentile of ``score`` (inverse of :meth:`threshold`)."""
        # np.interp needs increasing x: the quantile table is non-decreasing; ties are fine
        return float(np.interp(score, self.values, self.percentiles))

    def to_dict(self) -> dict:
        """JSON-able representation stored in the model file."""
        return {
            "percentiles": [float(p) for p in self.percentiles],
            "values": [float(v) for v in self.values],
            "n_pixels": int(self.n_pixels),
            "n_images": int(self.n_images),
            "n_volumes": int(self.n_volumes),
            "source": self.source,
            "operating_percentile": self.operating_percentile,
            "min_component_ml": float(self.min_component_ml),
            "max_false_components": self.max_false_components,
            "false_components_per_volume": self.false_components_per_volume,
            "budget_confidence": self.budget_confidence,
            "grow_percentile": self.grow_percentile,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        """Inverse of :meth:`to_dict`; validates the table."""
        percentiles = np.asarray(data["percentiles"], dtype=np.float64)
        values = np.asarray(data["values"], dtype=np.float64)
        if percentiles.shape != values.shape or percentiles.ndim != 1 or len(percentiles) < 2:
            raise ValueError("calibration table is malformed")
        if np.any(np.diff(percentiles) <= 0) or np.any(np.diff(values) < 0):
            raise ValueError("calibration table is not monotonic")
        operating = data.get("operating_percentile")
        min_ml = float(data.get("min_component_ml", 0.0) or 0.0)
        budget = data.get("max_false_components")
        measured = data.get("false_components_per_volume")
        confidence = data.get("budget_confidence")
        if confidence is not None and not (isinstance(confidence, (int, float)) and 0.0 <= confidence < 1.0):
            raise ValueError(f"calibration budget confidence {confidence!r} is not a number in [0, 1)")
        if operating is not None:
            check_percentile(operating, "calibration operating percentile")
        grow = data.get("grow_percentile")
        if grow is not None and not isinstance(grow, (int, float)):
            raise ValueError(f"calibration grow percentile {grow!r} is not a number")
        if not (math.isfinite(min_ml) and min_ml >= 0.0):
            raise ValueError(f"calibration minimum component volume {min_ml} is not a number >= 0")
        if not np.all(np.isfinite(values)):
            raise ValueError("calibration table holds non-finite thresholds")
        return cls(
            percentiles=percentiles,
            values=values,
            n_pixels=int(data["n_pixels"]),
            n_images=int(data["n_images"]),
            n_volumes=int(data["n_volumes"]),
            source=str(data.get("source", "")),
            operating_percentile=None if operating is None else float(operating),
            min_component_ml=min_ml,
            max_false_components=None if budget is None else float(budget),
            false_components_per_volume=None if measured is None else float(measured),
            budget_confidence=None if confidence is None else float(confidence),
            grow_percentile=None if grow is None else float(grow),
        )

    @classmethod
    def from_scores(cls, scores: np.ndarray, *, n_images: int, n_volumes: int, source: str = "") -> "Calibration":
        """Build the table from a 1-D array of healthy pixel scores."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise InputError("no healthy brain-tissue pixels to calibrate on")
        if not np.all(np.isfinite(scores)):
            raise InputError(f"the model gave {int(np.count_nonzero(~np.isfinite(scores)))} non-finite (NaN/Inf) "
                             "scores on healthy volumes: the model is broken, retrain it")
        values = np.percentile(scores, TABLE_PERCENTILES)
        values = np.maximum.accumulate(values)  # guard against float round-off making it non-monotonic
        return cls(TABLE_PERCENTILES.copy(), values, int(scores.size), n_images, n_volumes, source)

    @classmethod
    def from_healthy_maps(
        cls,
        maps: Sequence["tuple[np.ndarray, np.ndarray, float]"],
        *,
        start_percentile: float,
        min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
        max_false_components: float = DEFAULT_MAX_FALSE_COMPONENTS,
        budget_confidence: float = DEFAULT_BUDGET_CONFIDENCE,
        grow_percentile: Optional[float] = None,
        n_images: int = 0,
        source: str = "",
    ) -> "Calibration":
        """Quantile table + operating point from held-out healthy voxel-grid maps.

        ``maps`` holds ``(heatmap, brain_mask, voxel_ml)`` per healthy volume. The table is
        built from the brain voxels' scores; the operating percentile is the lowest one
        >= ``start_percentile`` at which these volumes carry on average at most
        ``max_false_components`` components of >= ``min_component_ml``, with the margin of
        a ``budget_confidence`` upper bound (:func:`.postprocess.select_operating_percentile`),
        components counted on masks grown to ``grow_percentile`` (hysteresis) when given.
        """
        if not maps:
            raise InputError("calibration needs at least one healthy volume")
        values = _subsample(np.concatenate([np.asarray(h)[np.asarray(b, dtype=bool)] for h, b, _ in maps]),
                            MAX_CALIBRATION_PIXELS)
        table = cls.from_scores(values, n_images=n_images, n_volumes=len(maps), source=source)
        table.grow_percentile = None if grow_percentile is None else check_percentile(
            grow_percentile, "grow percentile")
        pct, mean_false = select_operating_percentile(
            maps, table.threshold, table.percentiles, start_percentile=start_percentile,
            min_component_ml=min_component_ml, max_false_components=max_false_components,
            budget_confidence=budget_confidence, grow_threshold=table.grow_threshold())
        table.operating_percentile = pct
        table.min_component_ml = float(min_component_ml)
        table.max_false_components = float(max_false_components)
        table.false_components_per_volume = mean_false
        table.budget_confidence = float(budget_confidence)
        return table


def _subsample(scores: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    if scores.size <= limit:
        return scores
    rng = np.random.default_rng(seed)
    return rng.choice(scores, size=limit, replace=False)


def default_percentile(calibration: Optional[Calibration], fallback: float) -> float:
    """The healthy percentile used when none is given -- the one rule for models, baselines
    and the Slicer module: the calibration's operating point (chosen on held-out healthy
    volumes) when there is one, else ``fallback`` (the method's starting percentile)."""
    return calibration.default_percentile(fallback) if calibration is not None else float(fallback)


def resolve_percentile(percentile: Optional[float], calibration: Optional[Calibration], fallback: float) -> float:
    """``percentile`` when given, else :func:`default_percentile`; checked (:func:`.check_percentile`)."""
    return check_percentile(default_percentile(calibration, fallback) if percentile is None else percentile)
