"""Position-dependent healthy statistics: fitted moments, z-scores, serialisation, model file."""

import numpy as np
import pytest
import torch

from AnomalySegLib.model.position_stats import PositionStats, slice_positions


def test_slice_positions_span_zero_to_one():
    np.testing.assert_allclose(slice_positions(np.array([4, 5, 6, 8])), [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(slice_positions(np.array([7])), [0.0])


def test_fit_recovers_a_position_dependent_mean_and_std():
    # Healthy maps: mean 1 in the left half, 5 in the right half; std 0.1 left, 1.0 right.
    rng = np.random.default_rng(0)
    n, s = 12, 48
    maps, masks, idx = [], [], []
    for _ in range(6):
        left = 1.0 + 0.1 * rng.standard_normal((n, s, s // 2))
        right = 5.0 + 1.0 * rng.standard_normal((n, s, s // 2))
        maps.append(np.concatenate([left, right], axis=2).astype(np.float32))
        masks.append(np.ones((n, s, s), bool))
        idx.append(np.arange(10, 10 + n))
    stats = PositionStats.fit(maps, masks, idx, grid=(4, 8, 8))
    # away from the left/right border (smoothing mixes the two bins next to it)
    np.testing.assert_allclose(stats.mean[:, :, :1], 1.0, atol=0.02)
    np.testing.assert_allclose(stats.mean[:, :, -1:], 5.0, atol=0.05)
    np.testing.assert_allclose(stats.std[:, :, -1:], 1.0, rtol=0.05)
    # the left std (0.1) is below the floor 0.25 * median std: floored, not tiny
    assert stats.std[:, :, :2].min() >= 0.25 * float(np.median(stats.std)) - 1e-6
    # z-scores: a healthy-looking value scores ~0 on both sides; +3 std on the right is ~3
    probe = np.concatenate([np.full((n, s, s // 2), 1.0), np.full((n, s, s // 2), 8.0)], axis=2)
    z = stats.normalise(probe, np.ones((n, s, s), bool), np.arange(n))
    assert abs(float(z[:, :, :4].mean())) < 0.1
    assert float(z[:, :, -4:].mean()) == pytest.approx(3.0, rel=0.07)
    # outside the mask: 0
    mask = np.ones((n, s, s), bool)
    mask[:, 0, :] = False
    assert not stats.normalise(probe, mask, np.arange(n))[:, 0].any()


def test_round_trip_and_validation():
    stats = PositionStats(mean=np.arange(8, dtype=np.float32).reshape(2, 2, 2), std=np.ones((2, 2, 2), np.float32))
    back = PositionStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.std, stats.std)
    bad = stats.to_dict()
    bad["std"][0] = 0.0
    with pytest.raises(ValueError):
        PositionStats.from_dict(bad)
    bad = stats.to_dict()
    bad["grid"] = [2, 2, 3]
    with pytest.raises(ValueError):
        PositionStats.from_dict(bad)
    with pytest.raises(ValueError):
        PositionStats.fit([], [], [])


def test_dae_model_with_position_stats_round_trips_and_normalises_scores(tmp_path, healthy_volumes):
    from AnomalySegLib.pipeline.inference import score_prepared
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.model.bundle import AnomalyModel, load_model
    from AnomalySegLib.nn.networks import VAEConfig, build_network
    from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume

    torch.manual_seed(0)
    config = VAEConfig(image_size=32, base_width=4, architecture="unet")
    params = MethodParams.defaults("dae")
    assert params.position_normalise and params.fuse_intensity == 1.0  # the default: z-scores + fusion
    params.fuse_intensity = 0.0  # first the position statistics alone
    params.scan_normalise = "off"  # per-scan standardisation: its own tests below
    params.bias_flatten = "off"  # bias flattening: tests/test_bias_flatten.py
    model = AnomalyModel(network=build_network(config).eval(), network_config=config,
                         preprocessing=PreprocessConfig(image_size=32), method=params)
    prepared = [prepare_volume(v, model.preprocessing) for v in healthy_volumes[:3]]
    raw = [score_prepared(model, p, device="cpu") for p in prepared]
    model.position_stats = PositionStats.fit(raw, [p.masks for p in prepared], [p.slice_indices for p in prepared],
                                             grid=(4, 4, 4))
    path = tmp_path / "dae.pt"
    model.save(path)
    back = load_model(path)
    assert back.network_config.architecture == "unet" and back.method.position_normalise
    np.testing.assert_array_equal(back.position_stats.mean, model.position_stats.mean)
    z = score_prepared(back, prepared[0], device="cpu")
    expected = model.position_stats.normalise(raw[0], prepared[0].masks, prepared[0].slice_indices)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_prepared(back, prepared[0], device="cpu", normalise=False), raw[0], atol=1e-6)
    assert back.summary()["position_normalised"] is True
    # fusion with the healthy-normalised intensity: (z_map + w |z_int|) / (1 + w)
    back.method.fuse_intensity = 1.0
    back.intensity_stats = PositionStats.fit([p.images for p in prepared], [p.masks for p in prepared],
                                             [p.slice_indices for p in prepared], grid=(4, 4, 4))
    z_int = back.intensity_stats.normalise(prepared[0].images, prepared[0].masks, prepared[0].slice_indices)
    assert back.method.intensity_term == "bright-position"  # the default: hyperintense deviations only
    np.testing.assert_allclose(score_prepared(back, prepared[0], device="cpu"),
                               (expected + np.maximum(z_int, 0)) / 2.0, rtol=1e-5, atol=1e-5)
    back.method.intensity_term = "abs-position"  # files written before the field: (z_map + |z_int|) / 2
    np.testing.assert_allclose(score_prepared(back, prepared[0], device="cpu"), (expected + np.abs(z_int)) / 2.0,
                               rtol=1e-5, atol=1e-5)
    back.save(tmp_path / "fused.pt")
    assert load_model(tmp_path / "fused.pt").intensity_stats is not None
    # the one-sided global term: max((x - mean) / std, 0) with one healthy brain mean/std
    back.method.intensity_term = "bright-global"
    back.intensity_stats = PositionStats.fit([p.images for p in prepared], [p.masks for p in prepared],
                                             [p.slice_indices for p in prepared], grid=(1, 1, 1))
    brain = np.concatenate([p.images[p.masks] for p in prepared]).astype(np.float64)
    mu, sd = brain.mean(), brain.std()
    d = np.where(prepared[0].masks, np.maximum((prepared[0].images - mu) / sd, 0.0), 0.0)
    np.testing.assert_allclose(score_prepared(back, prepared[0], device="cpu"), (expected + d) / 2.0,
                               rtol=1e-4, atol=1e-4)
    back.save(tmp_path / "global.pt")
    again = load_model(tmp_path / "global.pt")
    assert again.method.intensity_term == "bright-global" and again.intensity_stats.mean.shape == (1, 1, 1)
    back.method.intensity_term = "abs-position"
    back.intensity_stats = None  # a fusing model without its statistics is refused on load
    back.save(tmp_path / "broken.pt")
    from AnomalySegLib.errors import ModelFileError

    with pytest.raises(ModelFileError, match="intensity statistics"):
        load_model(tmp_path / "broken.pt")


def test_intensity_terms_against_hand_computed_values():
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.pipeline.inference import intensity_deviation

    z = np.array([2.0, -2.0, 1.0, -1.0, 0.5])
    sign = np.array([1.0, -1.0, -1.0, 0.0, 1.0])  # sign of the dae's residual x - f(x)
    np.testing.assert_array_equal(intensity_deviation(z, "abs-position"), [2, 2, 1, 1, 0.5])
    np.testing.assert_array_equal(intensity_deviation(z, "bright-position"), [2, 0, 1, 0, 0.5])
    np.testing.assert_array_equal(intensity_deviation(z, "bright-global"), [2, 0, 1, 0, 0.5])
    np.testing.assert_array_equal(intensity_deviation(z, "agree-position", sign), [2, 2, 0, 0, 0.5])
    with pytest.raises(ValueError, match="intensity_term"):
        MethodParams(method="dae", position_normalise=True, fuse_intensity=1.0, intensity_term="dark")
    with pytest.raises(ValueError, match="signed residual"):
        MethodParams(method="amcons", position_normalise=True, fuse_intensity=1.0, intensity_term="agree-position")


def test_model_settings_without_an_intensity_term_keep_the_fusion_they_were_written_with():
    from AnomalySegLib.nn.methods import MethodParams

    old = {k: v for k, v in MethodParams.defaults("dae").to_dict().items() if k != "intensity_term"}
    assert MethodParams.from_dict(old).intensity_term == "abs-position"  # files before the field: |z|
    assert MethodParams.defaults("dae").intensity_term == "bright-position"  # new models


def test_scan_standardisation_is_applied_after_smoothing_in_calibration_and_inference(healthy_volumes):
    """``scan_normalise``: every scored map (calibration and segmentation alike) is the
    smoothed voxel-grid map standardised by its own brain voxels; older files mean "off"."""
    import dataclasses

    from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume
    from AnomalySegLib.io.geometry import voxel_spacing
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.nn.networks import VAEConfig, build_network
    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.pipeline.inference import score_prepared, score_volume
    from AnomalySegLib.segmentation.postprocess import smooth_in_mask, standardise_scan
    from AnomalySegLib.data.preprocessing import brain_mask_in_volume, to_volume_grid

    torch.manual_seed(0)
    config = VAEConfig(image_size=32, base_width=4, architecture="unet")
    params = dataclasses.replace(MethodParams.defaults("dae"), fuse_intensity=0.0, position_normalise=False,
                                 bias_flatten="off",
                                 scan_normalise="interdecile")
    model = AnomalyModel(network=build_network(config).eval(), network_config=config,
                         preprocessing=PreprocessConfig(image_size=32), method=params)
    volume = healthy_volumes[0]
    prepared = prepare_volume(volume, model.preprocessing)
    brain = brain_mask_in_volume(prepared)
    expected = to_volume_grid(score_prepared(model, prepared, device="cpu"), prepared, order=1)
    expected[~brain] = 0.0
    smooth_in_mask(expected, brain, params.smoothing_mm, voxel_spacing(prepared.affine), out=expected)
    raw_tail = float(np.percentile(expected[brain], 99))
    standardise_scan(expected, brain, "interdecile")
    scores = score_volume(model, volume, device="cpu")
    np.testing.assert_allclose(scores.heatmap, expected, rtol=1e-5, atol=1e-5)
    q10, q50, q90 = np.percentile(scores.heatmap[scores.brain_mask], [10, 50, 90])
    assert q50 == pytest.approx(0.0, abs=1e-5) and q90 - q10 == pytest.approx(1.0, rel=1e-4)
    assert float(np.percentile(scores.heatmap[brain], 99)) != pytest.approx(raw_tail)  # it did change the map
    # calibration thresholds the same standardised values
    cal = calibrate(model, [volume], device="cpu")
    assert cal.threshold(99.0) == pytest.approx(np.percentile(scores.heatmap[scores.brain_mask], 99.0), rel=1e-4)
    # settings: validated, and files written before the field keep their maps unchanged
    old = {k: v for k, v in params.to_dict().items() if k != "scan_normalise"}
    assert MethodParams.from_dict(old).scan_normalise == "off"
    with pytest.raises(ValueError, match="scan_normalise"):
        dataclasses.replace(params, scan_normalise="zscore")


def test_terms_standardisation_standardises_each_fused_term_in_model_space(tmp_path, healthy_volumes):
    """``terms-upper`` (the dae default): the network's z-map and the intensity z are each
    standardised by the scan's own median and p90 - median over the tissue masks, then fused."""
    import dataclasses

    from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume
    from AnomalySegLib.model.bundle import AnomalyModel, load_model
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.nn.networks import VAEConfig, build_network
    from AnomalySegLib.pipeline.inference import score_prepared

    assert MethodParams.defaults("dae").scan_normalise == "terms-upper"
    torch.manual_seed(1)
    config = VAEConfig(image_size=32, base_width=4, architecture="unet")
    # bias flattening off: this test is about the standardisation (flattening: test_bias_flatten.py)
    method = dataclasses.replace(MethodParams.defaults("dae"), bias_flatten="off")
    model = AnomalyModel(network=build_network(config).eval(), network_config=config,
                         preprocessing=PreprocessConfig(image_size=32), method=method)
    prepared = [prepare_volume(v, model.preprocessing) for v in healthy_volumes[:3]]
    raw = [score_prepared(model, p, device="cpu", normalise=False) for p in prepared]
    masks, idx = [p.masks for p in prepared], [p.slice_indices for p in prepared]
    model.position_stats = PositionStats.fit(raw, masks, idx, grid=(4, 4, 4))
    model.intensity_stats = PositionStats.fit([p.images for p in prepared], masks, idx, grid=(4, 4, 4))
    model.save(tmp_path / "dae.pt")
    back = load_model(tmp_path / "dae.pt")
    assert back.method.scan_normalise == "terms-upper"
    p0 = prepared[0]
    m = p0.masks

    def upper(a):
        a = a.astype(np.float64)
        med, p90 = np.percentile(a[m], [50, 90])
        return np.where(m, (a - med) / (p90 - med), 0.0)

    z_map = upper(model.position_stats.normalise(raw[0], m, p0.slice_indices))
    z_int = upper(model.intensity_stats.normalise(p0.images, m, p0.slice_indices))
    expected = (z_map + np.maximum(z_int, 0.0)) / 2.0
    got = score_prepared(back, p0, device="cpu")
    np.testing.assert_allclose(got[m], expected[m], rtol=1e-4, atol=1e-4)
    assert np.all(got[~m] == 0.0)
    # and the terms are not standardised again on the voxel grid: a file with "off" differs
    off = dataclasses.replace(back.method, scan_normalise="off")
    back.method = off
    assert not np.allclose(score_prepared(back, p0, device="cpu")[m], expected[m], atol=1e-3)
