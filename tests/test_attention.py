"""Activation maps, Grad-CAM weights (Eq. 2), upsampling and min-max normalisation."""

import numpy as np
import pytest
import torch

from AnomalySegLib.nn.attention import activation_map, grad_cam, minmax_normalise, upsample
from AnomalySegLib.nn.networks import ConvVAE, VAEConfig


def _model(stage: int = 1) -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(image_size=32, base_width=4, latent_dim=8, attention_stage=stage)).double()


def _x(b: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(b, 1, 32, 32, dtype=torch.float64)


def test_activation_map_is_channel_mean():
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    expected = (f[:, 0] + f[:, 1] + f[:, 2]) / 3
    assert torch.equal(activation_map(f), expected)


def test_upsample_bilinear_by_hand():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # align_corners=False: output pixel i samples input coordinate (i + 0.5) / 2 - 0.5,
    # clamped to [0, 1]: 0, 0.25, 0.75, 1.
    c = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 2 * c[:, None] + c[None, :]
    assert torch.allclose(upsample(m, 4)[0], expected)


def test_minmax_normalise_by_hand():
    maps = torch.tensor([[[5.0, 1.0, 3.0], [2.0, 100.0, -50.0]], [[7.0, 7.0, 7.0], [7.0, 7.0, 7.0]]])
    mask = torch.tensor([[[True, True, True], [True, False, False]], [[True] * 3, [True] * 3]])
    out = minmax_normalise(maps, mask)
    expected0 = torch.tensor([[1.0, 0.0, 0.5], [0.25, 0.0, 0.0]])
    assert torch.allclose(out[0], expected0)
    assert torch.equal(out[1], torch.zeros(2, 3))  # constant map -> 0
    empty = minmax_normalise(maps, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros_like(maps))


def test_grad_cam_alpha_is_per_image_gradient_mean():
    model = _model().eval()
    x = _x()
    feats = model.attention_features(x)
    mu, _ = model.latent_from_stage(feats)
    cam, alpha = grad_cam(feats, mu, create_graph=False)
    assert cam.shape == (3, 16, 16) and alpha.shape == (3, 4)  # stage 1 is S/2
    for b in range(3):
        feats_b = model.attention_features(x)
        mu_b, _ = model.latent_from_stage(feats_b)
        (g,) = torch.autograd.grad(mu_b[b].sum(), feats_b)
        others = [i for i in range(3) if i != b]
        assert (g[others] == 0).all()  # eval mode: images independent
        assert torch.allclose(alpha[b], g[b].mean(dim=(1, 2)), rtol=1e-10, atol=1e-14)
        expected_cam = (g[b].mean(dim=(1, 2))[:, None, None] * feats_b[b]).sum(0)
        assert torch.allclose(cam[b], expected_cam.detach(), atol=1e-12)


def test_grad_cam_alpha_matches_finite_difference():
    model = _model().eval()
    x = _x(2)
    with torch.no_grad():
        feats = model.attention_features(x)
    feats.requires_grad_(True)
    mu, _ = model.latent_from_stage(feats)
    _, alpha = grad_cam(feats, mu, create_graph=False)
    b, k, eps = 1, 2, 1e-6
    h, w = feats.shape[-2:]
    with torch.no_grad():
        up, down = feats.clone(), feats.clone()
        up[b, k] += eps
        down[b, k] -= eps
        d = (model.latent_from_stage(up)[0][b].sum() - model.latent_from_stage(down)[0][b].sum()) / (2 * eps)
    # Shifting every pixel of channel k by eps changes sum(mu) by eps * sum_t grad = eps * h*w * alpha.
    assert alpha[b, k].item() == pytest.approx(d.item() / (h * w), rel=1e-5, abs=1e-10)


def test_grad_cam_is_not_the_plain_channel_mean():
    model = _model().eval()
    feats = model.attention_features(_x())
    mu, _ = model.latent_from_stage(feats)
    cam, alpha = grad_cam(feats, mu, create_graph=False)
    am = activation_map(feats).detach()
    assert alpha.std(dim=1).min() > 0  # channel weights differ
    # cam is not any multiple of the activation map: least-squares residual is large.
    for b in range(cam.shape[0]):
        c, a = cam[b].flatten(), am[b].flatten()
        scale = (c @ a) / (a @ a)
        assert (c - scale * a).norm() > 0.05 * c.norm()


def test_create_graph_trains_the_layers_that_produce_alpha():
    model = _model(stage=1).train()
    x = _x()
    feats = model(x).features[1]
    with model.per_image_batchnorm():
        mu, _ = model.latent_from_stage(feats)
    cam, alpha = grad_cam(feats, mu, create_graph=True)
    (alpha**2).sum().backward(retain_graph=True)
    after = [model.layer2[0].conv1.weight, model.layer4[1].conv2.weight, model.fc_mu.weight]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in after)
    assert model.fc_logvar.weight.grad is None  # alpha does not depend on logvar
    # A loss on the sigmoid map (what the size constraint sees) also reaches the layers
    # before the stage, through the activations themselves.
    model.zero_grad()
    torch.sigmoid(cam).mean().backward()
    before = [model.stem[0].weight, model.layer1[0].conv1.weight]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in before + after)


def test_create_graph_false_gives_a_constant_alpha():
    model = _model().eval()
    feats = model.attention_features(_x())
    mu, _ = model.latent_from_stage(feats)
    _, alpha = grad_cam(feats, mu, create_graph=False)
    assert not alpha.requires_grad


def test_train_mode_batchnorm_coupling_and_per_image_fix():
    model = _model(stage=1).train()
    x = _x()
    feats = model.attention_features(x)
    # Naive: through train-mode BN every image's mu depends on every image's features.
    mu, _ = model.latent_from_stage(feats)
    (g,) = torch.autograd.grad(mu[0].sum(), feats, retain_graph=True)
    assert g[1:].abs().max() > 0
    # Per image: batch statistics held constant -> no cross-image gradient, and the
    # batch-sum gradient equals each image's own gradient.
    with model.per_image_batchnorm():
        mu_p, _ = model.latent_from_stage(feats)
    _, alpha = grad_cam(feats, mu_p, create_graph=True)
    for b in range(3):
        (g,) = torch.autograd.grad(mu_p[b].sum(), feats, retain_graph=True)
        assert (g[[i for i in range(3) if i != b]] == 0).all()
        assert torch.allclose(alpha[b], g[b].mean(dim=(1, 2)), rtol=1e-10, atol=1e-14)
    _, alpha_naive = grad_cam(feats, mu, create_graph=False)
    assert not torch.allclose(alpha, alpha_naive, rtol=1e-3)


def test_grad_cam_requires_graph():
    f = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError):
        grad_cam(f, f.sum((2, 3)), create_graph=False)
    assert np.isfinite(upsample(torch.rand(1, 2, 2), 8).numpy()).all()
