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


def image_size(text: str) -> int:
    """A slice size: a positive multiple of 32."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError("must be a multiple of 32 (e.g. 64, 128, 224)")
    return value
