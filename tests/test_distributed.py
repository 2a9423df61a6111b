"""DistributedDataParallel training under torchrun with 2 CPU processes (gloo backend)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from AnomalySegLib.model.bundle import load_model


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_cpu_processes(healthy_volumes, tmp_path):
    # 3 small volumes: 8 central slices each
    import nibabel as nib

    paths = []
    for i, v in enumerate(healthy_volumes[:3]):
        k0 = v.data.shape[2] // 2 - 4
        affine = v.affine.copy()
        affine[:3, 3] = v.affine[:3, :3] @ np.array([0, 0, k0]) + v.affine[:3, 3]
        p = tmp_path / f"h{i}.nii.gz"
        nib.save(nib.Nifti1Image(v.data[:, :, k0:k0 + 8], affine), str(p))
        paths.append(str(p))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    script = Path(__file__).parent / "helpers" / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), *paths],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    # gradients were all-reduced: both replicas end with identical weights
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # only rank 0 calibrates and writes the model; the process group is torn down again
    assert ranks[0]["calibrated"] and not ranks[1]["calibrated"]
    assert not ranks[0]["initialized_after"] and not ranks[1]["initialized_after"]
    model = load_model(tmp_path / "ddp_model.pt")
    assert model.model_id == ranks[0]["model_id"]
    assert model.training["world_size"] == 2
