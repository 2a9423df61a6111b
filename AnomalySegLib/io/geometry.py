"""The one geometry convention of AnomalySeg.

A :class:`~AnomalySegLib.io.volume_io.Volume` carries a 4x4 ``affine`` that maps a voxel
index ``(i, j, k)`` to **RAS** millimetres (+x Right, +y Anterior, +z Superior), the
nibabel convention. ITK, NRRD and DICOM describe geometry in **LPS**; readers and
writers convert with the functions here and nowhere else.

Axial slicing works on a *canonical* view of the voxel array obtained by permuting and
flipping axes only (no resampling), so that axis 0 points closest to Right, axis 1
closest to Anterior and axis 2 closest to Superior. The inverse is exact, so anything
computed in the canonical view lands on the input's own voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def _nio():
    """nibabel's orientation helpers, imported on first use: the Slicer GUI process
    thresholds and measures lesions through this module without needing nibabel."""
    from nibabel import orientations

    return orientations

#: Left-Posterior-Superior <-> Right-Anterior-Superior (its own inverse).
LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)


def _as_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {a.shape}")
    return a


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a voxel->LPS affine into the voxel->RAS affine of the same grid."""
    return LPS_TO_RAS @ _as_affine(affine)


def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """Convert a voxel->RAS affine into the voxel->LPS affine of the same grid."""
    return LPS_TO_RAS @ _as_affine(affine)


def affine_from_itk(
    origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """Voxel->RAS affine of an ITK image.

    ``origin`` (LPS mm), ``spacing`` (mm) and ``direction`` (3x3 row-major, flattened as
    SimpleITK's ``GetDirection()`` returns it; column ``c`` is the LPS direction of index
    axis ``c``) are ITK's description of a 3D image.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return lps_to_ras(lps)


def itk_from_affine(
    affine: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK ``(origin, spacing, direction_flat)`` (LPS) of a voxel->RAS affine.

    Inverse of :func:`affine_from_itk`; feed the result to ``SetOrigin``,
    ``SetSpacing`` and ``SetDirection`` of a SimpleITK image.
    """
    lps = ras_to_lps(affine)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    direction = m / spacing[None, :]
    return (
        tuple(float(v) for v in lps[:3, 3]),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(_as_affine(affine)[:3, :3])) / 1000.0)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each index axis (column norms of the 3x3 part)."""
    return np.linalg.norm(_as_affine(affine)[:3, :3], axis=0)


@dataclass(frozen=True)
class AxisReorientation:
    """Permutation + flips that bring a voxel array to the canonical (RAS-closest) view.

    ``ornt`` is nibabel's orientation array as a tuple of ``(target_axis, flip)`` per
    input axis (flip is +1 or -1). ``shape`` is the input array shape when known; it
    is needed for :meth:`canonical_affine` (a flip moves the origin by the axis length)
    and is used to check the arrays passed in.
    """

    ornt: tuple[tuple[int, int], ...]
    shape: Optional[tuple[int, int, int]] = None

    @property
    def _ornt(self) -> np.ndarray:
        return np.asarray(self.ornt, dtype=np.float64)

    @property
    def _inverse_ornt(self) -> np.ndarray:
        # Canonical axis c came from input axis i with the same flip.
        inv = np.zeros((3, 2))
        for i, (target, flip) in enumerate(self.ornt):
            inv[target] = (i, flip)
        return inv

    @property
    def is_identity(self) -> bool:
        """True when the array is already canonical (no permutation, no flip)."""
        return self.ornt == ((0, 1), (1, 1), (2, 1))

    def _check(self, shape: tuple[int, ...], expected: Optional[tuple[int, ...]], what: str) -> None:
        if len(shape) != 3:
            raise ValueError(f"{what}: expected a 3D array, got shape {shape}")
        if expected is not None and tuple(shape) != tuple(expected):
            raise ValueError(f"{what}: array shape {tuple(shape)} != expected {tuple(expected)}")

    def canonical_shape(self, shape: Optional[Sequence[int]] = None) -> tuple[int, int, int]:
        """Shape of the canonical array for an input of ``shape`` (default: stored shape)."""
        shape = self._shape(shape)
        out = [0, 0, 0]
        for i, (target, _) in enumerate(self.ornt):
            out[target] = int(shape[i])
        return tuple(out)  # type: ignore[return-value]

    def _shape(self, shape: Optional[Sequence[int]]) -> tuple[int, int, int]:
        if shape is None:
            if self.shape is None:
                raise ValueError("input shape unknown: pass shape= or build with canonical_reorientation(affine, shape)")
            return self.shape
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Reorient a 3D array (any dtype) to the canonical view.

        Returns a C-contiguous array; it is the input itself when the orientation is
        already canonical and the input is contiguous (copy it before writing into it).
        """
        array = np.asarray(array)
        self._check(array.shape, self.shape, "to_canonical")
        return np.ascontiguousarray(_nio().apply_orientation(array, self._ornt))

    def canonical_view(self, array: np.ndarray) -> np.ndarray:
        """A view of an input-order array in the canonical order (no copy): writing into it
        fills ``array`` (how results are put back on the input grid without a second copy)."""
        self._check(array.shape, self.shape, "canonical_view")
        view = _nio().apply_orientation(array, self._ornt)
        if not np.shares_memory(view, array):  # pragma: no cover - nibabel returns views
            raise RuntimeError("canonical_view: reorientation made a copy")
        return view

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_canonical` (back to the input's index order)."""
        array = np.asarray(array)
        expected = self.canonical_shape() if self.shape is not None else None
        self._check(array.shape, expected, "from_canonical")
        return np.ascontiguousarray(_nio().apply_orientation(array, self._inverse_ornt))

    def canonical_affine(self, affine: np.ndarray, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        """Voxel->RAS affine of the canonical array (same physical space as ``affine``).

        ``shape`` is the input array shape (default: the stored one).
        """
        affine = _as_affine(affine)
        return affine @ _nio().inv_ornt_aff(self._ornt, self._shape(shape))


def canonical_reorientation(affine: np.ndarray, shape: Optional[Sequence[int]] = None) -> AxisReorientation:
    """The axis permutation/flips that make a voxel array closest to RAS (no resampling).

    After :meth:`AxisReorientation.to_canonical`, axis 0 is the index axis closest to
    Right, axis 1 closest to Anterior and axis 2 closest to Superior, so axial slices
    are ``array[:, :, k]``. Pass ``shape`` (the array shape) to be able to call
    :meth:`AxisReorientation.canonical_affine` without it.
    """
    ornt = _nio().io_orientation(_as_affine(affine))
    if np.isnan(ornt).any():
        raise ValueError("affine is degenerate: cannot find the closest RAS axes")
    # io_orientation gives each index axis's closest world axis; the transform from
    # that orientation to RAS is the permutation + flips we apply.
    ornt = _nio().ornt_transform(ornt, _nio().axcodes2ornt(("R", "A", "S")))
    as_tuple = tuple((int(t), int(f)) for t, f in ornt)
    shp = None if shape is None else tuple(int(s) for s in shape)
    if shp is not None and len(shp) != 3:
        raise ValueError(f"expected a 3D shape, got {shp}")
    return AxisReorientation(ornt=as_tuple, shape=shp)  # type: ignore[arg-type]
