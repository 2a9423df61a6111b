"""Attention maps of the encoder: activation maps (Eq. 6) and Grad-CAM (Eq. 2).

Maps are ``[B, h, w]`` tensors at the resolution of the chosen encoder stage;
:func:`upsample` brings them to image size and :func:`minmax_normalise` maps them to
[0, 1] inside the brain-tissue mask (the GradCAMCons inference normalisation, Sec. 3.6).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["activation_map", "grad_cam", "upsample", "minmax_normalise"]


def _f32(x: Tensor) -> Tensor:
    """Promote half/bfloat16 (autocast outputs) to float32; keep float64 as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def activation_map(features: Tensor) -> Tensor:
    """Eq. 6: channel mean of a stage activation, ``[B, K, h, w] -> [B, h, w]``."""
    if features.dim() != 4:
        raise ValueError(f"features must be [B, K, h, w], got {list(features.shape)}")
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        # channels-last (the fast inference copy): channels are innermost, so reduce them
        # there instead of copying to NCHW first; bf16/fp16 activations accumulate in float32
        low = features.dtype in (torch.bfloat16, torch.float16)
        return features.permute(0, 2, 3, 1).mean(dim=-1, dtype=torch.float32 if low else None)
    return features.mean(dim=1)


def grad_cam(features: Tensor, mu: Tensor, *, create_graph: bool) -> Tuple[Tensor, Tensor]:
    """Eq. 2 before the sigmoid: ``cam[b] = sum_k alpha[b, k] * features[b, k]``.

    ``alpha[b, k]`` is the spatial mean of ``d(sum_j mu[b, j]) / d features[b, k, :, :]``.
    One backward pass of ``sum_b sum_j mu[b, j]`` gives every image's own gradient *when
    images are independent functions of their features*: true in eval mode, and in train
    mode inside :meth:`ConvVAE.per_image_batchnorm` (plain train-mode BatchNorm mixes the
    images through the batch statistics, and the gradient of the batch sum then is not a
    per-image Grad-CAM). ``features`` must be part of the graph that produced ``mu``.

    With ``create_graph=True`` the result stays differentiable w.r.t. the parameters
    through ``alpha`` as well (double backprop), so a loss on the map also trains the
    layers between ``features`` and ``mu``.

    Returns ``(cam [B, h, w], alpha [B, K])``, computed in float32 (float64 inputs stay float64).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, K, h, w], got {list(features.shape)}")
    if not features.requires_grad:
        raise ValueError("grad_cam needs features that are part of the autograd graph of mu")
    (grads,) = torch.autograd.grad(
        _f32(mu).sum(), features, create_graph=create_graph, retain_graph=create_graph
    )
    alpha = _f32(grads).mean(dim=(2, 3))
    # Elementwise product + sum (not einsum): stays float32 under autocast.
    cam = (alpha[:, :, None, None] * _f32(features)).sum(dim=1)
    return cam, alpha


def upsample(maps: Tensor, size: int) -> Tensor:
    """Bilinear resize ``[B, h, w] -> [B, size, size]`` (align_corners=False)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, h, w], got {list(maps.shape)}")
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def minmax_normalise(maps: Tensor, mask: Tensor) -> Tensor:
    """Per image min-max over the mask pixels: [0, 1] inside the mask, 0 outside.

    A map that is constant over its mask (or an empty mask) gives 0 everywhere.
    """
    if maps.shape != mask.shape:
        raise ValueError(f"maps {list(maps.shape)} and mask {list(mask.shape)} differ in shape")
    mask = mask.bool()
    m = _f32(maps)
    inf = torch.tensor(float("inf"), device=m.device)
    lo = torch.where(mask, m, inf).amin(dim=(-2, -1), keepdim=True)
    hi = torch.where(mask, m, -inf).amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    # Division only where the span is usable, so constant or empty masks give 0, not NaN.
    out = torch.where(ok, (m - torch.where(ok, lo, 0.0)) / torch.where(ok, span, 1.0), 0.0)
    return torch.where(mask, out.clamp(0.0, 1.0), 0.0)
