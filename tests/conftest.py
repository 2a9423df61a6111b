"""Shared pytest fixtures and small synthetic-data helpers.

``make_oblique_volume`` builds a synthetic "head" (an ellipsoid with a brighter inner
ellipsoid and dark ventricles) on an oblique, anisotropic, axis-permuted voxel grid,
writes it as NIfTI (nibabel, RAS) and returns a :class:`SyntheticHead` describing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest

# The suite runs on a few shared cores: keep BLAS/OpenMP single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def rotation_matrix(ax_deg: float = 0.0, ay_deg: float = 0.0, az_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation Rz @ Ry @ Rx (angles in degrees about the RAS x, y, z axes)."""
    ax, ay, az = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Index axis -> world axis of the default synthetic grid before rotation: i runs
#: Posterior, j runs Left, k runs Superior (so canonical reorientation must permute
#: and flip). Columns are the world direction of each index axis.
DEFAULT_AXES = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class SyntheticHead:
    """A synthetic head volume written to ``path`` (NIfTI, or None when not written)."""

    path: Optional[Path]
    data: np.ndarray  # float32 (I, J, K)
    affine: np.ndarray  # voxel -> RAS
    centre_ras: np.ndarray  # head centre, mm
    radii_mm: np.ndarray  # head semi-axes along RAS x, y, z
    head: np.ndarray  # bool (I, J, K): voxel centres inside the head ellipsoid


def synthetic_head(
    shape: Sequence[int] = (100, 84, 36),
    spacing: Sequence[float] = (1.3, 0.9, 3.0),
    angles_deg: Sequence[float] = (20.0, 10.0, 0.0),
    axes: np.ndarray = DEFAULT_AXES,
    centre_ras: Sequence[float] = (4.0, -9.0, 12.0),
    radii_mm: Sequence[float] = (34.0, 42.0, 34.0),
    noise: float = 1.0,
    seed: int = 0,
) -> SyntheticHead:
    """Synthetic head on an oblique anisotropic grid (not written to disk)."""
    shape = tuple(int(s) for s in shape)
    rot = rotation_matrix(*angles_deg) @ np.asarray(axes, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing, dtype=float)[None, :]
    # Grid centre at a non-zero world point so that origins matter.
    grid_centre = np.array([1.5, -2.0, 3.0])
    affine[:3, 3] = grid_centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = np.asarray(centre_ras, dtype=float)
    radii = np.asarray(radii_mm, dtype=float)
    rel = (world - centre) / radii
    r2 = np.sum(rel**2, axis=1).reshape(shape)
    vent = np.sum(((world - centre - np.array([0.0, 4.0, 6.0])) / (radii * [0.15, 0.3, 0.2])) ** 2, axis=1)
    data = np.zeros(shape, dtype=np.float32)
    head = r2 <= 1.0
    data[head] = 60.0
    data[r2 <= 0.55] = 100.0
    data[(vent.reshape(shape) <= 1.0) & head] = 20.0
    rng = np.random.default_rng(seed)
    data[head] += rng.normal(0.0, noise, size=int(head.sum())).astype(np.float32)
    return SyntheticHead(None, data, affine, centre, radii, head)


@pytest.fixture
def make_oblique_volume():
    """Factory ``make_oblique_volume(tmp_path, name="oblique", **synthetic_head_kwargs)``.

    Writes the synthetic head as ``<tmp_path>/<name>.nii.gz`` with nibabel and returns
    the :class:`SyntheticHead` (with ``path`` set).
    """
    import nibabel as nib

    def make(tmp_path: Path, name: str = "oblique", **kwargs) -> SyntheticHead:
        head = synthetic_head(**kwargs)
        path = Path(tmp_path) / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(head.data, head.affine), str(path))
        head.path = path
        return head

    return make


# ----------------------------------------------------------------------------- trained models
# One synthetic cohort and one small trained model per test session: the end-to-end,
# CLI, calibration and worker tests share them (training is the slow part of the suite).

#: Settings of the session model: small enough for a 2-core CI machine, good enough that
#: obvious lesions must stand out (the end-to-end test asserts it). Paper hyper-parameters
#: (AMCons, beta 10, lambda_H 0.1, Adam 1e-4, batch 32) on 64-pixel slices with the map
#: taken at the stem, like the demo (see docs/METHOD.md, "Attention stage").
SESSION_TRAINING = dict(method="amcons", epochs=30, batch_size=32, learning_rate=1e-4, image_size=64,
                        base_width=16, attention_stage=0, seed=0, device="cpu")


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """Healthy training volumes and lesion test volumes (FLAIR-like, 2 mm, 32 central slices)."""
    from AnomalySegLib.data.synthetic import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(root, n_healthy=12, n_lesion=2, lesion_kinds=("tumour", "bright"),
                           n_lesion_free_test=1, seed=7, resolution_mm=2.0, n_slices=32)
    return {
        "root": root,
        "healthy": [root / p for p in manifest["healthy"]],
        "test": [root / p for p in manifest["test"]],
        "labels": [root / p for p in manifest["labels"]],
        "manifest": manifest,
    }


@pytest.fixture(scope="session")
def healthy_volumes(synthetic_cohort):
    from AnomalySegLib.io.volume_io import read_volume

    return [read_volume(p) for p in synthetic_cohort["healthy"]]


@pytest.fixture(scope="session")
def trained_model_path(synthetic_cohort, tmp_path_factory):
    """A calibrated AMCons model trained on the session cohort by ``anomalyseg train``."""
    from AnomalySegLib.cli.commands import main

    path = tmp_path_factory.mktemp("model") / "session_model.pt"
    t = SESSION_TRAINING
    code = main(["train", *map(str, synthetic_cohort["healthy"]), "--output", str(path), "--quiet",
                 "--method", t["method"], "--epochs", str(t["epochs"]), "--batch-size", str(t["batch_size"]),
                 "--lr", str(t["learning_rate"]), "--image-size", str(t["image_size"]), "--width", str(t["base_width"]),
                 "--attention-stage", str(t["attention_stage"]), "--seed", str(t["seed"]), "--device", t["device"]])
    assert code == 0 and path.exists()
    return path


@pytest.fixture()
def tiny_model(trained_model_path):
    """A fresh in-memory copy of the session model (tests may modify it)."""
    from AnomalySegLib.model.bundle import load_model

    return load_model(trained_model_path)
