"""`anomalyseg demo` end to end, shrunk to seconds (same code path as the README command)."""

import json

import nibabel as nib
import numpy as np
import pytest

from AnomalySegLib.cli.demo import run_demo
from AnomalySegLib.errors import OutputError

TINY = dict(n_healthy=4, n_lesion=1, lesion_kinds=("tumour",), n_lesion_free_test=1, n_slices=12,
            image_size=32, base_width=4, epochs=1, batch_size=8)


def test_demo_writes_everything_and_refuses_to_overwrite(tmp_path):
    lines = []
    out = tmp_path / "demo"
    summary = run_demo(out, device="cpu", settings=TINY, echo=lines.append)
    assert (out / "demo_model.pt").exists() and (out / "overlay.png").stat().st_size > 10_000
    for stem in ("lesion_000", "normal_000"):
        for suffix in ("_heatmap.nii.gz", "_mask.nii.gz", ".seg.nrrd", "_report.json"):
            assert (out / "segmentations" / f"{stem}{suffix}").exists()
    # outputs sit on the generated volume's grid
    image = nib.load(str(out / "data" / "test" / "lesion_000.nii.gz"))
    heat = nib.load(str(out / "segmentations" / "lesion_000_heatmap.nii.gz"))
    assert heat.shape == image.shape and np.allclose(heat.affine, image.affine)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["model_row"]["AUROC"] == summary["model_row"]["AUROC"] is not None
    assert saved["method"] == "dae"
    assert 0.0 <= saved["intensity_baseline"]["AUPRC"] <= 1.0
    assert any("intensity threshold" in line for line in lines) and any("ORACLE" in l or "oracle" in l for l in lines)
    # a non-empty output folder is not reused without overwrite
    with pytest.raises(OutputError, match="--overwrite"):
        run_demo(out, device="cpu", settings=TINY, echo=lines.append)
