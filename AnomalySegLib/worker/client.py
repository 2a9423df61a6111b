"""The client side: :class:`WorkerProcess` starts a worker and turns its lines into callbacks (GUI process)."""

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
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from .. import errors
from .protocol import EXIT_CANCELLED, EXIT_OK, PathLike, error_from_message, json_default


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
        request_path.write_text(json.dumps(self.request, default=json_default), encoding="utf-8")
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
