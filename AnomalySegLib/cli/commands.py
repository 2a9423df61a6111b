"""The ``anomalyseg`` command line: train, calibrate, segment, evaluate, demo, info.

Exit codes: 0 success, 1 a user-facing error (one line on stderr, nothing half-written),
2 bad command-line usage (argparse: a usage line, then ``anomalyseg ...: error: ...``),
130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM). An interrupted or terminated
run removes its temporary files and leaves earlier outputs as they were.

torch is imported only once the arguments and the input/output paths have been checked,
so a mistyped call fails in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import __version__
from . import evaluate as evaluate_command
from .args import fraction, image_size, nonempty_path, percentile, positive_int, seed
from ..errors import AnomalySegError, ModelFileError, OutputError
from ..settings import (BIAS_FIELDS, BIAS_FLATTENING, CALIBRATE_WITH_TRAINING_DEFAULT, INTENSITY_TERMS, LR_SCHEDULES,
                        SCAN_NORMALISATIONS)

PROG = "anomalyseg"


def _progress(args) -> Optional[object]:
    if getattr(args, "quiet", False):
        return None
    from ..progress import TextProgressBar

    return TextProgressBar(sys.stderr)


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")


def _check_model_file(path) -> None:
    """The cheap part of loading a model, before torch is imported."""
    if not Path(path).is_file():
        raise ModelFileError(f"model file not found: {path}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` (temporary files) runs."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


@contextlib.contextmanager
def _train_lock(output: Path):
    """``MODEL.lock`` beside the model while a run trains it: a second run with the same
    ``--output`` fails at once instead of overwriting the checkpoint and losing a model.
    A lock left by a run that died (its process is gone) is taken over."""
    lock = output.with_name(output.name + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _alive(pid):
                raise OutputError(f"another run (process {pid}) is training {output}; wait for it or choose "
                                  f"another --output (lock file {lock})") from None
            with contextlib.suppress(OSError):
                lock.unlink()  # stale: its process is gone
        except OSError as exc:
            raise OutputError(f"cannot write in {output.parent}: {exc.strerror or exc}") from None
    else:
        raise OutputError(f"cannot take the lock {lock}")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _brain_extraction_arg(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--brain-extraction", choices=("auto", "on", "off"), default=None,
                        help="brain extraction (deepbet, needs `pip install \"anomalyseg[raw]\"`): auto = only when "
                             "the input check finds a skull, on = always, off = never (a scan with a skull is "
                             f"refused); {default_help}")


def _override_brain_extraction(model, value) -> None:
    """Apply ``--brain-extraction`` to this run only (the model file keeps its setting)."""
    if value is not None:
        import dataclasses

        from ..data.raw_input import resolve_brain_extraction

        model.preprocessing = dataclasses.replace(model.preprocessing,
                                                  brain_extraction=resolve_brain_extraction(value))


def _say(args, message: str) -> None:
    """An informational line on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from ..io.atomic import check_writable_folder
    from ..io.volume_io import find_volumes

    output = Path(args.output)
    if output.is_dir():
        raise OutputError(f"--output {output} is a folder; name the model file (e.g. {output / 'model.pt'})")
    if output.exists() and not args.overwrite:
        raise OutputError(f"{output} already exists (use --overwrite to replace it)")
    if not output.parent.is_dir():
        raise OutputError(f"cannot write {output}: folder {output.parent} does not exist")
    checkpoint = Path(args.checkpoint) if args.checkpoint else output.with_name(output.name + ".ckpt")
    if checkpoint.exists() and not args.resume:
        raise OutputError(f"a checkpoint of an interrupted run exists ({checkpoint}): "
                          "add --resume to continue it, or delete it to start over")
    # before the first epoch: a read-only folder must not cost a whole training run
    check_writable_folder(output.parent, "model folder")
    if checkpoint.parent != output.parent:
        check_writable_folder(checkpoint.parent if str(checkpoint.parent) else Path("."), "checkpoint folder")
    volumes = find_volumes(args.healthy)
    if args.init:
        _check_model_file(args.init)
    # under torchrun only rank 0 writes the model, so only it holds the lock
    lock = _train_lock(output) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        return _train(args, output, checkpoint, volumes)


def _train(args, output: Path, checkpoint: Path, volumes) -> int:
    from ..nn.device import resolve_device
    from ..pipeline.profiles import profile_settings
    from ..pipeline.training import TrainConfig, train_model

    overrides = {k: getattr(args, k) for k in ("beta", "lambda_h", "t", "p", "lambda_s", "warmup_epochs",
                                               "intensity_term", "bias_augmentation", "scan_normalise",
                                               "grow_percentile", "bias_flatten", "bias_field")
                 if getattr(args, k) is not None}
    device_type = resolve_device(args.device).type
    init = None
    if args.init:
        from ..model.bundle import load_model

        init = load_model(args.init)  # read once: its method is the default, train_model fine-tunes it
    method = args.method if args.method is not None or init is None else init.name
    settings = profile_settings(args.profile, device_type, {
        "method": method, "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
        "image_size": args.image_size, "base_width": args.width, "lr_schedule": args.lr_schedule})
    preprocessing = {}
    if args.brain_extraction is not None:
        from ..data.raw_input import resolve_brain_extraction

        preprocessing["brain_extraction"] = resolve_brain_extraction(args.brain_extraction)
    if args.bias_correction:
        preprocessing["bias_correction"] = True
    config = TrainConfig(**settings, latent_dim=args.latent_dim, attention_stage=args.attention_stage,
                         seed=args.seed, device=args.device, amp=not args.no_amp, compile=args.compile,
                         calibration_fraction=args.calibration_fraction, method_overrides=overrides,
                         preprocessing_overrides=preprocessing,
                         **({} if args.calibrate_with_training is None
                            else {"calibrate_with_training": args.calibrate_with_training}))
    from ..nn.speed import mixed_precision_training

    mixed = mixed_precision_training(resolve_device(args.device), config.amp)
    _say(args, f"{PROG}: training {config.method} on {len(volumes)} healthy volume(s) on {device_type} "
               f"(profile {config.profile}: {config.image_size} px, width {config.base_width}, {config.epochs} "
               f"epochs, batch {config.batch_size}, lr {config.learning_rate:g} {config.lr_schedule}, "
               f"{'mixed precision' if mixed else 'float32'}{', torch.compile' if config.compile else ''})")
    if device_type == "cpu" and not mixed and config.profile == "fast" and args.epochs is None:
        _say(args, f"{PROG}: note: this CPU trains in float32 (no native bfloat16, or --no-amp), about 2.3x "
                   f"slower than mixed precision: 10-20 min for 40 volumes on 2 cores; --epochs "
                   f"{config.epochs // 2} halves that at some cost in quality (docs/BENCHMARKS.md)")
    model = train_model(volumes, config, output=output, init=init, checkpoint=checkpoint,
                        resume=args.resume, progress=_progress(args), overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 calibrates and saves
    summary = model.summary()
    cal = summary["calibration"]
    print(f"saved {output} (model {model.version}); calibrated on {cal['n_volumes']} healthy volume(s), "
          f"threshold {cal['threshold_at_default_percentile']:.6g} at healthy p{model.default_percentile:g} "
          f"(minimum lesion {cal['min_component_ml']:g} mL{_grow_note(cal.get('grow_percentile'))}; "
          f"{cal['false_components_per_volume']:.2f} false component(s) per held-out healthy volume)")
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
    if cal.meets_budget() is False:
        margin = (f" with {cal.budget_confidence:.0%} confidence" if cal.budget_confidence else "")
        print(f"{PROG}: warning: even at healthy p{cal.operating_percentile:g} the calibration volumes carry "
              f"{cal.false_components_per_volume:.2f} false component(s) each, more than the budget of "
              f"{cal.max_false_components:g} per scan allows{margin}: expect false blobs", file=sys.stderr)


def cmd_calibrate(args) -> int:
    from ..io.atomic import check_writable_folder
    from ..io.volume_io import find_volumes

    _check_model_file(args.model)
    target = Path(args.output) if args.output else Path(args.model)
    if args.output and target.exists() and not args.overwrite:
        raise OutputError(f"{target} already exists (use --overwrite to replace it)")
    if target.is_dir():
        raise OutputError(f"--output {target} is a folder; name the model file")
    real = Path(os.path.realpath(target))  # through a symbolic link: the model it points to is updated
    if real.exists() and not (real.stat().st_mode & 0o222):
        raise OutputError(f"{target} is read-only: make it writable (chmod u+w) or write a calibrated copy "
                          f"with --output NEW.pt")
    if not real.parent.is_dir():
        raise OutputError(f"cannot write {target}: folder {real.parent} does not exist")
    check_writable_folder(real.parent, "model folder")  # before the (long) calibration run
    volumes = find_volumes(args.healthy)

    from ..pipeline.calibrate import calibrate
    from ..model.bundle import load_model

    model = load_model(args.model)
    old = model.calibration
    old_pct = model.default_percentile
    if args.percentile is not None:  # the operating point search starts at this percentile
        model.method.default_percentile = args.percentile
    stored = model.preprocessing
    _override_brain_extraction(model, args.brain_extraction)
    model.calibration = calibrate(model, volumes, device=args.device, batch_size=args.batch_size,
                                  progress=_progress(args))
    model.preprocessing = stored  # --brain-extraction is for this run; the file keeps its setting
    model.save(target, overwrite=not args.output or args.overwrite)
    pct = model.default_percentile
    before = f"{old.threshold(old_pct):.6g} at p{old_pct:g}" if old is not None else "none"
    cal = model.calibration
    print(f"calibrated on {len(volumes)} healthy volume(s), {cal.n_pixels} brain pixels; "
          f"threshold: {before} -> {cal.threshold(pct):.6g} at healthy p{pct:g} (minimum lesion "
          f"{cal.min_component_ml:g} mL{_grow_note(cal.grow_percentile)}, "
          f"{cal.false_components_per_volume:.2f} false component(s) per "
          f"healthy volume); saved {target}")
    _warn_about_calibration(cal)
    return 0


def cmd_segment(args) -> int:
    from ..pipeline.outputs import check_outputs_writable, complete_outputs_exist, write_case_outputs
    from ..io.volume_io import find_volumes, read_volume, volume_stem

    if args.overwrite and args.skip_existing:
        raise OutputError("--overwrite and --skip-existing exclude each other")
    _check_model_file(args.model)
    inputs = find_volumes(args.inputs)
    stems = [volume_stem(path) for path in inputs]
    out = Path(args.output_dir)
    with_brain = bool(args.write_brain_mask)
    skipped = [stem for stem in stems
               if args.skip_existing and complete_outputs_exist(out, stem, brain_mask=with_brain)]
    todo = [(path, stem) for path, stem in zip(inputs, stems) if stem not in skipped]
    check_outputs_writable(out, [stem for _, stem in todo], overwrite=args.overwrite, brain_mask=with_brain)
    for stem in skipped:
        print(f"{stem}: skipped, its outputs exist in {out}")
    if not todo:
        return 0

    from ..pipeline.inference import prepare_for_scoring, score_prepared_volume, threshold_for, threshold_scores
    from ..model.bundle import load_model

    model = load_model(args.model)
    threshold_for(model, args.percentile)  # fail early: uncalibrated model or bad percentile
    _override_brain_extraction(model, args.brain_extraction)
    created = not out.exists()
    failures = 0
    try:
        for path, stem in todo:
            try:
                volume = read_volume(path)
                prepared = prepare_for_scoring(model, volume, progress=_progress(args))
                # the voxels are no longer needed: free them before the full-size map is built
                volume = volume.grid_only()
                scores = score_prepared_volume(model, prepared, volume, device=args.device,
                                               batch_size=args.batch_size, progress=_progress(args))
                del prepared
                result = threshold_scores(scores, model, percentile=args.percentile)
                extra = {"method": model.name, "model_file": str(args.model), **(scores.raw_input or {})}
                brain = None
                if with_brain:  # the extracted brain, else the brain-tissue mask the map is confined to
                    brain = scores.extracted_brain if scores.extracted_brain is not None else scores.brain_mask
                    extra["brain_mask_source"] = "deepbet" if scores.extracted_brain is not None else "tissue"
                write_case_outputs(out, stem, volume, result, overwrite=args.overwrite, extra_report=extra,
                                   brain_mask=brain)
            except (AnomalySegError, OSError) as exc:
                failures += 1
                print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
                continue
            print(f"{stem}: {len(result.lesions)} lesion(s), {result.total_volume_ml:.2f} mL "
                  f"(threshold {result.threshold:.6g} = healthy p{result.percentile:g}) -> {out}")
    finally:
        if created:
            _remove_if_empty(out)  # a failed or interrupted run leaves no empty output folder
    if failures:
        print(f"{PROG}: {failures} of {len(todo)} input(s) failed", file=sys.stderr)
        return 1
    return 0


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` (created by this run) if nothing was written in it."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _grow_note(grow_percentile) -> str:
    """`, regions grown to healthy pX` for a calibration with hysteresis, else nothing."""
    return "" if not grow_percentile else f", regions grown to healthy p{grow_percentile:g}"


def cmd_info(args) -> int:
    _check_model_file(args.model)
    from ..model.bundle import load_model

    from ..pipeline.outputs import json_safe

    print(json.dumps(json_safe(load_model(args.model).summary()), indent=2, allow_nan=False))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
             device=args.device, progress=_progress(args))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from ..pipeline.profiles import DEFAULT_METHOD, METHOD_NAMES as METHODS, PROFILE_CHOICES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Unsupervised brain anomaly segmentation: train on healthy scans, "
                    "calibrate on healthy scans, segment anomalies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on healthy volumes (files or folders)")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY", help="healthy volumes or folders of volumes")
    p.add_argument("--output", "-o", required=True, type=nonempty_path, metavar="MODEL",
                   help="model file to write (e.g. model.pt)")
    p.add_argument("--profile", default="auto", choices=PROFILE_CHOICES,
                   help="settings without tuning: fast (CPU, minutes), paper (the paper's scale, for a GPU); "
                        "auto = paper on CUDA, fast otherwise. Flags below override single values")
    p.add_argument("--method", default=None, choices=METHODS, help=f"default: {DEFAULT_METHOD}")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the profile's")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="slice size (multiple of 32; paper: 224); default: the profile's")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the profile's (32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-4); default: the profile's")
    p.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                   help="learning rate over the run: constant (the paper) or cosine decay to 0; default: the profile's")
    p.add_argument("--width", type=positive_int, default=None,
                   help="network base width (64 = ResNet-18); default: the profile's")
    p.add_argument("--latent-dim", type=positive_int, default=32)
    p.add_argument("--attention-stage", type=int, default=1, choices=range(0, 5),
                   help="encoder stage whose activations form the attention map (1 = first residual block)")
    p.add_argument("--calibration-fraction", type=fraction, default=0.2,
                   help="share of healthy volumes held out for threshold calibration")
    p.add_argument("--calibrate-with-training", action=argparse.BooleanOptionalAction, default=None,
                   help="also calibrate the threshold and false-blob budget on the training volumes the position "
                        "statistics were not fitted on (more scans, a tighter budget margin; default: "
                        + ("on" if CALIBRATE_WITH_TRAINING_DEFAULT else "off") + ")")
    for name, help_text in (("beta", "KL weight"), ("lambda_h", "entropy weight (amcons)"),
                            ("t", "log-barrier t (gradcamcons)"), ("p", "size margin p (gradcamcons)"),
                            ("lambda_s", "size-constraint weight (gradcamcons)")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None, help=help_text)
    p.add_argument("--warmup-epochs", type=int, default=None, help="gradcamcons: epochs before the size constraint")
    p.add_argument("--bias-augmentation", type=float, default=None, metavar="STD",
                   help="dae: std of the log of a random smooth bias field applied to each training image "
                        "(0 = off)")
    p.add_argument("--intensity-term", choices=INTENSITY_TERMS, default=None,
                   help="dae: intensity deviation fused with the network's map (default bright-position: "
                        "hyperintense anomalies, e.g. FLAIR/T2; abs-position for anomalies of either sign, "
                        "the better choice on T1-weighted scans)")
    p.add_argument("--scan-normalise", choices=SCAN_NORMALISATIONS, default=None,
                   help="standardise each scan's map by its own brain voxels' median and spread before "
                        "calibration and thresholding (default: the method's; off = as the paper)")
    p.add_argument("--bias-flatten", choices=BIAS_FLATTENING, default=None,
                   help="dae: divide out each scan's smooth bias field, fitted against the healthy intensity at "
                        "each position, before scoring: off, intensity (the fused intensity term only) or all "
                        "(the network's input too, in training and at inference); default: the method's")
    p.add_argument("--bias-field", choices=BIAS_FIELDS, default=None,
                   help="dae: shape of the flattened field: quadratic, or spline (a smooth field with ~45 mm "
                        "knots, for fields a quadratic cannot follow); default: the method's")
    p.add_argument("--grow-percentile", type=float, default=None, metavar="P",
                   help="mask hysteresis: regions flagged at the operating threshold extend to connected brain "
                        "voxels above the healthy P-th percentile (0 = off, as the paper; default: the method's)")
    _device_arg(p)
    p.add_argument("--no-amp", action="store_true",
                   help="train in float32: no mixed precision (by default on CUDA, and bfloat16 + channels-last "
                        "on CPUs with AMX / AVX512-BF16)")
    p.add_argument("--compile", action="store_true",
                   help="amcons/vae: compile the training step with torch.compile, a one-off wait (up to "
                        "~1.5 min on a CPU) then faster steps; pays off in long runs (dae and gradcamcons stay "
                        "eager; falls back to eager when compilation fails)")
    _brain_extraction_arg(p, "stored in the model (default: auto)")
    p.add_argument("--bias-correction", action="store_true",
                   help="N4 bias-field correction before the normalisation, stored in the model (default: off)")
    p.add_argument("--init", metavar="MODEL", help="fine-tune from this model")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0 to 2**32-1")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: MODEL.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="recalibrate a model's threshold on local healthy volumes")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY")
    p.add_argument("--percentile", type=percentile, default=None, help="new default healthy percentile")
    p.add_argument("--output", "-o", type=nonempty_path, metavar="MODEL",
                   help="write a new model file instead of updating MODEL")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _device_arg(p)
    _brain_extraction_arg(p, "default: the model's (auto); for this run only")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("segment", help="segment anomalies in volumes")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volumes or folders (NIfTI, NRRD, MHA, DICOM folder)")
    p.add_argument("--model", "-m", required=True, metavar="MODEL")
    p.add_argument("--output-dir", "-o", required=True, type=nonempty_path, metavar="DIR")
    p.add_argument("--percentile", type=percentile, default=None,
                   help="healthy percentile used as threshold (default: the model's, 98 for amcons)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip (and report) inputs whose four outputs all exist: continue an interrupted batch")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _device_arg(p)
    _brain_extraction_arg(p, "default: the model's (auto)")
    p.add_argument("--write-brain-mask", action="store_true",
                   help="also write NAME_brainmask.nii.gz: the extracted brain (or, without extraction, the "
                        "brain-tissue mask the map is confined to)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="offline demo on synthetic data built from the MNI152 template")
    p.add_argument("--output-dir", "-o", default="anomalyseg-demo", type=nonempty_path, metavar="DIR")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: a quick run)")
    p.add_argument("--seed", type=seed, default=0)
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
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except (AnomalySegError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error; an OSError reads ``what: path`` (no traceback)."""
    if isinstance(exc, OSError) and not isinstance(exc, AnomalySegError):
        what = exc.strerror or type(exc).__name__
        return f"{what}: {exc.filename}" if exc.filename else what
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
