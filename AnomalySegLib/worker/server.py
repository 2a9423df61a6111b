"""The worker side: one request's task run in the worker process, protocol lines on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from .. import errors
from .protocol import (
    EXIT_BAD_REQUEST,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_OK,
    TEST_TASKS_ENV,
    BadRequest,
    PathLike,
    json_default,
)


class _Protocol:
    """Writes protocol lines to the real standard output, one flushed JSON object each."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False, default=json_default)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def log(self, message: str, **extra: Any) -> None:
        self.send({"type": "log", "message": str(message), **extra})

    def progress(self, event) -> None:
        self.send({"type": "progress", **event.to_dict()})


class _CancelFlag:
    """Set by SIGTERM/SIGINT (SIGBREAK on Windows); polled by the long operations."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set()

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            self.event.set()

        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, handler)


def _require(request: dict, key: str) -> Any:
    if key not in request or request[key] in (None, ""):
        raise BadRequest(f"request for task {request.get('task')!r} lacks {key!r}")
    return request[key]


def _existing_file(path: PathLike, what: str, error=errors.InputError) -> Path:
    p = Path(path)
    if not p.exists():
        raise error(f"{what} not found: {p}")
    return p


def _healthy_inputs(request: dict) -> list:
    """Healthy volumes from ``healthy`` (list of paths) and/or ``healthy_dir`` (folder)."""
    from ..io.volume_io import find_volumes

    paths = [str(p) for p in request.get("healthy") or []]
    if request.get("healthy_dir"):
        paths.append(str(request["healthy_dir"]))
    if not paths:
        raise BadRequest("request needs 'healthy' (list of volumes) or 'healthy_dir' (folder)")
    return find_volumes(paths)


def _task_info(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """``{"task": "info", "model": PATH}`` -> the model's summary and default percentile (validates the file)."""
    from ..model.bundle import load_model

    path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    model = load_model(path)
    # the operating point chosen on healthy volumes when calibrated, else the method's default
    return {"model": str(path), "summary": model.summary(), "default_percentile": float(model.default_percentile)}


def _task_segment(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Score one volume and write its anomaly map; the caller thresholds it.

    Request: ``input`` (volume path), ``model`` (model path), ``heatmap`` (output
    ``.nii.gz``: float32 on the input's voxel grid, 0 outside the brain), optional
    ``brain_mask`` (output uint8 ``.nii.gz``), ``percentile`` (default: the model's
    operating point), ``device`` (auto|cpu|cuda), ``batch_size``, ``brain_extraction``
    (auto|on|off for this run; default: the model's setting), ``extracted_brain``
    (output uint8 ``.nii.gz``, written only when brain extraction ran).

    The result carries the raw-input record (``input_check``, ``brain_extraction``,
    ``bias_correction``: see :func:`AnomalySegLib.data.raw_input.prepare_raw_input`) and
    ``extracted_brain`` (the path, or None when extraction did not run). Extraction and
    correction report progress as their own stages (``skullstrip``, ``bias``).

    The worker does not threshold: the result carries the model's calibration table,
    the percentile to start from and the method's fallback percentile, and the caller
    (Slicer module, batch script) runs :func:`AnomalySegLib.segmentation.postprocess.segment_heatmap`
    once -- the same function ``anomalyseg segment`` uses -- so the mask and lesion list
    come from one place and the slider re-thresholds without torch.
    """
    input_path = _existing_file(_require(request, "input"), "input volume")
    model_path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    heatmap_path = Path(_require(request, "heatmap"))
    brain_path = Path(request["brain_mask"]) if request.get("brain_mask") else None
    extracted_path = Path(request["extracted_brain"]) if request.get("extracted_brain") else None
    brain_extraction = request.get("brain_extraction") or None
    if brain_extraction is not None:
        from ..data.raw_input import resolve_brain_extraction

        try:
            brain_extraction = resolve_brain_extraction(brain_extraction)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    percentile = request.get("percentile")
    device = request.get("device") or "auto"
    batch_size = int(request.get("batch_size") or 16)

    from ..io.volume_io import read_volume, write_nifti

    volume = read_volume(input_path)  # fails fast on a bad input, before torch is imported

    import numpy as np

    from ..io.atomic import atomic_write
    from ..model.bundle import load_model
    from ..nn.device import resolve_device
    from ..pipeline.inference import score_volume
    from ..segmentation.calibration import resolve_percentile

    dev = resolve_device(device)
    proto.log(f"loading model {model_path.name} on {dev}")
    model = load_model(model_path, device=dev)
    if model.calibration is None:  # worded for every front end (no command-line syntax)
        raise errors.ModelFileError(f"model {model_path.name} is not calibrated: calibrate it on healthy volumes first")
    pct = resolve_percentile(percentile, model.calibration, model.method.default_percentile)
    if brain_extraction is not None:
        import dataclasses

        model.preprocessing = dataclasses.replace(model.preprocessing, brain_extraction=brain_extraction)
    scores = score_volume(model, volume, device=dev, batch_size=batch_size, progress=proto.progress, cancel=cancel)
    from ..progress import ProgressEvent, check_cancel

    check_cancel(cancel)
    proto.progress(ProgressEvent("write", 1.0, message="writing anomaly map"))
    heatmap_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(heatmap_path, lambda tmp: write_nifti(tmp, scores.heatmap.astype(np.float32), volume,
                                                       dtype=np.float32, description="AnomalySeg anomaly map"))
    if brain_path is not None:
        brain_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(brain_path, lambda tmp: write_nifti(tmp, scores.brain_mask.astype(np.uint8), volume,
                                                         dtype=np.uint8, description="AnomalySeg brain mask"))
    extracted = scores.extracted_brain
    if extracted_path is not None and extracted is not None:
        extracted_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(extracted_path, lambda tmp: write_nifti(tmp, extracted.astype(np.uint8), volume, dtype=np.uint8,
                                                             description="AnomalySeg extracted brain"))
    return {
        **(scores.raw_input or {}),
        "extracted_brain": str(extracted_path) if extracted_path is not None and extracted is not None else None,
        "input": str(input_path),
        "model": str(model_path),
        "heatmap": str(heatmap_path),
        "brain_mask": str(brain_path) if brain_path is not None else None,
        "shape": list(volume.shape),
        "percentile": float(pct),
        "default_percentile": float(model.default_percentile),
        "fallback_percentile": float(model.method.default_percentile),
        "method": model.name,
        "model_version": model.version,
        "calibration": model.calibration.to_dict(),
    }


#: TrainConfig fields a training profile sets (profiles.PROFILES), reported back after a train run.
PROFILE_FIELDS = ("epochs", "image_size", "base_width", "batch_size", "learning_rate")


def train_settings(config: Any, device_type: str, overrides: Optional[dict] = None) -> dict:
    """The settings a train run uses, as reported to the caller (the Slicer panel shows them).

    ``config`` is the resolved :class:`~AnomalySegLib.pipeline.training.TrainConfig` (or its dict),
    ``device_type`` the device it trains on (``cpu``/``cuda``), ``overrides`` the values
    the caller gave explicitly (their names are listed, so a GUI can tell them apart).
    """
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    settings = {key: data.get(key) for key in ("profile", "method") + PROFILE_FIELDS}
    settings["device_type"] = str(device_type)
    settings["overrides"] = sorted(k for k, v in (overrides or {}).items() if v is not None)
    return settings


def _task_train(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Train, calibrate on held-out healthy volumes, save.

    Request: ``healthy`` and/or ``healthy_dir``, ``output`` (model path), ``profile``
    (``auto`` (default) | ``fast`` | ``paper``, see :mod:`AnomalySegLib.pipeline.profiles`),
    ``overrides`` (profile values the user set explicitly: epochs, image_size,
    base_width, batch_size, learning_rate, method; None values are ignored), ``config``
    (other TrainConfig fields: device, seed, latent_dim, ...; values given here also
    override the profile), optional ``init`` (base model to fine-tune), ``checkpoint``,
    ``resume``, ``overwrite`` (default false).

    ``auto`` resolves against the device this worker actually trains on (``paper`` on
    CUDA, ``fast`` elsewhere), exactly like ``anomalyseg train``. Before training, one
    ``prepare`` progress line carries ``settings`` (:func:`train_settings`); the result
    carries them too (from the saved model, so a fine-tuned model reports its base
    model's architecture). Progress events carry per-step losses.
    """
    from ..nn.device import resolve_device
    from ..pipeline.profiles import profile_settings
    from ..progress import ProgressEvent
    from ..pipeline.training import TrainConfig, train_model

    output = Path(_require(request, "output"))
    if output.exists() and not request.get("overwrite", False):
        raise errors.OutputError(f"{output} already exists; choose another model name")
    init = request.get("init") or None
    if init:
        _existing_file(init, "base model", errors.ModelFileError)
    base = dict(request.get("config") or {})
    overrides = dict(request.get("overrides") or {})
    profile = request.get("profile") or "auto"
    if not isinstance(profile, str):
        raise BadRequest("'profile' must be a profile name")
    device_type = resolve_device(str(base.get("device") or "auto")).type
    try:
        settings = profile_settings(profile, device_type, {**base, **overrides})
        config = TrainConfig.from_dict(settings)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise errors.AnomalySegError(str(exc)) from exc
    healthy = _healthy_inputs(request)
    reported = train_settings(config, device_type, overrides)
    message = (f"training {config.method} on {len(healthy)} healthy volume(s) on {device_type} "
               f"(profile {config.profile}: {config.image_size} px, width {config.base_width}, "
               f"{config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate:g})")
    proto.log(message)
    proto.send({"type": "progress", **ProgressEvent("prepare", 0.0, message=message).to_dict(), "settings": reported})
    model = train_model(healthy, config, output=output, init=init, checkpoint=request.get("checkpoint") or None,
                        resume=bool(request.get("resume", False)), progress=proto.progress, cancel=cancel)
    recorded = (model.training or {}).get("config") or config.to_dict()
    return {"model": str(output), "version": model.version, "summary": model.summary(),
            "settings": train_settings(recorded, device_type, overrides)}


def _task_calibrate(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Re-calibrate a model on healthy volumes (never anomalous ones).

    Request: ``model``, ``healthy`` and/or ``healthy_dir``, optional ``output``
    (default: overwrite ``model`` atomically), ``device``, ``batch_size``,
    ``brain_extraction`` (auto|on|off, this run only).
    """
    from ..pipeline.calibrate import calibrate
    from ..nn.device import resolve_device
    from ..model.bundle import load_model

    model_path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    output = Path(request.get("output") or model_path)
    healthy = _healthy_inputs(request)
    dev = resolve_device(request.get("device") or "auto")
    model = load_model(model_path, device=dev)
    stored = model.preprocessing
    if request.get("brain_extraction"):  # auto|on|off for this run; the file keeps its setting
        import dataclasses

        from ..data.raw_input import resolve_brain_extraction

        try:
            setting = resolve_brain_extraction(request["brain_extraction"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        model.preprocessing = dataclasses.replace(stored, brain_extraction=setting)
    model.calibration = calibrate(model, healthy, device=dev, batch_size=int(request.get("batch_size") or 16),
                                  progress=proto.progress, cancel=cancel)
    model.preprocessing = stored
    model.save(output, overwrite=True)
    summary = model.summary()
    return {"model": str(output), "version": model.version, "calibration": summary["calibration"]}


def _task_sleep(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Test-only (needs ANOMALYSEG_WORKER_TEST_TASKS=1): start child processes, tick until cancelled.

    ``seconds`` to run, ``children`` to spawn (each sleeps as long), ``ignore_sigterm``
    to make the worker and its children ignore SIGTERM (exercises the SIGKILL path),
    ``noise`` to print non-protocol text to standard output (must land on stderr).
    """
    from ..progress import ProgressEvent, check_cancel

    seconds = float(request.get("seconds", 30))
    ignore = bool(request.get("ignore_sigterm", False))
    if ignore and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child_code = (
        ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore else "")
        + f"import time; time.sleep({seconds!r})"
    )
    children = [subprocess.Popen([sys.executable, "-c", child_code]) for _ in range(int(request.get("children", 1)))]
    proto.log("children started", child_pids=[c.pid for c in children], pid=os.getpid())
    if request.get("noise"):  # stray output of libraries must not reach the protocol stream
        print("noise from print()")
        os.write(1, b"noise written to file descriptor 1\n")
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < seconds:
        check_cancel(cancel)
        step += 1
        proto.progress(ProgressEvent("segment", min(1.0, (time.monotonic() - start) / seconds), step=step))
        time.sleep(0.05)
    for child in children:
        child.kill()
        child.wait()
    return {"steps": step}


TASKS: dict[str, Callable[[dict, _Protocol, _CancelFlag], dict]] = {
    "info": _task_info,
    "segment": _task_segment,
    "train": _task_train,
    "calibrate": _task_calibrate,
}
TEST_TASKS: dict[str, Callable[[dict, _Protocol, _CancelFlag], dict]] = {"sleep": _task_sleep}


def _read_request(path: PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            request = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read request {path}: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("task"), str):
        raise BadRequest(f"request {path} must be a JSON object with a 'task'")
    return request


def run_worker(request_path: PathLike, stream: Optional[TextIO] = None) -> int:
    """Run one request, writing protocol lines to ``stream``; return the exit status."""
    proto = _Protocol(stream if stream is not None else sys.stdout)
    cancel = _CancelFlag()
    cancel.install()
    task = None
    try:
        request = _read_request(request_path)
        task = request["task"]
        tasks = dict(TASKS)
        if os.environ.get(TEST_TASKS_ENV) == "1":
            tasks.update(TEST_TASKS)
        if task not in tasks:
            raise BadRequest(f"unknown task {task!r}; expected one of {', '.join(sorted(tasks))}")
        result = tasks[task](request, proto, cancel)
        if cancel():  # cancelled after the last check: the caller no longer wants the result
            raise errors.Cancelled("cancelled by the user")
        proto.send({"type": "result", "task": task, **result})
        return EXIT_OK
    except BadRequest as exc:
        proto.send({"type": "error", "kind": "BadRequest", "message": str(exc)})
        return EXIT_BAD_REQUEST
    except Exception as exc:  # noqa: BLE001 - every failure must become one error line
        if cancel() or isinstance(exc, errors.Cancelled):
            # killing the group also ends helper processes, which surfaces as other errors
            proto.send({"type": "error", "kind": "Cancelled", "message": "cancelled by the user"})
            return EXIT_CANCELLED
        if isinstance(exc, errors.AnomalySegError):
            proto.send({"type": "error", "kind": type(exc).__name__, "message": str(exc)})
            return EXIT_ERROR
        traceback.print_exc(file=sys.stderr)
        first = (str(exc).strip().splitlines() or [""])[0]
        proto.send({"type": "error", "kind": "InternalError",
                    "message": f"internal error in task {task!r}: {type(exc).__name__}: {first}"})
        return EXIT_INTERNAL


def _protocol_stream() -> TextIO:
    """Keep the real stdout for the protocol and send every other write (Python or C) to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m AnomalySegLib.worker REQUEST.json``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m AnomalySegLib.worker REQUEST.json\n")
        return EXIT_BAD_REQUEST
    stream = _protocol_stream()
    try:
        return run_worker(args[0], stream)
    finally:
        stream.flush()
