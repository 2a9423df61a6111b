"""Loss terms against formulas computed by hand (numpy / math), not by the same code."""

import math

import numpy as np
import pytest
import torch

from AnomalySegLib.nn.losses import (
    bce_reconstruction,
    extended_log_barrier,
    kl_divergence,
    masked_softmax_entropy,
    size_constraint,
)

T = 20.0
JOINT = -1.0 / T**2


def _barrier_by_hand(z: float, t: float) -> float:
    if z <= -1.0 / t**2:
        return -(1.0 / t) * math.log(-z)
    return t * z - (1.0 / t) * math.log(1.0 / t**2) + 1.0 / t


# ---------------------------------------------------------------- extended log-barrier
def test_log_barrier_values_both_sides():
    zs = [-0.9, -0.5, -0.1, -0.01, JOINT, -0.001, 0.0, 0.05, 0.3, 0.8]
    got = extended_log_barrier(torch.tensor(zs, dtype=torch.float64), T)
    expected = [_barrier_by_hand(z, T) for z in zs]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Two literal values: -(1/20) ln 0.5 and 20*0.1 + (1/20) ln 400 + 1/20.
    assert got[1].item() == pytest.approx(0.0346573590, abs=1e-9)
    v = extended_log_barrier(torch.tensor([0.1], dtype=torch.float64), T).item()
    assert v == pytest.approx(2.0 + 0.05 * 5.9914645471 + 0.05, abs=1e-9)


def test_log_barrier_value_and_slope_continuous_at_joint():
    d = 1e-9
    z = torch.tensor([JOINT - d, JOINT + d], dtype=torch.float64, requires_grad=True)
    v = extended_log_barrier(z, T)
    assert abs(v[0].item() - v[1].item()) < 3 * T * d  # jump-free (slope t)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert g[0].item() == pytest.approx(T, rel=1e-6)  # left: 1 / (t |z|) -> t
    assert g[1].item() == pytest.approx(T, rel=1e-12)  # right: t


def test_log_barrier_slopes_by_hand():
    z = torch.tensor([-0.5, -0.05, 0.2, 3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(extended_log_barrier(z, T).sum(), z)
    np.testing.assert_allclose(g.numpy(), [1 / (T * 0.5), 1 / (T * 0.05), T, T], rtol=1e-12)


def test_log_barrier_no_nan_for_nonnegative_or_huge_z():
    z = torch.tensor([0.0, 1e-12, 1.0, 1e6, 1e30], requires_grad=True)
    v = extended_log_barrier(z, T)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    assert torch.allclose(g, torch.full_like(g, T))


def test_log_barrier_convex_on_grid():
    z = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    v = extended_log_barrier(z, T)
    second = v[2:] - 2 * v[1:-1] + v[:-2]
    assert (second >= -1e-12).all()
    with pytest.raises(ValueError):
        extended_log_barrier(z, 0.0)


def test_size_constraint_by_hand():
    a = torch.zeros(2, 4, 4)
    a[0] = 1.0
    a[1, :2] = 1.0  # half covered
    np.testing.assert_allclose(size_constraint(a, 0.2).numpy(), [0.0 - 0.2, 0.5 - 0.2], atol=1e-7)


# ---------------------------------------------------------------- entropy
def test_entropy_uniform_is_log_n_and_maximal():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:6, 2:7] = True  # n = 25
    h = masked_softmax_entropy(torch.full((1, 8, 8), 3.7), mask)
    assert h.item() == pytest.approx(math.log(25), abs=1e-6)
    torch.manual_seed(0)
    for _ in range(5):
        assert masked_softmax_entropy(torch.randn(1, 8, 8), mask).item() < math.log(25)


def test_entropy_matches_numpy_softmax():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(1, 6, 6)) * 2
    mask = rng.random((1, 6, 6)) > 0.4
    v = maps[mask]
    p = np.exp(v - v.max())
    p /= p.sum()
    expected = -(p * np.log(p)).sum()
    got = masked_softmax_entropy(torch.tensor(maps), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_entropy_one_hot_is_near_zero():
    maps = torch.zeros(1, 8, 8)
    maps[0, 3, 3] = 100.0
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    assert masked_softmax_entropy(maps, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_ignores_pixels_outside_mask():
    torch.manual_seed(0)
    maps = torch.randn(1, 8, 8)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    ref = masked_softmax_entropy(maps, mask)
    polluted = maps.clone()
    polluted[~mask] = 1e30
    polluted[0, 0, 0] = float("inf")
    polluted[0, 7, 7] = float("nan")
    polluted.requires_grad_(True)
    h = masked_softmax_entropy(polluted, mask)
    assert h.item() == pytest.approx(ref.item(), abs=1e-6)
    (g,) = torch.autograd.grad(h.sum(), polluted)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()


def test_entropy_per_image_masks_and_empty_mask():
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 pixels
    mask[1, :, :5] = True  # 40 pixels
    maps = torch.zeros(3, 8, 8, requires_grad=True)  # uniform; image 2 has an empty mask
    h = masked_softmax_entropy(maps, mask)
    np.testing.assert_allclose(h.detach().numpy(), [math.log(4), math.log(40), 0.0], atol=1e-6)
    (g,) = torch.autograd.grad(h.sum(), maps)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------- KL and reconstruction
def test_kl_closed_form_against_numpy():
    rng = np.random.default_rng(2)
    mu = rng.normal(size=(5, 7))
    logvar = rng.normal(size=(5, 7))
    per_image = 0.5 * (mu**2 + np.exp(logvar) - 1 - logvar).sum(axis=1)
    got = kl_divergence(torch.tensor(mu), torch.tensor(logvar))
    assert got.item() == pytest.approx(per_image.mean(), rel=1e-12)


def test_kl_against_monte_carlo():
    torch.manual_seed(3)
    mu = torch.randn(2, 3, dtype=torch.float64) * 0.7
    logvar = torch.randn(2, 3, dtype=torch.float64) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((100_000,))
    mc = (q.log_prob(z) - prior.log_prob(z)).sum(-1).mean(0)  # per image
    assert kl_divergence(mu, logvar).item() == pytest.approx(mc.mean().item(), abs=0.03)


def test_kl_zero_at_standard_normal():
    assert kl_divergence(torch.zeros(4, 32), torch.zeros(4, 32)).item() == 0.0


def test_bce_against_hand_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 1, 5, 5)) * 3
    target = rng.random((3, 1, 5, 5))
    s = 1 / (1 + np.exp(-logits))
    expected = -(target * np.log(s) + (1 - target) * np.log(1 - s)).sum() / 3
    got = bce_reconstruction(torch.tensor(logits), torch.tensor(target))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_losses_float32_under_autocast():
    x = torch.randn(2, 4, 4, dtype=torch.bfloat16)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert masked_softmax_entropy(x, mask).dtype == torch.float32
        assert extended_log_barrier(x.flatten(), 20.0).dtype == torch.float32
        assert kl_divergence(x[:, 0], x[:, 1]).dtype == torch.float32
