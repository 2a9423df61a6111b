"""Reading and writing 3D volumes in the one geometry convention (voxel -> RAS mm).

NIfTI goes through nibabel (its affine is already RAS); NRRD, MetaImage and DICOM
series go through SimpleITK, whose LPS geometry is converted with
:mod:`AnomalySegLib.io.geometry`. Problems a user can fix raise :class:`InputError`
(reading) or :class:`OutputError` (writing) with one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from .geometry import affine_from_itk, itk_from_affine, voxel_spacing
from .parallel_gzip import ParallelGzipWriter

PathLike = Union[str, Path]

#: File name endings read as volumes when a folder is scanned (lower case).
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Name endings of label/output files skipped when a folder is scanned.
SKIPPED_SUFFIXES: tuple[str, ...] = ("_label", "_mask", "_heatmap")
_SEG_NRRD = ".seg.nrrd"
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A 3D scalar volume.

    ``data`` has shape ``(I, J, K)`` in the file's voxel index order (i fastest on
    disk); readers return float32. ``affine`` maps ``(i, j, k, 1)`` to RAS mm.
    ``meta`` holds reader details writers may reuse (``format``; for NIfTI
    ``sform_code``/``qform_code``).
    """

    data: np.ndarray
    affine: np.ndarray
    path: Optional[Path] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")
        if np.ndim(self.data) != 3:
            raise ValueError(f"Volume data must be 3D, got shape {np.shape(self.data)}")
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(I, J, K)``."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def grid_only(self) -> "Volume":
        """The same grid (shape, affine, path, meta) without the voxels: what writers need
        as a reference once a volume has been scored (frees the input's memory)."""
        return Volume(data=np.broadcast_to(np.zeros((), dtype=np.float32), self.shape), affine=self.affine,
                      path=self.path, meta=dict(self.meta))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return voxel_spacing(self.affine)

    @property
    def name(self) -> str:
        """Short name for messages: the file stem, or 'volume' without a path."""
        return volume_stem(self.path) if self.path is not None else "volume"


# ----------------------------------------------------------------------------- names


def _lower_name(path: PathLike) -> str:
    return Path(path).name.lower()


def _volume_extension(path: PathLike) -> Optional[str]:
    name = _lower_name(path)
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def volume_stem(path: PathLike) -> str:
    """Case name of a volume: ``case01`` for ``case01.nii.gz``/``.nrrd``/``.mha``...

    A DICOM folder gives its folder name; a single ``.dcm`` file gives its folder name
    (the series it belongs to is the volume).
    """
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    lower = name.lower()
    if lower.endswith(".dcm"):
        return p.parent.name or p.stem
    for ext in (_SEG_NRRD,) + VOLUME_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return p.stem


def _is_output_name(path: Path) -> bool:
    lower = path.name.lower()
    if lower.endswith(_SEG_NRRD):
        return True
    ext = _volume_extension(path)
    return ext is not None and lower[: -len(ext)].endswith(SKIPPED_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or an extension-less file with the DICM preamble magic."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_folder(folder: Path) -> bool:
    try:
        return any(_is_dicom_file(p) for p in folder.iterdir())
    except OSError:
        return False


def find_volumes(inputs: Iterable[PathLike]) -> list[Path]:
    """Volumes to process from a list of files and folders.

    Files are taken as they are (they must exist). Folders are scanned, sorted and
    non-recursively, for ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` and
    ``.mhd`` files, skipping outputs/labels (``*_label.*``, ``*_mask.*``,
    ``*_heatmap.*``, ``*.seg.nrrd``) and hidden files. A folder holding DICOM files
    (``.dcm``, or extension-less files with the DICM magic) counts as one DICOM volume,
    and so does each immediate subfolder that holds DICOM files.
    Raises InputError when a path is missing or nothing is found.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if not p.is_dir():
            add(p)
            continue
        if _is_dicom_folder(p):
            add(p)
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                if _is_dicom_folder(child):
                    add(child)
            elif _volume_extension(child) is not None and not _is_output_name(child):
                add(child)
    if not found:
        shown = ", ".join(str(p) for p in inputs) or "(no inputs)"
        raise InputError(
            f"no volumes found in {shown} (looked for {', '.join(VOLUME_EXTENSIONS)} files and DICOM folders)"
        )
    return found


# --------------------------------------------------------------------------- reading


def _finish(data: np.ndarray, affine: np.ndarray, path: Path, meta: dict[str, Any]) -> Volume:
    """Shared checks of every reader: 3D, non-empty, finite."""
    if data.ndim != 3:
        raise InputError(f"{path}: not a 3D volume (shape {data.shape})")
    if data.size == 0:
        raise InputError(f"{path}: empty volume (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():
        what = "NaN" if np.isnan(data).any() else "infinite"
        n_bad = int(data.size - np.count_nonzero(finite))
        raise InputError(f"{path}: contains {what} values ({n_bad} non-finite voxels)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: invalid voxel-to-world geometry (degenerate affine)")
    return Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=affine, path=path, meta=meta)


def _read_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
            raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
        shape = tuple(img.shape)
        if img.get_data_dtype().fields is not None:
            raise InputError(f"{path}: RGB/vector pixels are not supported; need one scalar 3D volume")
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) < 3:
            raise InputError(f"{path}: a {len(shape)}D image, not a 3D volume")
        if len(shape) > 3:
            n = int(np.prod(shape[3:]))
            raise InputError(f"{path}: a {len(shape)}D image with {n} volumes; need one 3D volume")
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
        sform_code = int(img.header["sform_code"])
        qform_code = int(img.header["qform_code"])
    except InputError:
        raise
    except Exception as exc:  # nibabel/gzip raise many types for corrupt files
        raise InputError(f"{path}: cannot read NIfTI file ({_short(exc)})") from exc
    meta = {"format": "nifti", "sform_code": sform_code, "qform_code": qform_code}
    return _finish(data, np.asarray(img.affine, dtype=np.float64), path, meta)


def _from_sitk(img: sitk.Image, path: Path, fmt: str) -> Volume:
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: has {img.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); need a scalar volume"
        )
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim < 3:
        raise InputError(f"{path}: a {dim}D image, not a 3D volume")
    if dim > 3:
        raise InputError(f"{path}: a {dim}D image with {img.GetSize()[3]} volumes; need one 3D volume")
    # GetArrayFromImage gives (k, j, i); the convention is (i, j, k).
    data = sitk.GetArrayFromImage(img).astype(np.float32, copy=False).transpose(2, 1, 0)
    affine = affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return _finish(data, affine, path, {"format": fmt})


def _read_dicom_series(folder: Path, series_file: Optional[Path] = None) -> Volume:
    """First DICOM series in ``folder`` (or the series holding ``series_file``)."""
    try:
        with _quiet_itk():
            ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception as exc:
        raise InputError(f"{folder}: cannot list DICOM series ({_short(exc)})") from exc
    if not ids:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    chosen = ids[0]
    if series_file is not None:
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(str(series_file))
            with _quiet_itk():
                r.ReadImageInformation()
            uid = r.GetMetaData("0020|000e").strip() if r.HasMetaDataKey("0020|000e") else ""
        except Exception as exc:
            raise InputError(f"{series_file}: cannot read DICOM file ({_short(exc)})") from exc
        if uid in ids:
            chosen = uid
    try:
        with _quiet_itk():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            img = reader.Execute()
    except Exception as exc:
        raise InputError(f"{folder}: cannot read DICOM series {chosen} ({_short(exc)})") from exc
    _check_slice_spacing(folder, reader, len(files), img)
    target = folder if series_file is None else series_file
    vol = _from_sitk(img, target, "dicom")
    vol.meta.update({"series_uid": chosen, "n_files": len(files)})
    return vol


_ITK_NOISE = (
    re.compile(r"Exception thrown in SimpleITK \w+:\s*"),        # the SimpleITK wrapper's prefix
    re.compile(r"\S+\.(?:cxx|hxx|cpp|h|txx):\d+:?\s*"),           # C++ source paths and lines
    re.compile(r"\(0x[0-9a-fA-F]+\)"),                             # object addresses
    re.compile(r"\b(?:sitk|itk)::(?:ERROR|WARNING):\s*"),
)


def _short(exc: BaseException) -> str:
    """One line describing ``exc``: no C++ source paths, object addresses or line breaks."""
    text = str(exc)
    is_itk = "SimpleITK" in text or "itk::" in text
    for pattern in _ITK_NOISE:
        text = pattern.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:200] + "..."
    if is_itk:
        return text or "SimpleITK could not read it"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_itk():
    """Silence ITK's own multi-line warnings on stderr: what matters is checked and
    reported in one line by the reader (e.g. non-uniform DICOM slice spacing)."""
    previous = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(previous)


#: Largest tolerated deviation of one DICOM slice gap from the median gap, as a fraction
#: of it: a missing or truncated slice (skipped by GDCM) deviates by 100%.
MAX_SLICE_GAP_DEVIATION = 0.1


def _check_slice_spacing(folder: Path, reader: "sitk.ImageSeriesReader", n_files: int, img: "sitk.Image") -> None:
    """InputError when the slices of a DICOM series are not evenly spaced (a slice is
    missing, truncated or duplicated): ITK would stack them anyway, misplacing every
    slice after the gap."""
    positions = []
    normal = None
    for i in range(n_files):
        try:
            ipp = [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
            if normal is None:
                iop = [float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")]
                normal = np.cross(iop[:3], iop[3:6])
        except (RuntimeError, ValueError, IndexError):
            positions = []
            break
        positions.append(ipp)
    if len(positions) >= 3 and normal is not None and np.linalg.norm(normal) > 0:
        along = np.sort(np.asarray(positions, dtype=np.float64) @ (normal / np.linalg.norm(normal)))
        gaps = np.diff(along)
        median = float(np.median(gaps))
        worst = int(np.argmax(np.abs(gaps - median)))
        if median <= 0 or abs(gaps[worst] - median) > max(MAX_SLICE_GAP_DEVIATION * median, 1e-3):
            raise InputError(
                f"{folder}: DICOM slices are not evenly spaced ({gaps[worst]:.3g} mm between slices {worst + 1} "
                f"and {worst + 2}, {median:.3g} mm elsewhere): a slice is missing, truncated or duplicated")
        return
    key = "ITK_non_uniform_sampling_deviation"
    if img.HasMetaDataKey(key):  # no per-slice positions: trust ITK's own measure
        spacing = img.GetSpacing()[2]
        try:
            deviation = float(img.GetMetaData(key))
        except ValueError:
            deviation = float("inf")
        if deviation > MAX_SLICE_GAP_DEVIATION * spacing:
            raise InputError(f"{folder}: DICOM slices are not evenly spaced (deviation {deviation:.3g} mm): "
                             "a slice is missing, truncated or duplicated")


def read_volume(path: PathLike) -> Volume:
    """Read one 3D scalar volume as float32 with its voxel->RAS affine.

    ``.nii``/``.nii.gz`` via nibabel (a trailing 4th dimension of size 1 is dropped);
    other files (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``...) via SimpleITK; a folder is
    read as a DICOM series (the first one found); a ``.dcm`` file reads the series it
    belongs to. Raises InputError for a missing/unreadable file, a non-3D image
    (2D, several volumes, RGB/vector pixels), NaN/Inf values or an empty volume.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom_series(p)
    lower = p.name.lower()
    if lower.endswith(_NIFTI_EXTENSIONS):
        return _read_nifti(p)
    if lower.endswith(".dcm"):
        return _read_dicom_series(p.parent, series_file=p)
    try:
        with _quiet_itk():
            img = sitk.ReadImage(str(p))
    except Exception as exc:
        raise InputError(f"{p}: cannot read image file ({_short(exc)})") from exc
    ext = _volume_extension(p)
    return _from_sitk(img, p, (ext or p.suffix or "itk").lstrip(".").replace(".gz", ""))


# --------------------------------------------------------------------------- writing


def _check_grid(data: np.ndarray, reference: Volume, what: str) -> np.ndarray:
    data = np.asarray(data)
    if data.shape != reference.shape:
        raise ValueError(f"{what}: data shape {data.shape} != reference shape {reference.shape}")
    return data


def nifti_image(data: np.ndarray, reference: Volume, *, dtype=np.float32, description: str = "") -> nib.Nifti1Image:
    """The NIfTI image :func:`write_nifti` writes (on the reference grid)."""
    data = _check_grid(data, reference, "write_nifti")
    dtype = np.dtype(np.uint8 if np.dtype(dtype) == np.bool_ else dtype)
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, reference.affine)
    hdr = img.header
    hdr.set_data_dtype(dtype)
    # Keep the reference's codes when it was NIfTI, else 1 (scanner-anatomical).
    sform_code = int(reference.meta.get("sform_code", 0)) or 1
    qform_code = int(reference.meta.get("qform_code", 0)) or 1
    img.set_sform(reference.affine, code=sform_code)
    img.set_qform(reference.affine, code=qform_code)
    hdr.set_xyzt_units(xyz="mm")
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    if description:
        hdr["descrip"] = description.encode("ascii", "replace")[:79]
    return img


def write_nifti(
    path: PathLike, data: np.ndarray, reference: Volume, *, dtype=np.float32, description: str = ""
) -> None:
    """Write ``data`` (shape of ``reference.data``) as NIfTI-1 on exactly the reference grid.

    sform and qform hold the reference affine (codes copied from a NIfTI reference,
    else 1 = scanner), units mm. Writes exactly to ``path``; the content is gzip
    compressed when the name contains ``.nii.gz`` or ends with ``.gz`` (so a temporary
    name such as ``x.nii.gz.part`` works). ``bool`` data is written as uint8.
    Raises OutputError when the file cannot be written.
    """
    p = Path(path)
    img = nifti_image(data, reference, dtype=dtype, description=description)
    lower = p.name.lower()
    try:
        # streamed slab by slab by nibabel (no whole-file bytes in memory) into one gzip
        # member deflated on all cores (io/parallel_gzip.py); no name, mtime 0 (reproducible)
        with open(p, "wb") as raw:
            if ".nii.gz" in lower or lower.endswith(".gz"):
                with ParallelGzipWriter(raw, level=6) as gz:
                    img.to_file_map({"image": nib.FileHolder(fileobj=gz), "header": nib.FileHolder(fileobj=gz)})
            else:
                img.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    except OSError as exc:
        raise OutputError(f"{p}: cannot write file ({_short(exc)})") from exc


_ITK_IO_BY_EXT = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO",
                  ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}


def sitk_image(data: np.ndarray, reference: Volume, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image of ``data`` on the reference grid (LPS geometry set)."""
    data = _check_grid(data, reference, "sitk_image")
    dtype = np.dtype(np.uint8 if np.dtype(dtype) == np.bool_ else dtype)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).astype(dtype, copy=False).transpose(2, 1, 0)))
    origin, spacing, direction = itk_from_affine(reference.affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def write_sitk_image(path: PathLike, img: sitk.Image, *, compress: bool = True) -> None:
    """Write a SimpleITK image; the format comes from the real extension inside the name.

    ``x.nrrd``, ``x.nrrd.part`` and ``x.part.nrrd`` are all written as NRRD.
    """
    p = Path(path)
    lower = p.name.lower()
    by_length = sorted(_ITK_IO_BY_EXT.items(), key=lambda kv: -len(kv[0]))
    io_name = next((name for ext, name in by_length if lower.endswith(ext)), None)
    if io_name is None:  # a temporary name such as x.nrrd.part
        io_name = next((name for ext, name in by_length if ext + "." in lower), None)
    if io_name is None:
        raise ValueError(f"{p}: unknown image format (use .nrrd, .nhdr, .mha, .mhd or .nii.gz)")
    # Writers that derive file names from the extension (MetaImage, NIfTI) write a
    # properly named sibling that is then renamed to the requested name.
    target = p
    if io_name != "NrrdImageIO" and not lower.endswith(tuple(e for e, n in by_length if n == io_name)):
        target = p.with_name(p.name + (".mha" if io_name == "MetaImageIO" else ".nii.gz"))
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(target))
    writer.SetImageIO(io_name)
    writer.SetUseCompression(compress)
    try:
        writer.Execute(img)
        if target != p:
            os.replace(target, p)
    except Exception as exc:
        raise OutputError(f"{p}: cannot write file ({_short(exc)})") from exc


def write_volume_itk(path: PathLike, data: np.ndarray, reference: Volume, dtype=np.float32) -> None:
    """Write ``data`` on the reference grid via SimpleITK (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``).

    Geometry is converted RAS -> LPS with :func:`geometry.itk_from_affine`; data is
    compressed. Raises OutputError when the file cannot be written.
    """
    write_sitk_image(path, sitk_image(data, reference, dtype))
