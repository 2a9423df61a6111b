"""Bias flattening: the fitted field against a known one, lesions left alone, and the option's wiring."""

import numpy as np
import pytest

from AnomalySegLib.data.bias_flatten import fit_bias_field, flatten_bias
from AnomalySegLib.model.position_stats import PositionStats
from AnomalySegLib.nn.methods import MethodParams


def _anatomy(n=24, size=48, seed=0):
    """A 'healthy mean' with structure (bright rim, dark centre), its brain masks and slice indices."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.sqrt(y ** 2 + x ** 2 + 0.5 * z ** 2)
    masks = r < 0.9
    mean = np.where(r < 0.3, 0.2, 0.5 + 0.3 * np.cos(6 * r)).astype(np.float32) * masks
    return mean, masks, np.arange(10, 10 + n), (z, y, x)


def _stats(mean, masks, idx):
    # one bin per pixel (and slice positions k / (n - 1) land in bin k): expected() is the mean itself
    return PositionStats(mean=mean.astype(np.float32), std=np.ones_like(mean, dtype=np.float32))


def test_recovers_a_quadratic_field_within_one_percent_and_ignores_a_bright_lesion():
    mean, masks, idx, (z, y, x) = _anatomy()
    stats = _stats(mean, masks, idx)
    true_field = np.exp(0.15 * x - 0.1 * y * z + 0.12 * x ** 2 + 0.05).astype(np.float32)
    lesion = (((y - 0.3) ** 2 + (x + 0.2) ** 2 + (z - 0.1) ** 2) < 0.25 ** 2) & masks
    images = mean * true_field
    images[lesion] *= 1.6  # a hyperintense lesion: 60 % above the biased tissue
    field = fit_bias_field(images, masks, idx, stats)
    expected = stats.expected(mean.shape[-1], idx)
    tissue = masks & (expected >= np.quantile(expected[masks], 0.25))
    assert np.abs(field[tissue] / true_field[tissue] - 1).max() < 0.01
    flat = flatten_bias(images, masks, idx, stats)
    # the lesion keeps its contrast against the flattened tissue; healthy tissue is back to the mean
    assert np.median(flat[lesion] / np.maximum(expected[lesion], 1e-6)) == pytest.approx(1.6, rel=0.02)
    healthy = tissue & ~lesion
    assert np.abs(flat[healthy] / expected[healthy] - 1).max() < 0.01


def test_no_field_gives_ones_and_an_empty_mask_is_left_alone():
    mean, masks, idx, _ = _anatomy()
    stats = _stats(mean, masks, idx)
    assert np.allclose(fit_bias_field(mean, masks, idx, stats)[masks], 1.0, atol=1e-4)
    assert (fit_bias_field(mean, np.zeros_like(masks), idx, stats) == 1.0).all()


def test_the_option_is_validated():
    base = dict(method="dae", position_normalise=True, fuse_intensity=1.0, intensity_term="bright-position")
    assert MethodParams(**base, bias_flatten="all").bias_flatten == "all"
    with pytest.raises(ValueError, match="bias_flatten must be one of"):
        MethodParams(**base, bias_flatten="n4")
    with pytest.raises(ValueError, match="per-position intensity statistics"):
        MethodParams(**{**base, "intensity_term": "bright-global"}, bias_flatten="intensity")
    # files written before the option exist read as "off"
    assert MethodParams.from_dict({k: v for k, v in MethodParams(**base).to_dict().items()
                                   if k != "bias_flatten"}).bias_flatten == "off"
    # ... and before the field's shape was a setting, as the quadratic they were fitted with
    spline = MethodParams(**base, bias_flatten="intensity", bias_field="spline")
    assert MethodParams.from_dict(spline.to_dict()).bias_field == "spline"
    assert MethodParams.from_dict({k: v for k, v in spline.to_dict().items()
                                   if k != "bias_field"}).bias_field == "quadratic"
    with pytest.raises(ValueError, match="bias_field must be one of"):
        MethodParams(**base, bias_flatten="intensity", bias_field="cubic")


def _tiny_dae(flatten: str, healthy_volumes):
    import torch

    from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.networks import VAEConfig, build_network
    from AnomalySegLib.pipeline.training import fit_position_stats

    torch.manual_seed(1)
    config = VAEConfig(image_size=32, base_width=4, architecture="unet")
    method = MethodParams.from_dict({**MethodParams.defaults("dae").to_dict(), "bias_flatten": flatten})
    model = AnomalyModel(network=build_network(config).eval(), network_config=config,
                         preprocessing=PreprocessConfig(image_size=32), method=method)
    prepared = [prepare_volume(v, model.preprocessing) for v in healthy_volumes]
    model.position_stats, model.intensity_stats = fit_position_stats(model, prepared, device="cpu")
    return model, prepared


@pytest.mark.parametrize("flatten", ["intensity", "all"])
def test_scoring_uses_the_flattened_images_where_the_setting_says(flatten, healthy_volumes):
    """score_prepared against the formula: the intensity term (and with ``all`` the network's
    input) is computed from images / fit_bias_field(images); a smooth field on the scan then
    hardly moves its scores, while the same model without flattening follows the field."""
    import copy
    import dataclasses

    from AnomalySegLib.pipeline.inference import score_prepared

    model, prepared = _tiny_dae(flatten, healthy_volumes[:3])
    # the intensity statistics are the second pass's: fitted on flattened training images
    first = PositionStats.fit([p.images for p in prepared], [p.masks for p in prepared],
                              [p.slice_indices for p in prepared])
    second = PositionStats.fit([flatten_bias(p.images, p.masks, p.slice_indices, first) for p in prepared],
                               [p.masks for p in prepared], [p.slice_indices for p in prepared])
    np.testing.assert_allclose(model.intensity_stats.mean, second.mean, rtol=1e-5)
    p0 = prepared[0]
    m = p0.masks
    n, s, _ = p0.images.shape
    zz = np.linspace(-1, 1, n)[:, None, None]
    xx = np.linspace(-1, 1, s)[None, None, :]
    field = np.exp(0.25 * xx + 0.1 * zz * xx).astype(np.float32)
    biased = copy.copy(p0)
    biased.images = (p0.images * field).astype(np.float32)
    # the formula: flattened images feed the intensity z (and the network for "all")
    flat = flatten_bias(biased.images, m, biased.slice_indices, model.intensity_stats)
    manual = copy.copy(biased)
    manual.images = flat
    plain = dataclasses.replace(model.method, bias_flatten="off")
    reference = copy.copy(model)
    reference.method = plain
    got = score_prepared(model, biased, device="cpu")
    if flatten == "all":
        np.testing.assert_allclose(got[m], score_prepared(reference, manual, device="cpu")[m], atol=1e-4)
    else:
        assert not np.allclose(got[m], score_prepared(reference, manual, device="cpu")[m], atol=1e-3)
    clean = score_prepared(model, p0, device="cpu")
    unflattened = score_prepared(reference, biased, device="cpu")
    assert np.abs(got[m] - clean[m]).mean() < 0.5 * np.abs(unflattened[m] - clean[m]).mean()


def test_the_baseline_flattens_with_statistics_of_its_reference_volumes(healthy_volumes):
    from AnomalySegLib.data.preprocessing import prepare_volume
    from AnomalySegLib.pipeline.baselines import IntensityBaseline

    base = IntensityBaseline("bright", bias_flatten=True).fit(healthy_volumes[:2], reference=healthy_volumes[2:4])
    ref = [prepare_volume(v, base.preprocessing) for v in healthy_volumes[2:4]]
    first = PositionStats.fit([p.images for p in ref], [p.masks for p in ref], [p.slice_indices for p in ref])
    np.testing.assert_allclose(
        base.flatten_stats.mean,
        PositionStats.fit([flatten_bias(p.images, p.masks, p.slice_indices, first) for p in ref],
                          [p.masks for p in ref], [p.slice_indices for p in ref]).mean, rtol=1e-5)
    p = prepare_volume(healthy_volumes[0], base.preprocessing)
    expected = np.where(p.masks, flatten_bias(p.images, p.masks, p.slice_indices, base.flatten_stats), 0.0)
    np.testing.assert_allclose(base.score_prepared(p), expected, rtol=1e-6)
    back = IntensityBaseline.from_dict(base.to_dict())
    assert back.bias_flatten and back.version == base.version and back.bias_field == "quadratic"
    np.testing.assert_array_equal(back.flatten_stats.mean, base.flatten_stats.mean)
    assert IntensityBaseline("bright").fit(healthy_volumes[:2]).version != base.version
    # the spline field: statistics and scores from the spline fit, stored, a different version
    spline = IntensityBaseline("bright", bias_flatten=True, bias_field="spline").fit(
        healthy_volumes[:2], reference=healthy_volumes[2:4])
    first_spline = PositionStats.fit([flatten_bias(p.images, p.masks, p.slice_indices, first, "spline") for p in ref],
                                     [p.masks for p in ref], [p.slice_indices for p in ref])
    np.testing.assert_allclose(spline.flatten_stats.mean, first_spline.mean, rtol=1e-5)
    expected = np.where(p.masks, flatten_bias(p.images, p.masks, p.slice_indices, spline.flatten_stats, "spline"), 0.0)
    np.testing.assert_allclose(spline.score_prepared(p), expected, rtol=1e-6)
    back = IntensityBaseline.from_dict(spline.to_dict())
    assert back.bias_field == "spline" and back.version == spline.version != base.version
    with pytest.raises(ValueError, match="bias_field must be one of"):
        IntensityBaseline("bright", bias_flatten=True, bias_field="n4")


def test_training_defaults_turn_flattening_off_only_when_its_statistics_are_turned_off():
    from AnomalySegLib.pipeline.training import TrainConfig, method_params_for

    # since stop 22 the dae default flattens the network's input too (trained on flattened images)
    assert MethodParams.defaults("dae").bias_flatten == "all"
    assert method_params_for(TrainConfig(method="dae")).bias_flatten == "all"
    assert method_params_for(TrainConfig(method="dae", method_overrides={"bias_flatten": "intensity"})
                             ).bias_flatten == "intensity"
    # a global intensity term has no per-position statistics: the default flattening goes with it
    glob = method_params_for(TrainConfig(method="dae", method_overrides={"intensity_term": "bright-global"}))
    assert glob.bias_flatten == "off" and glob.intensity_term == "bright-global"
    with pytest.raises(ValueError, match="per-position intensity statistics"):
        method_params_for(TrainConfig(method="dae", method_overrides={"intensity_term": "bright-global",
                                                                     "bias_flatten": "intensity"}))
    assert method_params_for(TrainConfig(method="amcons")).bias_flatten == "off"


def test_the_spline_field_follows_a_field_no_quadratic_fits_and_still_ignores_a_bright_lesion():
    mean, masks, idx, (z, y, x) = _anatomy(n=32, size=64)
    stats = _stats(mean, masks, idx)
    true_field = np.exp(0.12 * np.sin(3 * x + 0.5) * np.cos(2 * y) + 0.08 * np.cos(2.5 * z)).astype(np.float32)
    lesion = (((y - 0.3) ** 2 + (x + 0.2) ** 2 + (z - 0.1) ** 2) < 0.2 ** 2) & masks
    images = mean * true_field
    images[lesion] *= 1.6
    expected = stats.expected(mean.shape[-1], idx)
    tissue = masks & (expected >= np.quantile(expected[masks], 0.25)) & ~lesion
    error = {m: np.abs(fit_bias_field(images, masks, idx, stats, model=m)[tissue] / true_field[tissue] - 1)
             for m in ("quadratic", "spline")}
    # (the smoothness penalty costs some fit on a noise-free field: 0.8 % against the quadratic's 2.1 %)
    assert error["spline"].mean() < 0.01 and error["spline"].mean() < 0.5 * error["quadratic"].mean()
    flat = flatten_bias(images, masks, idx, stats, "spline")
    # the spline is flexible, but trimming and its smoothness penalty keep it out of the lesion
    assert np.median(flat[lesion] / np.maximum(expected[lesion], 1e-6)) == pytest.approx(1.6, rel=0.05)
    with pytest.raises(ValueError, match="bias field model"):
        fit_bias_field(images, masks, idx, stats, model="cubic")
