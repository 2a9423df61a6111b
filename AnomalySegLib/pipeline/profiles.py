"""Training profiles: the settings a user gets without tuning flags.

``fast`` fits a laptop CPU: 40 whole-brain 2 mm healthy volumes train and calibrate in
under 20 minutes on 2 cores (measured: docs/BENCHMARKS.md; ~5 min with native bf16, 10 min in
float32 on the same AMD CPU, ~19 min estimated on an older Xeon, where ``--epochs 8`` halves
it at a measured cost in quality). ``paper`` is the paper's scale
(224 px slices, ResNet-18 width 64, 50 epochs, lr 1e-4) for a CUDA GPU. ``auto`` picks
``paper`` when training on CUDA and ``fast`` otherwise. An explicit flag (``--epochs``,
``--image-size``, ...) overrides the profile's value; the resolved settings are printed and
stored in the model's training summary (``anomalyseg info``).

The default method is the learned method that measures best on the benchmark
(docs/BENCHMARKS.md): the coarse-noise denoising auto-encoder, ``dae``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..settings import METHOD_NAMES  # re-exported: the command line's choices, without torch

__all__ = ["METHOD_NAMES", "PROFILES", "LEARNING_RATES", "PROFILE_CHOICES", "DEFAULT_METHOD", "resolve_profile", "profile_settings"]

#: The default learned method (best measured on the benchmark; see docs/BENCHMARKS.md).
DEFAULT_METHOD = "dae"

#: Per profile: TrainConfig field -> value, the learning rate being the default method's.
PROFILES: Dict[str, Dict[str, Any]] = {
    # 16 epochs: measured better than 8 on every cohort (docs/BENCHMARKS.md, "Training length");
    # 40 volumes on 2 cores: ~5 min with native bf16, 10 min in float32 (AMD EPYC; ~19 min est. on an older Xeon)
    "fast": {"image_size": 96, "base_width": 16, "epochs": 16, "batch_size": 32, "learning_rate": 1e-3},
    "paper": {"image_size": 224, "base_width": 64, "epochs": 50, "batch_size": 32, "learning_rate": 1e-4},
}

#: Learning rates of the other methods where they differ from the profile's: the
#: VAE-based methods keep the paper's 1e-4 (the attention study trained them so); 1e-3
#: lets the short CPU run of the U-Net converge.
LEARNING_RATES: Dict[str, Dict[str, float]] = {
    "fast": {"amcons": 1e-4, "gradcamcons": 1e-4, "vae": 1e-4},
    "paper": {},
}

PROFILE_CHOICES = ("auto",) + tuple(PROFILES)


def resolve_profile(name: str, device_type: str) -> str:
    """``auto`` -> ``paper`` on CUDA, ``fast`` elsewhere; other names are checked and returned."""
    if name == "auto":
        return "paper" if device_type == "cuda" else "fast"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_CHOICES)}")
    return name


def profile_settings(name: str, device_type: str, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """TrainConfig keyword arguments of a profile, with the user's explicit ``overrides``
    (None values are ignored) applied on top, plus ``profile`` (the resolved name) and
    ``method`` (:data:`DEFAULT_METHOD` unless overridden)."""
    resolved = resolve_profile(name, device_type)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    method = given.get("method", DEFAULT_METHOD)
    settings: Dict[str, Any] = {"method": method, **PROFILES[resolved], "profile": resolved}
    settings["learning_rate"] = LEARNING_RATES[resolved].get(method, settings["learning_rate"])
    settings.update(given)
    return settings
