"""The per-user folder of AnomalySeg models offered by the Slicer Segment panel.

Models live as ``NAME.pt`` files in one folder (default ``~/.anomalyseg/models``,
overridden by the ``ANOMALYSEG_MODEL_DIR`` environment variable; Slicer passes a folder
inside its settings directory). Next to each model a small ``NAME.json`` sidecar keeps
what the model list shows (method, version, calibrated), so listing never loads torch.
Bundled models (``*.pt`` in read-only folders shipped with the extension) are listed too.

Importing validates the file *before* copying it (an invalid file never enters the
folder), refuses to replace a different model of the same name unless asked, and copies
atomically (temporary file in the folder, then rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..errors import InputError, ModelFileError, OutputError
from ..io.atomic import atomic_write, atomic_write_text
from ..io.checksum import file_sha256

PathLike = Union[str, "os.PathLike[str]"]

#: Environment variable that overrides the default model folder.
MODEL_DIR_ENV = "ANOMALYSEG_MODEL_DIR"
#: File name endings accepted as model files.
MODEL_SUFFIXES = (".pt", ".pth")

#: ``inspector(path) -> summary`` validates a model file and returns ``AnomalyModel.summary()``
#: (raising ModelFileError). Default: load it in this process; Slicer uses the worker process.
Inspector = Callable[[Path], dict]


def default_model_dir() -> Path:
    """``$ANOMALYSEG_MODEL_DIR`` if set, else ``~/.anomalyseg/models``."""
    env = os.environ.get(MODEL_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".anomalyseg" / "models"


def inspect_model(path: PathLike) -> dict:
    """Load a model file (torch, in this process) and return its summary; ModelFileError if invalid."""
    from .bundle import load_model

    return load_model(path).summary()


def safe_model_name(name: str) -> str:
    """A file-name-safe model name: letters, digits, ``-``, ``_``, ``.``; no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    if not cleaned:
        raise InputError(f"invalid model name {name!r}: use letters, digits, '-', '_' or '.'")
    return cleaned


def _model_stem(path: Path) -> str:
    for suffix in MODEL_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass
class ModelEntry:
    """One model offered to the user."""

    name: str
    path: Path
    method: str = "unknown"
    version: str = ""
    calibrated: bool = False
    source: str = "user"  # "user" (the registry folder) or "bundled" (shipped, read-only)
    sha256: str = ""
    default_percentile: Optional[float] = None  # the method's recommended healthy percentile
    details: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Text for a model selector, e.g. ``demo (amcons, calibrated, bundled)``."""
        parts = [self.method, "calibrated" if self.calibrated else "NOT calibrated"]
        if self.source != "user":
            parts.append(self.source)
        return f"{self.name} ({', '.join(parts)})"

    def to_dict(self) -> dict:
        """JSON-able form (sidecar content)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_summary(cls, name: str, path: Path, summary: dict, *, source: str, sha256: str = "") -> "ModelEntry":
        """Entry from an ``AnomalyModel.summary()`` dict."""
        method = summary.get("method")
        default_percentile = None
        if isinstance(method, dict):
            default_percentile = method.get("default_percentile")
            method = method.get("method")
        calibration = summary.get("calibration")
        if isinstance(calibration, dict) and calibration.get("default_percentile") is not None:
            # the operating point chosen on held-out healthy volumes wins over the method's start value
            default_percentile = calibration["default_percentile"]
        details = {k: summary[k] for k in ("model_id", "library_version", "training", "calibration") if k in summary}
        return cls(name=name, path=Path(path), method=str(method or "unknown"), version=str(summary.get("version", "")),
                   calibrated=bool(summary.get("calibrated", False)), source=source, sha256=sha256,
                   default_percentile=None if default_percentile is None else float(default_percentile),
                   details=details)


def _copy_synced(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb+") as fh:
        os.fsync(fh.fileno())


class ModelRegistry:
    """A model folder plus optional read-only bundled folders.

    ``inspector`` validates a file and returns its summary (default
    :func:`inspect_model`, which imports torch in this process).
    """

    def __init__(
        self,
        folder: Optional[PathLike] = None,
        *,
        bundled_dirs: Sequence[PathLike] = (),
        inspector: Optional[Inspector] = None,
    ) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_model_dir()
        self.bundled_dirs = [Path(d) for d in bundled_dirs]
        self.inspector: Inspector = inspector or inspect_model
        self._bundled_cache: dict = {}

    # ------------------------------------------------------------------ paths
    def model_path(self, name: str) -> Path:
        """Where a model called ``name`` lives in the registry folder."""
        return self.folder / f"{safe_model_name(name)}.pt"

    @staticmethod
    def sidecar_path(model_path: PathLike) -> Path:
        """The ``NAME.json`` metadata file next to ``NAME.pt``."""
        p = Path(model_path)
        return p.with_name(_model_stem(p) + ".json")

    def _ensure_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create model folder {self.folder}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ listing
    def _model_files(self, folder: Path) -> list:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(MODEL_SUFFIXES))

    def _read_sidecar(self, model_path: Path, source: str) -> Optional[ModelEntry]:
        sidecar = self.sidecar_path(model_path)
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            percentile = data.get("default_percentile")
            return ModelEntry(name=_model_stem(model_path), path=model_path, method=str(data.get("method", "unknown")),
                              version=str(data.get("version", "")), calibrated=bool(data.get("calibrated", False)),
                              source=source, sha256=str(data.get("sha256", "")),
                              default_percentile=None if percentile is None else float(percentile),
                              details=dict(data.get("details") or {}))
        except (OSError, ValueError, AttributeError):
            return None

    def _bundled_entry(self, path: Path, inspect: bool) -> ModelEntry:
        entry = self._read_sidecar(path, "bundled")
        if entry is not None:
            return entry
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._bundled_cache:
            entry = ModelEntry(name=_model_stem(path), path=path, source="bundled")
            if inspect:
                try:
                    entry = ModelEntry.from_summary(entry.name, path, self.inspector(path), source="bundled")
                except Exception as exc:  # noqa: BLE001 - e.g. torch not installed yet: list it, retry later
                    entry.details = {"error": str(exc)}
                else:
                    self._bundled_cache[key] = entry
            return entry
        return self._bundled_cache[key]

    def list_models(self, *, inspect_bundled: bool = False) -> list:
        """User models (from their sidecars) then bundled ones, each sorted by name.

        A user model without a sidecar (copied in by hand) is listed with method
        ``unknown``; bundled models without a sidecar are inspected only when
        ``inspect_bundled`` (results are cached).
        """
        entries = []
        for path in self._model_files(self.folder):
            entry = self._read_sidecar(path, "user") or ModelEntry(name=_model_stem(path), path=path)
            entries.append(entry)
        for folder in self.bundled_dirs:
            entries.extend(self._bundled_entry(path, inspect_bundled) for path in self._model_files(folder))
        return entries

    def find(self, name_or_path: PathLike) -> ModelEntry:
        """The entry with this name, or the entry of this file; InputError if unknown."""
        text = str(name_or_path)
        entries = self.list_models()
        for entry in entries:
            if entry.name == text:
                return entry
        candidate = Path(text).expanduser()
        for entry in entries:
            if candidate.exists() and entry.path.exists() and os.path.samefile(entry.path, candidate):
                return entry
        raise InputError(f"no model named {text!r} in {self.folder}")

    # ------------------------------------------------------------------ adding
    def register(self, path: PathLike, *, summary: Optional[dict] = None) -> ModelEntry:
        """Describe a model file that is already in the registry folder (e.g. just trained into it)."""
        path = Path(path)
        if path.parent.resolve() != self.folder.resolve():
            raise InputError(f"{path} is not in the model folder {self.folder}; use import_model to copy it there")
        if summary is None:
            summary = self.inspector(path)
        entry = ModelEntry.from_summary(_model_stem(path), path, summary, source="user", sha256=file_sha256(path))
        atomic_write_text(self.sidecar_path(path), json.dumps(entry.to_dict(), indent=2) + "\n")
        return entry

    def import_model(self, path: PathLike, *, name: Optional[str] = None, replace: bool = False) -> ModelEntry:
        """Validate a model file, then copy it into the registry folder atomically.

        Importing the same file again returns the existing entry. A *different* model
        with the same name is an OutputError unless ``replace``.
        """
        source = Path(path).expanduser()
        if not source.is_file():
            raise ModelFileError(f"model file not found: {source}")
        summary = self.inspector(source)  # raises ModelFileError: nothing is copied for invalid files
        target = self.model_path(name or _model_stem(source))
        digest = file_sha256(source)
        self._ensure_folder()
        if target.exists():
            if file_sha256(target) == digest:
                return self.register(target, summary=summary)
            if not replace:
                raise OutputError(
                    f"a different model named {_model_stem(target)!r} already exists in {self.folder}; "
                    "import it under another name or replace it explicitly"
                )
        try:
            if not (target.exists() and os.path.samefile(source, target)):
                atomic_write(target, lambda temp: _copy_synced(source, temp))
        except OSError as exc:
            raise OutputError(f"cannot copy {source} to {target}: {exc.strerror or exc}") from exc
        return self.register(target, summary=summary)

    def remove_model(self, name: str) -> None:
        """Delete a user model and its sidecar (bundled models cannot be removed)."""
        entry = self.find(name)
        if entry.source != "user":
            raise OutputError(f"{entry.name} is a bundled model and cannot be removed")
        for p in (entry.path, self.sidecar_path(entry.path)):
            if p.exists():
                p.unlink()
