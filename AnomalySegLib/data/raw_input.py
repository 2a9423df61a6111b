"""Raw clinical scans: an input check (skull present?), learned brain extraction and
N4 bias-field correction.

The anomaly models are trained on skull-stripped, bias-free images. A raw clinical scan
needs three steps before it can be segmented:

* :func:`skull_check` decides whether a head volume still has its skull (cheap, numpy/scipy).
* :func:`extract_brain` computes a brain mask with the pretrained networks of
  `deepbet <https://github.com/wwu-mmll/deepbet>`_ (Fisch et al., 2024, MIT licence;
  TorchScript files shipped inside its wheel, nothing is downloaded at run time). The
  inference path of ``deepbet.BrainExtraction`` is re-implemented here on arrays, so it
  works on any :class:`~AnomalySegLib.io.volume_io.Volume` without writing files.
* :func:`correct_bias_field` runs SimpleITK's N4 on a shrunken copy and applies the log
  bias field evaluated on the full-resolution grid.

Geometry follows :mod:`AnomalySegLib.io.geometry`: a volume's ``data`` has shape ``(I, J, K)``
and its 4x4 ``affine`` maps voxel indices ``(i, j, k, 1)`` to **RAS** millimetres. Every
mask returned here lies on the input's own voxel grid (same shape, same affine).

torch is imported only by :func:`extract_brain`; deepbet itself is never imported (only
its installed model files are located), so its heavy imports (pandas, tqdm, a GUI
toolkit) cost nothing here.
"""

from __future__ import annotations

import importlib.util
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..errors import AnomalySegError, Cancelled, InputError, ModelFileError
from ..io.checksum import file_sha256
from ..io.geometry import canonical_reorientation, voxel_spacing
from ..progress import CancelCallback, ProgressCallback, ProgressEvent, check_cancel, emit

__all__ = [
    "MissingDependencyError",
    "SkullCheck",
    "skull_check",
    "deepbet_model_files",
    "extract_brain",
    "correct_bias_field",
    "BRAIN_EXTRACTION_CHOICES",
    "resolve_brain_extraction",
    "RawInput",
    "prepare_raw_input",
    "resample_mask",
    "dice",
    "dice_physical",
]

#: Installing the optional brain-extraction dependency.
DEEPBET_INSTALL_HINT = 'pip install "anomalyseg[raw]"  (or: pip install deepbet)'

#: SHA-256 of the model files of deepbet 1.0.2 (audited: see :func:`deepbet_model_files`).
KNOWN_DEEPBET_SHA256: Dict[str, str] = {
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
}

#: Pickle globals a TorchScript archive of a plain network may reference (anything else,
#: e.g. ``builtins eval`` or ``posix system``, makes an unknown model file refused):
#: TorchScript classes, tensor storages and rebuild functions, OrderedDict.
_ALLOWED_PICKLE_GLOBAL = re.compile(
    r"^(__torch__([. ][\w. ]+)?|torch \w*Storage|torch\._utils _rebuild_\w+|collections OrderedDict)$")

#: TorchScript calls a plain network has no use for: custom-op namespaces (anything but
#: aten/prim), file access.
_SUSPICIOUS_CODE = re.compile(r"\bops\.(?!aten\b|prim\b)\w+|\bfrom_file\b|\bsave\b|\bload\b")


class MissingDependencyError(AnomalySegError):
    """An optional dependency (deepbet for brain extraction) is not installed."""


# ============================================================================ helpers


def _data_affine(volume: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a Volume-like object (``.data`` and ``.affine``) or a pair."""
    if isinstance(volume, (tuple, list)) and len(volume) == 2:
        data, affine = volume
    else:
        data, affine = getattr(volume, "data", None), getattr(volume, "affine", None)
    if data is None or affine is None:
        raise TypeError("expected a Volume (with .data and .affine) or a (data, affine) pair")
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise InputError(f"expected a 3D volume, got shape {data.shape}")
    if affine.shape != (4, 4):
        raise InputError(f"expected a 4x4 affine, got shape {affine.shape}")
    if not np.isfinite(data).all():
        raise InputError("volume contains NaN or infinite values")
    return data, affine


def _largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Largest connected component of a boolean mask (``connectivity`` 3 = 26-neighbourhood
    in 3D, deepbet's cc3d default); an empty mask stays empty."""
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _bounding_box(mask: np.ndarray, margin: int = 0) -> Tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
                 for i, n in zip(idx, mask.shape))


# ============================================================================ skull check


@dataclass
class SkullCheck:
    """Result of :func:`skull_check`.

    ``profile`` is the median intensity in successive ``profile_step_mm`` shells below the
    head surface (outermost first), divided by the median of the deep interior (the
    brain). A head with its skull shows a bright outer ring (scalp, fat) followed by a
    dark gap (bone, CSF) before the brain; a stripped brain starts with cortex.
    """

    has_skull: bool
    reason: str
    #: Highest profile value in the outer ``RING_DEPTH_MM`` (scalp).
    ring_level: float
    #: Lowest profile value in the ``GAP_SPAN_MM`` below the ring (skull + CSF).
    gap_level: float
    #: ``ring_level / gap_level``.
    ring_to_gap: float
    #: Depth (mm) of the ring and gap shells (start of the shell).
    ring_depth_mm: float
    gap_depth_mm: float
    #: Share of the head's outer 15 mm darker than 0.3 x the interior median.
    dark_shell_fraction: float
    #: Volume (mL) of the head mask (foreground, largest component, holes filled).
    head_volume_ml: float
    #: Intensity threshold of the foreground.
    threshold: float
    profile: Tuple[float, ...] = field(default_factory=tuple)
    profile_step_mm: float = 2.0

    def to_dict(self) -> dict:
        """JSON-able dict of the result."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


#: Skull-check settings (mm and fractions of the interior median intensity).
SKULL_CHECK_VOXEL_MM = 2.0
RING_DEPTH_MM = 10.0
GAP_SPAN_MM = 16.0
INTERIOR_DEPTH_MM = 25.0
#: A skull needs a dark gap below GAP_MAX and a ring at least RATIO_MIN times brighter.
GAP_MAX = 0.55
RATIO_MIN = 1.8


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def _foreground_threshold(data: np.ndarray) -> float:
    """Low threshold separating the head from the background: half of Otsu's threshold
    (above the minimum), low enough to keep the darker scalp. Works for a zero background
    (skull-stripped or zeroed outside the head), a noisy one, and zero padding around a
    noisy one (an exact "above zero" rule would take the padding's noise for the head)."""
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        return lo
    return lo + 0.5 * (_otsu(data) - lo)


def _head_mask(fg: np.ndarray) -> np.ndarray:
    """Head mask: foreground with holes filled in 3D and in every axial slice (the neck or
    a field of view cutting the head can open the 3D hole), then its largest component.
    Filling comes first: a scalp separated from the brain by dark bone is one solid head."""
    if not fg.any():
        return np.zeros(fg.shape, dtype=bool)
    box = _bounding_box(fg, margin=1)
    sub = ndimage.binary_fill_holes(fg[box])
    for k in range(sub.shape[2]):
        sub[:, :, k] = ndimage.binary_fill_holes(sub[:, :, k])
    head = np.zeros(fg.shape, dtype=bool)
    head[box] = _largest_component(sub, connectivity=1)
    return head


def skull_check(volume: Any) -> SkullCheck:
    """Decide whether a head volume still has its skull (not skull-stripped).

    ``volume`` is a :class:`~AnomalySegLib.io.volume_io.Volume` (or a ``(data, affine)``
    pair; the affine maps voxel indices to RAS mm and only its voxel sizes are used).

    Method: the volume is subsampled to about 2 mm voxels; the head mask is the largest
    component of the foreground (above half of Otsu's threshold) with holes filled; a
    Euclidean distance map in mm gives each head voxel's depth below the surface; the
    median intensity per 2-mm depth shell, divided by the median deeper than 25 mm, is
    the depth ``profile``. A skull shows as a bright ring within the outer 10 mm
    followed, within 16 mm, by a dark gap: ``has_skull`` when the gap's level is below
    0.55 and the ring is at least 1.8 times brighter. This holds for T1 (scalp fat
    bright, bone dark), and for T2/FLAIR where bone is dark too; skull-stripped brains
    (T1, T2 or FLAIR) start at the cortex and never drop that low. Takes ~0.3 s for a
    1 mm head.
    """
    data, affine = _data_affine(volume)
    spacing = voxel_spacing(affine)
    step = np.maximum(1, np.round(SKULL_CHECK_VOXEL_MM / spacing)).astype(int)
    d = np.asarray(data[:: step[0], :: step[1], :: step[2]], dtype=np.float32)
    sp = spacing * step
    thr = _foreground_threshold(d)
    head = _head_mask(d > thr)
    head_ml = float(head.sum() * np.prod(sp) / 1000.0)
    nan = float("nan")
    if head.sum() < 50:
        return SkullCheck(False, "no head found (empty or constant volume)", nan, nan, nan, nan, nan, nan,
                          head_ml, thr)
    box = _bounding_box(head, margin=1)
    head_b, d_b = head[box], d[box]
    depth = ndimage.distance_transform_edt(head_b, sampling=sp)
    values, dep = d_b[head_b], depth[head_b]
    deep = dep > INTERIOR_DEPTH_MM
    if deep.sum() < 20:  # a small or thin head: take its deeper half
        deep = dep > 0.5 * float(dep.max())
    ref = float(np.median(values[deep]))
    if not ref > 0:
        ref = float(np.mean(np.abs(values))) or 1.0
    step_mm = 2.0
    n_bins = int(np.ceil(min(float(dep.max()), INTERIOR_DEPTH_MM + 5.0) / step_mm))
    bins = ((dep - 1e-6) // step_mm).astype(int)
    profile = []
    for b in range(n_bins):
        sel = values[bins == b]
        profile.append(float(np.median(sel)) / ref if sel.size else nan)
    prof = np.array(profile)
    n_ring = max(1, int(round(RING_DEPTH_MM / step_mm)))
    ring_part = prof[:n_ring]
    ring_idx = int(np.nanargmax(ring_part)) if np.isfinite(ring_part).any() else 0
    ring = float(prof[ring_idx])
    gap_part = prof[ring_idx + 1: ring_idx + 1 + int(round(GAP_SPAN_MM / step_mm))]
    if gap_part.size and np.isfinite(gap_part).any():
        gap_idx = ring_idx + 1 + int(np.nanargmin(gap_part))
        gap = float(prof[gap_idx])
    else:
        gap_idx, gap = ring_idx, ring
    ratio = ring / gap if gap > 0 else float("inf")
    shell = dep <= 15.0
    dark = float(np.mean(values[shell] < 0.3 * ref)) if shell.any() else nan
    has_skull = bool(gap < GAP_MAX and ratio >= RATIO_MIN)
    if has_skull:
        reason = (f"skull present: bright ring ({ring:.2f} x brain median) at {ring_idx * step_mm:.0f} mm depth, "
                  f"dark gap ({gap:.2f}) at {gap_idx * step_mm:.0f} mm")
    else:
        reason = (f"looks skull-stripped: no dark gap under the surface (lowest {gap:.2f} x brain median, "
                  f"ring/gap {ratio:.2f}; a skull needs < {GAP_MAX} and >= {RATIO_MIN})")
    return SkullCheck(has_skull, reason, ring, gap, float(ratio), ring_idx * step_mm, gap_idx * step_mm, dark,
                      head_ml, thr, tuple(round(float(p), 4) for p in prof), step_mm)


# ============================================================================ brain extraction


def deepbet_model_files(verify: bool = True) -> Tuple[Path, Path]:
    """Paths of deepbet's installed TorchScript files ``(model.pt, bbox_model.pt)``.

    Located with ``importlib.util.find_spec("deepbet")`` (deepbet is not imported): its
    wheel installs them to ``<site-packages>/data/models``. Raises
    :class:`MissingDependencyError` with the install command when deepbet is absent.

    ``verify``: files whose SHA-256 matches :data:`KNOWN_DEEPBET_SHA256` (deepbet 1.0.2,
    audited) are accepted; other files are accepted only if every pickle global of the
    archive is a TorchScript class, a tensor rebuild function or OrderedDict (no Python
    callable such as ``eval`` or ``os.system``) and the TorchScript code calls no custom
    op namespace and no file access (``from_file``, ``save``, ``load``), else
    :class:`ModelFileError`. This is defence in depth, not a sandbox: PyTorch's security
    policy says to treat TorchScript files like executable code from their provider.
    """
    spec = importlib.util.find_spec("deepbet")
    if spec is None or not spec.origin:
        raise MissingDependencyError(f"brain extraction needs deepbet, which is not installed: {DEEPBET_INSTALL_HINT}")
    pkg = Path(spec.origin).resolve().parent
    folder = pkg.parent / "data" / "models"
    files = (folder / "model.pt", folder / "bbox_model.pt")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingDependencyError(f"deepbet is installed but its model files are missing ({', '.join(missing)}): "
                                     f"reinstall it: pip install --force-reinstall deepbet")
    if verify:
        for f in files:
            _verify_torchscript_file(f)
    return files


def _verify_torchscript_file(path: Path) -> None:
    """Accept a known file by hash, or an unknown one whose pickles only name allowed globals."""
    if KNOWN_DEEPBET_SHA256.get(path.name) == file_sha256(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith(".pkl") and "/code/" not in n]
            if not pickles:
                raise ModelFileError(f"{path}: not a TorchScript archive (no data.pkl)")
            for name in pickles:
                for op, arg, _ in pickletools.genops(z.read(name)):
                    if op.name in ("GLOBAL", "INST"):
                        if not _ALLOWED_PICKLE_GLOBAL.match(str(arg)):
                            raise ModelFileError(f"{path}: refusing to load, its {name} references {arg!r}")
                    elif op.name == "STACK_GLOBAL":
                        raise ModelFileError(f"{path}: refusing to load, {name} uses STACK_GLOBAL")
            for name in z.namelist():
                if "/code/" in name and name.endswith(".py"):
                    bad = _SUSPICIOUS_CODE.search(z.read(name).decode("utf-8", "replace"))
                    if bad:
                        raise ModelFileError(f"{path}: refusing to load, its {name} calls {bad.group(0)!r}")
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable TorchScript archive ({exc})") from exc


_MODEL_CACHE: Dict[Tuple[str, str], Any] = {}


def _load_deepbet(device) -> Tuple[Any, Any]:
    """(model, bbox_model) on ``device``, loaded once per process and device."""
    import torch

    model_file, bbox_file = deepbet_model_files()
    key = (str(model_file), str(device))
    if key not in _MODEL_CACHE:
        try:
            with warnings.catch_warnings():
                # torch >= 2.10 flags TorchScript as deprecated (in favour of torch.export);
                # nothing a user can act on, deepbet ships only TorchScript files.
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(model_file), map_location=device).eval()
                bbox = torch.jit.load(str(bbox_file), map_location=device).eval()
        except RuntimeError as exc:
            raise ModelFileError(f"cannot load deepbet's model files from {model_file.parent}: {exc}") from exc
        _MODEL_CACHE[key] = (model, bbox)
    return _MODEL_CACHE[key]


def _normalize(x, low, high):
    """deepbet.utils.normalize: clip to [low, high], standardise, ImageNet-like scaling."""
    x = (x - low) / (high - low)
    x = x.clamp(min=0, max=1)
    x = (x - x.mean()) / x.std()
    return 0.226 * x + 0.449


def _bbox_with_margin(mask_small: np.ndarray, shape: Sequence[int], margin: float = 0.1) -> Tuple[slice, ...]:
    """deepbet's BrainExtraction.get_bbox_with_margin (same rounding) on a numpy mask."""
    import torch

    m = torch.from_numpy(mask_small.astype(np.float32))
    rs = [torch.where(m.mean(dims) > 0.02)[0] for dims in [(1, 2), (0, 2), (0, 1)]]
    if not all(r.numel() > 0 for r in rs):
        raise InputError("brain extraction found no head in the volume (is it empty or not an MR head scan?)")
    center = torch.tensor([float(r.max() + 1 + r.min()) / 2 for r in rs])
    size = torch.tensor([float((r.max() + 1) - r.min()) for r in rs])
    scale = torch.tensor(list(shape), dtype=torch.float32) / torch.tensor(mask_small.shape, dtype=torch.float32)
    center, size = scale * center, scale * size
    size = (1 + 2 * margin * torch.ones(3)) * size
    center, size = center.round(), size.round()
    bbox = [[int(c - s / 2), int(c + s / 2)] for c, s in zip(center.tolist(), size.tolist())]
    return tuple(slice(max(0, b[0]), min(int(s), b[1])) for b, s in zip(bbox, shape))


def extract_brain(
    volume: Any,
    *,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """Brain mask of a head MR volume (T1-weighted expected) with deepbet's networks.

    ``volume`` is a :class:`~AnomalySegLib.io.volume_io.Volume` (or ``(data, affine)``) whose
    affine maps voxel indices to RAS mm. Returns a boolean array of ``volume``'s shape on
    its own voxel grid (same affine).

    Steps, as ``deepbet.BrainExtraction.run`` (1.0.2) does on a NIfTI file: the array is
    permuted/flipped to the closest-RAS view (what ``nibabel.as_closest_canonical`` gives
    deepbet; no resampling, voxel sizes are ignored as in deepbet); the whole view is
    resized to 128^3 (nearest-exact) and normalised with its 0.5/99.5 % quantiles; the
    bounding-box network's mask (largest 26-connected component) gives the head's box,
    enlarged by 10 % each side; that box is resized to 256^3, segmented by the main
    network, and the probability resized back (nearest-exact); threshold 0.5; inside the
    box the largest 26-connected component is kept and enclosed voids are filled
    (scipy in place of deepbet's cc3d/fill_voids, same definitions). The mask is
    permuted back to the input's index order.

    ``device``: ``cpu`` (default), ``cuda``/``cuda:N`` or ``auto``. ``threads`` sets
    torch's CPU threads for the call (restored afterwards). ``cancel`` is polled between
    steps (not inside a network pass: 1-7 s each on 2 CPU cores) and raises
    :class:`~AnomalySegLib.errors.Cancelled`. Needs the optional ``deepbet`` package
    (:class:`MissingDependencyError` otherwise); its files are checked before loading
    (see :func:`deepbet_model_files`). Raises InputError when no head or no brain is found.
    """
    data, affine = _data_affine(volume)
    check_cancel(cancel)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:  # pragma: no cover - torch is a core dependency
        raise MissingDependencyError("brain extraction needs PyTorch: pip install torch") from exc
    from ..nn.device import resolve_device

    dev = resolve_device(device)
    stage = "skullstrip"
    emit(progress, ProgressEvent(stage=stage, fraction=0.0, message="loading deepbet models"))
    model, bbox_model = _load_deepbet(dev)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        reo = canonical_reorientation(affine, data.shape)
        x_np = reo.to_canonical(np.asarray(data, dtype=np.float32))
        with torch.inference_mode():
            x = torch.nan_to_num(torch.from_numpy(np.array(x_np, dtype=np.float32)).to(dev))
            x_small = F.interpolate(x[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
            low, high = x_small.quantile(0.005), x_small.quantile(0.995)
            if not float(high) > float(low):
                raise InputError("brain extraction needs a non-constant volume")
            check_cancel(cancel)
            emit(progress, ProgressEvent(stage=stage, fraction=0.05, message="locating the head"))
            p_small = bbox_model(_normalize(x_small, low, high)[None, None])[0, 1]
            mask_small = _largest_component((p_small > 0.5).cpu().numpy())
            box = _bbox_with_margin(mask_small, x.shape)
            check_cancel(cancel)
            emit(progress, ProgressEvent(stage=stage, fraction=0.25, message="segmenting the brain"))
            crop = F.interpolate(x[box][None, None], (256, 256, 256), mode="nearest-exact")[0, 0]
            p_crop = model(_normalize(crop, low, high)[None, None])[0, 1]
            box_shape = tuple(s.stop - s.start for s in box)
            p_box = F.interpolate(p_crop[None, None], box_shape, mode="nearest-exact")[0, 0].cpu().numpy()
        check_cancel(cancel)
        emit(progress, ProgressEvent(stage=stage, fraction=0.9, message="cleaning the mask"))
        inner = _largest_component(p_box > threshold)
        inner = ndimage.binary_fill_holes(inner)
        if not inner.any():
            raise InputError("brain extraction found no brain in the volume (is it a head MR scan?)")
        mask_c = np.zeros(x_np.shape, dtype=bool)
        mask_c[box] = inner
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    mask = reo.from_canonical(mask_c)
    emit(progress, ProgressEvent(stage=stage, fraction=1.0, message="brain mask done"))
    return mask


# ============================================================================ bias field


def correct_bias_field(
    volume_data: np.ndarray,
    mask: Optional[np.ndarray],
    spacing: Sequence[float],
    *,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
    threads: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) of a 3D array; returns float32, same shape.

    ``volume_data`` is ``(I, J, K)`` with voxel sizes ``spacing`` (mm along i, j, k, e.g.
    ``Volume.spacing``); orientation does not matter (the field is smooth in the voxel
    grid's own physical frame). ``mask`` (boolean, same shape) selects the voxels N4
    fits, normally the brain mask from :func:`extract_brain`; ``None`` uses the Otsu
    foreground with holes filled.

    N4 runs on a copy shrunk by ``shrink`` (per axis, fewer along coarse axes so the
    shrunk voxels stay roughly isotropic) with one fitting level per entry of
    ``iterations``; the log bias field is then evaluated on the full-resolution grid
    (``GetLogBiasFieldAsImage``) and the input divided by its exponential everywhere
    (outside the mask too: the B-spline field extends smoothly). Non-positive voxels
    are clipped to a tiny positive value for the fit only. ``threads`` limits ITK's
    threads. ``cancel`` is polled every N4 iteration; it aborts the filter and raises
    :class:`~AnomalySegLib.errors.Cancelled`.
    """
    import SimpleITK as sitk

    data = np.asarray(volume_data)
    if data.ndim != 3:
        raise InputError(f"bias correction expects a 3D array, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError("bias correction: volume contains NaN or infinite values")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"bias correction: invalid voxel spacing {spacing}")
    data = data.astype(np.float32, copy=False)
    if mask is None:
        mask = ndimage.binary_fill_holes(data > _otsu(data))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape:
        raise InputError(f"bias correction: mask shape {mask.shape} != volume shape {data.shape}")
    if mask.sum() < 100:
        raise InputError("bias correction: the mask holds fewer than 100 voxels")
    iterations = [int(n) for n in iterations]
    if not iterations or min(iterations) < 1:
        raise InputError(f"bias correction: iterations must be positive integers, got {iterations}")
    check_cancel(cancel)
    stage = "bias"
    emit(progress, ProgressEvent(stage=stage, fraction=0.0, message="N4 bias-field correction"))

    positive = data[mask & (data > 0)]
    floor = float(np.percentile(positive, 1)) * 1e-3 if positive.size else 1e-6
    fit = np.maximum(data, max(floor, 1e-12))

    def to_itk(arr: np.ndarray) -> "sitk.Image":
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # ITK index = (i, j, k)
        img.SetSpacing(spacing)
        return img

    image = to_itk(fit)
    mask_img = to_itk(mask.astype(np.uint8))
    base = min(spacing)
    factors = [max(1, int(round(shrink * base / s))) for s in spacing]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask_img, factors)

    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(iterations)
    if threads is not None:
        n4.SetNumberOfThreads(max(1, int(threads)))
    total = float(sum(iterations))
    state = {"done": 0, "cancelled": False}

    def on_iteration() -> None:
        state["done"] += 1
        if cancel is not None and cancel():
            state["cancelled"] = True
            n4.Abort()
        emit(progress, ProgressEvent(stage=stage, fraction=min(0.95, 0.95 * state["done"] / total),
                                     step=state["done"], steps=int(total)))

    n4.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        n4.Execute(small, small_mask)
    except RuntimeError as exc:
        if state["cancelled"]:
            raise Cancelled("cancelled by the user") from exc
        raise InputError(f"N4 bias-field correction failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        n4.RemoveAllCommands()
    if state["cancelled"]:
        raise Cancelled("cancelled by the user")
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    corrected = (data / np.exp(log_field)).astype(np.float32)
    emit(progress, ProgressEvent(stage=stage, fraction=1.0, message="bias field corrected"))
    return corrected


# ============================================================================ the pipeline step

#: Brain-extraction settings stored in a model's PreprocessConfig: ``auto`` extracts when
#: the input check finds a skull, ``deepbet`` always extracts, ``off`` never does (and a
#: scan with a skull is refused). ``on`` (command line, Slicer) is an alias of ``deepbet``.
BRAIN_EXTRACTION_CHOICES = ("auto", "deepbet", "off")


def resolve_brain_extraction(value: Any) -> str:
    """A brain-extraction setting (``auto`` | ``deepbet`` | ``off``; ``on`` = ``deepbet``)."""
    text = str(value).strip().lower()
    if text == "on":
        text = "deepbet"
    if text not in BRAIN_EXTRACTION_CHOICES:
        raise ValueError(f"brain_extraction must be auto, on (deepbet) or off, got {value!r}")
    return text


@dataclass
class RawInput:
    """What :func:`prepare_raw_input` did to one volume.

    ``data``: the array to preprocess (voxels outside the extracted brain set to the
    background value, bias-corrected when asked); ``brain_mask``: the extracted brain
    (bool, same grid) or None when extraction did not run; ``report``: JSON-able record
    of the input check and of the steps run (``NAME_report.json``, the Slicer panel).
    """

    data: np.ndarray
    brain_mask: Optional[np.ndarray]
    report: dict


def prepare_raw_input(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    brain_extraction: str = "auto",
    bias_correction: bool = False,
    name: str = "volume",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    device: str = "cpu",
) -> RawInput:
    """Input check, brain extraction and bias-field correction: the raw-input step of
    :func:`~AnomalySegLib.data.preprocessing.prepare_volume` (so training, calibration,
    inference and the baselines share it).

    1. :func:`skull_check` (always; ~0.1-0.5 s);
    2. brain extraction (:func:`extract_brain`) when ``brain_extraction`` is ``deepbet``,
       or ``auto`` and the check found a skull; with ``off`` a scan with a skull raises
       :class:`InputError` naming the option (the models only know stripped brains);
    3. N4 (:func:`correct_bias_field`, fitted inside the extracted brain, else inside the
       Otsu foreground) when ``bias_correction``;
    4. voxels outside the extracted brain are set to the background value (0, or the
       minimum when the volume has negative values), so the volume looks like the
       skull-stripped training data for the normalisation, the field of view and the
       tissue masks.

    On a skull-stripped volume with the defaults (``auto``, no correction) ``data`` is
    returned unchanged: the path of models written before this step existed.
    """
    import time

    setting = resolve_brain_extraction(brain_extraction)
    check_cancel(cancel)
    check = skull_check((data, affine))
    info = check.to_dict()
    info.pop("profile", None)
    info.pop("profile_step_mm", None)
    report: dict = {"input_check": info,
                    "brain_extraction": {"setting": setting, "ran": False},
                    "bias_correction": {"ran": False}}
    if check.has_skull and setting == "off":
        raise InputError(f"{name} still has its skull ({check.reason}) and brain extraction is off: "
                         f"use --brain-extraction auto (Slicer: Brain extraction = auto) or skull-strip it first")
    mask = None
    if setting == "deepbet" or (setting == "auto" and check.has_skull):
        start = time.perf_counter()
        try:
            mask = extract_brain((data, affine), device=device, progress=progress, cancel=cancel)
        except MissingDependencyError as exc:
            why = "the input check found a skull" if check.has_skull else "brain extraction is on"
            raise MissingDependencyError(f"{name}: {why}, and brain extraction needs deepbet, which is not "
                                         f"installed: {DEEPBET_INSTALL_HINT}") from exc
        voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
        report["brain_extraction"].update(ran=True, method="deepbet", brain_volume_ml=float(mask.sum()) * voxel_ml,
                                          seconds=round(time.perf_counter() - start, 2))
    if bias_correction:
        start = time.perf_counter()
        data = correct_bias_field(data, mask, voxel_spacing(affine), progress=progress, cancel=cancel)
        report["bias_correction"].update(ran=True, seconds=round(time.perf_counter() - start, 2))
    if mask is not None:
        background = min(0.0, float(np.min(data)))
        data = np.where(mask, data, np.asarray(background, dtype=np.asarray(data).dtype))
    return RawInput(data=data, brain_mask=mask, report=report)


# ============================================================================ comparing masks


def resample_mask(mask: np.ndarray, affine: np.ndarray, target_shape: Sequence[int],
                  target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean mask (voxel->RAS ``affine``) onto another
    grid (``target_shape``, voxel->RAS ``target_affine``) by physical coordinates; points
    outside the source grid are False. Identical grids return a copy."""
    mask = np.asarray(mask, dtype=bool)
    affine = np.asarray(affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    target_shape = tuple(int(s) for s in target_shape)
    if target_shape == mask.shape and np.allclose(affine, target_affine, atol=1e-5):
        return mask.copy()
    vox = np.linalg.inv(affine) @ target_affine  # target index -> source index
    out = ndimage.affine_transform(mask.astype(np.uint8), vox[:3, :3], offset=vox[:3, 3], output_shape=target_shape,
                                   order=0, mode="constant", cval=0)
    return out.astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks on the same grid (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_physical(mask: np.ndarray, affine: np.ndarray, reference: np.ndarray, reference_affine: np.ndarray) -> float:
    """Dice of ``mask`` against ``reference`` compared in physical (RAS mm) space: the
    reference is resampled (nearest) onto ``mask``'s grid when the grids differ."""
    ref = resample_mask(reference, reference_affine, np.shape(mask), affine)
    return dice(mask, ref)
