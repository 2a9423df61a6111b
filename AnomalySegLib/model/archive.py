"""The container shared by model files and training checkpoints.

A ``torch.save`` archive (a dict) holding only tensors, strings and numbers, with a
``format`` name and a ``format_version``. It is read with ``torch.load(weights_only=True)``,
PyTorch's restricted unpickler, so opening a file cannot execute code from it, and
written atomically (:mod:`AnomalySegLib.io.atomic`), so a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from .. import MODEL_FORMAT_VERSION, __version__
from ..errors import ModelFileError, OutputError
from ..io.atomic import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

#: ``format`` of a model file (:mod:`.bundle`); checkpoints use :data:`.checkpoint.CHECKPOINT_FORMAT`.
FORMAT_NAME = "anomalyseg-model"


def write_payload(payload: dict, path: PathLike, *, overwrite: bool = True) -> None:
    """``torch.save`` the archive atomically; OutputError when it cannot be written.

    Without ``overwrite`` an existing file (even one created by a concurrent run while
    this one was working) is never replaced (:func:`..io.atomic.replacing`).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    try:
        atomic_write(path, lambda temp: torch.save(payload, temp), overwrite=overwrite)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:  # torch's zip writer reports a failed write (e.g. a full disk) so
        raise OutputError(f"cannot write {path}: the write failed (is the disk full?)") from exc


def read_payload(path: PathLike, expected_format: str = FORMAT_NAME) -> dict:
    """Load a model/checkpoint archive safely and check its format name and version."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a readable model file"
        raise ModelFileError(
            f"{path} is not an AnomalySeg model file (it could not be read safely: {type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise ModelFileError(f"{path} is not an AnomalySeg {expected_format.split('-')[-1]} file")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path} has an unknown format version {version!r}")
    if version > MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer AnomalySeg ({payload.get('library_version', '?')}, format {version}); "
            f"this is AnomalySeg {__version__} (format {MODEL_FORMAT_VERSION}): upgrade with `pip install -U anomalyseg`"
        )
    return payload
