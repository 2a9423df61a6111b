"""scripts/study_attention.py: end-to-end smoke run at tiny size, and the facts of the
re-implemented authors' setup (plain 7x7/2 stem without BN, one brain mask per batch)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return _script("study_attention")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "data"
    make = _script("make_benchmark_data")
    assert make.main(["-o", str(out), "--n-healthy", "4", "--n-per-kind", "1", "--n-lesion-free", "1",
                      "--kinds", "bright", "small", "--resolution", "4", "--slices", "6",
                      "--templates", "mni152"]) == 0
    return out


def test_study_runs_end_to_end_and_writes_tables(study, tiny_data, tmp_path):
    out = tmp_path / "out"
    variants = ["intensity", "amcons", "amcons+authors-inference", "reference", "reference+library-inference"]
    assert study.main(["--data", str(tiny_data), "-o", str(out), "--epochs", "1", "--image-size", "32",
                       "--width", "8", "--batch-size", "8", "--quiet", "--variants", *variants]) == 0
    md = (out / "results.md").read_text(encoding="utf-8")
    for kind in ("bright", "small"):
        assert f"## {kind}" in md
    for name in variants:
        assert f"| {name} |" in md
    assert "top 0.5 % near boundary" in md
    results = json.loads((out / "results.json").read_text())
    assert {e["variant"] for e in results["entries"]} == set(variants)
    for entry in results["entries"]:
        assert set(entry["kinds"]) == {"bright", "small"}
        hm = entry["healthy_maps"]
        assert hm["top_within_boundary"] is None or 0.0 <= hm["top_within_boundary"] <= 1.0
        assert 0.0 < hm["brain_within_boundary"] < 1.0
    assert results["aggregate"]["reference"]["kinds"]["bright"]["auprc"]["n"] == 1
    assert (out / "maps.png").is_file() and (out / "maps_main.png").is_file()
    # a second call refuses to overwrite, --resume keeps the finished entries without retraining
    assert study.main(["--data", str(tiny_data), "-o", str(out), "--variants", "intensity"]) == 1
    assert study.main(["--data", str(tiny_data), "-o", str(out), "--epochs", "1", "--image-size", "32",
                       "--width", "8", "--batch-size", "8", "--quiet", "--resume", "--no-figures",
                       "--variants", *variants]) == 0
    assert len(json.loads((out / "results.json").read_text())["entries"]) == len(variants)


def test_reference_encoder_has_plain_stem_without_batchnorm(study):
    from AnomalySegLib.nn.networks import ConvVAE, VAEConfig

    config = VAEConfig(image_size=32, base_width=8, latent_dim=4, attention_stage=1)
    net = study.ReferenceVAE(config)
    assert isinstance(net, ConvVAE)  # the library's scoring code accepts it
    stem_layers = list(net.stem.children())
    assert len(stem_layers) == 1 and isinstance(stem_layers[0], nn.Conv2d)
    conv = stem_layers[0]
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3) and conv.bias is None
    assert conv.out_channels == 8
    # no BN and no ReLU: stage 0 is the bare convolution (negative values survive)
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        _, _, feats = net.encode(x)
        assert torch.allclose(feats[0], conv(x))
        assert (feats[0] < 0).any()
        assert feats[1].shape == (2, 8, 16, 16)  # layer1 at S/2: no max-pool
    # our encoder keeps conv + BN + ReLU
    ours = ConvVAE(config)
    assert any(isinstance(m, nn.BatchNorm2d) for m in ours.stem.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.stem.modules())
    # the reference decoder: two blocks per stage, 4w -> w/4 channels, logits of the image size
    assert isinstance(net.decoder, study.ReferenceDecoder)
    assert net.decoder.out.in_channels == 2 and len(net.decoder.stages) == 4
    with torch.no_grad():
        assert net.decode(torch.zeros(3, 4)).shape == (3, 1, 32, 32)
    # ablation toggle: our stem inside the reference network
    mixed = study.ReferenceVAE(config, study.RefOptions(stem="bn_relu"))
    assert any(isinstance(m, nn.BatchNorm2d) for m in mixed.stem.modules())


def test_batch_shared_mask_is_one_eroded_union_for_the_whole_batch(study):
    x = np.zeros((3, 1, 16, 16), dtype=np.float32)
    x[0, 0, 2:8, 2:8] = 0.5  # three "brains" at different places
    x[1, 0, 6:12, 6:12] = 0.7
    x[2, 0, 9:15, 3:9] = 0.2
    union = (x[:, 0] != 0).any(axis=0)
    no_erosion = study.batch_shared_mask(x, erode=0)
    assert no_erosion.shape == (16, 16) and np.array_equal(no_erosion, union)
    from scipy import ndimage

    eroded = study.batch_shared_mask(x, erode=2)
    assert np.array_equal(eroded, ndimage.binary_erosion(union, structure=np.ones((2, 2), bool)))
    # pixels of image 0's background are inside the mask because other images cover them
    assert eroded[10, 10] and x[0, 0, 10, 10] == 0
    # one Otsu threshold for the whole batch: image 2 (dim) falls below it, so it drops out
    otsu = study.batch_shared_mask(x, foreground="otsu", erode=0)
    assert np.array_equal(otsu, (x[:2, 0] != 0).any(axis=0))
    # scaled erosion: 6 px at 224, 2 px at 64
    assert study.RefOptions().erode_pixels(224) == 6 and study.RefOptions().erode_pixels(64) == 2


def test_reference_loss_uses_the_shared_mask_and_authors_scaling(study):
    from AnomalySegLib.nn.networks import VAEConfig

    torch.manual_seed(0)
    config = VAEConfig(image_size=32, base_width=8, latent_dim=4, attention_stage=1)
    net = study.ReferenceVAE(config)
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 8:24] = torch.rand(4, 1, 16, 16) * 0.8 + 0.1
    x[1, :, 4:8, 4:28] = 0.3
    opts = study.RefOptions()
    torch.manual_seed(1)
    loss, logs = study.reference_losses(net, x, None, beta=10.0, lambda_h=0.1, epoch=1, opts=opts)
    torch.manual_seed(1)
    with torch.no_grad():
        out = net(x)  # same reparameterisation sample
    b = x.shape[0]
    rec = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, x, reduction="sum") / b
    kl = -0.5 * torch.sum(1 + out.logvar - out.mu ** 2 - out.logvar.exp()) / b
    am = torch.nn.functional.interpolate(out.features[1].mean(1, keepdim=True), size=(32, 32), mode="bilinear",
                                         align_corners=True)[:, 0]
    shared = torch.from_numpy(study.batch_shared_mask(x.numpy(), erode=1))
    p = torch.softmax(am[:, shared], dim=-1)  # the same pixel set for every image
    entropy = (-(p * torch.log(p + 1e-12)).sum(-1)).mean()
    assert logs["rec"] == pytest.approx(float(rec), rel=1e-5)
    assert logs["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert logs["entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(rec + 10 * kl - 0.1 * entropy), rel=1e-5)
    assert logs["entropy"] <= math.log(int(shared.sum())) + 1e-6
    # first epoch: no entropy term (the authors add it when epoch > 0)
    torch.manual_seed(1)
    loss0, _ = study.reference_losses(net, x, None, beta=10.0, lambda_h=0.1, epoch=0, opts=opts)
    assert float(loss0.detach()) == pytest.approx(float(rec + 10 * kl), rel=1e-5)
