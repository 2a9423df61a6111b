"""The four per-case outputs of `anomalyseg segment`, written all-or-nothing.

``DIR/NAME_heatmap.nii.gz`` (float32), ``DIR/NAME_mask.nii.gz`` (uint8 0/1),
``DIR/NAME.seg.nrrd`` (Slicer segmentation, segment "Anomaly") and
``DIR/NAME_report.json``, all on the input's voxel grid and affine.
"""

from __future__ import annotations

import datetime as _dt
import json
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


def case_output_paths(output_dir: "str | os.PathLike[str]", stem: str) -> dict:
    """Where the outputs of case ``stem`` go."""
    out = Path(output_dir)
    return {
        "heatmap": out / f"{stem}_heatmap.nii.gz",
        "mask": out / f"{stem}_mask.nii.gz",
        "segmentation": out / f"{stem}.seg.nrrd",
        "report": out / f"{stem}_report.json",
    }


def check_outputs_writable(output_dir: "str | os.PathLike[str]", stems, *, overwrite: bool) -> None:
    """Fail before any work if two cases share a name, an output exists (without
    ``overwrite``) or the folder is not writable."""
    stems = list(stems)
    duplicated = sorted({s for s in stems if stems.count(s) > 1})
    if duplicated:
        raise OutputError(f"several inputs would write the same outputs: {', '.join(duplicated)}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file")
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")
    if overwrite:
        return
    for stem in stems:
        existing = [str(p) for p in case_output_paths(out, stem).values() if p.exists()]
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
) -> dict:
    """Write heatmap, mask, segmentation and report for one case; return their paths.

    Everything is first written to hidden temporary files in the output folder and only
    then renamed into place, so an error leaves no half-written output behind.
    """
    out = Path(output_dir)
    check_outputs_writable(out, [stem], overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    targets = case_output_paths(out, stem)

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
        with replacing(*(targets[kind] for kind in OUTPUT_KINDS)) as written:
            temps = dict(zip(OUTPUT_KINDS, written))
            _write_case_files(temps, volume, result, report, seg_fields)
    except OSError as exc:
        raise OutputError(f"cannot write outputs for {stem} in {out}: {exc.strerror or exc}") from exc
    return targets


def _write_case_files(paths: dict, volume: Volume, result: SegmentationResult, report: dict, seg_fields: dict) -> None:
    write_nifti(paths["heatmap"], result.heatmap.astype(np.float32), volume, dtype=np.float32,
                description="AnomalySeg anomaly map")
    write_nifti(paths["mask"], result.mask.astype(np.uint8), volume, dtype=np.uint8,
                description="AnomalySeg anomaly mask")
    write_seg_nrrd(paths["segmentation"], result.mask, volume, extra_fields=seg_fields)
    paths["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
