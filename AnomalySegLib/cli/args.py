"""Argument types shared by the ``anomalyseg`` subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse

from ..errors import SettingError
from ..settings import check_percentile


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def percentile(text: str) -> float:
    """A healthy percentile strictly between 0 and 100 (:func:`~AnomalySegLib.settings.check_percentile`)."""
    value = _number(text)
    try:
        return check_percentile(value)
    except SettingError:
        raise argparse.ArgumentTypeError("must be between 0 and 100 (exclusive)") from None


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


#: Largest slice size accepted. The paper uses 224 px; 1024 px already resolves 0.25 mm on
#: a 256 mm field of view (finer than any clinical MRI) and needs ~20x the memory of 224 px.
#: Training memory grows with the square of the size (see :func:`training_memory_gb`).
MAX_IMAGE_SIZE = 1024


def training_memory_gb(size: int, batch: int = 32, width: int = 64) -> float:
    """Rough activation memory (GB) of one training batch: ~12 full-resolution float32 maps
    of ``width`` channels per image are kept for the backward pass."""
    return batch * width * size * size * 4 * 12 / 1e9


def image_size(text: str) -> int:
    """A slice size: a positive multiple of 32, at most :data:`MAX_IMAGE_SIZE`."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError("must be a multiple of 32 (e.g. 64, 128, 224)")
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{value} px is too large: at most {MAX_IMAGE_SIZE} (finer than any MRI; the paper uses 224); "
            f"{value}-px slices would need about {training_memory_gb(value):,.0f} GB per training batch "
            f"of 32 at width 64")
    return value


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be from 0 to {2**32 - 1}")
    return value


def nonempty_path(text: str) -> str:
    """A file or folder name that is not empty (``""`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
