"""Progress reporting and cancellation shared by training, calibration and inference.

Long operations take a ``progress`` callback receiving :class:`ProgressEvent` objects and a
``cancel`` callback polled between steps. The command line renders events as a text bar
(:class:`TextProgressBar`), the worker sends them as JSON lines (:meth:`ProgressEvent.to_dict`)
and the Slicer module shows :func:`status_line` of each. Torch-free and numpy-free: the
Slicer GUI process imports it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, TextIO

from .errors import Cancelled


@dataclass
class ProgressEvent:
    """One progress update; ``fraction`` is the completed share of the current ``stage``."""

    stage: str
    fraction: float
    message: str = ""
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    step: Optional[int] = None
    steps: Optional[int] = None
    losses: Optional[dict] = None
    eta_s: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-able dict with the unset (None) fields dropped."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProgressEvent":
        """Inverse of :meth:`to_dict`; other keys (a worker line's ``type``) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{"stage": "", "fraction": 0.0, **values})


ProgressCallback = Callable[[ProgressEvent], None]
CancelCallback = Callable[[], bool]


def check_cancel(cancel: Optional[CancelCallback]) -> None:
    """Raise :class:`Cancelled` if the caller asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def emit(progress: Optional[ProgressCallback], event: ProgressEvent) -> None:
    """Send ``event`` to ``progress`` if there is a callback."""
    if progress is not None:
        progress(event)


class EtaEstimator:
    """Remaining-time estimate from the elapsed time and the completed fraction."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def eta(self, fraction: float) -> Optional[float]:
        """Seconds left, or None while too little is done to tell."""
        if fraction <= 0.01:
            return None
        elapsed = time.monotonic() - self.start
        return max(0.0, elapsed * (1.0 - fraction) / fraction)


def format_seconds(seconds: Optional[float]) -> str:
    """``mm:ss`` (or ``h:mm:ss``); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(float(seconds)):
        return "--:--"
    seconds = int(round(float(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _loss(event: ProgressEvent) -> Optional[float]:
    return None if not event.losses or event.losses.get("loss") is None else float(event.losses["loss"])


def status_line(event: ProgressEvent) -> str:
    """One status line: stage, epoch, message, loss, ETA (``Train \u2013 epoch 2/5 \u2013 loss 123.5 \u2013 ETA 01:15``)."""
    parts = [str(event.stage).capitalize()]
    if event.epoch is not None and event.epochs:
        parts.append(f"epoch {event.epoch}/{event.epochs}")
    if event.message:
        parts.append(str(event.message))
    loss = _loss(event)
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    parts.append(f"ETA {format_seconds(event.eta_s)}")
    return " \u2013 ".join(p for p in parts if p)


class TextProgressBar:
    """Renders progress events as a single updating line on a terminal (stderr).

    On a non-interactive stream it prints at most one line per stage change or per 5 %,
    so logs of headless runs stay readable.
    """

    def __init__(self, stream: TextIO = sys.stderr, width: int = 28) -> None:
        self.stream = stream
        self.width = width
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._last_stage: Optional[str] = None
        self._last_bucket = -1

    def __call__(self, event: ProgressEvent) -> None:
        fraction = min(max(event.fraction, 0.0), 1.0)
        filled = int(round(self.width * fraction))
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"{event.stage:<9}", f"[{bar}]", f"{100 * fraction:5.1f}%"]
        if event.epoch is not None and event.epochs:
            parts.append(f"epoch {event.epoch}/{event.epochs}")
        loss = _loss(event)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"ETA {format_seconds(event.eta_s)}")
        if event.message:
            parts.append(event.message)
        line = " ".join(parts)
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(160))
            if fraction >= 1.0:
                self.stream.write("\n")
        else:
            bucket = int(fraction * 20)
            if event.stage == self._last_stage and bucket == self._last_bucket and fraction < 1.0:
                return
            self.stream.write(line + "\n")
            self._last_bucket = bucket
        self._last_stage = event.stage
        self.stream.flush()
