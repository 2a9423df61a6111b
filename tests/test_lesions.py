"""Lesion components measured in physical units."""

import numpy as np
import pytest

from AnomalySegLib.segmentation.lesions import find_lesions


def test_components_volumes_and_centroids_anisotropic():
    mask = np.zeros((20, 20, 10), dtype=np.uint8)
    mask[2:5, 2:5, 2:4] = 1  # 18 voxels
    mask[10:16, 10:12, 5:6] = 1  # 12 voxels
    mask[18, 18, 8] = 1  # 1 voxel
    mask[5, 5, 4] = 1  # touches the first blob only diagonally -> same 26-connected component
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    heat = np.zeros(mask.shape, dtype=np.float32)
    heat[3, 3, 3] = 7.0
    lesions = find_lesions(mask, affine, heat)
    assert [l.voxel_count for l in lesions] == [19, 12, 1]
    voxel_ml = 0.5 * 2.0 * 3.0 / 1000.0
    assert lesions[0].volume_ml == pytest.approx(19 * voxel_ml)
    assert lesions[1].volume_ml == pytest.approx(12 * voxel_ml)
    # centroid of the 6x2x1 block: index (12.5, 10.5, 5) -> RAS
    assert lesions[1].centroid_ras == pytest.approx((10 + 0.5 * 12.5, -20 + 2 * 10.5, 5 + 3 * 5))
    assert lesions[0].max_score == pytest.approx(7.0)
    assert lesions[1].max_score == 0.0
    assert find_lesions(np.zeros((3, 3, 3)), np.eye(4)) == []


def test_volume_uses_oblique_affine_determinant():
    mask = np.ones((2, 2, 2), dtype=bool)
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 2.0, 4.0])
    (lesion,) = find_lesions(mask, affine)
    assert lesion.volume_ml == pytest.approx(8 * 8.0 / 1000.0)
