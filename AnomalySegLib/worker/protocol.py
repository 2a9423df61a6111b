"""The worker protocol shared by both sides: exit statuses, error kinds, JSON encoding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .. import errors

#: Exit statuses of the worker process.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_REQUEST = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130

#: Environment variable enabling the test-only tasks ("sleep").
TEST_TASKS_ENV = "ANOMALYSEG_WORKER_TEST_TASKS"

PathLike = Union[str, "os.PathLike[str]"]


class BadRequest(Exception):
    """The request file is unreadable or lacks a required argument (exit status 2)."""


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and paths appear in summaries."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_ERROR_CLASSES = {
    "InputError": errors.InputError,
    "ModelFileError": errors.ModelFileError,
    "OutputError": errors.OutputError,
    "Cancelled": errors.Cancelled,
    "SettingError": errors.SettingError,
    "AnomalySegError": errors.AnomalySegError,
}


def error_from_message(message: dict) -> errors.AnomalySegError:
    """The exception matching a worker ``error`` line (its class by ``kind``)."""
    cls = _ERROR_CLASSES.get(str(message.get("kind")), errors.AnomalySegError)
    return cls(str(message.get("message", "worker failed")))
