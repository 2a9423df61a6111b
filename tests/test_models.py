"""ConvVAE architecture: shapes, stages, truncated encoder, parameter counts, config."""

import pytest
import torch

from AnomalySegLib.nn.networks import ConvVAE, VAEConfig, VAEOutput


def _tiny(**kw) -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(**{"image_size": 32, "base_width": 4, **kw}))


@pytest.mark.parametrize("size,width", [(32, 8), (64, 4), (224, 2)])
def test_output_and_feature_shapes(size, width):
    model = _tiny(image_size=size, base_width=width, latent_dim=6).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.logits.shape == (2, 1, size, size)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 6)
    expected = [(width, size // 2), (width, size // 2), (2 * width, size // 4), (4 * width, size // 8), (8 * width, size // 16)]
    assert [(f.shape[1], f.shape[2]) for f in out.features] == expected
    assert all(f.shape[2] == f.shape[3] and f.shape[0] == 2 for f in out.features)


def test_logits_are_unbounded_and_decode_shape():
    model = _tiny().eval()
    logits = model.decode(torch.randn(3, 32) * 5)
    assert logits.shape == (3, 1, 32, 32)
    assert logits.min() < 0 or logits.max() > 1  # logits, not a sigmoid output


def test_eval_uses_mu_train_samples():
    model = _tiny()
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    out = model(x)
    assert torch.equal(out.z, out.mu)
    assert torch.equal(model(x).logits, out.logits)  # deterministic
    model.train()
    out = model(x)
    assert not torch.allclose(out.z, out.mu)
    eps = (out.z - out.mu) / torch.exp(0.5 * out.logvar)
    assert eps.abs().max() < 10  # z = mu + sigma * eps


@pytest.mark.parametrize("stage", [0, 1, 2, 4])
def test_attention_features_equal_forward_features(stage):
    model = _tiny(attention_stage=stage).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        full = model(x).features[stage]
        part = model.attention_features(x)
    assert torch.equal(part, full)


def test_attention_features_runs_only_the_truncated_encoder():
    model = _tiny(attention_stage=1).eval()

    def boom(*a, **k):
        raise AssertionError("ran a layer after the attention stage")

    for name in ("layer2", "layer3", "layer4", "fc_mu", "fc_logvar", "decoder"):
        getattr(model, name).forward = boom
    model.attention_features(torch.rand(1, 1, 32, 32))


def test_encode_matches_forward():
    model = _tiny().eval()
    x = torch.rand(2, 1, 32, 32)
    mu, logvar, feats = model.encode(x)
    out = model(x)
    assert torch.equal(mu, out.mu) and torch.equal(logvar, out.logvar) and len(feats) == 5
    mu2, logvar2 = model.latent_from_stage(feats[1], 1)
    assert torch.allclose(mu2, mu) and torch.allclose(logvar2, logvar)


def test_resnet18_parameter_count():
    # torchvision resnet18 without its fc layer: 11,689,512 - (512*1000 + 1000) = 11,176,512
    # parameters (conv + BN) for 3 input channels.
    model = ConvVAE(VAEConfig(in_channels=3, image_size=32, base_width=64, attention_stage=4))
    assert model.num_parameters("attention") == 11_176_512
    heads = 2 * (512 * 2 * 2 * 32 + 32)  # layer4 is S/16 = 2x2 for a 32-pixel input
    assert model.num_parameters("encoder") == 11_176_512 + heads
    total = model.num_parameters("all")
    assert total == model.num_parameters("encoder") + model.num_parameters("decoder")
    assert total == sum(p.numel() for p in model.parameters())


def test_attention_parameter_count_by_hand():
    w = 4
    model = _tiny(attention_stage=1)
    stem = 1 * w * 7 * 7 + 2 * w
    layer1 = 4 * (w * w * 9 + 2 * w)
    assert model.num_parameters("attention") == stem + layer1
    with pytest.raises(ValueError):
        model.num_parameters("head")


def test_config_roundtrip_and_validation():
    cfg = VAEConfig(image_size=64, base_width=8, latent_dim=16, attention_stage=2)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({**cfg.to_dict(), "widht": 3})
    for bad in ({"image_size": 48}, {"image_size": 0}, {"attention_stage": 5}, {"attention_stage": -1},
                {"base_width": 0}, {"latent_dim": 0}, {"image_size": 64.0}):
        with pytest.raises(ValueError):
            VAEConfig(**bad)


def test_wrong_input_shape_raises():
    model = _tiny()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(1, 1, 64, 64))


def test_per_image_batchnorm_keeps_forward_values_and_running_stats():
    model = _tiny().train()
    x = torch.rand(4, 1, 32, 32)
    feats = model.attention_features(x)
    bn = model.layer2[0].bn1
    before = bn.running_mean.clone()
    ref_mu, _ = model.latent_from_stage(feats)
    after_normal = bn.running_mean.clone()
    with model.per_image_batchnorm():
        mu, _ = model.latent_from_stage(feats)
    assert torch.allclose(mu, ref_mu, atol=1e-5)
    assert not torch.equal(before, after_normal)  # the normal pass updates running stats
    assert torch.equal(bn.running_mean, after_normal)  # the per-image pass does not
    assert not bn.per_image  # flag restored


@pytest.mark.parametrize("train", [True, False])
def test_upblock_skip_path_at_input_resolution_equals_upsample_first(train):
    """UpBlock runs its 1x1 conv + BN skip path before the nearest upsampling: the outputs and
    every gradient must equal ``block(upsample(x))`` (float64), and the running mean must be
    updated identically (the running variance differs only by the unbiased n/(n-1) factor)."""
    import copy

    import torch.nn.functional as F

    from AnomalySegLib.nn.networks import UpBlock

    torch.manual_seed(0)
    fast = UpBlock(6, 3).double()
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for m in fast.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    slow = copy.deepcopy(fast)
    fast.train(train)
    slow.train(train)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    x_fast, x_slow = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast = fast(x_fast)
    y_slow = slow.block(F.interpolate(x_slow, scale_factor=2.0, mode="nearest"))
    assert y_fast.shape == (4, 3, 10, 14)
    torch.testing.assert_close(y_fast, y_slow, rtol=0, atol=1e-12)
    g = torch.randn_like(y_fast)
    y_fast.backward(g)
    y_slow.backward(g)
    torch.testing.assert_close(x_fast.grad, x_slow.grad, rtol=0, atol=1e-12)
    for (name, p_fast), p_slow in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p_fast.grad, p_slow.grad, rtol=0, atol=1e-12, msg=name)
    bn_fast, bn_slow = fast.block.shortcut[1], slow.block.shortcut[1]
    torch.testing.assert_close(bn_fast.running_mean, bn_slow.running_mean, rtol=0, atol=1e-12)
    if train:  # unbiased correction: n = 4*5*7 at the input, 4x more after upsampling
        n = 4 * 5 * 7
        running_var_fast = bn_fast.running_var
        expected = bn_slow.running_var + 0.1 * (n / (n - 1) - 4 * n / (4 * n - 1)) * \
            torch.var(slow.block.shortcut[0](x).detach(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(running_var_fast, expected, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(bn_fast.running_var, bn_slow.running_var, rtol=0, atol=0)
