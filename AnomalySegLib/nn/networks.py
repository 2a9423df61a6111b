"""Convolutional VAE of the paper (Sec. 4.3): ResNet-18 encoder, dense latent, residual decoder.

Encoder stages (the ``features`` list, indexed by ``VAEConfig.attention_stage``):

====== ====================================== ============ ==========
stage  layers                                 channels     size
====== ====================================== ============ ==========
0      conv 7x7 stride 2 + BN + ReLU (stem)   w            S/2
1      layer1 (2 blocks)                      w            S/2
2      layer2 (2 blocks, stride 2)            2w           S/4
3      layer3 (2 blocks, stride 2)            4w           S/8
4      layer4 (2 blocks, stride 2)            8w           S/16
====== ====================================== ============ ==========

``w = base_width`` (64 gives ResNet-18's convolutional layers). Like the authors' network,
the encoder has no max-pool after the stem, so the first residual block -- where the
attention map is taken (supplementary Table 3: the first block is best) -- keeps half the
input resolution (with the max-pool it would drop to S/4). The latent is
dense: the layer4 activation is flattened and mapped by two linear heads to ``mu`` and
``logvar``. The decoder mirrors the encoder (linear -> 8w x S/16 x S/16, then four x2
upsampling residual stages with 4w, 2w, w, max(w/2, 4) channels) and ends with a 3x3
convolution that returns **logits** (apply a sigmoid to get an image; train with
BCE-with-logits). ``image_size`` must be a multiple of 32 (a multiple of 16 would do for
this network; 32 keeps sizes compatible with standard ResNet-18 inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..settings import JsonSettings
from .unet import UNet

__all__ = ["VAEConfig", "VAEOutput", "ConvVAE", "BasicBlock", "UpBlock", "build_network", "ARCHITECTURES"]

NUM_STAGES = 5
ARCHITECTURES = ("vae", "unet")


@dataclass
class VAEConfig(JsonSettings):
    """Architecture of :class:`ConvVAE` (stored in the model file as JSON)."""

    in_channels: int = 1
    image_size: int = 224
    base_width: int = 64
    latent_dim: int = 32
    attention_stage: int = 1
    #: ``vae`` (:class:`ConvVAE`) or ``unet`` (:class:`~AnomalySegLib.nn.unet.UNet`, the
    #: denoising auto-encoder; ``latent_dim`` and ``attention_stage`` are then unused).
    #: Files written before this field existed are VAEs.
    architecture: str = "vae"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"VAEConfig.architecture must be one of {', '.join(ARCHITECTURES)}, "
                             f"got {self.architecture!r}")
        for f in dataclasses.fields(self):
            if f.name == "architecture":
                continue
            value = getattr(self, f.name)
            # bool is an int subclass; a True/False width is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"VAEConfig.{f.name} must be an integer, got {value!r}")
        if self.in_channels < 1:
            raise ValueError(f"VAEConfig.in_channels must be >= 1, got {self.in_channels}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(
                f"VAEConfig.image_size must be a multiple of 32 and >= 32, got {self.image_size}"
            )
        if self.base_width < 1:
            raise ValueError(f"VAEConfig.base_width must be >= 1, got {self.base_width}")
        if self.latent_dim < 1:
            raise ValueError(f"VAEConfig.latent_dim must be >= 1, got {self.latent_dim}")
        if not 0 <= self.attention_stage < NUM_STAGES:
            raise ValueError(
                f"VAEConfig.attention_stage must be in 0..{NUM_STAGES - 1}, got {self.attention_stage}"
            )


class VAEOutput(NamedTuple):
    """Result of :meth:`ConvVAE.forward`."""

    logits: Tensor  # [B, C, S, S] reconstruction logits
    mu: Tensor  # [B, latent_dim]
    logvar: Tensor  # [B, latent_dim]
    z: Tensor  # [B, latent_dim] sample (train) or mu (eval)
    features: List[Tensor]  # the 5 encoder stage activations


class _BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can treat the current batch statistics as constants.

    In train mode a normal BatchNorm couples the images of a batch: every output depends
    on every image through the batch mean/variance, so the gradient of ``sum_b mu[b]``
    w.r.t. image n's features is *not* image n's own Grad-CAM gradient (the mean
    subtraction removes the part shared by the batch). With ``per_image`` set (see
    :meth:`ConvVAE.per_image_batchnorm`) the forward value is unchanged (same batch
    statistics) but the statistics are detached, so each image is an independent function
    of its own features, exactly like in eval mode. Running statistics are not updated
    in that mode (the normal forward of the same batch already did).
    """

    per_image: bool = False

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not (self.training and self.per_image):
            return super().forward(x)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(xf.detach(), dim=(0, 2, 3), unbiased=False)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity (or 1x1 conv+BN) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = _BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = _BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _BatchNorm2d(cout)
            )

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``skip`` replaces
        ``shortcut(x)`` when the caller computed it another way (UpBlock: before upsampling)."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.shortcut(x) if skip is None else skip))


class UpBlock(nn.Module):
    """Decoder stage: x2 nearest upsampling followed by a residual block.

    The skip path gets a 1x1 convolution (+BN) when the channel count changes.

    The function is ``block(upsample(x))``, but the skip path runs at the *input* resolution
    and is upsampled afterwards: nearest upsampling copies each pixel four times, so a 1x1
    convolution gives the same values and BatchNorm the same batch mean and (biased)
    variance, i.e. the same outputs and gradients for a quarter of the skip path's work
    (tests/test_models.py checks it in float64, train and eval mode). The one difference:
    the *running* variance BatchNorm keeps for eval mode is updated with the unbiased
    correction ``n / (n - 1)`` of a 4x smaller ``n`` (relative difference ``< 1 / n``, e.g.
    < 0.1 % for a batch of 32 at the 6 x 6 bottom of a 96 px network). Parameters and the
    model file format are unchanged.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = BasicBlock(cin, cout, stride=1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"),
                          skip=F.interpolate(self.block.shortcut(x), scale_factor=2.0, mode="nearest"))


class ConvVAE(nn.Module):
    """VAE with a ResNet-18 convolutional encoder and a symmetric residual decoder."""

    def __init__(self, config: Optional[VAEConfig] = None) -> None:
        super().__init__()
        self.config = config if config is not None else VAEConfig()
        c = self.config
        w = c.base_width
        self._bottom = c.image_size // 16
        widths = [w, w, 2 * w, 4 * w, 8 * w]
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, w, 7, stride=2, padding=3, bias=False),
            _BatchNorm2d(w),
            nn.ReLU(inplace=False),
        )
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w))
        flat = widths[4] * self._bottom * self._bottom
        self.fc_mu = nn.Linear(flat, c.latent_dim)
        self.fc_logvar = nn.Linear(flat, c.latent_dim)

        dec_widths = [4 * w, 2 * w, w, max(w // 2, 4)]
        self.decoder = _Decoder(c.latent_dim, 8 * w, self._bottom, dec_widths, c.in_channels)
        self._init_weights()

    # -- construction -------------------------------------------------------------------
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    def _stages(self) -> List[nn.Module]:
        """Modules that turn stage s-1's activation into stage s's (stage 0 from the image)."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"expected input [B, {c.in_channels}, {c.image_size}, {c.image_size}], got {list(x.shape)}"
            )

    # -- encoder ------------------------------------------------------------------------
    def _heads(self, last: Tensor) -> Tuple[Tensor, Tensor]:
        flat = torch.flatten(last, 1)
        return self.fc_mu(flat), self.fc_logvar(flat)

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Encoder only: ``(mu, logvar, features)`` with the 5 stage activations."""
        self._check_input(x)
        features: List[Tensor] = []
        h = x
        for stage in self._stages():
            h = stage(h)
            features.append(h)
        mu, logvar = self._heads(h)
        return mu, logvar, features

    def attention_features(self, x: Tensor) -> Tensor:
        """Activation of ``config.attention_stage`` ([B, K, h, w]), running only the
        encoder up to that stage (the rest of the network is not evaluated)."""
        self._check_input(x)
        h = x
        for stage in self._stages()[: self.config.attention_stage + 1]:
            h = stage(h)
        return h

    def latent_from_stage(self, features: Tensor, stage: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """``(mu, logvar)`` from a stage activation, running only the encoder stages after it.

        ``stage`` defaults to ``config.attention_stage``. Used by Grad-CAM: the gradient of
        ``mu`` w.r.t. ``features`` needs only this part of the network.
        """
        s = self.config.attention_stage if stage is None else stage
        if not 0 <= s < NUM_STAGES:
            raise ValueError(f"stage must be in 0..{NUM_STAGES - 1}, got {s}")
        h = features
        for module in self._stages()[s + 1 :]:
            h = module(h)
        return self._heads(h)

    @contextlib.contextmanager
    def per_image_batchnorm(self) -> Iterator[None]:
        """Within this context, train-mode BatchNorm layers use the batch statistics as
        constants, so images do not interact through the backward pass (see
        ``_BatchNorm2d``). No effect in eval mode, where images are independent anyway."""
        bns = [m for m in self.modules() if isinstance(m, _BatchNorm2d)]
        previous = [m.per_image for m in bns]
        for m in bns:
            m.per_image = True
        try:
            yield
        finally:
            for m, p in zip(bns, previous):
                m.per_image = p

    # -- decoder / full model -----------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction logits [B, C, S, S] from latent codes [B, latent_dim]."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor) -> VAEOutput:
        """Full VAE pass. Samples z in train mode; z = mu in eval mode."""
        mu, logvar, features = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return VAEOutput(self.decode(z), mu, logvar, z, features)

    def num_parameters(self, part: str = "all") -> int:
        """Parameter count of ``"all"``, ``"encoder"`` (convolutional encoder + latent
        heads, what Grad-CAM inference runs), ``"attention"`` (stem up to the attention
        stage, what AMCons inference runs) or ``"decoder"``."""
        if part == "all":
            modules: List[nn.Module] = [self]
        elif part == "encoder":
            modules = self._stages() + [self.fc_mu, self.fc_logvar]
        elif part == "attention":
            modules = self._stages()[: self.config.attention_stage + 1]
        elif part == "decoder":
            modules = [self.decoder]
        else:
            raise ValueError(f"part must be one of all, encoder, attention, decoder; got {part!r}")
        return sum(p.numel() for m in modules for p in m.parameters())


class _Decoder(nn.Module):
    """Linear -> [8w, S/16, S/16] -> four upsampling residual stages -> 3x3 conv logits."""

    def __init__(self, latent_dim: int, cin: int, bottom: int, widths: List[int], out_channels: int) -> None:
        super().__init__()
        self.cin = cin
        self.bottom = bottom
        self.fc = nn.Linear(latent_dim, cin * bottom * bottom)
        blocks = []
        prev = cin
        for cout in widths:
            blocks.append(UpBlock(prev, cout))
            prev = cout
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        h = F.relu(self.fc(z)).view(z.shape[0], self.cin, self.bottom, self.bottom)
        return self.out(self.blocks(h))


def build_network(config: VAEConfig) -> nn.Module:
    """The network a configuration describes: a :class:`ConvVAE` or a U-Net (``dae``)."""
    if config.architecture == "unet":
        return UNet(config)
    return ConvVAE(config)
