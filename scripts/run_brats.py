#!/usr/bin/env python
"""The paper's BraTS experiment for users who have BraTS locally (it is not downloadable here).

1. Build the dataset (AnomalySegLib.data.brats): 10 central axial FLAIR slices per patient,
   271 / 32 / 32 patients (train / val / test, seeded), lesion-free slices only for
   training, lesion-free slices of the validation patients for calibration.
2. Train each method on ``data/train``, calibrate it on ``data/val_healthy`` (healthy-only
   threshold), evaluate on ``data/test`` with the harness of ``anomalyseg evaluate``.
3. Write results.md / results.json / figures like scripts/run_benchmark.py.

Example (paper settings, GPU)::

    python scripts/run_brats.py --brats-dir /data/MICCAI_BraTS_2019_Data_Training \
        --output-dir brats_run --image-size 224 --epochs 100 --seeds 0 1 2

``--prepare-only`` stops after step 1; the same steps by hand::

    anomalyseg train brats_run/data/train -o amcons.pt --calibration-fraction 0
    anomalyseg calibrate amcons.pt brats_run/data/val_healthy
    anomalyseg evaluate --model amcons.pt --images brats_run/data/test -o brats_eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_benchmark lives next to this script

import run_benchmark as rb  # noqa: E402

from AnomalySegLib.data.brats import PAPER_SLICES, PAPER_SPLIT, prepare_brats_dataset  # noqa: E402
from AnomalySegLib.errors import AnomalySegError, InputError  # noqa: E402


def _dataset(args) -> dict:
    """Build (or reuse, when built from the same source with the same settings) the dataset."""
    data_dir = args.output_dir / "data"
    manifest_path = data_dir / "manifest.json"
    if manifest_path.is_file() and not args.rebuild:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        same = (manifest.get("source") == str(args.brats_dir.resolve()) and manifest.get("n_slices") == args.n_slices
                and manifest.get("seed") == args.split_seed and manifest.get("requested_split") == list(args.split))
        if same and (args.max_cases is None or len(manifest["cases"]) == max(3, args.max_cases)):
            rb.log(f"reusing {data_dir}")
            return manifest
        raise InputError(f"{data_dir} was built with other settings: add --rebuild to replace it")
    rb.log(f"building the BraTS dataset from {args.brats_dir}")
    return prepare_brats_dataset(args.brats_dir, data_dir, n_slices=args.n_slices, seed=args.split_seed,
                                 split=args.split, max_cases=args.max_cases, overwrite=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brats-dir", required=True, type=Path, help="folder holding BraTS case folders (searched recursively)")
    p.add_argument("--n-slices", type=int, default=PAPER_SLICES)
    p.add_argument("--split", type=int, nargs=3, default=list(PAPER_SPLIT), metavar=("TRAIN", "VAL", "TEST"),
                   help="split proportions (paper: 271 32 32)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N cases (quick trial)")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if one exists")
    rb.add_training_args(p)
    p.set_defaults(image_size=224)
    args = p.parse_args(argv)
    started = time.time()
    try:
        rb.check_output_dir(args.output_dir, args.overwrite)
        manifest = _dataset(args)
        data_dir = args.output_dir / "data"
        split = manifest["split"]
        print(f"dataset {data_dir}: {len(split['train'])}/{len(split['val'])}/{len(split['test'])} patients, "
              f"{manifest['healthy_training_slices']} lesion-free training slices, "
              f"{manifest['healthy_calibration_slices']} lesion-free calibration slices")
        if args.prepare_only:
            return 0
        train = sorted((data_dir / "train").glob("*.nii.gz"))
        calibration = sorted((data_dir / "val_healthy").glob("*.nii.gz"))
        if not calibration:
            raise InputError("no lesion-free validation slices to calibrate on (every validation slice has tumour)")
        test_images = [data_dir / "test" / f"{cid}.nii.gz" for cid in split["test"]]
        test_labels = [data_dir / "test" / f"{cid}_label.nii.gz" for cid in split["test"]]
        result = rb.run_methods(args.methods, train, {"brats_test": (test_images, test_labels)}, [], args,
                                args.output_dir, calibration=calibration)
        desc = (f"BraTS from {manifest['source']}: {args.n_slices} central FLAIR slices, "
                f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])} patients (split seed "
                f"{args.split_seed}), {manifest['healthy_training_slices']} lesion-free training slices, "
                f"calibration on {manifest['healthy_calibration_slices']} lesion-free validation slices")
        summary = rb.make_summary(args, args.methods, ["brats_test"], result, desc, started,
                                  rb.command_line(__file__, argv))
        rb.write_benchmark_report(summary, args.output_dir, result["examples"], title="AnomalySeg on BraTS")
    except AnomalySegError as exc:
        print(f"run_brats: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir / 'results.md'} ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
