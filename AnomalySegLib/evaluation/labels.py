"""Test-set label files: which file is the lesion mask of an image, and reading it checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError
from ..io.volume_io import read_volume, volume_stem

PathLike = Union[str, "os.PathLike[str]"]


def find_label(image: PathLike, labels_dir: Optional[PathLike] = None, pattern: str = "{name}_label.nii.gz") -> Optional[Path]:
    """The label file of ``image`` (``pattern`` formatted with the image's name) or None."""
    image = Path(image)
    folder = Path(labels_dir) if labels_dir is not None else image.parent
    candidate = folder / pattern.format(name=volume_stem(image))
    return candidate if candidate.is_file() else None


def is_label_file(path: PathLike, pattern: str = "{name}_label.nii.gz") -> bool:
    """True when ``path``'s file name has the shape of ``pattern`` (so it is not an image)."""
    prefix, _, suffix = pattern.partition("{name}")
    name = Path(path).name
    return len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)


def read_label(path: Path, image: Any) -> np.ndarray:
    """The lesion mask (bool) of ``image`` from ``path``, checked to lie on the image's voxel grid."""
    label = read_volume(path)
    data = np.asarray(label.data)
    if data.shape != np.asarray(image.data).shape:
        raise InputError(f"label {path.name} has shape {data.shape}, its image has {np.asarray(image.data).shape}")
    if not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3):
        raise InputError(f"label {path.name} is not on its image's voxel grid (different affine)")
    if not np.all(np.isfinite(data)):
        raise InputError(f"label {path.name} contains NaN or infinite values")
    return data > 0
