"""Loss terms of the paper (Eqs. 1, 3, 4, 5, 8), differentiable torch functions.

Everything is computed in float32 (inputs are cast), so the terms are safe under
``torch.autocast``: exp/log of half precision values overflow or lose the barrier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kl_divergence",
    "bce_reconstruction",
    "masked_softmax_entropy",
    "extended_log_barrier",
    "size_constraint",
]


def _f32(x: Tensor) -> Tensor:
    """Promote half/bfloat16 (autocast outputs) to float32; keep float64 as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dims, mean over batch.

    ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` per image.
    """
    if mu.shape != logvar.shape or mu.dim() < 1:
        raise ValueError(f"mu {list(mu.shape)} and logvar {list(logvar.shape)} must have the same shape")
    mu, logvar = _f32(mu), _f32(logvar)
    per_image = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1)
    return per_image.mean()


def bce_reconstruction(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits summed over pixels and channels, mean over batch.

    ``target`` must lie in [0, 1] (intensities are normalised to that range).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {list(logits.shape)} and target {list(target.shape)} differ in shape")
    logits = _f32(logits)
    total = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum")
    return total / logits.shape[0]


def masked_softmax_entropy(maps: Tensor, mask: Tensor) -> Tensor:
    """Shannon entropy (nats) of the softmax of each map over its own mask pixels.

    ``maps`` [B, H, W], ``mask`` bool [B, H, W] (per image, any number of pixels).
    Returns [B]. Pixels outside the mask get probability exactly 0 and do not affect the
    result, whatever their value. A uniform map over n pixels gives log(n), the maximum.
    An empty mask gives 0 with finite gradients.
    """
    if maps.dim() != 3 or maps.shape != mask.shape:
        raise ValueError(f"maps {list(maps.shape)} and mask {list(mask.shape)} must both be [B, H, W]")
    mask = mask.bool()
    m = _f32(maps)
    # Shift by the per-image max over the mask (softmax is shift invariant; detaching the
    # shift changes no gradient) and zero everything outside the mask with where(), so
    # inf/NaN/huge values outside never enter exp() or the gradient.
    neg_inf = torch.tensor(float("-inf"), device=m.device)
    peak = torch.where(mask, m, neg_inf).amax(dim=(-2, -1), keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = torch.where(mask, m - peak, torch.zeros_like(m))
    e = torch.where(mask, shifted.exp(), torch.zeros_like(m))
    z = e.sum(dim=(-2, -1), keepdim=True)
    z_safe = torch.where(z > 0, z, torch.ones_like(z))  # empty mask -> Z := 1, p = 0
    p = e / z_safe
    # H = -sum p log p = log Z - sum p * shifted   (log p = shifted - log Z)
    return torch.log(z_safe).flatten(1)[:, 0] - (p * shifted).sum(dim=(-2, -1))


def extended_log_barrier(z: Tensor, t: float) -> Tensor:
    """Elementwise extended log-barrier (Eq. 4, Kervadec et al.).

    ``-(1/t) log(-z)`` for ``z <= -1/t^2``, else ``t z - (1/t) log(1/t^2) + 1/t``:
    convex, continuous with a continuous slope (= t) at the joint, defined for all z.
    """
    if not t > 0:
        raise ValueError(f"log-barrier t must be > 0, got {t}")
    z = _f32(z)
    joint = -1.0 / (t * t)
    # Clamp the log's argument so the branch torch.where discards never sees log(<= 0):
    # a NaN there would poison the gradient even though its value is not selected.
    barrier = -(1.0 / t) * torch.log(-torch.clamp(z, max=joint))
    linear = t * z - (1.0 / t) * math.log(1.0 / (t * t)) + 1.0 / t
    return torch.where(z <= joint, barrier, linear)


def size_constraint(attention: Tensor, p: float) -> Tensor:
    """Per image ``(1 - mean over all pixels of attention) - p`` (f_c in Eq. 3), [B].

    <= 0 when the attention covers at least a fraction 1 - p of the image.
    """
    if attention.dim() < 2:
        raise ValueError(f"attention must be [B, ...], got {list(attention.shape)}")
    return (1.0 - _f32(attention).flatten(1).mean(dim=1)) - p
