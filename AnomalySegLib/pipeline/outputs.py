"""The four per-case outputs of `anomalyseg segment`, written all-or-nothing.

``DIR/NAME_heatmap.nii.gz`` (float32), ``DIR/NAME_mask.nii.gz`` (uint8 0/1),
``DIR/NAME.seg.nrrd`` (Slicer segmentation, segment "Anomaly") and
``DIR/NAME_report.json``, all on the input's voxel grid and affine; optionally
``DIR/NAME_brainmask.nii.gz`` (uint8 0/1, ``segment --write-brain-mask``): the brain the
map is confined to (the extracted brain when brain extraction ran).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..errors import OutputError
from ..io.atomic import replacing
from ..io.geometry import voxel_volume_ml
from ..io.segmentation_file import write_seg_nrrd
from ..io.volume_io import Volume, write_nifti
from ..segmentation.segment import SegmentationResult

OUTPUT_KINDS = ("heatmap", "mask", "segmentation", "report")

#: Longest suffix added to a case name (``_heatmap.nii.gz``) and longest hidden prefix of
#: the atomic writer's temporary and backup names (``.tmp-XXXXXXXX-bak-``).
_LONGEST_SUFFIX = len("_brainmask.nii.gz")
_TEMP_PREFIX = len(".tmp-12345678-bak-")


def max_stem_length(output_dir: "str | os.PathLike[str]") -> int:
    """The longest case name whose outputs (and their temporary names) fit the file system."""
    out = Path(output_dir)
    probe = out if out.is_dir() else next((p for p in out.parents if p.is_dir()), Path("."))
    try:
        name_max = int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        name_max = 255
    return max(1, name_max - _LONGEST_SUFFIX - _TEMP_PREFIX)


def case_output_paths(output_dir: "str | os.PathLike[str]", stem: str, *, brain_mask: bool = False) -> dict:
    """Where the outputs of case ``stem`` go (with ``brain_mask``: the optional fifth)."""
    out = Path(output_dir)
    paths = {
        "heatmap": out / f"{stem}_heatmap.nii.gz",
        "mask": out / f"{stem}_mask.nii.gz",
        "segmentation": out / f"{stem}.seg.nrrd",
        "report": out / f"{stem}_report.json",
    }
    if brain_mask:
        paths["brainmask"] = out / f"{stem}_brainmask.nii.gz"
    return paths


def check_outputs_writable(output_dir: "str | os.PathLike[str]", stems, *, overwrite: bool,
                           brain_mask: bool = False) -> None:
    """Fail before any work if two cases share a name, an output exists (without
    ``overwrite``) or the folder is not writable."""
    stems = list(stems)
    duplicated = sorted({s for s in stems if stems.count(s) > 1})
    if duplicated:
        raise OutputError(f"several inputs would write the same outputs: {', '.join(duplicated)}")
    out = Path(output_dir)
    if not str(output_dir).strip():
        raise OutputError("the output folder name is empty")
    limit = max_stem_length(out)
    for stem in stems:
        if len(stem) > limit:
            raise OutputError(f"input name {stem[:40]}... is too long for its output file names "
                              f"({len(stem)} characters; at most {limit} here): rename the input")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file")
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")
    if overwrite:
        return
    for stem in stems:
        existing = [str(p) for p in case_output_paths(out, stem, brain_mask=brain_mask).values()
                    if os.path.lexists(p)]
        if existing:
            raise OutputError(f"{existing[0]} already exists (use --overwrite to replace outputs)")


def write_case_outputs(
    output_dir: "str | os.PathLike[str]",
    stem: str,
    volume: Volume,
    result: SegmentationResult,
    *,
    overwrite: bool = False,
    extra_report: Optional[dict] = None,
    brain_mask: Optional[np.ndarray] = None,
) -> dict:
    """Write heatmap, mask, segmentation and report for one case; return their paths.

    Everything is first written to hidden temporary files in the output folder and only
    then moved into place, all four together or none (:func:`..io.atomic.replacing`): an
    error leaves neither a half-written output nor a mix of old and new outputs behind.
    Without ``overwrite`` the placement is no-clobber, so a concurrent run writing the same
    case fails instead of silently replacing it. ``brain_mask`` (bool, the input's grid)
    adds ``NAME_brainmask.nii.gz`` to the same all-or-nothing set.
    """
    out = Path(output_dir)
    with_brain = brain_mask is not None
    check_outputs_writable(out, [stem], overwrite=overwrite, brain_mask=with_brain)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    targets = case_output_paths(out, stem, brain_mask=with_brain)
    kinds = tuple(targets)

    report = {
        "input": str(volume.path) if volume.path is not None else None,
        "library_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **result.report(),
        "voxel_volume_ml": voxel_volume_ml(volume.affine),
        "outputs": {kind: path.name for kind, path in targets.items()},
    }
    if extra_report:
        report.update(extra_report)
    seg_fields = {
        "AnomalySeg_ModelVersion": result.model_version,
        "AnomalySeg_Threshold": repr(float(result.threshold)),
        "AnomalySeg_Percentile": repr(float(result.percentile)),
    }
    try:
        with replacing(*(targets[kind] for kind in kinds), overwrite=overwrite) as written:
            temps = dict(zip(kinds, written))
            _write_case_files(temps, volume, result, report, seg_fields)
            if with_brain:
                write_nifti(temps["brainmask"], np.asarray(brain_mask).astype(np.uint8), volume, dtype=np.uint8,
                            description="AnomalySeg brain mask")
    except OSError as exc:
        where = f"{Path(exc.filename).name}: " if exc.filename else ""
        raise OutputError(f"cannot write outputs for {stem} in {out}: {where}{exc.strerror or exc}; "
                          "no output of this case was changed") from exc
    return targets


def _write_case_files(paths: dict, volume: Volume, result: SegmentationResult, report: dict, seg_fields: dict) -> None:
    write_nifti(paths["heatmap"], np.asarray(result.heatmap, dtype=np.float32), volume, dtype=np.float32,
                description="AnomalySeg anomaly map")
    write_nifti(paths["mask"], result.mask.astype(np.uint8), volume, dtype=np.uint8,
                description="AnomalySeg anomaly mask")
    write_seg_nrrd(paths["segmentation"], result.mask, volume, extra_fields=seg_fields)
    paths["report"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def complete_outputs_exist(output_dir: "str | os.PathLike[str]", stem: str, *, brain_mask: bool = False) -> bool:
    """True when all four outputs of case ``stem`` exist (``segment --skip-existing``;
    with ``brain_mask`` the brain mask too)."""
    return all(p.is_file() for p in case_output_paths(output_dir, stem, brain_mask=brain_mask).values())
