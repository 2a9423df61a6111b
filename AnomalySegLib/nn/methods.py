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
* ``dae`` (beyond the paper; Kascenas et al., "Denoising autoencoders for unsupervised
  anomaly detection in brain MRI", MIDL 2022): a U-Net learns to remove *coarse* noise
  (Gaussian noise drawn on a ``noise_cells`` x ``noise_cells`` grid, upsampled
  bilinearly, std ``noise_std``, randomly shifted, added inside the tissue mask) from
  healthy images; loss = mean squared error to the clean image. Anomalies look like
  coarse "noise" to it and are removed, so the residual |x - f(x)| (eroded tissue mask)
  is large on them, bright or dark.

Reconstruction and KL are sums over pixels / latent dims divided by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

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
from .networks import ConvVAE
from .unet import UNet
from ..settings import (BIAS_FLATTENING, INTENSITY_TERMS, METHOD_NAMES, SCAN_NORMALISATIONS, JsonSettings, check_bias_field,
                        check_percentile)

__all__ = [
    "METHODS",
    "ARCHITECTURE_OF",
    "coarse_noise",
    "ERODE_PIXELS",
    "MethodParams",
    "default_warmup_epochs",
    "training_loss",
    "anomaly_scores",
    "erode_mask",
]

METHODS = METHOD_NAMES

#: Network architecture each method trains (:data:`.models.ARCHITECTURES`).
ARCHITECTURE_OF = {"amcons": "vae", "gradcamcons": "vae", "vae": "vae", "dae": "unet"}

#: Erosion (pixels, square 5x5 element) of the tissue mask for residual (vae) scores.
ERODE_PIXELS = 2

#: Default smoothing of dae maps (mm): residuals are noisy pixel by pixel (Kascenas et al.
#: median-filter them); smoothing before thresholding removes most single-voxel blobs.
DAE_SMOOTHING_MM = 2.0

#: Fraction of the epochs that GradCAMCons trains as a plain VAE before the barrier
#: (the paper: 300 epochs of VAE first, then the size constraint).
GRADCAMCONS_WARMUP_FRACTION = 1.0 / 3.0


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def intensity_term_is_global(term: str) -> bool:
    """Whether ``term`` is normalised by one global healthy mean/std (else per position)."""
    return term.endswith("-global")


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
    #: dae: std of the coarse training noise and the side of its grid (cells per image).
    noise_std: float = 0.2
    noise_cells: int = 16
    #: dae: std of the log of a random smooth multiplicative field (a 3 x 3 grid,
    #: upsampled) applied to each clean training image, input and target alike: a healthy
    #: scan under another bias field is still healthy, so the network learns to keep smooth
    #: intensity trends instead of "repairing" them (0 = off; files without it: 0).
    bias_augmentation: float = 0.0
    #: Gaussian smoothing (sigma, mm) of the voxel-grid map inside the brain before
    #: thresholding and calibration (0 = none, the paper; files without it: 0).
    smoothing_mm: float = 0.0
    #: Turn maps into z-scores of their healthy variation at each normalised position
    #: (:mod:`.position_stats`, fitted on the training volumes after training).
    position_normalise: bool = False
    #: Fusion with a healthy-normalised intensity deviation: the score becomes
    #: ``(z_map + w * d) / (1 + w)`` with ``w = fuse_intensity`` (0 = no fusion) and ``d``
    #: the intensity term chosen by ``intensity_term`` (:data:`INTENSITY_TERMS`).
    fuse_intensity: float = 0.0
    #: ``abs-position``: |z| against healthy per-position statistics (files without the
    #: field); ``bright-position``: max(z, 0) of the same (hyperintense deviations only);
    #: ``bright-global`` / ``abs-global``: the same against one healthy brain mean/std;
    #: ``agree-position`` (dae): |z| where the residual x - f(x) has the sign of z.
    intensity_term: str = "abs-position"
    #: Standardise each scan's voxel-grid map by its own brain-voxel median and spread
    #: (:data:`~AnomalySegLib.settings.SCAN_NORMALISATIONS`; files without it: ``off``),
    #: after smoothing, before calibration and thresholding.
    scan_normalise: str = "off"
    #: Hysteresis of the mask: regions flagged at the operating threshold extend to the
    #: connected brain voxels above this healthy percentile's threshold (0 = off, plain
    #: thresholding as the paper; files without it: 0). Stored in the calibration too, so
    #: ``segment``, ``evaluate`` and the Slicer slider apply it (docs/METHOD.md).
    grow_percentile: float = 0.0
    #: Divide out a smooth bias field fitted against the healthy intensity statistics
    #: (:mod:`AnomalySegLib.data.bias_flatten`) before scoring: ``off`` (files without
    #: it), ``intensity`` (the fusion's intensity term only) or ``all`` (the network's
    #: input too, in training and at inference; files trained before stop 21 saw
    #: unflattened images in training). Needs per-position intensity statistics (fusion on).
    bias_flatten: str = "off"
    #: Shape of the flattened field (:data:`~AnomalySegLib.settings.BIAS_FIELDS`):
    #: ``quadratic`` (files without it) or ``spline``.
    bias_field: str = "quadratic"

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
        if not self.noise_std > 0:
            raise ValueError(f"MethodParams.noise_std must be > 0, got {self.noise_std}")
        if isinstance(self.noise_cells, bool) or not isinstance(self.noise_cells, int) or self.noise_cells < 1:
            raise ValueError(f"MethodParams.noise_cells must be an integer >= 1, got {self.noise_cells!r}")
        if not (0 <= self.bias_augmentation <= 1):
            raise ValueError(f"MethodParams.bias_augmentation must be in [0, 1], got {self.bias_augmentation}")
        if not (0 <= self.smoothing_mm <= 50):
            raise ValueError(f"MethodParams.smoothing_mm must be in [0, 50], got {self.smoothing_mm}")
        if not isinstance(self.position_normalise, bool):
            raise ValueError(f"MethodParams.position_normalise must be true or false, got {self.position_normalise!r}")
        if not (0 <= self.fuse_intensity <= 100):
            raise ValueError(f"MethodParams.fuse_intensity must be in [0, 100], got {self.fuse_intensity}")
        if self.fuse_intensity > 0 and not self.position_normalise:
            raise ValueError("MethodParams.fuse_intensity needs position_normalise (both maps are z-scored)")
        if self.intensity_term not in INTENSITY_TERMS:
            raise ValueError(f"MethodParams.intensity_term must be one of {', '.join(INTENSITY_TERMS)}, "
                             f"got {self.intensity_term!r}")
        if self.intensity_term.startswith("agree") and self.method != "dae":
            raise ValueError("MethodParams.intensity_term 'agree-position' needs the dae's signed residual")
        if self.scan_normalise not in SCAN_NORMALISATIONS:
            raise ValueError(f"MethodParams.scan_normalise must be one of {', '.join(SCAN_NORMALISATIONS)}, "
                             f"got {self.scan_normalise!r}")
        if self.bias_flatten not in BIAS_FLATTENING:
            raise ValueError(f"MethodParams.bias_flatten must be one of {', '.join(BIAS_FLATTENING)}, "
                             f"got {self.bias_flatten!r}")
        check_bias_field(self.bias_field, "MethodParams.bias_field")
        if self.bias_flatten != "off" and (self.fuse_intensity <= 0 or intensity_term_is_global(self.intensity_term)):
            raise ValueError("MethodParams.bias_flatten needs the per-position intensity statistics "
                             "(fuse_intensity > 0 with a *-position intensity term)")
        check_percentile(self.default_percentile, "MethodParams.default_percentile")
        if self.grow_percentile != 0:
            check_percentile(self.grow_percentile, "MethodParams.grow_percentile (0 = off)")

    @classmethod
    def defaults(cls, method: str) -> "MethodParams":
        """The paper's settings for ``method`` (Sec. 4.3; percentiles from its Table 2).

        ``warmup_epochs`` is 0 here because it depends on the number of epochs: training
        should use :func:`default_warmup_epochs` unless the user gives one.
        """
        _check_method(method)
        if method == "amcons":
            # position_normalise: beyond the paper; its healthy maps carry a fixed band along
            # one side of the brain boundary that outscores lesions (docs/BENCHMARKS.md,
            # attention study: mean AUPRC 0.018 -> 0.095 with it)
            return cls(method=method, beta=10.0, lambda_h=0.1, default_percentile=98.0, position_normalise=True)
        if method == "gradcamcons":
            return cls(method=method, beta=1.0, t=20.0, p=0.2, lambda_s=10.0, default_percentile=95.0)
        if method == "dae":
            # position z-scores + fusion with the hyperintense intensity deviation: chosen on
            # the development data (docs/BENCHMARKS.md, fusion study), measured on held-out
            # seeds. One-sided because |z| also rewards dark healthy CSF edges, which raises
            # the healthy threshold for every bright lesion; dark lesions rest on the dae alone.
            # bias_augmentation stays off: measured mixed (better on the development set,
            # worse on a held-out seed; docs/BENCHMARKS.md, bias-field augmentation).
            # scan_normalise terms-upper: each term standardised by the scan's own median and
            # p90 - median before fusion; chosen on the development set among four variants,
            # better on all four held-out seeds (docs/BENCHMARKS.md, per-scan standardisation)
            # grow_percentile stays off: growing masks to healthy p99.5 (hysteresis) raised Dice
            # at the operating point on the development set (0.555 -> 0.665) but lowered it on
            # all three FLAIR-like held-out seeds (e.g. 0.608 -> 0.557: tumours and faint lesions
            # gain, bright and small ones lose) and broke the false-blob budget on two held-out
            # sets (docs/BENCHMARKS.md, mask growth)
            # bias_flatten (stop 19): each scan's smooth bias field, fitted against the healthy
            # intensity per position, is divided out before scoring (development set: pooled AUPRC
            # 0.661 -> 0.776, Dice 0.591 -> 0.755). "all" since stop 22: the network is trained on,
            # and given, the flattened images too; under a rule fixed beforehand it beat the
            # stop-19 "intensity" (fused term only) on six cohorts, the two smooth-field ones
            # included, where "intensity" lost Dice to the baseline (docs/BENCHMARKS.md, stop 22)
            return cls(method=method, beta=0.0, noise_std=0.2, noise_cells=16, default_percentile=98.0,
                       smoothing_mm=DAE_SMOOTHING_MM, position_normalise=True, fuse_intensity=1.0,
                       intensity_term="bright-position", scan_normalise="terms-upper", bias_flatten="all")
        return cls(method=method, beta=1.0, default_percentile=98.0)


def default_warmup_epochs(method: str, epochs: int) -> int:
    """Epochs of plain-VAE training before the method's constraint is switched on:
    ``floor(epochs / 3)`` for gradcamcons, 0 for the others."""
    _check_method(method)
    if method != "gradcamcons":
        return 0
    return int(epochs * GRADCAMCONS_WARMUP_FRACTION)


def _check_batch(model: torch.nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    s = model.config.image_size
    if x.dim() != 4 or x.shape[-2:] != (s, s):
        raise ValueError(f"x must be [B, C, {s}, {s}], got {list(x.shape)}")
    if mask.shape != (x.shape[0], s, s):
        raise ValueError(f"mask must be [B, {s}, {s}] like x, got {list(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ConvVAE / UNet inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    net = getattr(model, "module", model)
    if not isinstance(net, (ConvVAE, UNet)):
        raise TypeError(f"expected a ConvVAE or UNet (optionally wrapped in DDP), got {type(net).__name__}")
    return net


def _check_architecture(net: torch.nn.Module, method: str) -> None:
    wanted = UNet if ARCHITECTURE_OF[method] == "unet" else ConvVAE
    if not isinstance(net, wanted):
        raise TypeError(f"method {method!r} needs a {wanted.__name__}, got a {type(net).__name__}")


def coarse_noise(x: Tensor, std: float, cells: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Coarse Gaussian noise like ``x`` ``[B, C, S, S]``: i.i.d. N(0, std^2) on a
    ``(cells + 1)^2`` grid, bilinearly upsampled so one cell spans ``S / cells`` pixels,
    then cropped at a random offset (the noise is not tied to a fixed grid)."""
    b, c, h, w = x.shape
    grid = torch.randn((b, c, cells + 1, cells + 1), generator=generator, device="cpu").to(x.device)
    big = (h * (cells + 1) + cells - 1) // cells, (w * (cells + 1) + cells - 1) // cells
    noise = F.interpolate(grid * std, size=big, mode="bilinear", align_corners=False)
    oy = int(torch.randint(0, big[0] - h + 1, (1,), generator=generator))
    ox = int(torch.randint(0, big[1] - w + 1, (1,), generator=generator))
    return noise[:, :, oy:oy + h, ox:ox + w].to(x.dtype)


#: Control points per side of the augmentation's bias field: smooth across the whole image.
BIAS_FIELD_CELLS = 2


def random_bias_field(x: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random smooth multiplicative field like ``x`` ``[B, C, S, S]``: ``exp`` of coarse
    noise (:func:`coarse_noise`) on a ``BIAS_FIELD_CELLS`` grid, i.e. a log-field with
    std ``std`` at the control points, varying over the whole image."""
    return torch.exp(coarse_noise(x.float(), std, BIAS_FIELD_CELLS, generator)).to(x.dtype)


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
    _check_architecture(net, method)
    mask = _check_batch(net, x, mask)
    size = net.config.image_size
    if method == "dae":
        if params.bias_augmentation > 0:
            x = random_bias_field(x, params.bias_augmentation) * x
            x = x.clamp(0.0, 1.0)
        noisy = x + coarse_noise(x, params.noise_std, params.noise_cells) * mask[:, None].to(x.dtype)
        recon = model(noisy)  # through the wrapper, so DDP sees the forward
        rec = F.mse_loss(recon.float(), x.float())
        return rec, {"loss": float(rec.detach()), "rec": float(rec.detach())}
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


def anomaly_scores(model: ConvVAE, x: Tensor, mask: Tensor, method: str, *, signed: bool = False) -> Tensor:
    """Pixel anomaly scores [B, S, S] (float32, 0 outside the mask) for ``method``.

    The model runs in eval mode (its previous mode is restored afterwards) and only the
    part each method needs: the encoder up to the attention stage (amcons), the encoder
    (gradcamcons: gradients of mu, no decoder), or the whole VAE with z = mu (vae).
    Results are detached.
    """
    _check_method(method)
    model = _unwrap(model)
    _check_architecture(model, method)
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
        if method == "dae":
            with torch.inference_mode():
                residual = (x.float() - model(x).float()).mean(dim=1)
                residual = residual if signed else residual.abs()
                scores = torch.where(erode_mask(mask), residual, torch.zeros_like(residual))
            return scores.clone()
        with torch.inference_mode():
            mu, _, _ = model.encode(x)
            recon = torch.sigmoid(model.decode(mu).float())
            residual = (x.float() - recon).abs().mean(dim=1)
            scores = torch.where(erode_mask(mask), residual, torch.zeros_like(residual))
        return scores.clone()
    finally:
        model.train(was_training)
