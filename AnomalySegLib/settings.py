"""Settings: the JSON base class of every settings dataclass, and the shared value rules.

Torch-free and numpy-free: the command line, the Slicer GUI process and the batch script
validate with it before any heavy import.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Type, TypeVar

from .errors import SettingError

T = TypeVar("T", bound="JsonSettings")


class JsonSettings:
    """Mixin for dataclasses: ``to_dict`` and a strict ``from_dict`` (no silent typos)."""

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: Type[T], data: Mapping[str, Any]) -> T:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing keys take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        return cls(**dict(data))


#: The methods a model can be trained with (torch-free, for the command line and Slicer).
METHOD_NAMES = ("amcons", "gradcamcons", "vae", "dae")

#: The dae fusion's intensity terms (``MethodParams.intensity_term``; torch-free so the
#: command line can offer them without importing the networks).
INTENSITY_TERMS = ("bright-position", "abs-position", "bright-global", "abs-global", "agree-position")

#: Per-scan standardisation of a voxel-grid map (``MethodParams.scan_normalise``):
#: ``off``, ``interdecile`` ((s - median) / (p90 - p10) over the scan's brain voxels),
#: ``upper`` ((s - median) / (p90 - median)); ``terms-*``: the same, in model space, on the
#: network's map and the intensity term separately before they are fused.
SCAN_NORMALISATIONS = ("off", "interdecile", "upper", "terms-interdecile", "terms-upper")

#: Bias flattening before scoring (``MethodParams.bias_flatten``): ``off``, ``intensity``
#: (the fusion's intensity term only) or ``all`` (the network's input too).
BIAS_FLATTENING = ("off", "intensity", "all")

#: Shape of the fitted bias field (``MethodParams.bias_field``): ``quadratic`` (10 terms over
#: the brain) or ``spline`` (a penalised cubic B-spline, ~45 mm knots, for fields with
#: structure a quadratic cannot follow). Both trim outliers (lesions) from the fit.
BIAS_FIELDS = ("quadratic", "spline")


def check_bias_field(value: Any, name: str = "bias_field") -> str:
    """The one rule for a bias-field shape: one of :data:`BIAS_FIELDS` (``ValueError``
    naming ``name`` otherwise). Returns it."""
    if value not in BIAS_FIELDS:
        raise ValueError(f"{name} must be one of {', '.join(BIAS_FIELDS)}, got {value!r}")
    return value


#: Default of ``TrainConfig.calibrate_with_training`` (chosen in stop 20: docs/BENCHMARKS.md).
CALIBRATE_WITH_TRAINING_DEFAULT = False

#: Learning-rate schedules of training (``TrainConfig.lr_schedule``): the paper's constant
#: Adam rate, or a cosine decay to 0 over the run.
LR_SCHEDULES = ("constant", "cosine")


def check_percentile(value: Any, name: str = "percentile") -> float:
    """The one rule for a healthy percentile: a number strictly between 0 and 100.

    Returns it as a float; raises :class:`~AnomalySegLib.errors.SettingError` (named
    ``name`` in the message) otherwise: 0 would flag every brain voxel, 100 none.
    """
    try:
        pct = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(pct) and 0.0 < pct < 100.0):
        raise SettingError(f"{name} must be between 0 and 100 (exclusive), got {pct:g}")
    return pct
