"""JSON-lines worker process used by the Slicer module (and usable from any GUI).

The 3D Slicer GUI must never freeze and must be able to stop a run at any time, so all
torch work runs in a separate process::

    python -m AnomalySegLib.worker REQUEST.json

``REQUEST.json`` holds ``{"task": "segment" | "train" | "calibrate" | "info", ...}``
(the arguments of each task are documented on the ``_task_*`` functions below). The
worker prints one JSON object per line on its standard output, flushing each line:

* ``{"type": "progress", "stage": ..., "fraction": ..., ...}`` (a ProgressEvent),
* ``{"type": "log", "message": ...}``,
* ``{"type": "result", "task": ..., ...}`` once, on success,
* ``{"type": "error", "kind": "InputError" | ..., "message": ...}`` on failure.

Exit status: 0 success, 1 an :class:`~AnomalySegLib.errors.AnomalySegError` (after the
error line), 2 a malformed request, 3 an unexpected internal error (traceback on
stderr), 130 cancelled.

Anything else the libraries print goes to standard error, never into the protocol.

Cancelling = ending the whole process tree. :class:`WorkerProcess` starts the worker in a
new session/process group; :meth:`WorkerProcess.cancel` sends SIGTERM to the group (the
worker turns it into :class:`~AnomalySegLib.errors.Cancelled` at the next step and
removes partial outputs) and SIGKILL after a grace period, so children (data loader
workers, the PythonSlicer launcher's python-real) go too. On Windows the worker gets
its own process group, CTRL_BREAK_EVENT first, then ``taskkill /T /F``.

This module imports neither torch nor any Slicer/Qt/VTK module at import time: the
client side runs inside the Slicer GUI process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO, Union

from . import errors

#: Exit statuses of the worker process.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_REQUEST = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130

#: Environment variable enabling the test-only tasks ("sleep").
TEST_TASKS_ENV = "ANOMALYSEG_WORKER_TEST_TASKS"

PathLike = Union[str, "os.PathLike[str]"]


class BadRequest(Exception):
    """The request file is unreadable or lacks a required argument (exit status 2)."""


# =============================================================================== worker side


class _Protocol:
    """Writes protocol lines to the real standard output, one flushed JSON object each."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False, default=_json_default)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def log(self, message: str, **extra: Any) -> None:
        self.send({"type": "log", "message": str(message), **extra})

    def progress(self, event) -> None:
        self.send({"type": "progress", **event.to_dict()})


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths appear in summaries
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
    from .volume_io import find_volumes

    paths = [str(p) for p in request.get("healthy") or []]
    if request.get("healthy_dir"):
        paths.append(str(request["healthy_dir"]))
    if not paths:
        raise BadRequest("request needs 'healthy' (list of volumes) or 'healthy_dir' (folder)")
    return find_volumes(paths)


def _replace_atomically(write: Callable[[Path], None], target: Path) -> None:
    """Write through ``write(temp)`` into a hidden sibling, then rename onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _task_info(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """``{"task": "info", "model": PATH}`` -> the model's summary and default percentile (validates the file)."""
    from .model_file import load_model

    path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    model = load_model(path)
    # the operating point chosen on healthy volumes when calibrated, else the method's default
    return {"model": str(path), "summary": model.summary(), "default_percentile": float(model.default_percentile)}


def _task_segment(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Score one volume and write its anomaly map; the caller thresholds it.

    Request: ``input`` (volume path), ``model`` (model path), ``heatmap`` (output
    ``.nii.gz``: float32 on the input's voxel grid, 0 outside the brain), optional
    ``brain_mask`` (output uint8 ``.nii.gz``), ``percentile`` (default: the model's
    operating point), ``device`` (auto|cpu|cuda), ``batch_size``.

    The worker does not threshold: the result carries the model's calibration table,
    the percentile to start from and the method's fallback percentile, and the caller
    (Slicer module, batch script) runs :func:`AnomalySegLib.postprocess.segment_heatmap`
    once -- the same function ``anomalyseg segment`` uses -- so the mask and lesion list
    come from one place and the slider re-thresholds without torch.
    """
    input_path = _existing_file(_require(request, "input"), "input volume")
    model_path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    heatmap_path = Path(_require(request, "heatmap"))
    brain_path = Path(request["brain_mask"]) if request.get("brain_mask") else None
    percentile = request.get("percentile")
    device = request.get("device") or "auto"
    batch_size = int(request.get("batch_size") or 16)

    from .volume_io import read_volume, write_nifti

    volume = read_volume(input_path)  # fails fast on a bad input, before torch is imported

    import numpy as np

    from .inference import resolve_device, score_volume
    from .model_file import load_model
    from .postprocess import percentile_or_default

    dev = resolve_device(device)
    proto.log(f"loading model {model_path.name} on {dev}")
    model = load_model(model_path, device=dev)
    if model.calibration is None:  # worded for every front end (no command-line syntax)
        raise errors.ModelFileError(f"model {model_path.name} is not calibrated: calibrate it on healthy volumes first")
    try:
        pct = percentile_or_default(percentile, model.default_percentile)
    except ValueError as exc:
        raise errors.InputError(str(exc)) from exc
    scores = score_volume(model, volume, device=dev, batch_size=batch_size, progress=proto.progress, cancel=cancel)
    from .progress import ProgressEvent, check_cancel

    check_cancel(cancel)
    proto.progress(ProgressEvent("write", 1.0, message="writing anomaly map"))
    _replace_atomically(lambda tmp: write_nifti(tmp, scores.heatmap.astype(np.float32), volume,
                                                dtype=np.float32, description="AnomalySeg anomaly map"),
                        heatmap_path)
    if brain_path is not None:
        _replace_atomically(lambda tmp: write_nifti(tmp, scores.brain_mask.astype(np.uint8), volume,
                                                    dtype=np.uint8, description="AnomalySeg brain mask"),
                            brain_path)
    return {
        "input": str(input_path),
        "model": str(model_path),
        "heatmap": str(heatmap_path),
        "brain_mask": str(brain_path) if brain_path is not None else None,
        "shape": list(volume.shape),
        "percentile": float(pct),
        "default_percentile": float(model.default_percentile),
        "fallback_percentile": float(model.method.default_percentile),
        "method": model.method.method,
        "model_version": model.version,
        "calibration": model.calibration.to_dict(),
    }


#: TrainConfig fields a training profile sets (profiles.PROFILES), reported back after a train run.
PROFILE_FIELDS = ("epochs", "image_size", "base_width", "batch_size", "learning_rate")


def train_settings(config: Any, device_type: str, overrides: Optional[dict] = None) -> dict:
    """The settings a train run uses, as reported to the caller (the Slicer panel shows them).

    ``config`` is the resolved :class:`~AnomalySegLib.training.TrainConfig` (or its dict),
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
    (``auto`` (default) | ``fast`` | ``paper``, see :mod:`AnomalySegLib.profiles`),
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
    from .device import resolve_device
    from .profiles import profile_settings
    from .progress import ProgressEvent
    from .training import TrainConfig, train_model

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
    (default: overwrite ``model`` atomically), ``device``, ``batch_size``.
    """
    from .calibration import calibrate
    from .inference import resolve_device
    from .model_file import load_model

    model_path = _existing_file(_require(request, "model"), "model file", errors.ModelFileError)
    output = Path(request.get("output") or model_path)
    healthy = _healthy_inputs(request)
    dev = resolve_device(request.get("device") or "auto")
    model = load_model(model_path, device=dev)
    model.calibration = calibrate(model, healthy, device=dev, batch_size=int(request.get("batch_size") or 16),
                                  progress=proto.progress, cancel=cancel)
    model.save(output, overwrite=True)
    summary = model.summary()
    return {"model": str(output), "version": model.version, "calibration": summary["calibration"]}


def _task_sleep(request: dict, proto: _Protocol, cancel: _CancelFlag) -> dict:
    """Test-only (needs ANOMALYSEG_WORKER_TEST_TASKS=1): start child processes, tick until cancelled.

    ``seconds`` to run, ``children`` to spawn (each sleeps as long), ``ignore_sigterm``
    to make the worker and its children ignore SIGTERM (exercises the SIGKILL path),
    ``noise`` to print non-protocol text to standard output (must land on stderr).
    """
    from .progress import ProgressEvent, check_cancel

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


# =============================================================================== client side


_ERROR_CLASSES = {
    "InputError": errors.InputError,
    "ModelFileError": errors.ModelFileError,
    "OutputError": errors.OutputError,
    "Cancelled": errors.Cancelled,
    "AnomalySegError": errors.AnomalySegError,
}


def error_from_message(message: dict) -> errors.AnomalySegError:
    """The exception matching a worker ``error`` line (its class by ``kind``)."""
    cls = _ERROR_CLASSES.get(str(message.get("kind")), errors.AnomalySegError)
    return cls(str(message.get("message", "worker failed")))


class WorkerProcess:
    """Runs one worker request in a subprocess and turns its output into callbacks.

    Callbacks run in the thread that calls :meth:`poll` or :meth:`wait` (a GUI timer or
    the caller's own thread), never in a background thread::

        worker = WorkerProcess({"task": "segment", ...}, on_progress=print).start()
        result = worker.wait()          # blocking, or: call worker.poll() from a timer
        worker.cancel()                 # from anywhere: ends the whole process tree

    ``python`` is the interpreter to run (default: this one; in Slicer: PythonSlicer).
    ``pythonpath`` entries are prepended to PYTHONPATH so the worker finds AnomalySegLib.
    """

    #: Seconds to keep reading after the worker exited while something still holds its pipes.
    PIPE_GRACE_S = 2.0

    def __init__(
        self,
        request: dict,
        *,
        python: Optional[str] = None,
        pythonpath: Sequence[PathLike] = (),
        env: Optional[dict] = None,
        cwd: Optional[PathLike] = None,
        on_progress: Optional[Callable[[dict], None]] = None,
        on_log: Optional[Callable[[str], None]] = None,
        on_event: Optional[Callable[[dict], None]] = None,
        stderr_lines: int = 200,
    ) -> None:
        self.request = dict(request)
        self.python = python or sys.executable
        self.pythonpath = [str(p) for p in pythonpath]
        self.env = env
        self.cwd = str(cwd) if cwd is not None else None
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_event = on_event
        self.process: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.result: Optional[dict] = None
        self.error: Optional[dict] = None
        self.last_progress: Optional[dict] = None
        self.cancelled = False
        self.stderr_tail: deque = deque(maxlen=stderr_lines)
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._request_dir: Optional[str] = None
        self._finished = False
        self._exited_at: Optional[float] = None
        self._killer: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ start
    def command(self, request_path: PathLike) -> list:
        """The command line that runs the worker on ``request_path``."""
        return [self.python, "-m", "AnomalySegLib.worker", str(request_path)]

    def _environment(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        if self.pythonpath:
            parts = self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def start(self) -> "WorkerProcess":
        """Write the request to a temporary file and start the worker in its own process group."""
        if self.process is not None:
            raise RuntimeError("worker already started")
        self._request_dir = tempfile.mkdtemp(prefix="anomalyseg-request-")
        request_path = Path(self._request_dir) / "request.json"
        request_path.write_text(json.dumps(self.request, default=_json_default), encoding="utf-8")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session => own process group to signal
        self.process = subprocess.Popen(
            self.command(request_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._environment(),
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            thread.start()
            self._readers.append(thread)
        return self

    def _read(self, name: str, stream: TextIO) -> None:
        for line in stream:
            self._queue.put((name, line.rstrip("\r\n")))
        stream.close()
        self._queue.put((name + "-closed", None))

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> Optional[int]:
        """Process id of the worker (also its process group id on POSIX)."""
        return self.process.pid if self.process is not None else None

    @property
    def finished(self) -> bool:
        """True once the process has exited and all its output has been dispatched."""
        return self._finished

    def _dispatch(self, name: str, line: Optional[str]) -> None:
        if name == "stderr":
            self.stderr_tail.append(line)
            return
        if name != "stdout" or not line:
            return
        try:
            message = json.loads(line)
            if not isinstance(message, dict) or "type" not in message:
                raise ValueError
        except ValueError:
            message = {"type": "log", "message": line}
        kind = message["type"]
        if kind == "progress":
            self.last_progress = message
            if self.on_progress is not None:
                self.on_progress(message)
        elif kind == "log":
            if self.on_log is not None:
                self.on_log(str(message.get("message", "")))
        elif kind == "result":
            self.result = message
        elif kind == "error":
            self.error = message
        if self.on_event is not None:
            self.on_event(message)

    def poll(self, timeout: float = 0.0) -> bool:
        """Dispatch pending output (waiting up to ``timeout`` s for some); True while still running."""
        if self.process is None:
            raise RuntimeError("worker not started")
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            try:
                name, line = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            self._dispatch(name, line)
            timeout = 0.0  # got something: drain the rest without waiting
            deadline = time.monotonic()
        if not self._finished and self.process.poll() is not None:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            readers_done = not any(t.is_alive() for t in self._readers)
            # an orphaned grandchild may hold the pipes open: do not wait for it forever
            if not readers_done and time.monotonic() - self._exited_at < self.PIPE_GRACE_S:
                return True
            for thread in self._readers:
                thread.join(timeout=0.05)
            while not self._queue.empty():  # whatever is queued now is the last output
                self._dispatch(*self._queue.get_nowait())
            self.returncode = self.process.returncode
            self._finished = True
            self._cleanup()
        return not self._finished

    def wait(self, timeout: Optional[float] = None) -> dict:
        """Block until the worker ends (dispatching callbacks); return its result or raise.

        Raises the AnomalySegError subclass named by the worker's error line,
        :class:`~AnomalySegLib.errors.Cancelled` after :meth:`cancel`, or
        :class:`TimeoutError` (after cancelling the worker) when ``timeout`` expires.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll(timeout=0.1):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(wait=True)
                self.poll()
                raise TimeoutError(f"worker did not finish within {timeout} s")
        return self.outcome()

    def outcome(self) -> dict:
        """Result of a finished worker, or the matching exception."""
        if not self._finished:
            raise RuntimeError("worker still running")
        if self.cancelled or self.returncode == EXIT_CANCELLED:
            raise errors.Cancelled("cancelled by the user")
        if self.returncode == EXIT_OK and self.result is not None:
            return self.result
        if self.error is not None:
            raise error_from_message(self.error)
        tail = " | ".join(line for line in list(self.stderr_tail)[-3:] if line.strip())
        raise errors.AnomalySegError(
            f"the AnomalySeg worker stopped unexpectedly (exit status {self.returncode})" + (f": {tail}" if tail else "")
        )

    # ------------------------------------------------------------------ cancel
    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_tree_windows(self) -> None:
        subprocess.run(["taskkill", "/PID", str(self.process.pid), "/T", "/F"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def cancel(self, grace_s: float = 3.0, wait: bool = False) -> None:
        """End the worker and all its children: polite signal first, forced kill after ``grace_s``.

        Returns at once unless ``wait`` (the forced kill then happens in a helper thread).
        """
        if self.process is None:
            return
        self.cancelled = True
        if self._killer is None:
            if os.name == "nt":
                try:
                    self.process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
                except OSError:
                    pass
            else:
                self._signal_group(signal.SIGTERM)
            self._killer = threading.Thread(target=self._force_kill, args=(grace_s,), daemon=True)
            self._killer.start()
        if wait:
            self._killer.join()

    def _force_kill(self, grace_s: float) -> None:
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Always sweep the group: children that ignored the polite signal outlive the leader.
        if os.name == "nt":
            self._kill_tree_windows()
        else:
            self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _cleanup(self) -> None:
        if self._request_dir is not None:
            try:
                for child in Path(self._request_dir).iterdir():
                    child.unlink()
                os.rmdir(self._request_dir)
            except OSError:
                pass
            self._request_dir = None


if __name__ == "__main__":
    sys.exit(main())
