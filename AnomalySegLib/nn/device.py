"""Where torch runs: device selection and mixed precision (shared by training, inference,
the worker and the evaluation harness)."""

from __future__ import annotations

import contextlib

import torch

from ..errors import AnomalySegError

__all__ = ["resolve_device", "autocast_for", "training_autocast"]


def resolve_device(spec: "str | torch.device" = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device, checking CUDA is there."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AnomalySegError("CUDA was requested but PyTorch sees no CUDA GPU here: choose the CPU (or auto) device")
        return torch.device(text)
    raise AnomalySegError(f"unknown device {spec!r}: use auto, cpu or cuda")


def autocast_for(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def training_autocast(device: torch.device, enabled: bool = True):
    """The training step's precision: :func:`autocast_for` on CUDA; on a CPU, bfloat16
    autocast when ``enabled`` (the caller checks the CPU has native bfloat16, e.g. AMX)."""
    if device.type == "cpu" and enabled:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return autocast_for(device, enabled)
