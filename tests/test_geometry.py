"""Geometry convention: LPS<->RAS, ITK geometry, canonical axial reorientation."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from AnomalySegLib.io.geometry import (
    LPS_TO_RAS,
    affine_from_itk,
    canonical_reorientation,
    itk_from_affine,
    lps_to_ras,
    ras_to_lps,
    voxel_volume_ml,
)
from conftest import rotation_matrix


def _oblique_affine(axes=np.eye(3), spacing=(0.9, 1.3, 3.0), angles=(20.0, 10.0, 5.0), origin=(12.5, -30.0, 7.0)):
    a = np.eye(4)
    a[:3, :3] = rotation_matrix(*angles) @ axes * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def test_lps_ras_flip_x_and_y_only():
    a = _oblique_affine()
    lps = ras_to_lps(a)
    np.testing.assert_array_equal(lps[0], -a[0])
    np.testing.assert_array_equal(lps[1], -a[1])
    np.testing.assert_array_equal(lps[2:], a[2:])
    np.testing.assert_array_equal(lps_to_ras(lps), a)
    np.testing.assert_array_equal(LPS_TO_RAS, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_affine_from_itk_matches_sitk_physical_points():
    img = sitk.Image(7, 5, 4, sitk.sitkUInt8)
    direction = rotation_matrix(20, 10, -30)  # columns: LPS direction of i, j, k
    img.SetDirection(tuple(direction.ravel()))
    img.SetSpacing((0.9, 1.3, 3.0))
    img.SetOrigin((10.0, -20.0, 5.5))
    aff = affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (6, 4, 3), (2.5, 1.25, 0.5)]:
        lps = np.array(img.TransformContinuousIndexToPhysicalPoint(ijk))
        ras = aff @ np.r_[ijk, 1.0]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_itk_from_affine_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(20):
        axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        a = _oblique_affine(axes=axes, spacing=rng.uniform(0.3, 5, 3), origin=rng.uniform(-200, 200, 3))
        origin, spacing, direction = itk_from_affine(a)
        assert len(direction) == 9 and len(spacing) == 3 and len(origin) == 3
        np.testing.assert_allclose(affine_from_itk(origin, spacing, direction), a, rtol=0, atol=1e-12)
        # The direction ITK gets is orthonormal for an orthogonal grid.
        d = np.reshape(direction, (3, 3))
        np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)


def test_voxel_volume_ml():
    assert voxel_volume_ml(np.diag([2.0, 3.0, 4.0, 1.0])) == pytest.approx(0.024)
    assert voxel_volume_ml(_oblique_affine()) == pytest.approx(0.9 * 1.3 * 3.0 / 1000)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ _oblique_affine()
    assert voxel_volume_ml(flipped) == pytest.approx(0.9 * 1.3 * 3.0 / 1000)


def _all_orientations():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([1.0, -1.0], repeat=3):
            axes = np.zeros((3, 3))
            for index_axis, world_axis in enumerate(perm):
                axes[world_axis, index_axis] = flips[index_axis]
            yield perm, flips, axes


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (20.0, 10.0, 0.0), (-25.0, 15.0, 30.0)])
def test_canonical_reorientation_all_48_orientations(angles):
    shape = (3, 4, 5)
    values = np.arange(np.prod(shape)).reshape(shape)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    count = 0
    for _, _, axes in _all_orientations():
        aff = _oblique_affine(axes=axes, angles=angles)
        reo = canonical_reorientation(aff, shape)
        can = reo.to_canonical(values)
        assert can.shape == reo.canonical_shape(shape) == reo.canonical_shape()
        np.testing.assert_array_equal(reo.from_canonical(can), values)  # exact inverse
        assert reo.from_canonical(can.astype(np.float32)).dtype == np.float32
        # Same physical space: every voxel keeps its world position.
        caff = reo.canonical_affine(aff)
        world = ijk @ aff[:3, :3].T + aff[:3, 3]
        cijk = np.stack(np.meshgrid(*[np.arange(n) for n in can.shape], indexing="ij"), -1).reshape(-1, 3)
        cworld = cijk @ caff[:3, :3].T + caff[:3, 3]
        order = can.reshape(-1)  # value v sits at original flat index v
        np.testing.assert_allclose(cworld, world[order], atol=1e-9)
        # Canonical axis 0 ~ +R, 1 ~ +A, 2 ~ +S.
        for axis in range(3):
            col = caff[:3, axis]
            assert np.argmax(np.abs(col)) == axis and col[axis] > 0
        count += 1
    assert count == 48


def test_canonical_affine_needs_shape_when_not_stored():
    aff = _oblique_affine(axes=np.diag([-1.0, 1.0, 1.0]))
    reo = canonical_reorientation(aff)
    with pytest.raises(ValueError):
        reo.canonical_affine(aff)
    np.testing.assert_allclose(
        reo.canonical_affine(aff, (4, 5, 6)), canonical_reorientation(aff, (4, 5, 6)).canonical_affine(aff)
    )


def test_reorientation_rejects_wrong_shape():
    reo = canonical_reorientation(_oblique_affine(), (3, 4, 5))
    with pytest.raises(ValueError):
        reo.to_canonical(np.zeros((4, 3, 5)))
