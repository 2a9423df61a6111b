"""Per-method training loss and anomaly score: ``amcons`` | ``gradcamcons`` | ``vae``.

* ``amcons`` (Eq. 8): BCE + beta*KL - lambda_H * mean entropy of the softmax, over each
  image's brain-tissue pixels, of the upsampled channel-mean activation of the attention
  stage. Score: that activation map, running only the encoder up to the attention stage.
* ``gradcamcons`` (Eq. 5): BCE + beta*KL + lambda_s * mean extended log-barrier of the size
  constraint on sigmoid(upsampled Grad-CAM), switched on from ``warmup_epochs`` (the
  paper first trains a plain VAE). Alpha is computed per image with double backprop, so
  the barrier trains the layers that produce alpha too. Score: Grad-CAM with min-max
  normalisation over the tissue mask instead of the sigmoid (Sec. 3.6), encoder only.
* ``vae``: BCE + beta*KL. Score: |x - sigmoid(decoder(mu))| inside the tissue mask eroded
  by ``ERODE_PIXELS`` (residual maps are noisy along the brain border, Sec. 4.4).

Reconstruction and KL are sums over pixels / latent dims divided by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import activation_map, grad_cam, minmax_normalise, upsample
from .losses import (
    bce_reconstruction,
    extended_log_barrier,
    kl_divergence,
    masked_softmax_entropy,
    size_constraint,
)
from .models import ConvVAE
from .settings import JsonSettings

__all__ = [
    "METHODS",
    "ERODE_PIXELS",
    "MethodParams",
    "default_warmup_epochs",
    "training_loss",
    "anomaly_scores",
    "erode_mask",
]

METHODS = ("amcons", "gradcamcons", "vae")

#: Erosion (pixels, square 5x5 element) of the tissue mask for residual (vae) scores.
ERODE_PIXELS = 2

#: Fraction of the epochs that GradCAMCons trains as a plain VAE before the barrier
#: (the paper: 300 epochs of VAE first, then the size constraint).
GRADCAMCONS_WARMUP_FRACTION = 1.0 / 3.0


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


@dataclass
class MethodParams(JsonSettings):
    """Hyper-parameters of the training loss and the default calibration percentile."""

    method: str = "amcons"
    beta: float = 10.0
    lambda_h: float = 0.1
    t: float = 20.0
    p: float = 0.2
    lambda_s: float = 10.0
    warmup_epochs: int = 0
    default_percentile: float = 98.0

    def __post_init__(self) -> None:
        _check_method(self.method)
        for name in ("beta", "lambda_h", "lambda_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MethodParams.{name} must be >= 0, got {getattr(self, name)}")
        if not self.t > 0:
            raise ValueError(f"MethodParams.t must be > 0, got {self.t}")
        if not 0 <= self.p < 1:
            raise ValueError(f"MethodParams.p must be in [0, 1), got {self.p}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"MethodParams.warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        if not 0 < self.default_percentile < 100:
            raise ValueError(f"MethodParams.default_percentile must be in (0, 100), got {self.default_percentile}")

    @classmethod
    def defaults(cls, method: str) -> "MethodParams":
        """The paper's settings for ``method`` (Sec. 4.3; percentiles from its Table 2).

        ``warmup_epochs`` is 0 here because it depends on the number of epochs: training
        should use :func:`default_warmup_epochs` unless the user gives one.
        """
        _check_method(method)
        if method == "amcons":
            return cls(method=method, beta=10.0, lambda_h=0.1, default_percentile=98.0)
        if method == "gradcamcons":
            return cls(method=method, beta=1.0, t=20.0, p=0.2, lambda_s=10.0, default_percentile=95.0)
        return cls(method=method, beta=1.0, default_percentile=98.0)


def default_warmup_epochs(method: str, epochs: int) -> int:
    """Epochs of plain-VAE training before the method's constraint is switched on:
    ``floor(epochs / 3)`` for gradcamcons, 0 for the others."""
    _check_method(method)
    if method != "gradcamcons":
        return 0
    return int(epochs * GRADCAMCONS_WARMUP_FRACTION)


def _check_batch(model: ConvVAE, x: Tensor, mask: Tensor) -> Tensor:
    s = model.config.image_size
    if x.dim() != 4 or x.shape[-2:] != (s, s):
        raise ValueError(f"x must be [B, C, {s}, {s}], got {list(x.shape)}")
    if mask.shape != (x.shape[0], s, s):
        raise ValueError(f"mask must be [B, {s}, {s}] like x, got {list(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def _unwrap(model: torch.nn.Module) -> ConvVAE:
    """The ConvVAE inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    net = getattr(model, "module", model)
    if not isinstance(net, ConvVAE):
        raise TypeError(f"expected a ConvVAE (optionally wrapped in DDP), got {type(net).__name__}")
    return net


def _per_image_grad_cam(model: ConvVAE, features: Tensor, *, create_graph: bool) -> Tuple[Tensor, Tensor]:
    """Grad-CAM of each image on its own: the part of the encoder after the attention
    stage is re-run with the batch statistics held constant (same forward values), so
    train-mode BatchNorm does not leak other images' gradients into alpha."""
    with model.per_image_batchnorm():
        mu, _ = model.latent_from_stage(features)
    return grad_cam(features, mu, create_graph=create_graph)


def training_loss(
    model: ConvVAE, x: Tensor, mask: Tensor, params: MethodParams, *, epoch: int
) -> Tuple[Tensor, Dict[str, float]]:
    """Loss of one batch for ``params.method`` and a dict of its terms as floats.

    ``model`` may be wrapped in DistributedDataParallel (its forward is then called
    through the wrapper). ``x`` [B, C, S, S] in [0, 1]; ``mask`` bool [B, S, S] brain
    tissue per image; ``epoch`` (0-based) decides whether the GradCAMCons barrier is
    active (``epoch >= params.warmup_epochs``). Log keys: ``loss``, ``rec``, ``kl`` and
    ``entropy`` (amcons) or ``barrier`` + ``mean_attention`` (gradcamcons). During the
    GradCAMCons warm-up the barrier is not in the loss but is still reported (computed
    without double backprop) so the attention coverage can be followed.
    """
    method = _check_method(params.method)
    net = _unwrap(model)
    mask = _check_batch(net, x, mask)
    size = net.config.image_size
    out = model(x)  # through the wrapper, so DDP sees the forward
    rec = bce_reconstruction(out.logits, x)
    kl = kl_divergence(out.mu, out.logvar)
    loss = rec + params.beta * kl
    terms: Dict[str, Tensor] = {"rec": rec, "kl": kl}

    if method == "amcons":
        amap = upsample(activation_map(out.features[net.config.attention_stage]).float(), size)
        entropy = masked_softmax_entropy(amap, mask).mean()
        loss = loss - params.lambda_h * entropy
        terms["entropy"] = entropy
    elif method == "gradcamcons":
        active = epoch >= params.warmup_epochs
        cam, _ = _per_image_grad_cam(net, out.features[net.config.attention_stage], create_graph=active)
        attention = torch.sigmoid(upsample(cam, size))
        barrier = extended_log_barrier(size_constraint(attention, params.p), params.t).mean()
        if active:
            loss = loss + params.lambda_s * barrier
        terms["barrier"] = barrier
        terms["mean_attention"] = attention.mean()

    names = ["loss"] + list(terms)
    values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
    return loss, dict(zip(names, values.tolist()))  # one device sync for all logs


def erode_mask(mask: Tensor, pixels: int = ERODE_PIXELS) -> Tensor:
    """Binary erosion of [B, H, W] masks by a (2*pixels+1)^2 square; outside the image
    counts as background (like scipy's ``binary_erosion`` default)."""
    mask = mask.bool()
    if pixels <= 0:
        return mask
    outside = (~mask).float()[:, None]
    outside = F.pad(outside, (pixels,) * 4, value=1.0)
    grown = F.max_pool2d(outside, kernel_size=2 * pixels + 1, stride=1)
    return grown[:, 0] < 0.5


def anomaly_scores(model: ConvVAE, x: Tensor, mask: Tensor, method: str) -> Tensor:
    """Pixel anomaly scores [B, S, S] (float32, 0 outside the mask) for ``method``.

    The model runs in eval mode (its previous mode is restored afterwards) and only the
    part each method needs: the encoder up to the attention stage (amcons), the encoder
    (gradcamcons: gradients of mu, no decoder), or the whole VAE with z = mu (vae).
    Results are detached.
    """
    _check_method(method)
    model = _unwrap(model)
    mask = _check_batch(model, x, mask)
    size = model.config.image_size
    was_training = model.training
    model.eval()
    try:
        if method == "amcons":
            with torch.inference_mode():
                amap = upsample(activation_map(model.attention_features(x)).float(), size)
                scores = torch.where(mask, amap, torch.zeros_like(amap))
            return scores.clone()  # a normal tensor, usable outside inference mode
        if method == "gradcamcons":
            with torch.no_grad():
                feats = model.attention_features(x)
            # Autograd is needed for alpha even when the caller runs under no_grad or
            # inference_mode; only the stages after the attention stage are recorded.
            with torch.inference_mode(False), torch.enable_grad():
                feats = feats.detach().clone().requires_grad_(True)
                mu, _ = model.latent_from_stage(feats)
                cam, _ = grad_cam(feats, mu, create_graph=False)
            return minmax_normalise(upsample(cam.detach(), size), mask)
        with torch.inference_mode():
            mu, _, _ = model.encode(x)
            recon = torch.sigmoid(model.decode(mu).float())
            residual = (x.float() - recon).abs().mean(dim=1)
            scores = torch.where(erode_mask(mask), residual, torch.zeros_like(residual))
        return scores.clone()
    finally:
        model.train(was_training)
