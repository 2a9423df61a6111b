"""``anomalyseg evaluate``: metrics of a model (or the intensity baseline) on labelled volumes.

Example::

    anomalyseg evaluate --model model.pt --images test/ --healthy normals/ --output-dir eval/

Each image ``NAME`` in ``--images`` needs its lesion mask ``NAME_label.nii.gz`` (or
``--label-pattern``) in ``--labels`` (default: the images folder); files matching the
pattern are not taken as images. ``--healthy`` adds lesion-free volumes (no label) for
the false-positive fraction; images whose label is all zero count as lesion-free too.
Writes ``results.json``, ``results.md``, ``pr_curve.png`` and overlay PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from .args import fraction, nonempty_path, percentile, positive_int
from ..errors import InputError

LABEL_PATTERN = "{name}_label.nii.gz"
#: The baseline's slice size unless --baseline-like gives it a model's (the paper's size).
IMAGE_SIZE_DEFAULT = 224


def _pattern(text: str) -> str:
    if text.count("{name}") != 1 or "/" in text:
        raise argparse.ArgumentTypeError("must contain {name} exactly once and no folder, e.g. {name}_label.nii.gz")
    return text


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand to the ``anomalyseg`` parser."""
    p = subparsers.add_parser(
        "evaluate", help="AUPRC, AUROC, Dice, detection and false positives on labelled volumes",
        description="Evaluate a model (or the intensity-threshold baseline) on volumes with lesion masks. "
                    "Dice is reported at the healthy-calibrated threshold (honest) and, marked ORACLE, "
                    "at the best threshold chosen with the labels (an upper bound).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", "-m", metavar="MODEL", help="model file to evaluate")
    which.add_argument("--baseline", choices=("intensity",),
                       help="evaluate the model-free intensity-threshold baseline instead")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of test volumes")
    p.add_argument("--labels", metavar="DIR", help="folder of lesion masks (default: the images folder)")
    p.add_argument("--label-pattern", type=_pattern, default=LABEL_PATTERN,
                   help="label file name for image NAME (default: %(default)s)")
    p.add_argument("--healthy", metavar="DIR", help="folder of lesion-free volumes (false-positive fraction)")
    p.add_argument("--output-dir", "-o", required=True, type=nonempty_path, metavar="DIR",
                   help="where the report is written")
    p.add_argument("--percentile", type=percentile, default=None,
                   help="healthy percentile for the calibrated threshold (default: the method's)")
    p.add_argument("--detection-overlap", type=fraction, default=0.0,
                   help="fraction of a lesion that must be predicted to count as detected (default: any voxel)")
    p.add_argument("--calibration-images", metavar="DIR",
                   help="--baseline only: healthy volumes (not test volumes) to calibrate the baseline on")
    p.add_argument("--baseline-like", metavar="MODEL",
                   help="--baseline only: give the baseline this model's preprocessing, map smoothing, per-scan "
                        "standardisation, bias flattening, minimum lesion volume and operating-point rule, so that "
                        "it differs from the model only in its scores (the fair comparison)")
    p.add_argument("--reference-images", metavar="DIR",
                   help="--baseline-like only: healthy volumes for the baseline's healthy intensity statistics "
                        "(bias flattening, dark/abs median), e.g. the model's training volumes "
                        "(default: the calibration volumes)")
    p.add_argument("--baseline-mode", choices=("bright", "dark", "abs"), default="bright",
                   help="--baseline only: bright = intensity, dark/abs = below / distance from the healthy median")
    p.add_argument("--image-size", type=positive_int, default=IMAGE_SIZE_DEFAULT,
                   help="--baseline only: preprocessing slice size (as the models; multiple of 32)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--brain-extraction", choices=("auto", "on", "off"), default=None,
                   help="brain extraction for this run (default: the model's; auto for the baseline)")
    p.add_argument("--bias-correction", action="store_true",
                   help="baseline only: N4 bias-field correction before the normalisation (a model keeps its own)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _volumes(folder: str, pattern: str, what: str) -> list[Path]:
    from ..evaluation.labels import is_label_file
    from ..io.volume_io import find_volumes

    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{what} folder {path} does not exist")
    found = [p for p in find_volumes([path]) if not is_label_file(p, pattern)]
    if not found:
        raise InputError(f"no volumes in {what} folder {path}")
    return found


def collect_test_set(images_dir: str, labels_dir: Optional[str] = None, pattern: str = LABEL_PATTERN,
                     healthy_dir: Optional[str] = None) -> tuple[list[Path], list[Optional[Path]]]:
    """Images with their label paths, plus lesion-free volumes (label None) from ``healthy_dir``."""
    from ..evaluation.labels import find_label
    from ..io.volume_io import volume_stem

    images = _volumes(images_dir, pattern, "images")
    labels: list[Optional[Path]] = []
    folder = Path(labels_dir) if labels_dir else Path(images_dir)
    for image in images:
        label = find_label(image, folder, pattern)
        if label is None:
            expected = folder / pattern.format(name=volume_stem(image))
            raise InputError(f"no label for {image.name}: expected {expected} "
                             "(put lesion-free volumes in --healthy, or set --label-pattern)")
        labels.append(label)
    if healthy_dir:
        healthy = _volumes(healthy_dir, pattern, "healthy")
        images += healthy
        labels += [None] * len(healthy)
    return images, labels


def _load_model(path: str, brain_extraction: Optional[str]) -> Any:
    """A model file, with ``--brain-extraction`` (when given) replacing its own setting."""
    from ..model.bundle import load_model

    model = load_model(path)
    if brain_extraction is not None:
        import dataclasses

        model.preprocessing = dataclasses.replace(model.preprocessing, brain_extraction=brain_extraction)
    return model


def _check_baseline_options(args: argparse.Namespace) -> None:
    """Option combinations that cannot work, refused before anything is read or written."""
    if args.model and (args.baseline_like or args.reference_images):
        raise InputError("--baseline-like and --reference-images are options of --baseline")
    if args.reference_images and not args.baseline_like:
        raise InputError("--reference-images goes with --baseline-like MODEL")
    if args.baseline_like and (args.bias_correction or args.image_size != IMAGE_SIZE_DEFAULT):
        raise InputError("with --baseline-like the preprocessing is the model's: drop --bias-correction and --image-size")


def run(args: argparse.Namespace) -> int:
    """Run ``anomalyseg evaluate``; returns the exit code (errors raise AnomalySegError)."""
    from ..evaluation.report import check_report_writable

    progress = None
    if not args.quiet:
        from ..progress import TextProgressBar

        progress = TextProgressBar(sys.stderr)
    _check_baseline_options(args)
    check_report_writable(args.output_dir, args.overwrite)  # before any heavy work
    images, labels = collect_test_set(args.images, args.labels, args.label_pattern, args.healthy)

    if args.model:
        if args.bias_correction:
            raise InputError("--bias-correction is a setting of the model file (anomalyseg train --bias-correction); "
                             "with --model it cannot change")
        method: Any = _load_model(args.model, args.brain_extraction)
        source = str(args.model)
    else:
        from ..pipeline.baselines import IntensityBaseline
        from ..data.preprocessing import PreprocessConfig

        if not args.calibration_images:
            raise InputError("--baseline needs --calibration-images DIR: healthy volumes to calibrate its threshold")
        calibration = _volumes(args.calibration_images, args.label_pattern, "calibration")
        overlap = {p.resolve() for p in calibration} & {p.resolve() for p in images}
        if overlap:
            raise InputError(f"{sorted(overlap)[0].name} is both a calibration and a test volume")
        reference = None
        if args.reference_images:
            reference = _volumes(args.reference_images, args.label_pattern, "reference")
        if args.baseline_like:
            method = IntensityBaseline.like_model(_load_model(args.baseline_like, args.brain_extraction),
                                                  args.baseline_mode)
        else:
            try:
                config = PreprocessConfig(image_size=args.image_size,
                                          brain_extraction=args.brain_extraction or "auto",
                                          bias_correction=bool(args.bias_correction))
            except ValueError as exc:
                raise InputError(str(exc)) from None
            method = IntensityBaseline(args.baseline_mode, config)
        method.fit(calibration, reference=reference, progress=progress)
        source = f"baseline intensity ({args.baseline_mode}), calibrated on {args.calibration_images}"
        if args.baseline_like:
            source += f", post-processing as {args.baseline_like}"

    from ..evaluation.harness import evaluate_model
    from ..evaluation.machine import machine_info

    results = evaluate_model(
        method, images, labels, percentile=args.percentile, device=args.device, output_dir=args.output_dir,
        progress=progress, batch_size=args.batch_size, detection_overlap=args.detection_overlap,
        overwrite=args.overwrite, extra={"source": source, "machine": machine_info(args.device)})
    _print_summary(results, Path(args.output_dir))
    return 0


def _print_summary(results: dict, output_dir: Path) -> None:
    def fmt(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    pooled, lf, det = results["pooled"], results["lesion_free"], results["detection"]
    n = results["n_volumes"]
    print(f"{results['method']}: {n['lesion']} lesion volume(s), {n['lesion_free']} lesion-free; "
          f"threshold {fmt(results['threshold'])} (healthy p{results['percentile']:g})")
    print(f"  AUPRC {fmt(pooled.get('auprc'))}  AUROC {fmt(pooled.get('auroc'))}  "
          f"Dice@calibrated {fmt(pooled.get('dice_calibrated'))}  "
          f"[Dice] ORACLE {fmt(pooled.get('oracle_best_dice'))}")
    print(f"  lesions detected {det.get('n_detected')}/{det.get('n_lesions')}  "
          f"FP fraction on lesion-free {fmt(lf.get('fp_fraction_pooled'))} (expected {fmt(lf.get('expected_fp_fraction'))})")
    print(f"  report: {output_dir / 'results.md'}")
