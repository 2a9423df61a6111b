"""The paper's BraTS protocol, for users who have BraTS on disk (it cannot be downloaded here).

Silva-Rodríguez et al. (2022), Sec. 4.1, following Baur et al.: from every patient, 10
consecutive axial FLAIR slices around the centre form a pseudo-volume; patients are split
271 / 32 / 32 (train / validation / test); only slices without lesion are used for
training. :func:`prepare_brats_dataset` turns a BraTS folder into a dataset that the
``anomalyseg`` commands use directly:

``train/CASE.nii.gz``
    training pseudo-volumes with every slice that contains tumour set to 0 (such slices
    carry no tissue, so preprocessing drops them: only lesion-free slices are trained on);
    cases whose 10 slices all contain tumour are skipped.
``val_healthy/CASE.nii.gz``
    the same for validation patients: lesion-free slices never trained on, used to
    calibrate the threshold (healthy-only, no label is looked at beyond "lesion-free").
``val/CASE.nii.gz`` + ``val/CASE_label.nii.gz``, ``test/CASE.nii.gz`` + ``test/CASE_label.nii.gz``
    full pseudo-volumes and whole-tumour masks (labels 1, 2, 4 -> 1).
``manifest.json``
    source files, split, slice offsets, lesion slices per case, settings.

The pseudo-volumes keep the original voxel grid: the slab is cut along the voxel axis
closest to superior-inferior and the affine's origin is shifted, so every voxel keeps its
world position (overlays on the original scans line up). The slab is centred on the
brain's extent along that axis (voxels > 0; BraTS is skull-stripped).

Layouts found (recursively, so ``BraTS*/HGG/<case>/...`` works too):
``<case>/<case>_flair.nii[.gz]`` + ``<case>_seg.nii[.gz]`` (BraTS 2018-2021) and
``<case>/<case>-t2f.nii[.gz]`` + ``<case>-seg.nii[.gz]`` (BraTS 2023).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError, OutputError
from ..io.atomic import replacing
from ..progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit
from ..io.volume_io import Volume, read_volume, write_nifti

PathLike = Union[str, "os.PathLike[str]"]

#: Patients in train / validation / test in the paper (BraTS 2019, 335 patients).
PAPER_SPLIT = (271, 32, 32)
#: Consecutive central axial slices per pseudo-volume in the paper.
PAPER_SLICES = 10

_FLAIR = re.compile(r"^(?P<case>.+?)(?P<sep>_flair|-t2f)\.nii(\.gz)?$", re.IGNORECASE)
_MANIFEST = "manifest.json"


@dataclass
class BratsCase:
    """One BraTS patient: its FLAIR and segmentation files."""

    case_id: str
    flair: Path
    seg: Path


def find_brats_cases(root: PathLike) -> tuple[list[BratsCase], list[str]]:
    """Cases under ``root`` sorted by id, and the ids of FLAIR files without a segmentation.

    Raises InputError when ``root`` is missing, holds no labelled case, or a case id
    appears twice.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"BraTS folder {root} does not exist")
    cases: dict[str, BratsCase] = {}
    unlabelled: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            match = _FLAIR.match(fname)
            if not match:
                continue
            case_id = match.group("case")
            sep = "_" if match.group("sep").startswith("_") else "-"
            folder = Path(dirpath)
            seg = next((folder / f"{case_id}{sep}seg{ext}" for ext in (".nii.gz", ".nii")
                        if (folder / f"{case_id}{sep}seg{ext}").is_file()), None)
            if seg is None:
                unlabelled.append(case_id)
                continue
            if case_id in cases:
                raise InputError(f"BraTS case {case_id} appears twice: {cases[case_id].flair} and {folder / fname}")
            cases[case_id] = BratsCase(case_id, folder / fname, seg)
    if not cases:
        extra = f" ({len(unlabelled)} FLAIR file(s) without a segmentation)" if unlabelled else ""
        raise InputError(f"no BraTS cases (<case>/<case>_flair.nii.gz + <case>_seg.nii.gz) under {root}{extra}")
    return [cases[k] for k in sorted(cases)], sorted(unlabelled)


def split_cases(case_ids: Sequence[str], *, seed: int = 0,
                split: Sequence[int] = PAPER_SPLIT) -> dict[str, list[str]]:
    """Deterministic train / val / test split in the proportions of ``split``.

    With 335 cases and the default this is exactly 271 / 32 / 32. Cases are sorted by id,
    then shuffled with ``seed``; validation and test get at least one case each.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise InputError("duplicate case ids in the BraTS split")
    n = len(ids)
    if n < 3:
        raise InputError(f"the BraTS protocol needs at least 3 labelled cases, found {n}")
    if len(split) != 3 or min(split) < 0 or split[0] <= 0:
        raise InputError(f"split must be three counts (train, val, test) with train > 0, got {tuple(split)}")
    total = float(sum(split))
    n_val = max(1, int(round(n * split[1] / total))) if split[1] else 0
    n_test = max(1, int(round(n * split[2] / total))) if split[2] else 0
    while n - n_val - n_test < 1:  # tiny data sets: keep at least one training case
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    return {
        "train": sorted(shuffled[n_test + n_val:]),
        "val": sorted(shuffled[n_test:n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior-inferior direction."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def central_slab(brain: np.ndarray, axis: int, n_slices: int) -> int:
    """First index of the ``n_slices`` consecutive slices centred on the brain's extent along ``axis``."""
    nz = brain.shape[axis]
    if not 1 <= n_slices <= nz:
        raise InputError(f"need between 1 and {nz} slices, got {n_slices}")
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(brain.any(axis=other))
    centre = 0.5 * (present[0] + present[-1]) if present.size else 0.5 * (nz - 1)
    k0 = int(round(centre - n_slices / 2.0 + 0.5))
    return int(min(max(k0, 0), nz - n_slices))


def slab_affine(affine: np.ndarray, axis: int, k0: int) -> np.ndarray:
    """Affine of the sub-volume starting at index ``k0`` along ``axis`` (same world positions)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, 3] + out[:3, axis] * k0
    return out


@dataclass
class PseudoVolume:
    """A central slab of a BraTS case: FLAIR, whole-tumour mask and where it came from."""

    flair: Volume
    label: Volume
    axis: int
    slice_offset: int
    lesion_slices: list[int]


def extract_pseudo_volume(flair: Volume, seg: Volume, n_slices: int = PAPER_SLICES) -> PseudoVolume:
    """Cut ``n_slices`` consecutive central axial slices of a FLAIR and its segmentation."""
    data = np.asarray(flair.data, dtype=np.float32)
    if np.asarray(seg.data).shape != data.shape or not np.allclose(seg.affine, flair.affine, atol=1e-3):
        raise InputError(f"{flair.name}: the segmentation is not on the FLAIR's voxel grid")
    brain = data > 0
    if not brain.any():
        raise InputError(f"{flair.name}: the FLAIR is empty (no voxel > 0)")
    axis = axial_axis(flair.affine)
    k0 = central_slab(brain, axis, n_slices)
    index = np.arange(k0, k0 + n_slices)
    image = np.ascontiguousarray(np.take(data, index, axis=axis))
    label = np.ascontiguousarray(np.take(np.asarray(seg.data) > 0, index, axis=axis)).astype(np.uint8)
    affine = slab_affine(flair.affine, axis, k0)
    other = tuple(a for a in range(3) if a != axis)
    lesion_slices = [int(i) for i in np.flatnonzero(label.any(axis=other))]
    meta = dict(flair.meta)
    return PseudoVolume(
        flair=Volume(image, affine, flair.path, meta),
        label=Volume(label, affine, seg.path, dict(seg.meta)),
        axis=axis, slice_offset=k0, lesion_slices=lesion_slices,
    )


def lesion_free_slices(pseudo: PseudoVolume) -> Optional[np.ndarray]:
    """The FLAIR slab with every tumour-containing slice set to 0, or None if none is left."""
    n = pseudo.flair.data.shape[pseudo.axis]
    if len(pseudo.lesion_slices) >= n:
        return None
    data = np.array(pseudo.flair.data, dtype=np.float32)
    index = [slice(None)] * 3
    index[pseudo.axis] = pseudo.lesion_slices
    data[tuple(index)] = 0.0
    return data


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise OutputError(f"{output_dir} exists and is not a folder")
        if any(output_dir.iterdir()):
            if not (output_dir / _MANIFEST).is_file():
                raise OutputError(f"{output_dir} is not empty and is not a BraTS dataset made by AnomalySeg")
            if not overwrite:
                raise OutputError(f"{output_dir} already holds a dataset (use --overwrite to rebuild it)")
    parent = output_dir.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {output_dir}: folder {parent} does not exist")


def prepare_brats_dataset(
    brats_dir: PathLike,
    output_dir: PathLike,
    *,
    n_slices: int = PAPER_SLICES,
    seed: int = 0,
    split: Sequence[int] = PAPER_SPLIT,
    max_cases: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> dict:
    """Build the paper's BraTS dataset from ``brats_dir`` into ``output_dir`` (see module doc).

    ``max_cases`` keeps the first N cases by sorted id (quick trials). The dataset is
    written into a temporary sibling folder and renamed at the end, so an interrupted run
    leaves nothing half-written. Returns the manifest (also written as manifest.json).
    """
    out = Path(output_dir)
    _prepare_output(out, overwrite)
    cases, unlabelled = find_brats_cases(brats_dir)
    if max_cases is not None:
        cases = cases[:max(3, int(max_cases))]
    splits = split_cases([c.case_id for c in cases], seed=seed, split=split)
    split_of = {cid: name for name, ids in splits.items() for cid in ids}
    manifest: dict = {
        "protocol": "BraTS pseudo-volumes (Silva-Rodriguez et al. 2022, Sec. 4.1; Baur et al.)",
        "source": str(Path(brats_dir).resolve()), "n_slices": int(n_slices), "seed": int(seed),
        "requested_split": [int(v) for v in split], "split": splits,
        "folders": {"train": "train", "calibration": "val_healthy", "val": "val", "test": "test"},
        "label_pattern": "{name}_label.nii.gz", "cases": {},
        "skipped": {"no_segmentation": unlabelled, "train_all_slices_with_lesion": [],
                    "val_all_slices_with_lesion": []},
        "healthy_training_slices": 0, "healthy_calibration_slices": 0,
    }
    try:
        with replacing(out, directory=True) as (tmp,):
            for sub in ("train", "val_healthy", "val", "test"):
                (tmp / sub).mkdir()
            for index, case in enumerate(cases):
                check_cancel(cancel)
                pseudo = extract_pseudo_volume(read_volume(case.flair), read_volume(case.seg), n_slices)
                where = split_of[case.case_id]
                info = {"split": where, "flair": str(case.flair), "seg": str(case.seg), "axis": pseudo.axis,
                        "slice_offset": pseudo.slice_offset, "lesion_slices": pseudo.lesion_slices}
                if where in ("val", "test"):
                    write_nifti(tmp / where / f"{case.case_id}.nii.gz", pseudo.flair.data, pseudo.flair)
                    write_nifti(tmp / where / f"{case.case_id}_label.nii.gz", pseudo.label.data, pseudo.label,
                                dtype=np.uint8)
                if where in ("train", "val"):
                    healthy = lesion_free_slices(pseudo)
                    folder = "train" if where == "train" else "val_healthy"
                    n_free = n_slices - len(pseudo.lesion_slices)
                    if healthy is None:
                        manifest["skipped"][f"{where}_all_slices_with_lesion"].append(case.case_id)
                    else:
                        write_nifti(tmp / folder / f"{case.case_id}.nii.gz", healthy, pseudo.flair)
                        key = "healthy_training_slices" if where == "train" else "healthy_calibration_slices"
                        manifest[key] += n_free
                    info["healthy_slices"] = n_free
                manifest["cases"][case.case_id] = info
                emit(progress, ProgressEvent("prepare", (index + 1) / len(cases),
                                             message=f"{case.case_id} ({index + 1}/{len(cases)})"))
            if manifest["healthy_training_slices"] == 0:
                raise InputError("every central slice of every training case contains tumour: nothing to train on")
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the BraTS dataset into {out}: {exc.strerror or exc}") from exc
    return manifest
