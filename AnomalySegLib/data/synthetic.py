"""Offline synthetic brain MRI: healthy cohorts and lesion cases with known masks.

No lesion data set can be downloaded, so the demo, the end-to-end tests and the
benchmark build their data from whole-brain anatomies that ship inside installed
packages (:data:`TEMPLATES`):

    * ``mni152``: the MNI152 ICBM 2009a symmetric template (T1 + grey/white matter
      probability maps) in nilearn's wheel, located on disk without importing nilearn.
      An average of 152 brains: smooth, blurred folding.
    * ``colin27``: the Colin27 single-subject scan (27 averaged T1 acquisitions of one
      person, skull-stripped ``ch2bet.nii.gz``, 1 mm) from Debian's ``mricron-data``
      package. It ships no tissue maps, so soft GM/WM/CSF maps are derived from its T1
      (a partial-volume model between the three tissue intensities, see
      :func:`_soft_tissue_maps`). Sharp individual folding, different ventricles.

Realism choices
    * Anatomy: every subject is the template under a random small affine (rotation
      +-6 deg, scaling +-6 %, translation +-4 mm) plus a smooth low-frequency
      displacement field of a few mm, applied to T1, GM, WM and brain mask together.
    * Contrast: intensity = w_gm*GM + w_wm*WM + w_csf*CSF with per-subject weights
      jittered around a base contrast (t1: WM > GM > CSF, t2: CSF > GM > WM,
      flair: GM > WM > CSF), plus the real T1 texture that the three-tissue model does
      not explain (its residual), rescaled to the synthetic GM/WM contrast (so the
      texture is inverted for T2/FLAIR).
    * Lesion centres (``placement``): "deep" (the published benchmark) draws them in
      deep white matter (any parenchyma for "small"); "mixed" draws them anywhere in
      grey or white matter, cortex included. Either way at least 85 % of the blob must
      lie inside the brain (the best of up to 40 random centres otherwise).
    * Lesions are added before the bias field and the noise, so they carry both
      (no noise-free shortcut): blobby ellipsoids (random axes and orientation,
      radius perturbed by a smooth random field), soft edges (the label is the
      half-change contour), mostly inside the brain (label = lesion and brain),
      an intensity change relative to the subject's WM intensity with a smooth
      texture. A tumour has a dark necrotic core, a bright enhancing ring and bright
      oedema; its label is the whole tumour.
    * Acquisition: smooth multiplicative bias field (quadratic polynomial, +-10-20 %),
      a random global gain (arbitrary scanner units), Rician or Gaussian noise with
      sigma 2-4 % of the WM intensity; outside the brain the image is exactly 0
      (skull-stripped, like BraTS).

Limits
    Two anatomies deformed (little true inter-subject variability of folding,
    ventricles, age; colin27's tissue maps come from its own T1 intensities, so deep
    grey nuclei are GM/WM mixtures), synthetic contrasts rather than physics (no T1/T2
    relaxation model, no partial-volume model beyond the probability maps), lesion
    directions fixed per kind whatever the contrast, no mass effect. These data test
    that the software works end to end and rank methods on a controlled problem; they
    are not a substitute for validation on real clinical scans.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from ..errors import InputError, OutputError
from ..segmentation.lesions import mask_bounding_box

__all__ = [
    "add_synthetic_skull",
    "package_data_file",
    "Template",
    "LesionSpec",
    "SyntheticCase",
    "LESION_KINDS",
    "LESION_RADIUS_MM",
    "CONTRASTS",
    "TEMPLATES",
    "PLACEMENTS",
    "load_template",
    "cohort_case_seeds",
    "synthesize_case",
    "make_cohort",
]

#: Lesion kinds understood by :class:`LesionSpec`.
LESION_KINDS: Tuple[str, ...] = ("bright", "dark", "small", "tumour", "low_contrast")

#: Default range of the lesion "radius" (geometric mean of the semi-axes, in mm) per kind.
#: The nominal volume is 4/3*pi*r^3 (e.g. small: 0.11-0.52 mL, tumour: 14-82 mL).
LESION_RADIUS_MM: Dict[str, Tuple[float, float]] = {
    "bright": (7.0, 13.0),
    "dark": (6.0, 11.0),
    "small": (3.0, 5.0),
    "tumour": (15.0, 27.0),
    "low_contrast": (7.0, 13.0),
}

#: Default range of the intensity change per kind, as a fraction of the WM intensity
#: (added for bright kinds; for "dark" the fractional darkening of the local tissue;
#: for "tumour" the oedema's brightening, the ring gets twice that).
_LESION_CONTRAST: Dict[str, Tuple[float, float]] = {
    "bright": (0.4, 0.8),
    "dark": (0.35, 0.6),
    "small": (0.4, 0.8),
    "tumour": (0.25, 0.45),
    "low_contrast": (0.12, 0.20),
}

#: Base tissue intensities (gm, wm, csf) of the synthetic contrasts.
_BASE_CONTRAST: Dict[str, Tuple[float, float, float]] = {
    "t1": (0.55, 0.85, 0.15),
    "t2": (0.60, 0.45, 0.95),
    "flair": (0.75, 0.55, 0.12),
}

#: Contrast names accepted by :func:`synthesize_case` ("random" picks one per subject).
CONTRASTS: Tuple[str, ...] = ("t1", "t2", "flair", "random")

#: Template names accepted by :func:`load_template`.
TEMPLATES: Tuple[str, ...] = ("mni152", "colin27")

#: Lesion placements accepted by :func:`synthesize_case`: "deep" = deep white matter
#: (any parenchyma for "small"; the published benchmark), "mixed" = anywhere in grey or
#: white matter, cortex included.
PLACEMENTS: Tuple[str, ...] = ("deep", "mixed")

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_NILEARN_MISSING = "the demo needs the MNI152 template shipped with nilearn: pip install nilearn"

#: Where Debian's mricron-data package installs the skull-stripped Colin27 T1.
_COLIN27_FILE = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
_COLIN27_MISSING = ("the colin27 template needs the Colin27 scan from Debian's mricron-data package "
                    "(apt-get install mricron-data)")


# --------------------------------------------------------------------------- data types


@dataclass
class Template:
    """A skull-stripped anatomy on an isotropic RAS grid (axis 2 points Superior).

    Arrays are read-only because templates are cached and shared between callers.
    ``t1`` is scaled to [0, 1]; ``gm``, ``wm`` and ``csf`` are probabilities in [0, 1]
    (``csf`` = brain minus GM minus WM, clipped); ``affine`` maps voxel index to RAS mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    name: str

    @property
    def voxel_size_mm(self) -> float:
        """Isotropic voxel edge in mm."""
        return float(np.linalg.norm(self.affine[:3, 0]))


@dataclass
class LesionSpec:
    """One lesion to insert.

    ``kind`` is one of :data:`LESION_KINDS`. Optional overrides: ``center_mm`` (RAS
    world coordinate; default: random, see ``placement`` of :func:`synthesize_case`), ``radius_mm``
    (geometric mean of the semi-axes; default: random in :data:`LESION_RADIUS_MM`),
    ``contrast`` (magnitude of the intensity change as a fraction of the WM intensity;
    the sign is fixed by the kind).
    """

    kind: str
    center_mm: Optional[Tuple[float, float, float]] = None
    radius_mm: Optional[float] = None
    contrast: Optional[float] = None


@dataclass
class SyntheticCase:
    """One synthetic subject: image (float32), lesion label (uint8 0/1), RAS affine,
    brain mask (bool) and ``meta`` (JSON-serialisable generation parameters)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- templates


def package_data_file(package: str, *parts: str) -> Optional[Path]:
    """A data file shipped inside an installed package, found without importing it (slow
    imports: nilearn, nimare); None when the package or the file is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    return None


def _nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data, found without importing nilearn (slow)."""
    if importlib.util.find_spec("nilearn") is None:
        raise InputError(_NILEARN_MISSING)
    files = [package_data_file("nilearn", "datasets", "data", f) for f in _MNI_FILES.values()]
    if all(files):
        return files[0].parent
    raise InputError(_NILEARN_MISSING + " (installed nilearn lacks datasets/data/mni_icbm152_*)")


def _resample(data: np.ndarray, factor: float, shape: Tuple[int, ...]) -> np.ndarray:
    """Sample ``data`` at voxel positions ``j * factor`` (linear), anti-aliased when shrinking."""
    data = data.astype(np.float32, copy=False)
    if factor > 1.0:
        data = ndimage.gaussian_filter(data, sigma=(factor - 1.0) / 2.0, mode="constant")
    if factor == 1.0 and shape == data.shape:
        return data.copy()
    return ndimage.affine_transform(
        data, np.full(3, factor), output_shape=shape, order=1, mode="constant", cval=0.0
    )


def _colin27_file() -> Path:
    """Path of ``ch2bet.nii.gz``; InputError naming the Debian package when it is absent."""
    if not _COLIN27_FILE.is_file():
        raise InputError(f"{_COLIN27_MISSING}: {_COLIN27_FILE} not found")
    return _COLIN27_FILE


def _histogram_peak(hist: np.ndarray, lo: int, hi: int) -> float:
    """Intensity of the highest interior local maximum of ``hist[lo:hi]`` (its mean if none).

    Interior only: a class cut from a rising flank has its maximum at the cut, which is
    not a tissue intensity. (scipy.signal.find_peaks would do, but importing it costs seconds.)
    """
    part = hist[lo:hi]
    inner = np.flatnonzero((part[1:-1] > part[:-2]) & (part[1:-1] >= part[2:])) + 1
    if inner.size:
        return float(lo + inner[int(np.argmax(part[inner]))])
    return float(lo + (np.arange(part.size) * part).sum() / max(part.sum(), 1e-12))


def _otsu3(hist: np.ndarray) -> Tuple[int, int]:
    """Two thresholds (t1 < t2, classes [0,t1], (t1,t2], (t2,end)) maximising the
    between-class variance of a histogram (exhaustive 3-class Otsu, vectorised)."""
    x = np.arange(hist.size, dtype=np.float64)
    p = hist / max(float(hist.sum()), 1e-12)
    w, m = np.cumsum(p), np.cumsum(p * x)
    i, j = np.meshgrid(np.arange(hist.size), np.arange(hist.size), indexing="ij")
    w0, w1, w2 = w[i], w[j] - w[i], 1.0 - w[j]
    m0, m1, m2 = m[i], m[j] - m[i], m[-1] - m[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = m0 ** 2 / w0 + m1 ** 2 / w1 + m2 ** 2 / w2
    score = np.where((i < j) & (w0 > 1e-9) & (w1 > 1e-9) & (w2 > 1e-9), score, -np.inf)
    t1, t2 = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(t1), int(t2)


def _soft_tissue_maps(t1: np.ndarray, brain: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
    """Soft GM and WM probability maps (float32, GM + WM <= 1, 0 outside ``brain``) from a
    skull-stripped integer-valued T1 (WM > GM > CSF).

    A 3-class Otsu split of the brain histogram finds the classes; each class's pure
    intensity is its highest histogram peak (class means are pulled by partial volume:
    Colin27's CSF peak is at 32 but the dark class's mean at 53). Memberships then
    interpolate linearly between neighbouring pure intensities (a partial-volume model:
    a voxel half-way between the GM and WM peaks is half GM, half WM), below the CSF peak
    all CSF, above the WM peak all WM. Gaussian-mixture posteriors were tried and
    rejected: the averaged scan's very narrow WM peak (sd ~4 against ~12 for GM) left
    10 % "GM" in the brightest WM, and partial volume pulled the CSF class to ~49.
    A light normalised smoothing inside the brain (sigma 0.5 voxel) removes the
    single-voxel noise of the class boundaries without leaking tissue out of the mask.
    Returns (gm, wm, pure intensities).
    """
    # Work in the brain's bounding box (+2 voxels for the smoothing): half the grid.
    box = mask_bounding_box(brain, margin=2)
    full_shape = t1.shape
    t1, brain = t1[box], brain[box]
    values = t1[brain].astype(np.int64)
    hist = ndimage.gaussian_filter1d(np.bincount(values, minlength=int(values.max()) + 1).astype(np.float64), 1.5)
    hist[0] = 0.0
    lo, hi = _otsu3(hist)
    pure = np.array([_histogram_peak(hist, 1, lo + 1), _histogram_peak(hist, lo + 1, hi + 1),
                     _histogram_peak(hist, hi + 1, hist.size)])
    if not (pure[0] < pure[1] < pure[2]):
        raise InputError(f"cannot derive tissue maps: class intensities {pure.tolist()} are not CSF < GM < WM")
    x = t1.astype(np.float32)
    wm = np.clip((x - pure[1]) / (pure[2] - pure[1]), 0.0, 1.0)
    gm_rise = np.clip((x - pure[0]) / (pure[1] - pure[0]), 0.0, 1.0)  # CSF -> GM ramp
    gm = np.where(x <= pure[1], gm_rise, 1.0 - wm)
    mask = brain.astype(np.float32)
    norm = ndimage.gaussian_filter(mask, 0.5)
    norm = np.maximum(norm, 1e-6)
    out = []
    for p in (gm, wm):
        full = np.zeros(full_shape, dtype=np.float32)
        full[box] = np.where(brain, ndimage.gaussian_filter(p * mask, 0.5) / norm, 0.0)
        out.append(full)
    return out[0], out[1], {"csf": float(pure[0]), "gm": float(pure[1]), "wm": float(pure[2])}


def _load_colin27() -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Colin27 T1 (brain only) plus derived GM/WM maps, all uint8 (maps coded 0-255 like
    MNI152's, floored so that GM + WM never exceeds 255), and the RAS affine."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(_colin27_file())))  # RAS: axis 2 superior
    t1 = np.asarray(img.dataobj)
    if t1.ndim != 3 or t1.dtype.kind not in "ui":
        raise InputError(f"{_COLIN27_FILE}: expected a 3D integer T1, got {t1.dtype} {t1.shape}")
    # Brain extraction left ~100 specks and 1-voxel strands of non-brain (mostly near the
    # midline and the skull base): open once, keep the largest component, fill holes.
    # (In the non-zero bounding box, about half the grid: loading time matters in tests.)
    if not t1.any():
        raise InputError(f"{_COLIN27_FILE} is empty")
    box = mask_bounding_box(t1 > 0, margin=2)
    core = ndimage.binary_opening(t1[box] > 0, ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(core)
    if n == 0:
        raise InputError(f"{_COLIN27_FILE} holds no brain")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = np.zeros(t1.shape, dtype=bool)
    brain[box] = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    # A filled hole would be 0 in the T1: lift it to 1 so that the loader's "T1 > 0"
    # brain mask reproduces this one exactly.
    t1 = np.where(brain, np.maximum(t1, 1), 0).astype(np.uint8)
    gm, wm, _ = _soft_tissue_maps(t1, brain)
    maps = {"t1": t1, "gm": np.floor(gm * 255.0).astype(np.uint8), "wm": np.floor(wm * 255.0).astype(np.uint8)}
    return maps, img.affine.astype(np.float64)


def _load_mni152() -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """MNI152 T1, GM and WM maps as stored (uint8) and the RAS affine."""
    import nibabel as nib  # local: keeps `import AnomalySegLib.data.synthetic` light

    folder = _nilearn_data_dir()
    maps = {}
    affine = None
    for key, fname in _MNI_FILES.items():
        img = nib.as_closest_canonical(nib.load(str(folder / fname)))  # RAS: axis 2 superior
        maps[key] = np.asarray(img.dataobj)
        affine = img.affine.astype(np.float64)
    return maps, affine


@functools.lru_cache(maxsize=len(TEMPLATES))
def _load_native(name: str) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Native template maps (t1, gm, wm; uint8 with probabilities coded 0-255) and RAS
    affine; cached so that several resolutions read (and for colin27 segment) once."""
    maps, affine = _load_colin27() if name == "colin27" else _load_mni152()
    for a in maps.values():
        a.setflags(write=False)
    return maps, affine


def load_template(name: str = "mni152", resolution_mm: float = 2.0) -> Template:
    """Load a shipped anatomy resampled to ``resolution_mm`` isotropic voxels.

    Voxel ``j`` of the result lies at voxel ``j * resolution_mm / native_mm`` of the
    native grid (same first-voxel centre), so the affine is ``native @ diag(f, f, f, 1)``
    and every world coordinate is preserved. Cached per (name, resolution); the cached
    arrays are read-only. Raises InputError if the template is unknown or its files are
    missing (mni152: ``pip install nilearn``; colin27: ``apt-get install mricron-data``).
    """
    if name not in TEMPLATES:
        raise InputError(f"unknown template {name!r}; available: {', '.join(TEMPLATES)}")
    resolution_mm = float(resolution_mm)
    if not (0.5 <= resolution_mm <= 8.0):
        raise InputError(f"template resolution must be between 0.5 and 8 mm, got {resolution_mm}")
    return _load_template(name, resolution_mm)


@functools.lru_cache(maxsize=8)
def _load_template(name: str, resolution_mm: float) -> Template:
    native, affine = _load_native(name)
    maps = {k: v.astype(np.float32) for k, v in native.items()}
    prob_scale = 255.0 if native["gm"].dtype.kind in "ui" else 1.0  # uint8-coded probabilities
    native_mm = float(np.linalg.norm(affine[:3, 0]))
    factor = resolution_mm / native_mm
    shape = tuple(int(np.floor((n - 1) / factor + 1e-9)) + 1 for n in maps["t1"].shape)

    # The template is skull-stripped: the brain is where the T1 is non-zero.
    brain_native = ndimage.binary_fill_holes(maps["t1"] > 0).astype(np.float32)
    brain = _resample(brain_native, factor, shape) > 0.5
    t1 = _resample(maps["t1"], factor, shape)
    gm = _resample(maps["gm"], factor, shape)
    wm = _resample(maps["wm"], factor, shape)
    t1 = np.clip(t1 / max(float(t1.max()), 1e-6), 0.0, 1.0)
    gm = np.clip(gm / prob_scale, 0.0, 1.0) * brain
    wm = np.clip(wm / prob_scale, 0.0, 1.0) * brain
    t1 = t1 * brain
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    new_affine = affine @ np.diag([factor, factor, factor, 1.0])
    arrays = [a.astype(np.float32) for a in (t1, gm, wm, csf)] + [brain, new_affine]
    for a in arrays:
        a.setflags(write=False)
    return Template(*arrays, name=name)


# --------------------------------------------------------------------------- smooth random fields


def _kernel_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) Gaussian interpolation weights (rows sum to 1), controls spread over the axis."""
    x = np.arange(n_out, dtype=np.float64)
    ctrl = np.linspace(0.0, n_out - 1.0, n_ctrl)
    h = max((n_out - 1.0) / max(n_ctrl - 1, 1), 1.0)
    w = np.exp(-0.5 * ((x[:, None] - ctrl[None, :]) / h) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], n_ctrl: Sequence[int]) -> np.ndarray:
    """Smooth random field: standard-normal control grid, separable Gaussian interpolation.

    Separable tensor products keep this O(voxels * controls) with no per-voxel Python.
    """
    ctrl = rng.standard_normal(tuple(n_ctrl))
    wx, wy, wz = (_kernel_matrix(n, c) for n, c in zip(shape, n_ctrl))
    f = np.tensordot(wx, ctrl, axes=(1, 0))  # (X, cy, cz)
    f = np.tensordot(f, wy, axes=(1, 1))  # (X, cz, Y)
    f = np.tensordot(f, wz, axes=(1, 1))  # (X, Y, Z)
    return f.astype(np.float32)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> Tuple[np.ndarray, List[float]]:
    """Rotation matrix from three random Euler angles in [-max_deg, max_deg]."""
    angles = rng.uniform(-max_deg, max_deg, size=3)
    a, b, c = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx, [float(v) for v in angles]


def _uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# --------------------------------------------------------------------------- synthesis steps


def _deform(template: Template, rng: np.random.Generator, meta: dict) -> Dict[str, np.ndarray]:
    """Random affine + low-frequency displacement, applied to all maps (linear interpolation)."""
    vox = template.voxel_size_mm
    shape = template.t1.shape
    rot, angles = _random_rotation(rng, 6.0)
    scales = rng.uniform(0.94, 1.06, size=3)
    shift_mm = rng.uniform(-4.0, 4.0, size=3)
    # Output voxel x samples the template at M (x - c) + c + t + d(x), c = brain centre.
    centre = np.array(ndimage.center_of_mass(template.brain))
    m = rot @ np.diag(1.0 / scales)  # inverse map: a larger subject samples a shrunk template
    n_ctrl = [max(3, int(round(n * vox / 40.0)) + 1) for n in shape]  # controls ~40 mm apart
    disp_mm = rng.uniform(1.5, 3.5)
    disp = [_smooth_field(rng, shape, n_ctrl) for _ in range(3)]
    peak = max(float(np.abs(d).max()) for d in disp)
    scale = disp_mm / vox / max(peak, 1e-6)
    axes = [np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(shape, centre)]
    coords = []
    for a in range(3):
        base = (m[a, 0] * axes[0][:, None, None] + m[a, 1] * axes[1][None, :, None]
                + m[a, 2] * axes[2][None, None, :]).astype(np.float32)
        coords.append(base + disp[a] * np.float32(scale) + np.float32(centre[a] + shift_mm[a] / vox))
    coords = np.stack(coords).reshape(3, -1)
    # Interpolate only where the 2x2x2 support can touch the brain (~1/4 of the grid):
    # all template maps are zero outside it.
    support = ndimage.binary_dilation(template.brain, structure=np.ones((3, 3, 3), bool))
    nearest = [np.clip(np.rint(coords[a]), 0, shape[a] - 1).astype(np.intp) for a in range(3)]
    hit = np.flatnonzero(support[nearest[0], nearest[1], nearest[2]])
    pts = coords[:, hit]
    out = {}
    for key in ("t1", "gm", "wm", "brain"):
        src = getattr(template, key).astype(np.float32, copy=False)
        vals = np.zeros(coords.shape[1], dtype=np.float32)
        vals[hit] = ndimage.map_coordinates(src, pts, order=1, mode="constant", cval=0.0)
        out[key] = vals.reshape(shape)
    out["brain"] = out["brain"] > 0.5
    meta["deformation"] = {
        "rotation_deg": angles,
        "scale": [float(s) for s in scales],
        "translation_mm": [float(s) for s in shift_mm],
        "displacement_peak_mm": float(disp_mm),
    }
    return out


def _identity_maps(template: Template) -> Dict[str, np.ndarray]:
    return {
        "t1": np.array(template.t1),
        "gm": np.array(template.gm),
        "wm": np.array(template.wm),
        "brain": np.array(template.brain),
    }


def _contrast_image(maps: Dict[str, np.ndarray], rng: np.random.Generator, contrast: str,
                    meta: dict) -> Tuple[np.ndarray, float]:
    """Tissue-weighted contrast plus the real T1 texture; returns (image, WM intensity)."""
    brain = maps["brain"]
    gm, wm, t1 = maps["gm"] * brain, maps["wm"] * brain, maps["t1"] * brain
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    base = np.array(_BASE_CONTRAST[contrast])
    w_gm, w_wm, w_csf = base * rng.uniform(0.92, 1.08, size=3)
    image = w_gm * gm + w_wm * wm + w_csf * csf
    # Texture = what the 3-tissue model does not explain in the real T1 (deep nuclei,
    # partial volume, fine structure), scaled by the ratio of the WM-GM contrasts.
    idx = brain.ravel()
    design = np.stack([gm.ravel()[idx], wm.ravel()[idx], csf.ravel()[idx]], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, t1.ravel()[idx].astype(np.float64), rcond=None)
    residual = t1 - (coef[0] * gm + coef[1] * wm + coef[2] * csf)
    denom = coef[1] - coef[0]
    blend = rng.uniform(0.6, 1.0)
    k = blend * (w_wm - w_gm) / denom if abs(denom) > 1e-6 else 0.0
    image = (image + np.float32(k) * residual) * brain
    image = np.maximum(image, 0.0).astype(np.float32)
    meta["contrast"] = contrast
    meta["tissue_weights"] = {"gm": float(w_gm), "wm": float(w_wm), "csf": float(w_csf)}
    meta["texture_blend"] = float(blend)
    return image, float(w_wm)


def _lesion_box(center: np.ndarray, reach_vox: float, shape: Sequence[int]) -> Tuple[slice, ...]:
    lo = np.maximum(np.floor(center - reach_vox).astype(int), 0)
    hi = np.minimum(np.ceil(center + reach_vox).astype(int) + 1, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _lesion_shape(center: np.ndarray, radius_mm: float, vox: float, shape: Sequence[int],
                  rng: np.random.Generator) -> Tuple[Tuple[slice, ...], np.ndarray, np.ndarray]:
    """Blobby ellipsoid around ``center`` (voxels): returns (box, normalised radius f, texture).

    ``f`` < 1 inside the lesion (the label), ~0 at its centre; the radius is modulated by a
    smooth random field so the outline is irregular. ``texture`` is ~1 +- 0.15, smooth.
    """
    axes_mm = radius_mm * np.exp(rng.normal(0.0, 0.2, size=3))
    axes_mm *= radius_mm / np.prod(axes_mm) ** (1.0 / 3.0)  # keep the nominal volume
    rot = _uniform_rotation(rng)
    wobble = rng.uniform(0.1, 0.25)
    reach = axes_mm.max() * (1.0 + wobble) * 1.2 / vox + 1.0
    box = _lesion_box(center, reach, shape)
    grid = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) - c for s, c in zip(box, center)],
                       indexing="ij")
    rel = np.stack(grid, axis=-1) * vox  # mm
    local = rel @ rot  # coordinates along the ellipsoid axes
    f = np.sqrt(((local / axes_mm) ** 2).sum(axis=-1))
    bshape = f.shape
    n_ctrl = [max(2, min(4, n)) for n in bshape]
    pert = _smooth_field(rng, bshape, n_ctrl)
    pert *= wobble / max(float(np.abs(pert).max()), 1e-6)
    f = f / (1.0 + pert)
    tex = _smooth_field(rng, bshape, n_ctrl)
    tex = 1.0 + 0.15 * tex / max(float(np.abs(tex).max()), 1e-6)
    return box, f.astype(np.float32), tex.astype(np.float32)


def _centre_tissue(maps: Dict[str, np.ndarray], centre: np.ndarray) -> str:
    """Most probable tissue ("gm", "wm" or "csf") at the voxel nearest ``centre``."""
    idx = tuple(int(np.clip(np.rint(c), 0, n - 1)) for c, n in zip(centre, maps["brain"].shape))
    gm, wm = float(maps["gm"][idx]), float(maps["wm"][idx])
    probs = {"gm": gm, "wm": wm, "csf": max(float(maps["brain"][idx]) - gm - wm, 0.0)}
    return max(probs, key=probs.get)


def _place_lesion(spec: LesionSpec, maps: Dict[str, np.ndarray], affine: np.ndarray, vox: float,
                  occupied: np.ndarray, z_range: Tuple[int, int], rng: np.random.Generator,
                  placement: str = "deep"):
    """Choose centre and radius, retrying random centres until the blob lies >= 85 % in the brain.

    ``placement`` "deep": centres in deep WM (WM probability > 0.4; any parenchyma for
    "small"). "mixed": any parenchyma voxel (GM + WM > 0.5, cortex included) for every
    kind, so roughly half the candidates are grey matter. The "deep" path draws exactly
    the random numbers it always did: the published benchmark stays reproducible.
    """
    brain = maps["brain"]
    lo, hi = _LESION_CONTRAST[spec.kind]
    radius = float(spec.radius_mm) if spec.radius_mm is not None else rng.uniform(*LESION_RADIUS_MM[spec.kind])
    if spec.center_mm is not None:
        inv = np.linalg.inv(affine)
        centres = [inv[:3, :3] @ np.asarray(spec.center_mm, dtype=np.float64) + inv[:3, 3]]
    else:
        # Candidate tissue inside the kept slab.
        parenchyma = (maps["gm"] + maps["wm"]) > 0.5
        tissue = maps["wm"] > 0.4 if placement == "deep" and spec.kind != "small" else parenchyma
        zone = tissue & brain
        zone[:, :, : z_range[0]] = False
        zone[:, :, z_range[1]:] = False
        cand = np.flatnonzero(zone & ~occupied)
        if cand.size == 0:
            cand = np.flatnonzero(brain)
        picks = rng.choice(cand, size=min(40, cand.size), replace=False)
        centres = [np.array(np.unravel_index(p, brain.shape), dtype=np.float64) + rng.uniform(-0.5, 0.5, 3)
                   for p in picks]
    best = None
    for c in centres:
        box, f, tex = _lesion_shape(c, radius, vox, brain.shape, rng)
        inside = f < 1.0
        n = int(inside.sum())
        frac = float((inside & brain[box]).sum()) / max(n, 1)
        clash = bool((inside & occupied[box]).any())
        score = frac - (1.0 if clash else 0.0)
        if best is None or score > best[0]:
            best = (score, c, box, f, tex)
        if frac >= 0.85 and not clash:
            break
    _, c, box, f, tex = best
    contrast = float(spec.contrast) if spec.contrast is not None else rng.uniform(lo, hi)
    return c, radius, contrast, box, f, tex


def _apply_lesion(image: np.ndarray, kind: str, box, f: np.ndarray, tex: np.ndarray, contrast: float,
                  i_wm: float, rng: np.random.Generator, info: dict) -> None:
    """Change intensities in place with soft edges (half change on the label boundary)."""
    region = image[box]
    w = _smoothstep((1.15 - f) / 0.3)
    if kind in ("bright", "small", "low_contrast"):
        region += w * contrast * i_wm * tex
    elif kind == "dark":
        region *= 1.0 - w * np.clip(contrast * tex, 0.0, 0.95)
    elif kind == "tumour":
        core_r = rng.uniform(0.25, 0.4)
        ring_r = core_r + rng.uniform(0.2, 0.3)
        core_dark = rng.uniform(0.4, 0.6)
        w_ring = _smoothstep((ring_r + 0.1 - f) / 0.2)
        w_core = _smoothstep((core_r + 0.05 - f) / 0.1)
        original = region.copy()
        bright = original + contrast * i_wm * tex * (w + w_ring)
        region[...] = bright * (1.0 - w_core) + w_core * original * (1.0 - core_dark)
        info.update(core_fraction=float(core_r), ring_fraction=float(ring_r), core_darkening=float(core_dark))
    image[box] = np.maximum(region, 0.0)


def _bias_field(shape: Sequence[int], rng: np.random.Generator, brain: np.ndarray, meta: dict) -> np.ndarray:
    """Quadratic polynomial multiplicative field, peak deviation 10-20 % inside the brain."""
    amp = rng.uniform(0.10, 0.20)
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    coef = rng.normal(0.0, 1.0, size=len(terms)).astype(np.float32)
    poly = sum(c * t for c, t in zip(coef, terms))
    poly = np.broadcast_to(poly, tuple(shape)).astype(np.float32)
    inside = poly[brain] if brain.any() else poly.ravel()
    poly = poly - np.float32(inside.mean())
    peak = float(np.abs(poly[brain]).max()) if brain.any() else 1.0
    meta["bias_amplitude"] = float(amp)
    return 1.0 + np.float32(amp / max(peak, 1e-6)) * poly


#: Bias-field models of the acquisition step: ``quadratic`` (the benchmark's default) or
#: ``smooth`` (a random smooth field with ~50 mm features, which no low-order polynomial
#: fits: data made differently, to check that methods do not rely on the field's shape).
BIAS_MODELS = ("quadratic", "smooth")


def _smooth_bias_field(shape: Sequence[int], rng: np.random.Generator, brain: np.ndarray, meta: dict,
                       voxel_mm: float) -> np.ndarray:
    """``exp`` of a Gaussian random field (white noise on a 16 mm grid, smoothed with sigma
    24 mm, cubic-upsampled), peak deviation of the log 10-25 % inside the brain."""
    amp = rng.uniform(0.10, 0.25)
    cell_mm = 16.0
    coarse = tuple(max(2, int(np.ceil(n * voxel_mm / cell_mm)) + 1) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma=1.5, mode="reflect")
    # cubic interpolation of the coarse grid at every voxel (voxel centre -> coarse coordinate)
    coords = np.meshgrid(*[np.arange(n) * (voxel_mm / cell_mm) for n in shape], indexing="ij", sparse=True)
    coords = [np.broadcast_to(c, tuple(shape)) for c in coords]
    log_field = ndimage.map_coordinates(noise, coords, order=3, mode="nearest").astype(np.float32)
    inside = log_field[brain] if brain.any() else log_field.ravel()
    log_field -= np.float32(inside.mean())
    peak = float(np.abs(log_field[brain]).max()) if brain.any() else 1.0
    meta["bias_amplitude"] = float(amp)
    meta["bias_model"] = "smooth"
    return np.exp(np.float32(amp / max(peak, 1e-6)) * log_field)


def _central_slab(template_brain: np.ndarray, n_slices: int) -> int:
    """First axial index of the ``n_slices`` slices centred on the brain's superior-inferior extent."""
    nz = template_brain.shape[2]
    if not 1 <= n_slices <= nz:
        raise InputError(f"n_slices must be between 1 and {nz}, got {n_slices}")
    zs = np.flatnonzero(template_brain.any(axis=(0, 1)))
    centre = 0.5 * (zs[0] + zs[-1]) if zs.size else 0.5 * (nz - 1)
    k0 = int(round(centre - n_slices / 2.0 + 0.5))
    return int(min(max(k0, 0), nz - n_slices))


def _as_spec(lesion: Union[LesionSpec, str]) -> LesionSpec:
    spec = LesionSpec(lesion) if isinstance(lesion, str) else lesion
    if spec.kind not in LESION_KINDS:
        raise InputError(f"unknown lesion kind {spec.kind!r}; choose from {', '.join(LESION_KINDS)}")
    return spec


def synthesize_case(
    template: Template,
    rng: Union[np.random.Generator, int],
    *,
    lesions: Sequence[Union[LesionSpec, str]] = (),
    contrast: str = "random",
    deform: bool = True,
    bias: bool = True,
    noise: Optional[float] = None,
    n_slices: Optional[int] = None,
    placement: str = "deep",
    bias_model: str = "quadratic",
) -> SyntheticCase:
    """Synthesize one subject from ``template``.

    Order: deformation -> contrast -> lesions -> bias field -> gain and noise -> zero
    outside the brain -> optional crop. ``rng`` is a Generator or an int seed (same
    seed, same case). ``noise`` is the noise sigma as a fraction of the WM intensity
    (default random 0.02-0.04; 0 disables). ``n_slices`` keeps the central axial
    slices of the brain (the paper's BraTS protocol) and shifts the affine's origin so
    world coordinates are unchanged; lesion centres are then drawn inside that slab.
    ``placement`` (:data:`PLACEMENTS`) chooses where random lesion centres go: "deep"
    (default, the published benchmark) in deep white matter, "mixed" anywhere in grey
    or white matter. ``meta`` records it, and per lesion the tissue at the centre.
    ``bias_model`` (:data:`BIAS_MODELS`) chooses the shape of the bias field.
    """
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    gen = np.random.default_rng(seed) if seed is not None else rng
    if not isinstance(gen, np.random.Generator):
        raise TypeError("rng must be a numpy Generator or an int seed")
    if contrast not in CONTRASTS:
        raise InputError(f"unknown contrast {contrast!r}; choose from {', '.join(CONTRASTS)}")
    if placement not in PLACEMENTS:
        raise InputError(f"unknown lesion placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
    if bias_model not in BIAS_MODELS:
        raise InputError(f"unknown bias model {bias_model!r}; choose from {', '.join(BIAS_MODELS)}")
    specs = [_as_spec(l) for l in lesions]
    shape = template.t1.shape
    vox = template.voxel_size_mm
    k0 = _central_slab(template.brain, n_slices) if n_slices is not None else 0
    z_range = (k0, k0 + n_slices) if n_slices is not None else (0, shape[2])

    meta: dict = {"seed": seed, "template": template.name, "resolution_mm": vox}
    if contrast == "random":
        contrast = str(gen.choice(["t1", "t2", "flair"]))
    maps = _deform(template, gen, meta) if deform else _identity_maps(template)
    brain = maps["brain"]
    image, w_wm = _contrast_image(maps, gen, contrast, meta)

    occupied = np.zeros(shape, dtype=bool)
    lesion_info = []
    for spec in specs:
        c, radius, lc, box, f, tex = _place_lesion(spec, maps, template.affine, vox, occupied, z_range, gen,
                                                   placement)
        info = {"kind": spec.kind, "radius_mm": float(radius), "contrast": float(lc),
                "center_mm": [float(v) for v in template.affine[:3, :3] @ c + template.affine[:3, 3]],
                "placement": "given" if spec.center_mm is not None else placement,
                "center_tissue": _centre_tissue(maps, c)}
        _apply_lesion(image, spec.kind, box, f, tex, lc, w_wm, gen, info)
        own = np.zeros(shape, dtype=bool)
        own[box] = (f < 1.0) & brain[box]
        occupied |= own
        info["_mask"] = own
        lesion_info.append(info)

    if bias and bias_model == "smooth":
        image *= _smooth_bias_field(shape, gen, brain, meta, vox)
    elif bias:
        image *= _bias_field(shape, gen, brain, meta)
    gain = float(gen.uniform(200.0, 1000.0))  # arbitrary scanner units
    image *= np.float32(gain)
    i_wm = w_wm * gain
    rel_sigma = float(gen.uniform(0.02, 0.04)) if noise is None else float(noise)
    sigma = rel_sigma * i_wm
    noise_kind = str(gen.choice(["rician", "gaussian"]))
    if sigma > 0:
        n1 = gen.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
        if noise_kind == "rician":
            n2 = gen.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
            image = np.sqrt((image + n1) ** 2 + n2 ** 2)
        else:
            image = np.maximum(image + n1, 0.0)
    image = (image * brain).astype(np.float32)  # skull-stripped: background exactly 0
    label = occupied.astype(np.uint8)

    affine = np.array(template.affine, dtype=np.float64)
    if n_slices is not None:
        sl = slice(k0, k0 + n_slices)
        image, label, brain = image[:, :, sl].copy(), label[:, :, sl].copy(), brain[:, :, sl].copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, k0]) + affine[:3, 3]
    voxel_ml = vox ** 3 / 1000.0
    for info in lesion_info:
        mask = info.pop("_mask")
        if n_slices is not None:
            mask = mask[:, :, k0:k0 + n_slices]
        info["volume_ml"] = float(mask.sum()) * voxel_ml
    meta.update(
        gain=gain,
        wm_intensity=float(i_wm),
        noise_sigma=float(sigma),
        noise_relative=rel_sigma,
        noise_kind=noise_kind if sigma > 0 else "none",
        lesions=lesion_info,
        lesion_kinds=[i["kind"] for i in lesion_info],
        lesion_volume_ml=float(label.sum()) * voxel_ml,
        n_slices=n_slices,
        slice_offset=k0,
        placement=placement,
        deformed=bool(deform),
        biased=bool(bias),
    )
    return SyntheticCase(image=image, label=label, affine=affine, brain=brain, meta=meta)


# --------------------------------------------------------------------------- cohorts


def _case_seed(seed: int, group: int, index: int) -> int:
    """Independent, reproducible per-case seed (so any case can be regenerated alone)."""
    return int(np.random.SeedSequence([int(seed), group, index]).generate_state(1, dtype=np.uint32)[0])


def _cohort_jobs(n_healthy: int, n_lesion: int, n_lesion_free_test: int,
                 kinds: Sequence[str]) -> List[Tuple[str, str, int, int, Tuple[str, ...]]]:
    """(folder, name, seed group, index, lesion kinds) of every case :func:`make_cohort` writes."""
    jobs = [("healthy", f"healthy_{i:03d}", 0, i, ()) for i in range(n_healthy)]
    for i in range(n_lesion):
        kind = kinds[i % len(kinds)]
        count = 1 if kind != "small" else 2 + i // len(kinds) % 3  # 2-4, deterministic
        jobs.append(("test", f"lesion_{i:03d}", 1, i, (kind,) * count))
    jobs += [("test", f"normal_{i:03d}", 2, i, ()) for i in range(n_lesion_free_test)]
    return jobs


def cohort_case_seeds(seed: int, *, n_healthy: int, n_lesion: int = 0, n_lesion_free_test: int = 0) -> Dict[str, int]:
    """Case name -> the integer seed :func:`make_cohort` gives that case (without writing
    anything), e.g. to check that an evaluation cohort shares no subject with a tuning one.

    Seeds come from ``SeedSequence([seed, group, index])`` (group 0 healthy, 1 lesion,
    2 lesion-free test), so cohorts with different ``seed`` draw from disjoint entropy.
    """
    jobs = _cohort_jobs(n_healthy, n_lesion, n_lesion_free_test, ("bright",))
    return {name: _case_seed(seed, group, index) for _, name, group, index, _ in jobs}


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_cohort(
    output_dir: Union[str, Path],
    *,
    n_healthy: int,
    n_lesion: int = 0,
    lesion_kinds: Sequence[str] = LESION_KINDS,
    n_lesion_free_test: int = 0,
    seed: int = 0,
    resolution_mm: float = 2.0,
    n_slices: Optional[int] = None,
    template: Union[str, Sequence[str]] = "mni152",
    contrast: str = "flair",
    placement: str = "deep",
    bias_model: str = "quadratic",
) -> dict:
    """Write a synthetic cohort as NIfTI files and return its manifest (also manifest.json).

    Layout: ``healthy/healthy_NNN.nii.gz`` (training/calibration subjects),
    ``test/lesion_NNN.nii.gz`` + ``test/lesion_NNN_label.nii.gz`` (lesion kinds cycle
    through ``lesion_kinds``; "small" cases get 2-4 small lesions), and
    ``test/normal_NNN.nii.gz`` + all-zero ``test/normal_NNN_label.nii.gz``. Images are
    float32, labels uint8. One contrast for the whole cohort (default FLAIR, as in the
    paper's BraTS experiments; "random" mixes them). ``template`` is one name of
    :data:`TEMPLATES` or several: case ``i`` of each group (healthy, lesion, lesion-free)
    uses ``template[i % len(template)]``, so the anatomies alternate. ``placement`` as in
    :func:`synthesize_case`. Same arguments, identical files.

    Manifest keys: ``healthy`` (image paths), ``test`` (image paths), ``labels`` (label
    paths, parallel to ``test``), ``cases`` (name -> meta; meta has ``image``, ``label``),
    plus the generation arguments (``template`` as given, ``templates`` always a list).
    Paths are relative to ``output_dir`` (POSIX).
    """
    for name, value in (("n_healthy", n_healthy), ("n_lesion", n_lesion),
                        ("n_lesion_free_test", n_lesion_free_test)):
        if int(value) < 0:
            raise InputError(f"{name} must be >= 0, got {value}")
    kinds = [str(k) for k in lesion_kinds]
    if n_lesion > 0 and not kinds:
        raise InputError("lesion_kinds is empty but n_lesion > 0")
    for k in kinds:
        _as_spec(k)
    if contrast not in CONTRASTS:
        raise InputError(f"unknown contrast {contrast!r}; choose from {', '.join(CONTRASTS)}")
    if placement not in PLACEMENTS:
        raise InputError(f"unknown lesion placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
    if bias_model not in BIAS_MODELS:
        raise InputError(f"unknown bias model {bias_model!r}; choose from {', '.join(BIAS_MODELS)}")
    names = [template] if isinstance(template, str) else [str(t) for t in template]
    if not names:
        raise InputError("no template given")
    tpls = [load_template(t, resolution_mm) for t in names]
    if n_slices is not None:
        for tpl in tpls:
            _central_slab(tpl.brain, n_slices)  # validate before writing anything
    out = Path(output_dir)
    try:
        (out / "healthy").mkdir(parents=True, exist_ok=True)
        (out / "test").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create cohort folder {out}: {exc.strerror or exc}") from exc

    manifest: dict = {
        "generator": "AnomalySegLib.data.synthetic", "format_version": 1, "seed": int(seed),
        "template": template if isinstance(template, str) else list(names), "templates": names,
        "resolution_mm": float(resolution_mm), "n_slices": n_slices,
        "contrast": contrast, "lesion_kinds": kinds, "placement": placement, "bias_model": bias_model,
        "healthy": [], "test": [], "labels": [], "cases": {},
    }
    jobs = _cohort_jobs(n_healthy, n_lesion, n_lesion_free_test, kinds)

    try:
        for folder, name, group, index, lesions in jobs:
            case_seed = _case_seed(seed, group, index)
            case = synthesize_case(tpls[index % len(tpls)], case_seed, lesions=lesions, contrast=contrast,
                                   n_slices=n_slices, placement=placement, bias_model=bias_model)
            image_rel = f"{folder}/{name}.nii.gz"
            _write_nifti(out / image_rel, case.image, case.affine, np.float32)
            meta = dict(case.meta, name=name, image=image_rel)
            if folder == "healthy":
                manifest["healthy"].append(image_rel)
            else:
                label_rel = f"{folder}/{name}_label.nii.gz"
                _write_nifti(out / label_rel, case.label, case.affine, np.uint8)
                manifest["test"].append(image_rel)
                manifest["labels"].append(label_rel)
                meta["label"] = label_rel
            manifest["cases"][name] = meta
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write cohort into {out}: {exc.strerror or exc}") from exc
    return manifest


def add_synthetic_skull(data: np.ndarray, affine: np.ndarray, gap_mm: float = 5.0, ring_mm: float = 5.0,
                        seed: int = 0) -> np.ndarray:
    """A skull-stripped volume with a head around it: a dark gap (bone, ``gap_mm`` thick) and a
    bright ring (scalp fat, ``ring_mm``) outside the brain (``data > 0``), distances in mm.

    For tests and measurements of the input check and brain extraction (data/raw_input.py).
    """
    rng = np.random.default_rng(seed)
    brain = data > 0
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out_dist = ndimage.distance_transform_edt(~brain, sampling=spacing)
    ref = float(np.median(data[brain]))
    out = data.copy()
    gap = (out_dist > 0) & (out_dist <= gap_mm)
    ring = (out_dist > gap_mm) & (out_dist <= gap_mm + ring_mm)
    out[gap] = np.abs(rng.normal(0.04 * ref, 0.02 * ref, int(gap.sum())))
    out[ring] = rng.normal(1.25 * ref, 0.05 * ref, int(ring.sum()))
    return out.astype(np.float32)
