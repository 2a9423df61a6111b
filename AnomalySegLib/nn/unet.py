"""Small U-Net for the denoising auto-encoder (``dae`` method; Kascenas et al., MIDL 2022).

Five resolution levels (S, S/2, S/4, S/8, S/16) with ``w, 2w, 4w, 8w, 8w`` channels; each
level is two 3x3 conv + BatchNorm + ReLU; max-pool down, bilinear x2 up with skip
concatenation; a 1x1 convolution returns the reconstructed image (no output
non-linearity: the training target is the clean image in [0, 1]). Four poolings give a
receptive field of ~140 pixels, enough context to "inpaint" a lesion-sized region from
the healthy tissue around it. ``image_size`` must be a multiple of 16 (the model config
requires 32).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet"]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Image-to-image U-Net: ``[B, C, S, S] -> [B, C, S, S]`` reconstruction."""

    def __init__(self, config) -> None:  # config: models.VAEConfig with architecture "unet"
        super().__init__()
        self.config = config
        w = config.base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.down = nn.ModuleList()
        prev = config.in_channels
        for cout in widths:
            self.down.append(_double_conv(prev, cout))
            prev = cout
        self.up = nn.ModuleList()
        for skip in reversed(widths[:-1]):
            self.up.append(_double_conv(prev + skip, skip))
            prev = skip
        self.out = nn.Conv2d(prev, config.in_channels, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"expected input [B, {c.in_channels}, {c.image_size}, {c.image_size}], got {list(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (same shape)."""
        self._check_input(x)
        skips: List[Tensor] = []
        h = x
        for level, block in enumerate(self.down):
            if level:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        skips.pop()  # the bottom level is h itself
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return self.out(h)

    def num_parameters(self, part: str = "all") -> int:
        """Parameter count; every part of a U-Net runs at inference (``all`` = ``encoder``)."""
        if part not in ("all", "attention", "encoder", "decoder"):
            raise ValueError(f"part must be one of all, encoder, attention, decoder; got {part!r}")
        if part == "attention":
            return 0
        if part == "decoder":
            return sum(p.numel() for m in list(self.up) + [self.out] for p in m.parameters())
        if part == "encoder":
            return sum(p.numel() for p in self.down.parameters())
        return sum(p.numel() for p in self.parameters())
