"""Per-method training losses and anomaly scores."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from AnomalySegLib.nn.attention import activation_map, upsample
from AnomalySegLib.nn.losses import bce_reconstruction, kl_divergence
from AnomalySegLib.nn.methods import (
    ARCHITECTURE_OF,
    METHODS,
    MethodParams,
    coarse_noise,
    random_bias_field,
    anomaly_scores,
    default_warmup_epochs,
    erode_mask,
    training_loss,
)
from AnomalySegLib.nn.networks import VAEConfig, build_network

S = 32


def _model(seed: int = 0, method: str = "amcons") -> torch.nn.Module:
    """The small network ``method`` trains: a ConvVAE, or a U-Net for dae."""
    torch.manual_seed(seed)
    return build_network(VAEConfig(image_size=S, base_width=4, latent_dim=8, attention_stage=1,
                                   architecture=ARCHITECTURE_OF[method]))


def _batch(b: int = 4):
    """Disc-shaped 'brains' of different sizes with a bright blob; masks per image."""
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    radii = [12, 9, 13, 7][:b]
    mask = torch.stack([((yy - 16) ** 2 + (xx - 16) ** 2) < r * r for r in radii])
    gen = torch.Generator().manual_seed(5)
    x = (0.5 + 0.1 * torch.rand(b, S, S, generator=gen)) * mask
    return x[:, None].float(), mask


@pytest.mark.parametrize("method", METHODS)
def test_training_loss_finite_and_backward(method):
    model = _model(method=method).train()
    x, mask = _batch()
    params = MethodParams.defaults(method)
    loss, logs = training_loss(model, x, mask, params, epoch=0)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    expected_keys = {"loss", "rec"} | {"amcons": {"kl", "entropy"}, "gradcamcons": {"kl", "barrier", "mean_attention"},
                                       "vae": {"kl"}, "dae": set()}[method]
    assert set(logs) == expected_keys and all(isinstance(v, float) for v in logs.values())
    assert logs["loss"] == pytest.approx(loss.item())


def test_amcons_loss_terms_by_hand():
    model = _model().eval()  # eval: z = mu, deterministic, so terms can be recomputed
    x, mask = _batch()
    params = MethodParams.defaults("amcons")
    _, logs = training_loss(model, x, mask, params, epoch=0)
    out = model(x)
    rec = bce_reconstruction(out.logits, x).item()
    kl = kl_divergence(out.mu, out.logvar).item()
    amap = upsample(activation_map(out.features[1]), S).detach().numpy()
    entropies = []
    for b in range(x.shape[0]):
        v = amap[b][mask[b].numpy()].astype(np.float64)
        p = np.exp(v - v.max())
        p /= p.sum()
        entropies.append(-(p * np.log(p)).sum())
    assert logs["rec"] == pytest.approx(rec, rel=1e-5)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    assert logs["entropy"] == pytest.approx(np.mean(entropies), rel=1e-5)
    assert logs["entropy"] <= max(math.log(int(m.sum())) for m in mask)
    assert logs["loss"] == pytest.approx(rec + 10 * kl - 0.1 * np.mean(entropies), rel=1e-5)


def test_gradcamcons_barrier_only_after_warmup():
    model = _model().eval()
    x, mask = _batch()
    params = MethodParams(method="gradcamcons", beta=1.0, warmup_epochs=2)
    _, warm = training_loss(model, x, mask, params, epoch=1)
    assert warm["barrier"] > 0  # reported during warm-up...
    assert warm["loss"] == pytest.approx(warm["rec"] + warm["kl"], rel=1e-6)  # ...not in the loss
    _, on = training_loss(model, x, mask, params, epoch=2)
    assert on["loss"] == pytest.approx(on["rec"] + on["kl"] + 10 * on["barrier"], rel=1e-6)
    # t=20, p=0.2: barrier = psi_t((1 - mean a) - p) with the logged mean attention
    z = (1 - on["mean_attention"]) - 0.2
    psi = -(1 / 20) * math.log(-z) if z <= -1 / 400 else 20 * z - (1 / 20) * math.log(1 / 400) + 1 / 20
    assert on["barrier"] == pytest.approx(psi, rel=1e-4)


def test_gradcamcons_barrier_trains_layers_after_the_stage():
    # The Grad-CAM map is sum_k alpha_k A_k with A from the layers before the stage, so
    # the barrier can reach layer3 only through alpha (double backprop). Code that drops
    # or detaches the gradients would leave layer3's gradient unchanged by lambda_s.
    x, mask = _batch()
    grads = []
    for lambda_s in (0.0, 10.0):
        model = _model().eval()
        params = MethodParams(method="gradcamcons", beta=1.0, lambda_s=lambda_s, p=0.0)
        loss, _ = training_loss(model, x, mask, params, epoch=0)
        loss.backward()
        grads.append(model.layer3[0].conv1.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("method", METHODS)
def test_few_steps_reduce_the_loss(method):
    model = _model(1, method).train()
    x, mask = _batch()
    params = MethodParams.defaults(method)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        torch.manual_seed(100 + step)
        loss, _ = training_loss(model, x, mask, params, epoch=10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_amcons_scores_use_only_the_truncated_encoder():
    model = _model().train()
    x, mask = _batch()

    def boom(*a, **k):
        raise AssertionError("amcons inference ran more than the encoder up to the attention stage")

    for name in ("decoder", "layer2", "layer3", "layer4", "fc_mu", "fc_logvar"):
        getattr(model, name).forward = boom
    scores = anomaly_scores(model, x, mask, "amcons")
    assert model.training  # mode restored
    assert scores.shape == (4, S, S) and scores.dtype == torch.float32
    assert (scores[~mask] == 0).all()
    model.eval()
    expected = upsample(activation_map(model.attention_features(x)), S).detach()
    assert torch.allclose(scores[mask], expected[mask])
    scores.add_(1.0)  # a normal tensor, not an inference-mode one


def test_gradcamcons_scores_encoder_only_and_in_unit_range():
    model = _model()
    x, mask = _batch()
    model.decoder.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoder ran"))
    with torch.inference_mode():  # callers may be in inference mode; alpha still works
        scores = anomaly_scores(model, x, mask, "gradcamcons")
    assert (scores[~mask] == 0).all()
    for b in range(4):
        inside = scores[b][mask[b]]
        assert inside.min().item() == pytest.approx(0.0) and inside.max().item() == pytest.approx(1.0)
    for p in model.parameters():
        assert p.grad is None  # inference leaves no gradients behind


def test_vae_scores_are_residual_inside_eroded_mask():
    model = _model()
    x, mask = _batch()
    scores = anomaly_scores(model, x, mask, "vae")
    keep = torch.from_numpy(
        np.stack([ndimage.binary_erosion(m, structure=np.ones((5, 5)), border_value=0) for m in mask.numpy()])
    )
    assert torch.equal(erode_mask(mask), keep)
    assert (scores[~keep] == 0).all()
    model.eval()
    with torch.no_grad():
        out = model(x)
    residual = (x[:, 0] - torch.sigmoid(out.logits[:, 0])).abs()
    assert torch.allclose(scores[keep], residual[keep], atol=1e-6)


def test_erosion_at_image_border():
    mask = torch.ones(1, 10, 10, dtype=torch.bool)
    eroded = erode_mask(mask, 2)
    assert eroded[0, 2:8, 2:8].all() and eroded.sum() == 36


def test_training_loss_under_cpu_autocast():
    x, mask = _batch(2)
    for method in METHODS:
        model = _model(method=method).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = training_loss(model, x, mask, MethodParams.defaults(method), epoch=0)
        assert loss.dtype == torch.float32 and math.isfinite(logs["loss"])
        loss.backward()


def test_method_params_defaults_and_validation():
    a = MethodParams.defaults("amcons")
    assert (a.beta, a.lambda_h, a.default_percentile) == (10.0, 0.1, 98.0)
    g = MethodParams.defaults("gradcamcons")
    assert (g.beta, g.t, g.p, g.lambda_s, g.default_percentile) == (1.0, 20.0, 0.2, 10.0, 95.0)
    v = MethodParams.defaults("vae")
    assert (v.beta, v.default_percentile) == (1.0, 98.0)
    assert MethodParams.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="amcons, gradcamcons, vae"):
        MethodParams.defaults("cavga")
    with pytest.raises(ValueError, match="unknown"):
        MethodParams.from_dict({"method": "vae", "lamda": 1})
    for bad in ({"t": 0.0}, {"p": 1.0}, {"beta": -1.0}, {"warmup_epochs": -1}, {"default_percentile": 100.0}):
        with pytest.raises(ValueError):
            MethodParams(**bad)
    assert default_warmup_epochs("gradcamcons", 30) == 10
    assert default_warmup_epochs("amcons", 30) == 0


def test_shape_errors():
    model = _model()
    x, mask = _batch()
    with pytest.raises(ValueError):
        anomaly_scores(model, x, mask[:, :16], "amcons")
    with pytest.raises(ValueError, match="unknown method"):
        anomaly_scores(model, x, mask, "ae")


def test_coarse_noise_is_smooth_gaussian_at_the_cell_scale():
    x = torch.zeros(64, 1, 64, 64)
    gen = torch.Generator().manual_seed(0)
    noise = coarse_noise(x, 0.2, 8, gen)
    assert noise.shape == x.shape
    # bilinear interpolation of i.i.d. N(0, 0.04) nodes: std between 0.2 * (interpolation
    # shrinkage ~0.67 mid-cell) and 0.2 at the nodes; mean ~ 0
    assert 0.12 < float(noise.std()) < 0.2 and abs(float(noise.mean())) < 0.02
    # neighbouring pixels are strongly correlated (cells span 8 pixels), distant ones are not
    a, b, far = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten(), noise[..., :, 32:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9
    assert abs(float(torch.corrcoef(torch.stack([noise[..., :, :32].flatten(), far]))[0, 1])) < 0.1


def test_dae_loss_is_mse_to_the_clean_image_of_the_denoised_noisy_input():
    model = _model(method="dae").eval()  # eval: BatchNorm deterministic, so the loss can be recomputed
    x, mask = _batch()
    params = dataclasses.replace(MethodParams.defaults("dae"), bias_augmentation=0.0)
    torch.manual_seed(3)
    loss, logs = training_loss(model, x, mask, params, epoch=0)
    torch.manual_seed(3)
    noise = coarse_noise(x, params.noise_std, params.noise_cells)
    noisy = x + noise * mask[:, None]  # noise only inside the brain
    expected = ((model(noisy) - x) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs == {"loss": pytest.approx(loss.item()), "rec": pytest.approx(loss.item())}


def test_random_bias_field_is_smooth_positive_and_log_normal_at_the_given_std():
    x = torch.zeros(256, 1, 48, 48)
    field = random_bias_field(x, 0.1, torch.Generator().manual_seed(0))
    assert field.shape == x.shape and bool((field > 0).all())
    log = torch.log(field)
    # log-field: bilinear interpolation of N(0, 0.01) nodes on a 3 x 3 grid (cells span
    # 24 px): std between ~0.5 * 0.1 mid-cell and 0.1 at the nodes, mean ~ 0
    assert 0.05 < float(log.std()) < 0.1 and abs(float(log.mean())) < 0.01
    # smooth over the whole image: neighbours almost equal, opposite corners barely related
    assert float((log[..., 1:] - log[..., :-1]).abs().max()) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([log[:, 0, 0, 0], log[:, 0, -1, -1]]))[0, 1])) < 0.4


def test_dae_bias_augmentation_moves_input_and_target_together():
    """With ``bias_augmentation`` the clean image is multiplied by one random field (then
    clipped to [0, 1]) and that *biased* image is both the noisy input's base and the
    target: loss = mse(f(b*x + noise*mask), b*x)."""
    model = _model(method="dae").eval()
    x, mask = _batch()
    params = dataclasses.replace(MethodParams.defaults("dae"), bias_augmentation=0.2)
    torch.manual_seed(5)
    loss, _ = training_loss(model, x, mask, params, epoch=0)
    torch.manual_seed(5)
    biased = (random_bias_field(x, 0.2) * x).clamp(0.0, 1.0)
    noisy = biased + coarse_noise(x, params.noise_std, params.noise_cells) * mask[:, None]
    expected = ((model(noisy) - biased) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = dataclasses.replace(params, bias_augmentation=0.0)
    torch.manual_seed(5)
    assert training_loss(model, x, mask, plain, epoch=0)[0].item() != pytest.approx(loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="bias_augmentation"):
        dataclasses.replace(params, bias_augmentation=-0.1)


def test_dae_scores_are_residual_inside_eroded_mask_and_need_a_unet():
    model = _model(method="dae")
    x, mask = _batch()
    scores = anomaly_scores(model, x, mask, "dae")
    keep = erode_mask(mask)
    assert (scores[~keep] == 0).all()
    with torch.no_grad():
        residual = (x[:, 0] - model.eval()(x)[:, 0]).abs()
    assert torch.allclose(scores[keep], residual[keep], atol=1e-6)
    with pytest.raises(TypeError, match="UNet"):
        anomaly_scores(_model(method="amcons"), x, mask, "dae")
    with pytest.raises(TypeError, match="ConvVAE"):
        anomaly_scores(model, x, mask, "amcons")
    d = MethodParams.defaults("dae")
    assert (d.noise_std, d.noise_cells, d.default_percentile) == (0.2, 16, 98.0) and d.smoothing_mm > 0
    for bad in ({"noise_std": 0.0}, {"noise_cells": 0}, {"smoothing_mm": -1.0}):
        with pytest.raises(ValueError):
            MethodParams(**bad)


def test_grow_percentile_is_validated_and_off_by_default_for_old_files():
    from AnomalySegLib.nn.methods import MethodParams

    assert MethodParams().grow_percentile == 0.0
    assert MethodParams.from_dict({"method": "dae"}).grow_percentile == 0.0
    assert MethodParams(method="dae", grow_percentile=99.0).grow_percentile == 99.0
    for bad in (100.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grow_percentile"):
            MethodParams(method="dae", grow_percentile=bad)
