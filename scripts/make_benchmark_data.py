#!/usr/bin/env python
"""Write the synthetic benchmark data sets (offline, from the MNI152 and Colin27 anatomies).

Layout of ``--output-dir``::

    healthy/healthy_NNN.nii.gz                 healthy cohort (training + held-out calibration)
    lesion_free/normal_NNN.nii.gz              lesion-free test volumes (+ all-zero *_label.nii.gz)
    <kind>/lesion_NNN.nii.gz + _label.nii.gz   one lesion test set per kind
    benchmark.json                             file lists, settings and per-case generation metadata

Kinds: bright, dark, small (2-4 small lesions), tumour (core/ring/oedema), low_contrast.
Lesions are inserted before the bias field and the noise (see AnomalySegLib.data.synthetic).
Every set has its own seeds, so test subjects are never training subjects; the same
arguments give identical files.

Anatomies (``--templates``, default both): MNI152 (nilearn's wheel) and Colin27 (Debian's
mricron-data: ``apt-get install mricron-data``). Case ``i`` of every set uses template
``i % n``, so the anatomies alternate; each case's template is in benchmark.json.
Lesion centres (``--placement``): ``mixed`` (default) anywhere in grey or white matter,
cortex included; ``deep`` deep white matter only, the easier setting of the published
numbers (reproduce those with ``--placement deep --templates mni152``).

Seeds: tune on the default development seed (0) and report on the held-out evaluation
seed 9000, whose per-case seeds are disjoint from seed 0's (set ``s`` draws its cases from
``SeedSequence([s, group, i])`` with set seeds ``s`` and ``s + 1000 * k`` for lesion kind
``k`` = 1..5; checked again at run time, a seed that shares subjects with seed 0 is refused)::

    python scripts/make_benchmark_data.py --output-dir bench_dev                # tuning
    python scripts/make_benchmark_data.py --output-dir bench_eval --seed 9000   # evaluation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from AnomalySegLib.errors import AnomalySegError, InputError, OutputError
from AnomalySegLib.io.atomic import replacing
from AnomalySegLib.data.synthetic import (BIAS_MODELS, LESION_KINDS, PLACEMENTS, TEMPLATES, cohort_case_seeds, load_template,
                                     make_cohort)

INDEX = "benchmark.json"

#: Seed of the development (tuning) data: the default.
DEV_SEED = 0
#: Recommended held-out evaluation seed: no case seed in common with DEV_SEED's.
EVAL_SEED = 9000
#: Sizes the development data is checked at (the defaults of make_benchmark_data).
_DEFAULT_SIZES = {"n_healthy": 40, "n_per_kind": 10, "n_lesion_free": 10}


def kind_set_seed(seed: int, kind_index: int) -> int:
    """Cohort seed of the ``kind_index``-th (0-based) lesion set: its own, so test subjects
    differ from each other and from the healthy cohort (which uses ``seed``)."""
    return seed + 1000 * (kind_index + 1)


def case_seeds(seed: int, *, n_healthy: int, n_per_kind: int, n_lesion_free: int,
               kinds: Sequence[str] = LESION_KINDS) -> Dict[str, int]:
    """Case name (as in benchmark.json) -> the per-case seed it is synthesised from,
    computed without generating anything."""
    base = cohort_case_seeds(seed, n_healthy=n_healthy, n_lesion_free_test=n_lesion_free)
    seeds = dict(base)
    for i, kind in enumerate(kinds):
        sub = cohort_case_seeds(kind_set_seed(seed, i), n_healthy=0, n_lesion=n_per_kind)
        seeds.update({f"{kind}/{name}": s for name, s in sub.items()})
    return seeds


def shared_with_dev_seed(seed: int, *, n_healthy: int, n_per_kind: int, n_lesion_free: int,
                         kinds: Sequence[str] = LESION_KINDS) -> set[int]:
    """Per-case seeds that data made with ``seed`` shares with the development data
    (DEV_SEED, every kind, at least the default sizes): must be empty for evaluation data."""
    if seed == DEV_SEED:
        return set()
    mine = set(case_seeds(seed, n_healthy=n_healthy, n_per_kind=n_per_kind, n_lesion_free=n_lesion_free,
                          kinds=kinds).values())
    sizes = {"n_healthy": n_healthy, "n_per_kind": n_per_kind, "n_lesion_free": n_lesion_free}
    dev_sizes = {k: max(v, _DEFAULT_SIZES[k]) for k, v in sizes.items()}
    return mine & set(case_seeds(DEV_SEED, **dev_sizes, kinds=LESION_KINDS).values())


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
                        kinds: Sequence[str] = LESION_KINDS, seed: int = DEV_SEED, resolution_mm: float = 2.0,
                        n_slices: Optional[int] = None, contrast: str = "flair",
                        templates: Sequence[str] = TEMPLATES, placement: str = "mixed", bias_model: str = "quadratic",
                        overwrite: bool = False,
                        log: Callable[[str], None] = print) -> dict:
    """Generate the benchmark into ``output_dir`` (built in a temporary sibling, then renamed).

    ``templates``: anatomies, alternating case by case within every set. ``placement``:
    lesion centres, "mixed" (grey and white matter) or "deep" (deep white matter, the
    published setting). Raises InputError when ``seed`` would reuse a case seed of the
    development seed (see :func:`shared_with_dev_seed`), OutputError on file problems.
    """
    output_dir = Path(output_dir)
    templates = list(templates)
    if not templates:
        raise InputError("no template given")
    shared = shared_with_dev_seed(seed, n_healthy=n_healthy, n_per_kind=n_per_kind, n_lesion_free=n_lesion_free,
                                  kinds=kinds)
    if shared:
        raise InputError(f"seed {seed} reuses {len(shared)} subject seed(s) of the development seed {DEV_SEED}; "
                         f"use --seed {EVAL_SEED} for held-out evaluation data")
    for name in templates:  # fail before any work, and say how to do without a missing anatomy
        try:
            load_template(name, resolution_mm)
        except InputError as exc:
            others = [t for t in templates if t != name]
            hint = f" (or leave it out: --templates {' '.join(others)})" if others else ""
            raise InputError(f"{exc}{hint}") from exc
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / INDEX).is_file():
            raise OutputError(f"{output_dir} is not empty and holds no {INDEX}: choose another folder")
        if not overwrite:
            raise OutputError(f"{output_dir} already holds benchmark data (use --overwrite to regenerate)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with replacing(output_dir, directory=True) as (tmp,):
        index: dict = {
            "generator": "scripts/make_benchmark_data.py", "seed": seed, "resolution_mm": resolution_mm,
            "n_slices": n_slices, "contrast": contrast, "template": "+".join(templates), "templates": templates,
            "placement": placement, "bias_model": bias_model, "dev_seed": DEV_SEED, "eval_seed": EVAL_SEED,
            "healthy": [], "lesion_free": [], "kinds": {}, "cases": {},
        }
        common = dict(resolution_mm=resolution_mm, n_slices=n_slices, contrast=contrast, template=templates,
                      placement=placement, bias_model=bias_model)
        log(f"healthy cohort: {n_healthy} volumes + {n_lesion_free} lesion-free test volumes "
            f"({', '.join(templates)}; lesions: {placement})")
        base = make_cohort(tmp / "_base", n_healthy=n_healthy, n_lesion=0, n_lesion_free_test=n_lesion_free,
                           seed=seed, **common)
        index["healthy"] = _move(tmp / "_base", tmp / "healthy", base["healthy"])
        index["lesion_free"] = _move(tmp / "_base", tmp / "lesion_free", base["test"])
        _move(tmp / "_base", tmp / "lesion_free", base["labels"])
        for name, meta in base["cases"].items():
            index["cases"][name] = {k: v for k, v in meta.items() if k not in ("image", "label")}
        for i, kind in enumerate(kinds):
            log(f"lesion set {kind}: {n_per_kind} volumes")
            sub = make_cohort(tmp / f"_{kind}", n_healthy=0, n_lesion=n_per_kind, lesion_kinds=[kind],
                              seed=kind_set_seed(seed, i), **common)
            images = _move(tmp / f"_{kind}", tmp / kind, sub["test"])
            labels = _move(tmp / f"_{kind}", tmp / kind, sub["labels"])
            index["kinds"][kind] = {"images": images, "labels": labels}
            for name, meta in sub["cases"].items():
                index["cases"][f"{kind}/{name}"] = {k: v for k, v in meta.items() if k not in ("image", "label")}
        for leftover in tmp.glob("_*"):
            shutil.rmtree(leftover)
        index["seconds"] = round(time.time() - started, 1)
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
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
    p.add_argument("--templates", nargs="+", default=list(TEMPLATES), choices=TEMPLATES,
                   help="anatomies, alternating case by case (colin27 needs: apt-get install mricron-data)")
    p.add_argument("--placement", default="mixed", choices=PLACEMENTS,
                   help="lesion centres: mixed = grey and white matter (default), deep = deep white matter "
                        "(the published benchmark)")
    p.add_argument("--bias-model", default="quadratic", choices=BIAS_MODELS,
                   help="shape of each scan's bias field: quadratic (default) or smooth (a random field with "
                        "~50 mm features: data made differently)")
    p.add_argument("--seed", type=int, default=DEV_SEED,
                   help=f"{DEV_SEED} for development/tuning data, {EVAL_SEED} for held-out evaluation data")
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
            n_slices=args.slices, contrast=args.contrast, templates=args.templates, placement=args.placement,
            bias_model=args.bias_model, overwrite=args.overwrite,
            log=lambda m: print(m, file=sys.stderr))
    except AnomalySegError as exc:
        print(f"make_benchmark_data: error: {exc}", file=sys.stderr)
        return 1
    n_test = sum(len(v["images"]) for v in index["kinds"].values())
    print(f"wrote {len(index['healthy'])} healthy, {len(index['lesion_free'])} lesion-free and {n_test} lesion "
          f"volumes ({', '.join(index['kinds'])}; {index['template']}, {index['placement']} placement, "
          f"seed {index['seed']}) to {args.output_dir} in {index['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
