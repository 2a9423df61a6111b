"""Post-processing and the healthy-only operating point, against hand-computed cases."""

import math
import numpy as np
import pytest

from AnomalySegLib.segmentation.calibration import Calibration
from AnomalySegLib.segmentation.postprocess import (
    count_components,
    false_rate_upper_bound,
    min_component_voxels,
    remove_small_components,
    select_operating_percentile,
    smooth_in_mask,
    standardisation_stages,
    standardise_scan,
    threshold_mask,
)
from AnomalySegLib.segmentation import postprocess
from AnomalySegLib.segmentation.segment import segment_heatmap


def test_min_component_voxels_in_physical_units():
    assert min_component_voxels(0.1, 0.008) == 13  # 2 mm voxels: 12.5 -> 13
    assert min_component_voxels(0.1, 0.001) == 100  # 1 mm voxels: exactly 100
    assert min_component_voxels(0.0, 0.008) == 1
    assert min_component_voxels(0.016, 0.008) == 2
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            min_component_voxels(bad, 0.008)
    with pytest.raises(ValueError):
        min_component_voxels(0.1, 0.0)


def _three_blobs() -> np.ndarray:
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[1, 1, 1] = True  # 1 voxel
    mask[5, 5, 5] = mask[6, 6, 6] = True  # 2 voxels, touching by a corner: one 26-component
    mask[10:13, 10:13, 10:12] = True  # 18 voxels
    return mask


def test_remove_small_components_uses_26_connectivity():
    mask = _three_blobs()
    assert count_components(mask) == 3
    assert count_components(mask, 2) == 2
    assert count_components(mask, 3) == 1
    kept = remove_small_components(mask, 2)
    assert kept.sum() == 20 and not kept[1, 1, 1] and kept[5, 5, 5] and kept[6, 6, 6]
    assert remove_small_components(mask, 19).sum() == 0
    np.testing.assert_array_equal(remove_small_components(mask, 1), mask)
    assert count_components(np.zeros((3, 3, 3), bool)) == 0


def test_threshold_mask_is_strict_and_inside_the_brain():
    heat = np.array([[[0.5, 0.6, 0.7, 0.9]]], dtype=np.float32)
    brain = np.array([[[True, True, True, False]]])
    np.testing.assert_array_equal(threshold_mask(heat, brain, 0.6), [[[False, False, True, False]]])
    with pytest.raises(ValueError):
        threshold_mask(heat, brain[..., :2], 0.6)


def _peaks_volume(values) -> np.ndarray:
    """Isolated single-voxel peaks (3 voxels apart) with the given scores, 0 elsewhere."""
    heat = np.zeros((4, 4, 3 * len(values) + 1), dtype=np.float32)
    for n, v in enumerate(values):
        heat[1, 1, 1 + 3 * n] = v
    return heat


def test_operating_percentile_is_lowest_meeting_the_budget():
    # Two healthy volumes; threshold_at(p) = p / 100. Peaks: volume A 0.95, 0.97, 0.99;
    # volume B 0.96. Mean count above t: t < 0.95 -> 2, [0.95, 0.96) -> 1.5, [0.96, 0.97) -> 1,
    # [0.97, 0.99) -> 0.5, >= 0.99 -> 0.
    a, b = _peaks_volume([0.95, 0.97, 0.99]), _peaks_volume([0.96])
    healthy = [(a, np.ones_like(a, bool), 0.008), (b, np.ones_like(b, bool), 0.008)]
    grid = np.round(np.arange(90.0, 100.0, 0.5), 6)
    pct, mean_false = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=90.0,
                                                  min_component_ml=0.0, max_false_components=1.0,
                                                  budget_confidence=0.0)
    assert (pct, mean_false) == (96.0, 1.0)
    pct, mean_false = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=90.0,
                                                  min_component_ml=0.0, max_false_components=0.0,
                                                  budget_confidence=0.0)
    assert (pct, mean_false) == (99.0, 0.0)
    # the start percentile already meets a loose budget
    pct, _ = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=92.0,
                                         min_component_ml=0.0, max_false_components=2.0,
                                         budget_confidence=0.0)
    assert pct == 92.0
    # single-voxel peaks are all below a 2-voxel minimum: nothing is false at the start
    pct, mean_false = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=90.0,
                                                  min_component_ml=0.016, max_false_components=0.0,
                                                  budget_confidence=0.0)
    assert (pct, mean_false) == (90.0, 0.0)


def test_unreachable_budget_returns_highest_candidate_with_its_count():
    heat = _peaks_volume([5.0, 6.0])
    healthy = [(heat, np.ones_like(heat, bool), 0.008)]
    pct, mean_false = select_operating_percentile(healthy, lambda p: p / 100.0, [98.0, 99.0], start_percentile=98.0,
                                                  min_component_ml=0.0, max_false_components=0.5,
                                                  budget_confidence=0.0)
    assert (pct, mean_false) == (99.0, 2.0)


def test_false_rate_upper_bound_is_the_exact_poisson_bound():
    from scipy.stats import poisson

    # zero events: P(X = 0 | n u) = exp(-n u) = 1 - c  ->  u = -ln(1 - c) / n
    assert false_rate_upper_bound(0, 8, 0.9) == pytest.approx(-math.log(0.1) / 8, rel=1e-9)
    # one event: exp(-m) (1 + m) = 0.1 at m = 3.88972 (hand-solved), per volume m / n
    assert false_rate_upper_bound(1, 4, 0.9) == pytest.approx(3.88972 / 4, rel=1e-5)
    for total, n, c in [(4, 8, 0.9), (31, 40, 0.9), (7, 10, 0.75)]:
        u = false_rate_upper_bound(total, n, c)
        assert poisson.cdf(total, n * u) == pytest.approx(1 - c, rel=1e-9)  # the defining equation
    assert false_rate_upper_bound(6, 8, 0.0) == 0.75  # confidence 0: the plain mean
    for bad in [(-1, 8, 0.9), (1, 0, 0.9), (1, 8, 1.0), (1, 8, -0.1)]:
        with pytest.raises(ValueError):
            false_rate_upper_bound(*bad)


def _peak_volumes(counts_above, n_volumes):
    """``n_volumes`` volumes; threshold_at(p) = p / 100. Volume i carries
    ``counts_above[i]`` isolated peaks at 0.95 (so above any threshold < 0.95)."""
    vols = []
    for i in range(n_volumes):
        heat = _peaks_volume([0.95] * counts_above[i] + [0.5])
        vols.append((heat, np.ones_like(heat, bool), 0.008))
    return vols


def test_operating_point_keeps_a_margin_that_shrinks_with_more_volumes():
    grid = [90.0, 96.0]
    # 8 volumes with 5 peaks in all (mean 0.625 <= 1): the 90 % bound is
    # chi2.ppf(0.9, 12) / 16 = 18.549 / 16 = 1.159 > 1, so p90 is refused and p96 (none) taken
    eight = _peak_volumes([1, 1, 1, 1, 1, 0, 0, 0], 8)
    pct, mean_false = select_operating_percentile(eight, lambda p: p / 100.0, grid, start_percentile=90.0,
                                                  min_component_ml=0.0, max_false_components=1.0)
    assert (pct, mean_false) == (96.0, 0.0)
    # 4 peaks (mean 0.5): bound chi2.ppf(0.9, 10) / 16 = 15.987 / 16 = 0.9992 <= 1: kept at p90
    pct, mean_false = select_operating_percentile(_peak_volumes([1, 1, 1, 1, 0, 0, 0, 0], 8), lambda p: p / 100.0,
                                                  grid, start_percentile=90.0, min_component_ml=0.0,
                                                  max_false_components=1.0)
    assert (pct, mean_false) == (90.0, 0.5)
    # the same mean 0.625 on 40 volumes (25 peaks): bound chi2.ppf(0.9, 52) / 80 = 0.818 <= 1
    forty = _peak_volumes([1] * 25 + [0] * 15, 40)
    pct, mean_false = select_operating_percentile(forty, lambda p: p / 100.0, grid, start_percentile=90.0,
                                                  min_component_ml=0.0, max_false_components=1.0)
    assert (pct, mean_false) == (90.0, 0.625)
    # a single volume: one false component is refused (bound 3.89), none is accepted (no data can show better)
    pct, mean_false = select_operating_percentile(_peak_volumes([1], 1), lambda p: p / 100.0, grid,
                                                  start_percentile=90.0, min_component_ml=0.0,
                                                  max_false_components=1.0)
    assert (pct, mean_false) == (96.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        select_operating_percentile(eight, lambda p: p / 100.0, grid, start_percentile=90.0, budget_confidence=1.0)


def test_smooth_in_mask_keeps_constants_at_the_boundary():
    brain = np.zeros((20, 20, 20), dtype=bool)
    brain[4:16, 4:16, 4:16] = True
    heat = np.where(brain, 3.0, 0.0).astype(np.float32)
    out = smooth_in_mask(heat, brain, 2.0, (1.0, 1.0, 2.0))
    np.testing.assert_allclose(out[brain], 3.0, rtol=1e-5)  # normalised convolution: no boundary darkening
    assert not out[~brain].any()
    spike = np.zeros_like(heat)
    spike[10, 10, 10] = 1.0
    smoothed = smooth_in_mask(spike, brain, 1.0, (1.0, 1.0, 1.0))
    assert smoothed[10, 10, 10] < 0.1 and smoothed.sum() == pytest.approx(1.0, rel=1e-3)  # mass is kept
    np.testing.assert_array_equal(smooth_in_mask(heat, brain, 0.0, (1, 1, 1)), heat)


def _random_healthy_maps(seed: int, side: int, n: int = 3) -> list:
    """``n`` uniform-noise "healthy" maps ``(heatmap, whole-volume brain, 2 mm voxel mL)``."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        heat = rng.random((side, side, side)).astype(np.float32)
        maps.append((heat, np.ones(heat.shape, bool), 0.008))
    return maps


def test_calibration_operating_point_round_trip_and_flag():
    maps = _random_healthy_maps(0, 30)
    cal = Calibration.from_healthy_maps(maps, start_percentile=98.0, min_component_ml=0.016,
                                        max_false_components=1.0, n_images=90)
    assert cal.operating_percentile is not None and cal.operating_percentile >= 98.0
    assert cal.false_components_per_volume <= 1.0
    # what the calibration reports is what flagging its own volumes gives
    counts = [count_components(cal.flag(h, b, cal.operating_percentile, voxel_ml=v)[0]) for h, b, v in maps]
    assert np.mean(counts) == pytest.approx(cal.false_components_per_volume)
    back = Calibration.from_dict(cal.to_dict())
    assert (back.operating_percentile, back.min_component_ml, back.max_false_components,
            back.false_components_per_volume) == (cal.operating_percentile, 0.016, 1.0, cal.false_components_per_volume)
    assert back.budget_confidence == cal.budget_confidence == 0.9 and back.meets_budget() is True
    # 3 volumes, 2 components (mean 0.67): bound chi2.ppf(0.9, 6) / 6 = 1.77 > 1 -> not met at 90 %,
    # met under the plain mean of a file calibrated before the margin existed
    back.false_components_per_volume = 2 / 3
    assert back.meets_budget() is False
    back.budget_confidence = None
    assert back.meets_budget() is True
    for wrong in (1.0, -0.5, "0.9"):
        with pytest.raises(ValueError, match="confidence"):
            Calibration.from_dict({**cal.to_dict(), "budget_confidence": wrong})
    with pytest.raises(ValueError, match="voxel_ml"):
        cal.flag(maps[0][0], maps[0][1], 99.0)
    # files written before the operating point existed: no minimum size, method default percentile
    old = cal.to_dict()
    for key in ("operating_percentile", "min_component_ml", "max_false_components", "false_components_per_volume",
                "budget_confidence"):
        del old[key]
    legacy = Calibration.from_dict(old)
    assert legacy.operating_percentile is None and legacy.min_component_ml == 0.0
    assert legacy.default_percentile(95.0) == 95.0 and legacy.meets_budget() is None
    mask, thr = legacy.flag(maps[0][0], maps[0][1], 98.0)
    assert mask.sum() == (maps[0][0] > thr).sum()
    bad = cal.to_dict()
    bad["values"][-1] = float("nan")
    with pytest.raises(ValueError):
        Calibration.from_dict(bad)


def test_segment_heatmap_measures_kept_lesions_in_ml():
    heat = np.zeros((20, 20, 20), dtype=np.float32)
    heat[2:5, 2:5, 2:5] = 5.0  # 27 voxels
    heat[10, 10, 10] = 5.0  # 1 voxel: below the minimum
    brain = np.ones(heat.shape, bool)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cal = Calibration.from_scores(np.linspace(0, 1, 1000), n_images=1, n_volumes=1)
    cal.min_component_ml = 0.1  # 13 voxels of 8 uL
    cal.operating_percentile = 99.0
    result = segment_heatmap(heat, brain, affine, cal, None, fallback_percentile=98.0, model_version="m")
    assert result.percentile == 99.0 and result.threshold == pytest.approx(0.99, abs=1e-3)
    assert len(result.lesions) == 1 and result.lesions[0].voxel_count == 27
    assert result.lesions[0].volume_ml == pytest.approx(27 * 0.008)
    np.testing.assert_allclose(result.lesions[0].centroid_ras, [6.0, 6.0, 6.0])
    assert int(result.mask.sum()) == 27
    report = result.report()
    assert report["min_component_ml"] == 0.1 and report["lesion_count"] == 1
    with pytest.raises(ValueError):
        segment_heatmap(heat, brain, affine, cal, 100.0, fallback_percentile=98.0)


def test_thresholding_path_needs_neither_torch_nor_nibabel():
    """The Slicer GUI process re-thresholds with these modules; Slicer ships neither package."""
    import subprocess
    import sys

    code = ("import sys; import AnomalySegLib.segmentation.calibration, AnomalySegLib.segmentation.postprocess, AnomalySegLib.segmentation.lesions, AnomalySegLib.segmentation.segment; "
            "bad = [m for m in ('torch', 'nibabel') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _scan(seed: int = 0):
    rng = np.random.default_rng(seed)
    heat = rng.gamma(2.0, 0.5, size=(30, 28, 26)).astype(np.float32)
    brain = np.zeros(heat.shape, dtype=bool)
    brain[3:27, 4:24, 2:24] = True
    heat[~brain] = 7.0  # outside the brain: must neither count nor change
    return heat, brain


@pytest.mark.parametrize("mode", ["interdecile", "upper"])
def test_standardise_scan_matches_its_formula_inside_the_brain_only(mode):
    heat, brain = _scan()
    values = heat[brain].astype(np.float64)
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    spread = p90 - p10 if mode == "interdecile" else p90 - p50
    out = standardise_scan(heat.copy(), brain, mode)
    np.testing.assert_allclose(out[brain], (values - p50) / spread, rtol=1e-5, atol=1e-6)
    assert np.all(out[~brain] == 7.0)
    assert np.median(out[brain]) == pytest.approx(0.0, abs=1e-6)
    q = np.percentile(out[brain], [10, 50, 90])
    assert (q[2] - q[0] if mode == "interdecile" else q[2] - q[1]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["interdecile", "upper"])
def test_standardise_scan_removes_a_scan_wide_gain_and_offset(mode):
    """A scan whose scores are all shifted and stretched (another scanner, a bias field's
    global effect) standardises to the same map, so the same healthy threshold fits it."""
    heat, brain = _scan(1)
    moved = heat.copy()
    moved[brain] = 2.5 * heat[brain] + 0.8
    a = standardise_scan(heat.copy(), brain, mode)
    b = standardise_scan(moved, brain, mode)
    np.testing.assert_allclose(a[brain], b[brain], rtol=1e-4, atol=1e-5)
    # and a lesion of 1 % of the brain moves the standardisation of the rest by a few % (upper: 5.8 %)
    lesioned = heat.copy()
    idx = np.flatnonzero(brain.ravel())[: int(0.01 * brain.sum())]
    lesioned.ravel()[idx] += 20.0
    c = standardise_scan(lesioned, brain, mode)
    rest = brain.copy()
    rest.ravel()[idx] = False
    assert np.max(np.abs(c[rest] - a[rest]) / np.maximum(1.0, np.abs(a[rest]))) < 0.07


def test_standardise_scan_off_flat_and_empty():
    heat, brain = _scan(2)
    same = heat.copy()
    assert standardise_scan(same, brain, "off") is same and np.array_equal(same, heat)
    flat = np.where(brain, np.float32(3.0), np.float32(0.0))
    out = standardise_scan(flat, brain, "interdecile")  # no spread: centred, not divided by 0
    assert np.all(out[brain] == 0.0) and np.all(np.isfinite(out))
    empty = np.zeros_like(brain)
    np.testing.assert_array_equal(standardise_scan(heat.copy(), empty, "upper"), heat)
    with pytest.raises(ValueError):
        standardise_scan(heat.copy(), brain, "zscore")


def test_standardise_scan_subsamples_planes_of_very_large_brains(monkeypatch):
    heat, brain = _scan(3)
    exact = standardise_scan(heat.copy(), brain, "interdecile")
    monkeypatch.setattr(postprocess, "STANDARDISE_MAX_VOXELS", int(brain.sum()) // 3)  # every 4th plane
    approx = standardise_scan(heat.copy(), brain, "interdecile")
    assert not np.array_equal(approx, exact)  # the subsample was used ...
    np.testing.assert_allclose(approx[brain], exact[brain], atol=0.05)  # ... and estimates the same


def test_each_scan_normalise_setting_acts_at_one_stage():
    """(model space, voxel grid): terms-* standardise the fused terms, the others the final map."""
    from AnomalySegLib.settings import SCAN_NORMALISATIONS

    assert standardisation_stages("terms-upper") == ("upper", "off")
    assert standardisation_stages("terms-interdecile") == ("interdecile", "off")
    assert standardisation_stages("upper") == ("off", "upper")
    assert standardisation_stages("off") == ("off", "off")
    for setting in SCAN_NORMALISATIONS:  # every setting maps onto modes standardise_scan knows
        for mode in standardisation_stages(setting):
            assert mode in ("off", "interdecile", "upper")


# -- hysteresis (grow_percentile) ------------------------------------------------------------------


def test_grow_into_keeps_whole_26_connected_regions_that_hold_a_seed():
    region = np.zeros((5, 6, 6), bool)
    region[1, 1:4, 1] = True          # region A: a line of 3
    region[2, 4, 2] = True            # diagonal neighbour of A's end (1, 3, 1): 26-connected -> part of A
    region[3:5, 4:6, 4:6] = True      # region B: 8 voxels, no seed
    seeds = np.zeros_like(region)
    seeds[1, 1, 1] = True
    seeds[0, 0, 0] = True             # outside the region: ignored
    got = postprocess.grow_into(seeds, region)
    want = np.zeros_like(region)
    want[1, 1:4, 1] = True
    want[2, 4, 2] = True
    assert np.array_equal(got, want)
    assert not postprocess.grow_into(np.zeros_like(region), region).any()
    seeds[4, 5, 5] = True
    assert np.array_equal(postprocess.grow_into(seeds, region), region)


def test_threshold_mask_with_hysteresis_by_hand():
    heat = np.zeros((1, 1, 12), np.float32)
    heat[0, 0, :] = [0, 0.6, 0.7, 0.95, 0.7, 0.6, 0, 0.6, 0.7, 0.6, 0, 0.99]
    brain = np.ones(heat.shape, bool)
    brain[0, 0, 1] = False
    # plain: the two voxels above 0.9
    assert np.flatnonzero(threshold_mask(heat, brain, 0.9)[0, 0]).tolist() == [3, 11]
    # grown to 0.5: the seed at 3 takes its run 2..5 (voxel 1 is outside the brain); the run 7..9
    # has no seed and stays out; 11 is a seed alone
    assert np.flatnonzero(threshold_mask(heat, brain, 0.9, grow_threshold=0.5)[0, 0]).tolist() == [2, 3, 4, 5, 11]
    # the minimum size acts on the grown regions: the 4-voxel region stays, the single voxel goes
    assert np.flatnonzero(threshold_mask(heat, brain, 0.9, 2, grow_threshold=0.5)[0, 0]).tolist() == [2, 3, 4, 5]
    # a growth threshold at or above the threshold changes nothing
    for g in (0.9, 0.95):
        assert np.array_equal(threshold_mask(heat, brain, 0.9, grow_threshold=g), threshold_mask(heat, brain, 0.9))


def test_operating_point_counts_false_components_on_grown_masks():
    # One healthy volume: two single-voxel peaks 0.97 and 0.99 on one plateau of 0.6 (4 voxels
    # between them), and a lone peak 0.98 elsewhere. threshold_at(p) = p / 100, growth to 0.5.
    heat = np.zeros((1, 1, 20), np.float32)
    heat[0, 0, 2:8] = 0.6
    heat[0, 0, 2], heat[0, 0, 7] = 0.97, 0.99
    heat[0, 0, 15] = 0.98
    healthy = [(heat, np.ones(heat.shape, bool), 0.008)]
    grid = [96.0, 97.5, 98.5, 99.5]
    # plain thresholds: 3 components at p96, 2 at p97.5, 1 at p98.5, 0 at p99.5
    plain = [select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=96.0,
                                         min_component_ml=0.0, max_false_components=m, budget_confidence=0.0)
             for m in (2.0, 1.0)]
    assert plain == [(97.5, 2.0), (98.5, 1.0)]
    # grown: the two plateau peaks are one component (2 at p96), and a 2-voxel minimum (0.016 mL)
    # keeps the grown plateau (6 voxels) but drops the lone peak -> 1 component up to p99.5
    grown = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=96.0,
                                        min_component_ml=0.0, max_false_components=2.0, budget_confidence=0.0,
                                        grow_threshold=0.5)
    assert grown == (96.0, 2.0)
    grown = select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=96.0,
                                        min_component_ml=0.016, max_false_components=0.0, budget_confidence=0.0,
                                        grow_threshold=0.5)
    assert grown == (99.5, 0.0)
    # without growth the same minimum drops every single-voxel peak: budget 0 met at once
    assert select_operating_percentile(healthy, lambda p: p / 100.0, grid, start_percentile=96.0,
                                       min_component_ml=0.016, max_false_components=0.0,
                                       budget_confidence=0.0) == (96.0, 0.0)


def test_calibration_grow_percentile_round_trip_flag_and_legacy():
    maps = _random_healthy_maps(1, 24)
    cal = Calibration.from_healthy_maps(maps, start_percentile=99.0, min_component_ml=0.016,
                                        max_false_components=1.0, grow_percentile=97.0, n_images=72)
    assert cal.grow_percentile == 97.0 and cal.grow_threshold() == pytest.approx(cal.threshold(97.0))
    pct = cal.operating_percentile
    h, b, v = maps[0]
    mask, thr = cal.flag(h, b, pct, voxel_ml=v)
    want = threshold_mask(h, b, thr, 2, grow_threshold=cal.threshold(97.0))
    assert np.array_equal(mask, want) and mask.sum() >= threshold_mask(h, b, thr, 2).sum()
    # the reported rate is the grown masks' count
    counts = [count_components(cal.flag(hh, bb, pct, voxel_ml=vv)[0]) for hh, bb, vv in maps]
    assert np.mean(counts) == pytest.approx(cal.false_components_per_volume)
    back = Calibration.from_dict(cal.to_dict())
    assert back.grow_percentile == 97.0
    assert np.array_equal(back.flag(h, b, pct, voxel_ml=v)[0], mask)
    legacy = cal.to_dict()
    del legacy["grow_percentile"]
    assert Calibration.from_dict(legacy).grow_percentile is None
    for wrong in (100.0, 0.0, "97"):
        with pytest.raises(ValueError):
            Calibration.from_dict({**cal.to_dict(), "grow_percentile": wrong})


def test_grown_mask_contains_the_plain_mask():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for _ in range(5):
        h = ndimage.gaussian_filter(rng.random((12, 12, 12)), 1.0)
        brain = rng.random(h.shape) > 0.1
        t, g = np.percentile(h, 97), np.percentile(h, 80)
        plain, grown = threshold_mask(h, brain, t), threshold_mask(h, brain, t, grow_threshold=g)
        assert plain.any() and not (plain & ~grown).any() and grown.sum() > plain.sum()
        assert not (grown & ~brain).any() and (h[grown] > g).all()
