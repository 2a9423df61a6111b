"""Healthy-only calibration: quantile table, inverse, serialisation, real model scores."""

import numpy as np
import pytest

from AnomalySegLib.pipeline.calibrate import calibrate_prepared
from AnomalySegLib.segmentation.calibration import TABLE_PERCENTILES, Calibration
from AnomalySegLib.errors import InputError


def test_threshold_matches_numpy_percentile():
    scores = np.random.default_rng(0).gamma(2.0, 1.5, size=50_000)
    cal = Calibration.from_scores(scores, n_images=10, n_volumes=2)
    for p in (50.0, 90.0, 95.0, 98.0, 99.5, 99.95):
        assert cal.threshold(p) == pytest.approx(np.percentile(scores, p), rel=1e-6)
    # between table entries the threshold is interpolated linearly
    mid = 0.5 * (np.percentile(scores, 98.0) + np.percentile(scores, 98.1))
    assert cal.threshold(98.05) == pytest.approx(mid, rel=1e-9)
    # exceedance on the calibration scores is 1 - p/100
    assert np.mean(scores > cal.threshold(98.0)) == pytest.approx(0.02, abs=1e-3)


def test_percentile_of_inverts_threshold():
    scores = np.random.default_rng(1).normal(size=20_000)
    cal = Calibration.from_scores(scores, n_images=1, n_volumes=1)
    for p in (10.0, 50.0, 97.3, 99.0):
        assert cal.percentile_of(cal.threshold(p)) == pytest.approx(p, abs=1e-6)
    assert cal.percentile_of(scores.max() + 10) == 100.0
    assert cal.percentile_of(scores.min() - 10) == 0.0


def test_round_trip_and_validation():
    cal = Calibration.from_scores(np.arange(1000.0), n_images=3, n_volumes=1, source="x")
    back = Calibration.from_dict(cal.to_dict())
    np.testing.assert_array_equal(back.values, cal.values)
    np.testing.assert_array_equal(back.percentiles, TABLE_PERCENTILES)
    assert (back.n_pixels, back.n_images, back.n_volumes, back.source) == (1000, 3, 1, "x")
    bad = cal.to_dict()
    bad["values"] = bad["values"][::-1]
    with pytest.raises(ValueError):
        Calibration.from_dict(bad)
    with pytest.raises(ValueError):
        cal.threshold(101.0)
    with pytest.raises(InputError):
        Calibration.from_scores(np.array([]), n_images=0, n_volumes=0)


def test_calibrate_prepared_uses_brain_voxels_of_the_thresholded_map(tiny_model, healthy_volumes):
    from AnomalySegLib.pipeline.inference import score_volume, threshold_scores
    from AnomalySegLib.data.preprocessing import prepare_volume

    volumes = healthy_volumes[:2]
    prepared = [prepare_volume(v, tiny_model.preprocessing) for v in volumes]
    cal = calibrate_prepared(tiny_model, prepared, device="cpu")
    scored = [score_volume(tiny_model, v, device="cpu") for v in volumes]
    voxels = np.concatenate([s.heatmap[s.brain_mask] for s in scored])
    assert cal.n_pixels == voxels.size
    assert cal.n_volumes == 2 and cal.n_images == sum(len(p.images) for p in prepared)
    assert cal.threshold(98.0) == pytest.approx(np.percentile(voxels, 98.0), rel=1e-5)
    # the table alone (no minimum lesion size): what segmentation flags on the calibration
    # volumes is exactly 2 % of their brain voxels
    cal.min_component_ml = 0.0
    tiny_model.calibration = cal
    flagged = sum(int(threshold_scores(s, tiny_model, percentile=98.0).mask.sum()) for s in scored)
    assert flagged / voxels.size == pytest.approx(0.02, abs=0.002)


def test_scoring_without_the_input_voxels_gives_the_same_map(tiny_model, healthy_volumes):
    """``segment`` frees the input's voxels before the full-size map is built (memory):
    scoring a prepared volume against the grid alone must give the identical map."""
    from AnomalySegLib.data.preprocessing import prepare_volume
    from AnomalySegLib.pipeline.inference import score_prepared_volume, score_volume

    volume = healthy_volumes[0]
    whole = score_volume(tiny_model, volume, device="cpu")
    grid = volume.grid_only()
    assert not np.asarray(grid.data).any() and grid.data.strides == (0, 0, 0)  # no voxels held
    lean = score_prepared_volume(tiny_model, prepare_volume(volume, tiny_model.preprocessing), grid, device="cpu")
    np.testing.assert_array_equal(lean.heatmap, whole.heatmap)
    np.testing.assert_array_equal(lean.brain_mask, whole.brain_mask)
    np.testing.assert_array_equal(lean.volume.affine, volume.affine)
