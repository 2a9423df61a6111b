"""JSON-lines worker process used by the Slicer module (and usable from any GUI).

:mod:`.protocol` (exit statuses, error kinds), :mod:`.server` (the tasks, run in the
worker process) and :mod:`.client` (:class:`~.client.WorkerProcess`, run in the GUI
process).

The 3D Slicer GUI must never freeze and must be able to stop a run at any time, so all
torch work runs in a separate process::

    python -m AnomalySegLib.worker REQUEST.json

``REQUEST.json`` holds ``{"task": "segment" | "train" | "calibrate" | "info", ...}``
(the arguments of each task are documented on the ``_task_*`` functions of :mod:`.server`). The
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

The package imports neither torch nor any Slicer/Qt/VTK module at import time: the
client side runs inside the Slicer GUI process.
"""
