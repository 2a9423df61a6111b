"""Intensity-threshold baseline: scores, healthy-only calibration, evaluation through the harness."""

from __future__ import annotations

import numpy as np
import pytest

from AnomalySegLib.evaluation import harness as ev
from AnomalySegLib.pipeline.baselines import IntensityBaseline
from AnomalySegLib.errors import InputError
from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume, to_volume_grid
from AnomalySegLib.data.synthetic import load_template, synthesize_case
from AnomalySegLib.io.volume_io import Volume

CFG = PreprocessConfig(image_size=64)


@pytest.fixture(scope="module")
def cohort():
    tpl = load_template("mni152", 4.0)

    def vol(seed, lesions=()):
        case = synthesize_case(tpl, seed, lesions=lesions, contrast="flair", n_slices=10)
        return Volume(case.image, case.affine), case.label

    healthy = [vol(s)[0] for s in range(3)]
    bright = vol(100, ["bright"])
    dark = vol(101, ["dark"])
    return healthy, bright, dark


def _healthy_pixels(volumes):
    prepared = [prepare_volume(v, CFG) for v in volumes]
    return np.concatenate([p.images[p.masks] for p in prepared])


def test_bright_scores_are_the_preprocessed_intensity(cohort):
    healthy, (lesion, _), _ = cohort
    base = IntensityBaseline("bright", CFG)
    prepared = prepare_volume(lesion, CFG)
    np.testing.assert_array_equal(base.score_prepared(prepared), np.where(prepared.masks, prepared.images, 0))
    scores = base.score_volume(lesion)
    expected = to_volume_grid(np.where(prepared.masks, prepared.images, 0), prepared, order=1)
    expected[~scores.brain_mask] = 0
    np.testing.assert_allclose(scores.heatmap, expected, atol=1e-6)
    assert scores.heatmap.shape == lesion.data.shape and not scores.heatmap[~scores.brain_mask].any()


def _healthy_voxel_scores(base, volumes):
    """The scorer's own maps on each volume's voxel grid, inside its brain mask."""
    out = []
    for v in volumes:
        scores = base.score_volume(v)
        out.append(scores.heatmap[scores.brain_mask])
    return np.concatenate(out)


def test_calibration_is_a_percentile_of_healthy_scores(cohort):
    healthy, _, _ = cohort
    bright = IntensityBaseline("bright", CFG).fit(healthy)
    voxels = _healthy_voxel_scores(bright, healthy)
    assert bright.calibration.n_volumes == 3 and bright.calibration.n_pixels == voxels.size
    for pct in (50.0, 95.0, 98.0):
        assert bright.threshold(pct) == pytest.approx(np.percentile(voxels, pct), rel=1e-6)
    # p98 flags 2 % of the calibration volumes' brain voxels, with predict_mask's own rule
    flagged = sum(int(bright.predict_mask(bright.score_volume(v), 98.0)[0].sum()) for v in healthy)
    assert flagged / voxels.size == pytest.approx(0.02, abs=0.003)

    absolute = IntensityBaseline("abs", CFG).fit(healthy[1:], reference=healthy[:1])
    median = np.median(_healthy_pixels(healthy[:1]))
    assert absolute.healthy_median == pytest.approx(median)
    dev = _healthy_voxel_scores(absolute, healthy[1:])
    assert absolute.threshold(98.0) == pytest.approx(np.percentile(dev, 98.0), rel=1e-5)
    dark = IntensityBaseline("dark", CFG).fit(healthy)
    assert dark.threshold(99.0) == pytest.approx(
        np.percentile(_healthy_voxel_scores(dark, healthy), 99.0), rel=1e-5, abs=1e-7)


def test_predict_mask_rule_and_round_trip(cohort):
    healthy, (lesion, _), _ = cohort
    base = IntensityBaseline("abs", CFG).fit(healthy)
    scores = base.score_volume(lesion)
    mask, thr = base.predict_mask(scores, 97.0)
    assert thr == pytest.approx(base.calibration.threshold(97.0))
    # the one rule: brain voxels above the threshold, minus blobs under the minimum lesion volume
    from AnomalySegLib.io.geometry import voxel_volume_ml
    from AnomalySegLib.segmentation.postprocess import min_component_voxels, remove_small_components

    raw = (scores.heatmap > thr) & scores.brain_mask
    min_voxels = min_component_voxels(base.calibration.min_component_ml, voxel_volume_ml(lesion.affine))
    assert base.calibration.min_component_ml > 0 and min_voxels > 1
    np.testing.assert_array_equal(mask, remove_small_components(raw, min_voxels))
    copy = IntensityBaseline.from_dict(base.to_dict())
    assert copy.version == base.version and copy.threshold(97.0) == pytest.approx(thr)
    assert copy.name == "intensity-abs" and base.version.split("/")[1] == "intensity-abs"


def test_unfitted_baseline_errors(cohort):
    _, (lesion, _), _ = cohort
    with pytest.raises(InputError):
        IntensityBaseline("bright", CFG).threshold()
    with pytest.raises(InputError):
        IntensityBaseline("dark", CFG).score_volume(lesion)
    with pytest.raises(InputError):
        IntensityBaseline("bright", CFG).fit([])
    with pytest.raises(ValueError):
        IntensityBaseline("sideways", CFG)


def test_baseline_through_the_harness(cohort, tmp_path):
    import nibabel as nib

    healthy, bright, dark = cohort
    paths = []
    for name, (vol, label) in (("bright", bright), ("dark", dark)):
        nib.save(nib.Nifti1Image(vol.data, vol.affine), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), vol.affine), str(tmp_path / f"{name}_label.nii.gz"))
        paths.append((tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_label.nii.gz"))
    bright_base = IntensityBaseline("bright", CFG).fit(healthy)
    abs_base = IntensityBaseline("abs", CFG).fit(healthy)
    r_bright = ev.evaluate_model(bright_base, [paths[0][0]], [paths[0][1]])
    r_dark_b = ev.evaluate_model(bright_base, [paths[1][0]], [paths[1][1]])
    r_dark_a = ev.evaluate_model(abs_base, [paths[1][0]], [paths[1][1]])
    assert r_bright["method"] == "intensity" and r_bright["calibrated"]
    # A bright FLAIR lesion is separable by intensity; a dark one is not, unless |x - median| is used.
    assert r_bright["pooled"]["auroc"] > 0.9
    assert r_bright["detection"]["n_detected"] == r_bright["detection"]["n_lesions"] == 1
    assert r_dark_b["pooled"]["auroc"] < 0.5 < r_dark_a["pooled"]["auroc"]


def test_zscore_baseline_is_the_position_normalised_intensity(cohort):
    from AnomalySegLib.model.position_stats import PositionStats

    healthy, (lesion, label), (dark, dark_label) = cohort
    base = IntensityBaseline("zscore", CFG).fit(healthy[:1], reference=healthy[1:])
    prepared = [prepare_volume(v, CFG) for v in healthy[1:]]
    stats = PositionStats.fit([p.images for p in prepared], [p.masks for p in prepared],
                              [p.slice_indices for p in prepared])
    np.testing.assert_allclose(base.position_stats.mean, stats.mean)
    case = prepare_volume(lesion, CFG)
    expected = np.abs(stats.normalise(case.images, case.masks, case.slice_indices))
    np.testing.assert_allclose(base.score_prepared(case), expected, rtol=1e-6)
    # both directions: the bright and the dark lesion score above the healthy brain
    for volume, truth in ((lesion, label), (dark, dark_label)):
        scores = base.score_volume(volume)
        inside = truth.astype(bool) & scores.brain_mask
        outside = scores.brain_mask & ~truth.astype(bool)
        assert np.median(scores.heatmap[inside]) > np.percentile(scores.heatmap[outside], 90)
    back = IntensityBaseline.from_dict(base.to_dict())
    np.testing.assert_array_equal(back.position_stats.std, base.position_stats.std)
    with pytest.raises(InputError, match="not fitted"):
        IntensityBaseline("zscore", CFG).score_prepared(case)


def test_baseline_with_scan_standardisation_calibrates_standardised_scores(cohort):
    """The model's scan standardisation is also available to the baseline (equal post-processing)."""
    from AnomalySegLib.segmentation.postprocess import standardise_scan

    healthy, (lesion, _), _ = cohort
    plain = IntensityBaseline("bright", CFG).fit(healthy)
    std = IntensityBaseline("bright", CFG, scan_normalise="interdecile").fit(healthy)
    scores = std.score_volume(lesion)
    expected = plain.score_volume(lesion).heatmap
    standardise_scan(expected, scores.brain_mask, "interdecile")
    np.testing.assert_allclose(scores.heatmap, expected, rtol=1e-5, atol=1e-6)
    voxels = np.concatenate([std.score_volume(v).heatmap[std.score_volume(v).brain_mask] for v in healthy])
    assert std.threshold(98.0) == pytest.approx(np.percentile(voxels, 98.0), rel=1e-5)
    back = IntensityBaseline.from_dict(std.to_dict())
    assert back.scan_normalise == "interdecile" and back.version == std.version != plain.version
    legacy = plain.to_dict()
    legacy.pop("scan_normalise")
    assert IntensityBaseline.from_dict(legacy).version == plain.version  # older descriptions: off, same digest
    with pytest.raises(ValueError, match="scan_normalise"):
        IntensityBaseline("bright", CFG, scan_normalise="zscore")


def test_baseline_mask_growth_is_the_models_rule(cohort):
    """grow_percentile reaches the baseline's calibration and masks (equal post-processing)."""
    from AnomalySegLib.segmentation.postprocess import threshold_mask

    healthy, (lesion, _), _ = cohort
    plain = IntensityBaseline("bright", CFG).fit(healthy)
    grown = IntensityBaseline("bright", CFG, grow_percentile=95.0).fit(healthy)
    assert plain.calibration.grow_percentile is None and grown.calibration.grow_percentile == 95.0
    scores = grown.score_volume(lesion)
    mask, thr = grown.predict_mask(scores, 99.5)
    voxel_ml = float(np.prod(np.abs(np.diag(lesion.affine)[:3]))) / 1000.0
    from AnomalySegLib.segmentation.postprocess import min_component_voxels

    n = min_component_voxels(grown.calibration.min_component_ml, voxel_ml)
    assert np.array_equal(mask, threshold_mask(scores.heatmap, scores.brain_mask, thr, n,
                                               grow_threshold=grown.threshold(95.0)))
    back = IntensityBaseline.from_dict(grown.to_dict())
    assert back.grow_percentile == 95.0 and back.calibration.grow_percentile == 95.0
    legacy = plain.to_dict()
    legacy.pop("grow_percentile")
    assert IntensityBaseline.from_dict(legacy).grow_percentile == 0.0
    with pytest.raises(ValueError, match="grow percentile"):
        IntensityBaseline("bright", CFG, grow_percentile=100.0)


def test_a_baseline_like_a_model_takes_its_post_processing_and_rule():
    import types

    from AnomalySegLib.data.preprocessing import PreprocessConfig
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.pipeline.baselines import IntensityBaseline

    method = MethodParams.from_dict({**MethodParams.defaults("dae").to_dict(), "bias_flatten": "all",
                                     "bias_field": "spline", "grow_percentile": 99.5, "smoothing_mm": 3.0})
    calibration = types.SimpleNamespace(min_component_ml=0.25, max_false_components=0.5)
    model = types.SimpleNamespace(preprocessing=PreprocessConfig(image_size=64), method=method, calibration=calibration)
    base = IntensityBaseline.like_model(model, "dark")
    assert (base.mode, base.preprocessing.image_size, base.smoothing_mm, base.scan_normalise, base.grow_percentile) == \
        ("dark", 64, 3.0, method.scan_normalise, 99.5)
    assert (base.bias_flatten, base.bias_field, base.min_component_ml, base.max_false_components) == \
        (True, "spline", 0.25, 0.5)
    assert base.default_percentile == method.default_percentile
    # an uncalibrated model: the library's default budget and minimum volume, flattening off with the model's
    model.calibration = None
    model.method = MethodParams.defaults("amcons")
    plain = IntensityBaseline.like_model(model)
    assert not plain.bias_flatten and plain.min_component_ml == IntensityBaseline().min_component_ml
