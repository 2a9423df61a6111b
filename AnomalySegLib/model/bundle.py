"""The model bundle: :class:`AnomalyModel` and the one AnomalySeg model file format.

A model file is a ``torch.save`` archive (:mod:`.archive`) holding only tensors, strings
and numbers: network weights plus JSON strings for the network configuration,
preprocessing, method parameters, training summary, healthy calibration and position
statistics. It is read with ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler, so opening a model file cannot execute code from it. A loaded model scores
volumes with the interface of the baselines (``score_volume``, ``predict_mask``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .. import MODEL_FORMAT_VERSION, __version__
from ..data.preprocessing import PreprocessConfig
from ..errors import ModelFileError, OutputError
from ..nn.methods import MethodParams
from ..nn.networks import VAEConfig, build_network
from ..pipeline import inference
from ..progress import CancelCallback, ProgressCallback
from ..segmentation.calibration import Calibration, default_percentile
from .archive import FORMAT_NAME, read_payload, write_payload
from .position_stats import PositionStats

PathLike = Union[str, "os.PathLike[str]"]


def weights_digest(state_dict: dict) -> str:
    """Stable short hash of the weights: identifies a model in reports and the Slicer UI."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()[:12]


@dataclass
class AnomalyModel:
    """A trained network bundled with everything needed to use it consistently."""

    network: torch.nn.Module  # ConvVAE or UNet (models.build_network)
    network_config: VAEConfig
    preprocessing: PreprocessConfig
    method: MethodParams
    training: dict = field(default_factory=dict)
    calibration: Optional[Calibration] = None
    #: Healthy mean/std of the map per normalised position (None: maps are used as scored).
    position_stats: Optional[PositionStats] = None
    #: Healthy statistics of the preprocessed intensity (for ``method.fuse_intensity``).
    intensity_stats: Optional[PositionStats] = None
    model_id: str = ""
    library_version: str = __version__
    format_version: int = MODEL_FORMAT_VERSION

    @property
    def name(self) -> str:
        """The method's name (``amcons``, ``dae``, ...), as a baseline's name."""
        return self.method.method

    @property
    def version(self) -> str:
        """Human-readable identity: library version / method / weights digest."""
        return f"{self.library_version}/{self.name}/{self.model_id or weights_digest(self.network.state_dict())}"

    @property
    def default_percentile(self) -> float:
        """The healthy percentile used when none is given: the calibration's operating point
        (chosen on held-out healthy volumes), else the method's default."""
        return default_percentile(self.calibration, self.method.default_percentile)

    # -- the scoring interface shared with the baselines (evaluation.harness.Scorer) ---------
    def score_volume(self, volume, *, device="auto", batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelCallback] = None) -> "inference.VolumeScores":
        """Anomaly map of ``volume`` on its voxel grid (:func:`.inference.score_volume`)."""
        return inference.score_volume(self, volume, device=device, batch_size=batch_size,
                                      progress=progress, cancel=cancel)

    def predict_mask(self, scores: "inference.VolumeScores",
                     percentile: Optional[float] = None) -> "tuple[np.ndarray, float]":
        """``(mask, threshold)`` of scored volume at a healthy percentile (default: :attr:`default_percentile`);
        the path of ``anomalyseg segment`` (:func:`.inference.threshold_scores`)."""
        result = inference.threshold_scores(scores, self, percentile=percentile)
        return np.asarray(result.mask, dtype=bool), float(result.threshold)

    def summary(self) -> dict:
        """JSON-able description (for `anomalyseg info`, reports and the Slicer model list)."""
        training = {k: v for k, v in self.training.items() if k != "history"}
        return {
            "version": self.version,
            "model_id": self.model_id,
            "library_version": self.library_version,
            "format_version": self.format_version,
            "method": self.method.to_dict(),
            "network": self.network_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "calibrated": self.calibration is not None,
            "position_normalised": self.position_stats is not None,
            "calibration": None if self.calibration is None else {
                "n_pixels": self.calibration.n_pixels,
                "n_images": self.calibration.n_images,
                "n_volumes": self.calibration.n_volumes,
                "source": self.calibration.source,
                "default_percentile": self.default_percentile,
                "threshold_at_default_percentile": self.calibration.threshold(self.default_percentile),
                "operating_percentile": self.calibration.operating_percentile,
                "min_component_ml": self.calibration.min_component_ml,
                "max_false_components": self.calibration.max_false_components,
                "false_components_per_volume": self.calibration.false_components_per_volume,
                "budget_confidence": self.calibration.budget_confidence,
                # hysteresis: flagged regions grow to this healthy percentile's threshold (None: off)
                "grow_percentile": self.calibration.grow_percentile,
                "grow_threshold": self.calibration.grow_threshold(),
            },
            "training": training,
            "parameters": {part: self.network.num_parameters(part) for part in ("all", "attention", "encoder", "decoder")},
        }

    def save(self, path: PathLike, *, overwrite: bool = True) -> None:
        """Write the model atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists (use --overwrite to replace it)")
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        self.model_id = weights_digest(state)
        payload = {
            "format": FORMAT_NAME,
            "format_version": MODEL_FORMAT_VERSION,
            "library_version": __version__,
            "model_id": self.model_id,
            "network_config": json.dumps(self.network_config.to_dict()),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "method": json.dumps(self.method.to_dict()),
            "training": json.dumps(self.training),
            "calibration": json.dumps(self.calibration.to_dict()) if self.calibration is not None else "",
            "position_stats": json.dumps(self.position_stats.to_dict()) if self.position_stats is not None else "",
            "intensity_stats": json.dumps(self.intensity_stats.to_dict()) if self.intensity_stats is not None else "",
            "state_dict": state,
        }
        write_payload(payload, path, overwrite=overwrite)


def load_model(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> AnomalyModel:
    """Read a model file written by :meth:`AnomalyModel.save`.

    Raises :class:`ModelFileError` for a missing, foreign, corrupt or newer file.
    """
    payload = read_payload(path)
    try:
        network_config = VAEConfig.from_dict(json.loads(payload["network_config"]))
        preprocessing = PreprocessConfig.from_dict(json.loads(payload["preprocessing"]))
        method = MethodParams.from_dict(json.loads(payload["method"]))
        training = json.loads(payload.get("training") or "{}")
        calibration_json = payload.get("calibration") or ""
        calibration = Calibration.from_dict(json.loads(calibration_json)) if calibration_json else None
        stats_json = payload.get("position_stats") or ""
        position_stats = PositionStats.from_dict(json.loads(stats_json)) if stats_json else None
        intensity_json = payload.get("intensity_stats") or ""
        intensity_stats = PositionStats.from_dict(json.loads(intensity_json)) if intensity_json else None
        if preprocessing.image_size != network_config.image_size:
            raise ValueError(f"its preprocessing makes {preprocessing.image_size}-pixel slices but its network "
                             f"takes {network_config.image_size}-pixel slices")
        if method.fuse_intensity > 0 and intensity_stats is None:
            raise ValueError("the method fuses intensity but the file has no intensity statistics")
        network = build_network(network_config)
        network.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is damaged or inconsistent: {exc}".splitlines()[0]) from exc
    network.to(device).eval()
    return AnomalyModel(
        network=network,
        network_config=network_config,
        preprocessing=preprocessing,
        method=method,
        training=training,
        calibration=calibration,
        position_stats=position_stats,
        intensity_stats=intensity_stats,
        model_id=str(payload.get("model_id", "")),
        library_version=str(payload.get("library_version", "")),
        format_version=int(payload["format_version"]),
    )
