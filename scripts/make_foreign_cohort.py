#!/usr/bin/env python
"""Write a benchmark cohort made *differently* from ``make_benchmark_data.py``.

Every method setting of AnomalySeg was tuned on data from ``AnomalySegLib.data.synthetic``
(FLAIR-like tissue-weighted contrast, blobby soft-edged lesions, quadratic or spline bias
fields). A method can win there by fitting that generator. This script shares only the two
anatomies (MNI152 and Colin27 via ``load_template``) and writes everything else with its own
code and its own choices, so that a result on it says something about data the defaults never
saw:

* **contrast**: the templates' own T1 intensities (T1-weighted: CSF dark, WM bright) under a
  random gamma curve, not the three-tissue model;
* **anatomy variation**: random affine (+-8 deg, scale 0.92-1.08) and a dense elastic field
  (Gaussian-smoothed white noise, ~10 mm correlation, up to ~3 mm), not control points;
* **bias field**: exp of a sum of 2-4 Gaussian bumps (40-90 mm wide, +-8-20 %), neither
  quadratic nor spline;
* **noise**: Rician, sigma 1.5-4 % of the WM intensity; skull-stripped (0 outside the brain);
* **lesions** with T1 directions and hard or irregular edges, labels = the changed voxels:

  ========== =====================================================================
  infarct    hypointense (to 35-60 % of the local intensity), union of 2-4 spheres
             (radius 3-9 mm) at a grey/white position, hard edges
  haemorrhage  hyperintense (+25-50 %), round (radius 5-11 mm), 1-voxel dark rim
  tumour     irregular (thresholded smooth noise inside an ellipsoid of radius
             12-24 mm): hypointense oedema (-15..-25 %), a bright enhancing rim
             (+30..+50 %) around a dark necrotic core (-45..-60 %)
  ms         4-10 small hypointense ovoids (radius 2-4 mm, -20..-40 %) in deep white
             matter
  subtle     one diffuse hypointense region (Gaussian profile, radius 9-15 mm,
             -8..-14 % at its centre), label where the change exceeds half of it
  ========== =====================================================================

Layout and index are those of ``make_benchmark_data.py`` (``healthy/``, ``lesion_free/``,
``<kind>/lesion_NNN(_label).nii.gz``, ``benchmark.json``), so ``run_benchmark.py``,
``study_postprocessing.py`` and ``anomalyseg evaluate`` read it unchanged::

    python scripts/make_foreign_cohort.py --output-dir foreign170000 --seed 170000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from AnomalySegLib.data.synthetic import load_template

KINDS = ("infarct", "haemorrhage", "tumour", "ms", "subtle")


def _deform(template, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Random affine + dense elastic deformation of the template's T1, WM and brain maps."""
    shape = template.t1.shape
    vox = float(np.linalg.norm(template.affine[:3, 0]))
    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.92, 1.08, 3))
    centre = (np.array(shape) - 1) / 2.0
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    flat = grid.reshape(3, -1) - centre[:, None]
    coords = (matrix @ flat).reshape(grid.shape) + centre[:, None, None, None]
    coords += rng.uniform(-3, 3, 3)[:, None, None, None] / vox
    sigma = 10.0 / vox
    for a in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
        noise *= rng.uniform(1.5, 3.0) / vox / max(float(np.abs(noise).max()), 1e-6)
        coords[a] += noise
    out = {}
    for key in ("t1", "wm", "gm"):
        out[key] = ndimage.map_coordinates(np.asarray(getattr(template, key)), coords, order=1, cval=0.0)
    out["brain"] = ndimage.map_coordinates(np.asarray(template.brain, np.float32), coords, order=1) > 0.5
    return out


def _bias(shape: Tuple[int, ...], vox: float, rng: np.random.Generator) -> np.ndarray:
    axes = [np.arange(n, dtype=np.float32) * vox for n in shape]
    log_field = np.zeros(shape, np.float32)
    extent = np.array(shape) * vox
    for _ in range(int(rng.integers(2, 5))):
        c = rng.uniform(0.1, 0.9, 3) * extent
        width = rng.uniform(40, 90)
        amp = rng.choice([-1, 1]) * rng.uniform(0.08, 0.20)
        parts = [np.exp(-((ax - ci) ** 2) / (2 * width ** 2)) for ax, ci in zip(axes, c)]
        log_field += amp * parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
    return np.exp(log_field)


def _pick_centre(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return np.array(np.unravel_index(int(rng.choice(idx)), mask.shape), dtype=np.float64)


def _dist(shape, centre, radii_vox) -> np.ndarray:
    axes = [(np.arange(n) - c) / r for n, c, r in zip(shape, centre, radii_vox)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def _lesion(kind: str, image: np.ndarray, maps: Dict[str, np.ndarray], vox: float,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Insert one lesion set of ``kind``; returns (image, label, metadata)."""
    brain = maps["brain"]
    # centres in parenchyma away from the brain's edge (not in the ventricles)
    core = ndimage.binary_erosion(brain, iterations=max(1, int(round(6 / vox)))) & (maps["gm"] + maps["wm"] > 0.6)
    wm_deep = core & (maps["wm"] > 0.8)
    gw = core & (maps["gm"] > 0.3) & (maps["wm"] > 0.2)
    shape = image.shape
    out = image.copy()
    label = np.zeros(shape, bool)
    info: dict = {"kind": kind}
    if kind == "infarct":
        c0 = _pick_centre(gw if gw.any() else core, rng)
        for _ in range(int(rng.integers(2, 5))):
            c = c0 + rng.normal(0, 4 / vox, 3)
            label |= _dist(shape, c, [rng.uniform(3, 9) / vox] * 3) <= 1.0
        label &= brain
        out[label] *= rng.uniform(0.35, 0.60)
    elif kind == "haemorrhage":
        c = _pick_centre(core, rng)
        r = rng.uniform(5, 11) / vox
        d = _dist(shape, c, r * rng.uniform(0.8, 1.2, 3))
        label = (d <= 1.0) & brain
        rim = label & ~ndimage.binary_erosion(label)
        out[label] *= 1.0 + rng.uniform(0.25, 0.5)
        out[rim] *= 0.6
    elif kind == "tumour":
        c = _pick_centre(core, rng)
        r = rng.uniform(12, 24) / vox
        d = _dist(shape, c, r * rng.uniform(0.75, 1.25, 3))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4 / vox)
        noise /= max(float(noise.std()), 1e-6)
        shape_field = d + 0.25 * noise
        label = (shape_field <= 1.0) & brain
        enh = (shape_field <= 0.55) & label
        necrotic = (shape_field <= 0.4) & label
        out[label] *= 1.0 - rng.uniform(0.15, 0.25)
        out[enh] = image[enh] * (1.0 + rng.uniform(0.3, 0.5))
        out[necrotic] = image[necrotic] * (1.0 - rng.uniform(0.45, 0.6))
    elif kind == "ms":
        n = int(rng.integers(4, 11))
        for _ in range(n):
            c = _pick_centre(wm_deep if wm_deep.any() else core, rng)
            radii = rng.uniform(2, 4, 3) / vox
            radii[int(rng.integers(0, 3))] *= 1.6  # ovoid
            lesion = (_dist(shape, c, radii) <= 1.0) & brain
            out[lesion] = image[lesion] * (1.0 - rng.uniform(0.2, 0.4))
            label |= lesion
        info["n_lesions"] = n
    elif kind == "subtle":
        c = _pick_centre(core, rng)
        r = rng.uniform(9, 15) / vox
        depth = rng.uniform(0.08, 0.14)
        change = depth * np.exp(-0.5 * _dist(shape, c, [r / 1.5] * 3) ** 2) * brain
        out = image * (1.0 - change)
        label = change > depth / 2
        info["depth"] = float(depth)
    else:
        raise ValueError(kind)
    info["volume_ml"] = float(label.sum() * vox ** 3 / 1000.0)
    return out, label, info


def make_case(template, rng: np.random.Generator, kind: str | None) -> Tuple[np.ndarray, np.ndarray, dict]:
    """One skull-stripped T1-like volume (and its label) from ``template``."""
    vox = float(np.linalg.norm(template.affine[:3, 0]))
    maps = _deform(template, rng)
    brain = maps["brain"]
    gamma = rng.uniform(0.75, 1.3)
    image = np.clip(maps["t1"], 0, 1) ** gamma * brain
    wm_level = float(np.median(image[brain & (maps["wm"] > 0.9)])) if (brain & (maps["wm"] > 0.9)).any() else 1.0
    meta = {"gamma": float(gamma)}
    label = np.zeros(image.shape, bool)
    if kind is not None:
        image, label, info = _lesion(kind, image, maps, vox, rng)
        meta["lesion"] = info
    image = image * _bias(image.shape, vox, rng)
    sigma = rng.uniform(0.015, 0.04) * wm_level
    noisy = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    gain = rng.uniform(200, 2000)
    image = (noisy * brain * gain / max(wm_level, 1e-6)).astype(np.float32)
    meta.update(noise_relative=float(sigma / max(wm_level, 1e-6)), gain=float(gain))
    return image, (label & brain).astype(np.uint8), meta


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=170000)
    ap.add_argument("--n-healthy", type=int, default=40)
    ap.add_argument("--n-lesion-free", type=int, default=20)
    ap.add_argument("--n-per-kind", type=int, default=10)
    ap.add_argument("--resolution-mm", type=float, default=2.0)
    args = ap.parse_args(argv)
    out = args.output_dir
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; choose another --output-dir", file=sys.stderr)
        return 2
    start = time.time()
    templates = [load_template(n, args.resolution_mm) for n in ("mni152", "colin27")]
    index: dict = {"generator": "scripts/make_foreign_cohort.py", "seed": args.seed,
                   "resolution_mm": args.resolution_mm, "contrast": "t1 (template intensities, gamma)",
                   "template": "mni152+colin27", "placement": "per kind", "bias_model": "gaussian bumps",
                   "healthy": [], "lesion_free": [], "kinds": {}, "cases": {}}
    groups = [("healthy", None, args.n_healthy), ("lesion_free", None, args.n_lesion_free)]
    groups += [(k, k, args.n_per_kind) for k in KINDS]
    for g, (group, kind, n) in enumerate(groups):
        (out / group).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([args.seed, g, i])
            template = templates[i % len(templates)]
            image, label, meta = make_case(template, rng, kind)
            stem = {"healthy": "healthy", "lesion_free": "normal"}.get(group, "lesion")
            name = f"{group}/{stem}_{i:03d}"
            nib.save(nib.Nifti1Image(image, template.affine), str(out / f"{name}.nii.gz"))
            meta["template"] = template.name
            index["cases"][name] = meta
            if group == "healthy":
                index["healthy"].append(f"{name}.nii.gz")
                continue
            nib.save(nib.Nifti1Image(label, template.affine), str(out / f"{name}_label.nii.gz"))
            if group == "lesion_free":
                index["lesion_free"].append(f"{name}.nii.gz")
            else:
                entry = index["kinds"].setdefault(kind, {"images": [], "labels": []})
                entry["images"].append(f"{name}.nii.gz")
                entry["labels"].append(f"{name}_label.nii.gz")
        print(f"[{time.time() - start:.0f} s] {group}: {n}", file=sys.stderr, flush=True)
    index["seconds"] = round(time.time() - start, 1)
    (out / "benchmark.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
