"""The ``anomalyseg`` command line: train, calibrate, segment, evaluate, demo, info.

Exit codes: 0 success, 1 a user-facing error (one line on stderr, nothing half-written),
2 bad command-line usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import __version__
from . import evaluate as evaluate_command
from .args import fraction, image_size, percentile, positive_int
from ..errors import AnomalySegError, OutputError

PROG = "anomalyseg"


def _progress(args) -> Optional[object]:
    if getattr(args, "quiet", False):
        return None
    from ..progress import TextProgressBar

    return TextProgressBar(sys.stderr)


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from ..nn.device import resolve_device
    from ..pipeline.profiles import profile_settings
    from ..pipeline.training import TrainConfig, train_model
    from ..io.volume_io import find_volumes

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise OutputError(f"{output} already exists (use --overwrite to replace it)")
    if not output.parent.is_dir():
        raise OutputError(f"cannot write {output}: folder {output.parent} does not exist")
    checkpoint = Path(args.checkpoint) if args.checkpoint else output.with_name(output.name + ".ckpt")
    if checkpoint.exists() and not args.resume:
        raise OutputError(f"a checkpoint of an interrupted run exists ({checkpoint}): "
                          "add --resume to continue it, or delete it to start over")
    volumes = find_volumes(args.healthy)
    overrides = {k: getattr(args, k) for k in ("beta", "lambda_h", "t", "p", "lambda_s", "warmup_epochs")
                 if getattr(args, k) is not None}
    device_type = resolve_device(args.device).type
    init = None
    if args.init:
        from ..model.bundle import load_model

        init = load_model(args.init)  # read once: its method is the default, train_model fine-tunes it
    method = args.method if args.method is not None or init is None else init.name
    settings = profile_settings(args.profile, device_type, {
        "method": method, "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
        "image_size": args.image_size, "base_width": args.width})
    config = TrainConfig(**settings, latent_dim=args.latent_dim, attention_stage=args.attention_stage,
                         seed=args.seed, device=args.device, amp=not args.no_amp,
                         calibration_fraction=args.calibration_fraction, method_overrides=overrides)
    print(f"{PROG}: training {config.method} on {len(volumes)} healthy volume(s) on {device_type} "
          f"(profile {config.profile}: {config.image_size} px, width {config.base_width}, {config.epochs} epochs, "
          f"batch {config.batch_size}, lr {config.learning_rate:g})", file=sys.stderr)
    model = train_model(volumes, config, output=output, init=init, checkpoint=checkpoint,
                        resume=args.resume, progress=_progress(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 calibrates and saves
    summary = model.summary()
    cal = summary["calibration"]
    print(f"saved {output} (model {model.version}); calibrated on {cal['n_volumes']} healthy volume(s), "
          f"threshold {cal['threshold_at_default_percentile']:.6g} at healthy p{model.default_percentile:g} "
          f"(minimum lesion {cal['min_component_ml']:g} mL; {cal['false_components_per_volume']:.2f} false "
          f"component(s) per held-out healthy volume)")
    _warn_about_calibration(model.calibration)
    return 0


#: Fewer held-out healthy volumes than this make the operating point a guess.
MIN_CALIBRATION_VOLUMES = 5


def _warn_about_calibration(cal) -> None:
    """Warnings (stderr) a user can act on when the healthy operating point is weak."""
    if cal is None:
        return
    if cal.n_volumes < MIN_CALIBRATION_VOLUMES:
        print(f"{PROG}: warning: the operating point was chosen on only {cal.n_volumes} healthy volume(s); "
              f"recalibrate on at least {MIN_CALIBRATION_VOLUMES} healthy scans not used for training "
              f"(anomalyseg calibrate MODEL HEALTHY...)", file=sys.stderr)
    budget, measured = cal.max_false_components, cal.false_components_per_volume
    if budget is not None and measured is not None and measured > budget:
        print(f"{PROG}: warning: even at healthy p{cal.operating_percentile:g} the calibration volumes carry "
              f"{measured:.2f} false component(s) each (budget {budget:g}): expect false blobs", file=sys.stderr)


def cmd_calibrate(args) -> int:
    from ..pipeline.calibrate import calibrate
    from ..model.bundle import load_model
    from ..io.volume_io import find_volumes

    model = load_model(args.model)
    target = Path(args.output) if args.output else Path(args.model)
    if args.output and target.exists() and not args.overwrite:
        raise OutputError(f"{target} already exists (use --overwrite to replace it)")
    volumes = find_volumes(args.healthy)
    old = model.calibration
    old_pct = model.default_percentile
    if args.percentile is not None:  # the operating point search starts at this percentile
        model.method.default_percentile = args.percentile
    model.calibration = calibrate(model, volumes, device=args.device, batch_size=args.batch_size,
                                  progress=_progress(args))
    model.save(target)
    pct = model.default_percentile
    before = f"{old.threshold(old_pct):.6g} at p{old_pct:g}" if old is not None else "none"
    cal = model.calibration
    print(f"calibrated on {len(volumes)} healthy volume(s), {cal.n_pixels} brain pixels; "
          f"threshold: {before} -> {cal.threshold(pct):.6g} at healthy p{pct:g} (minimum lesion "
          f"{cal.min_component_ml:g} mL, {cal.false_components_per_volume:.2f} false component(s) per "
          f"healthy volume); saved {target}")
    _warn_about_calibration(cal)
    return 0


def cmd_segment(args) -> int:
    from ..pipeline.inference import segment_volume, threshold_for
    from ..model.bundle import load_model
    from ..pipeline.outputs import check_outputs_writable, write_case_outputs
    from ..io.volume_io import find_volumes, read_volume, volume_stem

    model = load_model(args.model)
    threshold_for(model, args.percentile)  # fail early: uncalibrated model or bad percentile
    inputs = find_volumes(args.inputs)
    stems = [volume_stem(path) for path in inputs]
    check_outputs_writable(args.output_dir, stems, overwrite=args.overwrite)
    failures = 0
    for path, stem in zip(inputs, stems):
        try:
            volume = read_volume(path)
            result = segment_volume(model, volume, percentile=args.percentile, device=args.device,
                                    batch_size=args.batch_size, progress=_progress(args))
            write_case_outputs(args.output_dir, stem, volume, result, overwrite=args.overwrite,
                               extra_report={"method": model.name, "model_file": str(args.model)})
        except AnomalySegError as exc:
            failures += 1
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            continue
        print(f"{stem}: {len(result.lesions)} lesion(s), {result.total_volume_ml:.2f} mL "
              f"(threshold {result.threshold:.6g} = healthy p{result.percentile:g}) -> {args.output_dir}")
    if failures:
        print(f"{PROG}: {failures} of {len(inputs)} input(s) failed", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:
    from ..model.bundle import load_model

    print(json.dumps(load_model(args.model).summary(), indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
             device=args.device, progress=_progress(args))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from ..nn.methods import METHODS
    from ..pipeline.profiles import DEFAULT_METHOD, PROFILE_CHOICES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Unsupervised brain anomaly segmentation: train on healthy scans, "
                    "calibrate on healthy scans, segment anomalies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on healthy volumes (files or folders)")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY", help="healthy volumes or folders of volumes")
    p.add_argument("--output", "-o", required=True, metavar="MODEL", help="model file to write (e.g. model.pt)")
    p.add_argument("--profile", default="auto", choices=PROFILE_CHOICES,
                   help="settings without tuning: fast (CPU, minutes), paper (the paper's scale, for a GPU); "
                        "auto = paper on CUDA, fast otherwise. Flags below override single values")
    p.add_argument("--method", default=None, choices=METHODS, help=f"default: {DEFAULT_METHOD}")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the profile's")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="slice size (multiple of 32; paper: 224); default: the profile's")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the profile's (32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-4); default: the profile's")
    p.add_argument("--width", type=positive_int, default=None,
                   help="network base width (64 = ResNet-18); default: the profile's")
    p.add_argument("--latent-dim", type=positive_int, default=32)
    p.add_argument("--attention-stage", type=int, default=1, choices=range(0, 5),
                   help="encoder stage whose activations form the attention map (1 = first residual block)")
    p.add_argument("--calibration-fraction", type=fraction, default=0.2,
                   help="share of healthy volumes held out for threshold calibration")
    for name, help_text in (("beta", "KL weight"), ("lambda_h", "entropy weight (amcons)"),
                            ("t", "log-barrier t (gradcamcons)"), ("p", "size margin p (gradcamcons)"),
                            ("lambda_s", "size-constraint weight (gradcamcons)")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None, help=help_text)
    p.add_argument("--warmup-epochs", type=int, default=None, help="gradcamcons: epochs before the size constraint")
    _device_arg(p)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--init", metavar="MODEL", help="fine-tune from this model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: MODEL.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="recalibrate a model's threshold on local healthy volumes")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY")
    p.add_argument("--percentile", type=percentile, default=None, help="new default healthy percentile")
    p.add_argument("--output", "-o", metavar="MODEL", help="write a new model file instead of updating MODEL")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _device_arg(p)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("segment", help="segment anomalies in volumes")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volumes or folders (NIfTI, NRRD, MHA, DICOM folder)")
    p.add_argument("--model", "-m", required=True, metavar="MODEL")
    p.add_argument("--output-dir", "-o", required=True, metavar="DIR")
    p.add_argument("--percentile", type=percentile, default=None,
                   help="healthy percentile used as threshold (default: the model's, 98 for amcons)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _device_arg(p)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="offline demo on synthetic data built from the MNI152 template")
    p.add_argument("--output-dir", "-o", default="anomalyseg-demo", metavar="DIR")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: a quick run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    _device_arg(p)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("model", metavar="MODEL")
    p.set_defaults(func=cmd_info)

    evaluate_command.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``anomalyseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AnomalySegError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
