#!/usr/bin/env python
"""Peak memory of ``anomalyseg segment`` on a large volume (issue 12, item 8).

Writes a synthetic 512 x 512 x 300 float32 volume (315 MB; mostly zeros around a
brain-like ellipsoid blob), an untrained calibrated tiny model (the network's size is
not what is measured), then runs ``anomalyseg segment`` in a child process and reports
its peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and that of a child
that only imports the libraries (the fixed cost, "plus the model").

    python scripts/measure_memory.py [--shape 512 512 300] [--image-size 64] [--method dae] [--workdir DIR]

Prints one JSON line: input MB, baseline MB, peak MB, (peak - baseline) / input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_volume(path: Path, shape) -> int:
    import nibabel as nib

    data = np.zeros(shape, dtype=np.float32)
    ni, nj, nk = shape
    # a brain-like blob, built slab by slab so this script's own memory stays small
    ci, cj, ck = (ni - 1) / 2, (nj - 1) / 2, (nk - 1) / 2
    ri, rj, rk = 0.4 * ni, 0.45 * nj, 0.42 * nk
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    rng = np.random.default_rng(0)
    for k in range(nk):
        r2 = ((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2 + ((k - ck) / rk) ** 2
        sl = np.where(r2 <= 1.0, 60.0, 0.0) + np.where(r2 <= 0.5, 40.0, 0.0)
        sl[r2 <= 1.0] += rng.normal(0, 2.0, int((r2 <= 1.0).sum()))
        data[:, :, k] = sl
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.6, 1.0])), str(path))
    return data.nbytes


def make_model(path: Path, image_size: int, method: str, volume_path: Path) -> None:
    """An untrained network (seeded), calibrated on a 4x downsampled copy of the volume so
    that its mask is as small as a real one (the thresholding cost depends on the mask)."""
    import torch

    from AnomalySegLib.data.preprocessing import PreprocessConfig
    from AnomalySegLib.io.volume_io import Volume, read_volume
    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.nn.networks import VAEConfig, build_network

    torch.manual_seed(0)
    cfg = VAEConfig(image_size=image_size, base_width=8, latent_dim=8, attention_stage=0,
                    architecture="unet" if method == "dae" else "vae")
    model = AnomalyModel(network=build_network(cfg), network_config=cfg,
                         preprocessing=PreprocessConfig(image_size=image_size),
                         method=MethodParams.defaults(method))
    model.method.fuse_intensity = 0.0  # no healthy statistics in an untrained model
    model.method.bias_flatten = "off"  # (flattening needs them too; it works in model space, small here)
    model.method.position_normalise = False
    big = read_volume(volume_path)
    affine = big.affine.copy()
    affine[:3, :3] *= 4
    small = Volume(data=np.ascontiguousarray(big.data[::4, ::4, ::4]), affine=affine)
    del big
    model.calibration = calibrate(model, [small], device="cpu")
    model.save(path)


def peak_rss_mb(cmd) -> "tuple[float, float, str]":
    """Run ``cmd`` in a fresh child (via a wrapper, so RUSAGE_CHILDREN is only its own)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
               "print(r, time.time() - t, p.returncode); sys.stderr.write(p.stderr[-2000:])")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=str(REPO))
    kb, seconds, code = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{proc.stderr}")
    return int(kb) / 1024.0, float(seconds), proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--method", default="dae", help="dae (the default method; smooths its map) or amcons")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anomalyseg-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    volume, model = work / "big.nii", work / "tiny.pt"
    nbytes = make_volume(volume, tuple(args.shape))
    make_model(model, args.image_size, args.method, volume)
    base_mb, _, _ = peak_rss_mb([sys.executable, "-c", "import torch, AnomalySegLib.model.bundle, "
                                 "AnomalySegLib.pipeline.inference, nibabel, SimpleITK, scipy.ndimage"])
    peak_mb, seconds, _ = peak_rss_mb([sys.executable, "-m", "AnomalySegLib", "segment", str(volume), "-m", str(model),
                                       "-o", str(work / "out"), "-q", "--overwrite", "--device", "cpu"])
    input_mb = nbytes / 2**20
    print(json.dumps({"shape": list(args.shape), "method": args.method, "input_mb": round(input_mb, 1), "baseline_mb": round(base_mb, 1),
                      "peak_mb": round(peak_mb, 1), "peak_over_input": round(peak_mb / input_mb, 2),
                      "above_baseline_over_input": round((peak_mb - base_mb) / input_mb, 2),
                      "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
