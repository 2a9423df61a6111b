#!/usr/bin/env python
"""Write the synthetic benchmark data sets (offline, from the MNI152 template shipped with nilearn).

Layout of ``--output-dir``::

    healthy/healthy_NNN.nii.gz                 healthy cohort (training + held-out calibration)
    lesion_free/normal_NNN.nii.gz              lesion-free test volumes (+ all-zero *_label.nii.gz)
    <kind>/lesion_NNN.nii.gz + _label.nii.gz   one lesion test set per kind
    benchmark.json                             file lists, settings and per-case generation metadata

Kinds: bright, dark, small (2-4 small lesions), tumour (core/ring/oedema), low_contrast.
Lesions are inserted before the bias field and the noise (see AnomalySegLib.synthetic).
Every set has its own seeds, so test subjects are never training subjects; the same
arguments give identical files.

Example (the published benchmark)::

    python scripts/make_benchmark_data.py --output-dir bench_data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from AnomalySegLib.errors import AnomalySegError, OutputError
from AnomalySegLib.synthetic import LESION_KINDS, make_cohort

INDEX = "benchmark.json"


def _move(src_dir: Path, dst_dir: Path, rel_paths: Sequence[str]) -> list[str]:
    """Move files (paths relative to ``src_dir``) into ``dst_dir``; new relative paths."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for rel in rel_paths:
        target = dst_dir / Path(rel).name
        os.replace(src_dir / rel, target)
        moved.append(f"{dst_dir.name}/{target.name}")
    return moved


def make_benchmark_data(output_dir: Path, *, n_healthy: int = 40, n_per_kind: int = 10, n_lesion_free: int = 10,
                        kinds: Sequence[str] = LESION_KINDS, seed: int = 0, resolution_mm: float = 2.0,
                        n_slices: Optional[int] = None, contrast: str = "flair", overwrite: bool = False,
                        log=print) -> dict:
    """Generate the benchmark into ``output_dir`` (built in a temporary sibling, then renamed)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / INDEX).is_file():
            raise OutputError(f"{output_dir} is not empty and holds no {INDEX}: choose another folder")
        if not overwrite:
            raise OutputError(f"{output_dir} already holds benchmark data (use --overwrite to regenerate)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    started = time.time()
    try:
        index: dict = {
            "generator": "scripts/make_benchmark_data.py", "seed": seed, "resolution_mm": resolution_mm,
            "n_slices": n_slices, "contrast": contrast, "template": "mni152",
            "healthy": [], "lesion_free": [], "kinds": {}, "cases": {},
        }
        log(f"healthy cohort: {n_healthy} volumes + {n_lesion_free} lesion-free test volumes")
        base = make_cohort(tmp / "_base", n_healthy=n_healthy, n_lesion=0, n_lesion_free_test=n_lesion_free,
                           seed=seed, resolution_mm=resolution_mm, n_slices=n_slices, contrast=contrast)
        index["healthy"] = _move(tmp / "_base", tmp / "healthy", base["healthy"])
        index["lesion_free"] = _move(tmp / "_base", tmp / "lesion_free", base["test"])
        _move(tmp / "_base", tmp / "lesion_free", base["labels"])
        for name, meta in base["cases"].items():
            index["cases"][name] = {k: v for k, v in meta.items() if k not in ("image", "label")}
        for i, kind in enumerate(kinds):
            log(f"lesion set {kind}: {n_per_kind} volumes")
            # A separate seed per kind: test subjects differ from each other and from the cohort.
            sub = make_cohort(tmp / f"_{kind}", n_healthy=0, n_lesion=n_per_kind, lesion_kinds=[kind],
                              seed=seed + 1000 * (i + 1), resolution_mm=resolution_mm, n_slices=n_slices,
                              contrast=contrast)
            images = _move(tmp / f"_{kind}", tmp / kind, sub["test"])
            labels = _move(tmp / f"_{kind}", tmp / kind, sub["labels"])
            index["kinds"][kind] = {"images": images, "labels": labels}
            for name, meta in sub["cases"].items():
                index["cases"][f"{kind}/{name}"] = {k: v for k, v in meta.items() if k not in ("image", "label")}
        for leftover in tmp.glob("_*"):
            shutil.rmtree(leftover)
        index["seconds"] = round(time.time() - started, 1)
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)  # our own earlier benchmark data (checked above)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--n-healthy", type=int, default=40, help="healthy cohort size (train + calibration)")
    p.add_argument("--n-per-kind", type=int, default=10, help="lesion test volumes per kind")
    p.add_argument("--n-lesion-free", type=int, default=10, help="lesion-free test volumes")
    p.add_argument("--kinds", nargs="+", default=list(LESION_KINDS), choices=LESION_KINDS)
    p.add_argument("--resolution", type=float, default=2.0, help="isotropic voxel size in mm")
    p.add_argument("--slices", type=int, default=None,
                   help="keep N central axial slices (paper's pseudo-volumes: 10); default: whole brain")
    p.add_argument("--contrast", default="flair", choices=("flair", "t1", "t2", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n_healthy", "n_per_kind"):
        if getattr(args, name) < 1:
            print(f"make_benchmark_data: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        index = make_benchmark_data(
            args.output_dir, n_healthy=args.n_healthy, n_per_kind=args.n_per_kind,
            n_lesion_free=args.n_lesion_free, kinds=args.kinds, seed=args.seed, resolution_mm=args.resolution,
            n_slices=args.slices, contrast=args.contrast, overwrite=args.overwrite,
            log=lambda m: print(m, file=sys.stderr))
    except AnomalySegError as exc:
        print(f"make_benchmark_data: error: {exc}", file=sys.stderr)
        return 1
    n_test = sum(len(v["images"]) for v in index["kinds"].values())
    print(f"wrote {len(index['healthy'])} healthy, {len(index['lesion_free'])} lesion-free and {n_test} lesion "
          f"volumes ({', '.join(index['kinds'])}) to {args.output_dir} in {index['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
