#!/usr/bin/env python
"""Study of AMCons and GradCAMCons at CPU-feasible scale, with a re-implementation of the
authors' AMCons training setup as a reference.

Every variant is trained on the healthy volumes of a ``make_benchmark_data.py`` folder
(the seeded 80/20 split of ``run_benchmark.py``: training volumes / held-out calibration
volumes), calibrated on the held-out healthy volumes only, and evaluated on every lesion
set and the lesion-free set through the library's harness
(:func:`AnomalySegLib.evaluation.harness.evaluate_model`; the headline numbers are
``run_benchmark.headline``). The intensity-threshold baseline is evaluated the same way.

Variant kinds:

* ``ours``: the library's own training (:func:`AnomalySegLib.pipeline.training.train_model`) and
  inference (``score_prepared`` / ``scores_on_volume_grid`` / ``threshold_scores``) with
  one setting changed (training length, image size, width, attention stage, beta,
  lambda_H, intensity normalisation, ...).
* ``reference``: an independent re-implementation of the authors' AMCons training
  (github.com/jusiro/constrained_anomaly_segmentation, ``code/models/models.py``,
  ``code/methods/trainers/AMCons.py``; facts listed in :class:`RefOptions`), on the same
  slices, batch size, learning rate and number of epochs as ``ours``.
* derived variants (``base`` set): the network of another variant, scored differently
  (map smoothing, healthy position normalisation, the authors' inference masking, or the
  library's inference on the reference network). They cost no training.

Besides the metrics, the healthy maps are characterised on the held-out healthy volumes:
where the top 0.5 % of their scores sit (fraction within 4 mm of the brain boundary,
next to the fraction of brain voxels that lie there) and how much the map follows the
image intensity (correlation inside the tissue masks). ``maps.png`` shows one healthy
slice and one slice per lesion kind for every variant.

Outputs (``--output-dir``)::

    results.json   every number, per variant, seed and kind; settings; machine
    results.md     one table per lesion kind (rows = variants), healthy-map table
    maps.png       example maps (all variants), maps_main.png (key variants)
    examples/      the slices behind the figures (npz; reused by --resume)

Run used for docs/benchmarks/attention_study (2 shared CPU cores; interrupted twice and
continued with ``--resume``, ~54 min wall time in all)::

    nice -n 10 python scripts/study_attention.py --data /work/exp/dev_data \
        -o /work/exp/attention_study --epochs 4 --seeds 0 1 [--resume]

``--report-only`` rewrites results.md and the figures from results.json.

Tiny smoke run::

    python scripts/study_attention.py --data tiny_data -o tiny_out --epochs 1 \
        --image-size 32 --width 8 --batch-size 8 --variants intensity amcons reference
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402  (scripts/run_benchmark.py: data index, headline numbers, reporting)

from AnomalySegLib.pipeline.calibrate import calibrate_prepared  # noqa: E402
from AnomalySegLib.segmentation.calibration import Calibration  # noqa: E402
from AnomalySegLib.errors import AnomalySegError, InputError  # noqa: E402
from AnomalySegLib.io.geometry import voxel_spacing, voxel_volume_ml  # noqa: E402
from AnomalySegLib.nn.losses import masked_softmax_entropy  # noqa: E402
from AnomalySegLib.nn.methods import MethodParams  # noqa: E402
from AnomalySegLib.nn.networks import ConvVAE, VAEConfig  # noqa: E402
from AnomalySegLib.segmentation.postprocess import DEFAULT_MAX_FALSE_COMPONENTS, DEFAULT_MIN_COMPONENT_ML  # noqa: E402
from AnomalySegLib.data.preprocessing import PreparedVolume, PreprocessConfig, prepare_volume  # noqa: E402
from AnomalySegLib.io.volume_io import Volume, read_volume  # noqa: E402

#: Top fraction of healthy scores whose position is analysed, and the boundary band (mm).
TOP_FRACTION = 0.005
BOUNDARY_MM = 4.0

log = rb.log


# ============================================================================ variants


@dataclass
class Variant:
    """One row of the study. ``None`` fields take the run's defaults (command line)."""

    name: str
    kind: str  # "ours" | "reference" | "baseline"
    method: str = "amcons"
    description: str = ""
    epochs_factor: float = 1.0
    image_size: Optional[int] = None
    width: Optional[int] = None
    attention_stage: Optional[int] = None
    method_overrides: dict = field(default_factory=dict)
    preprocessing_overrides: dict = field(default_factory=dict)
    #: reference: RefOptions overrides (ablations towards our setup)
    reference: dict = field(default_factory=dict)
    #: baseline: smoothing (mm) of the intensity map
    smoothing_mm: float = 0.0
    #: derived variants: the variant whose network is re-used, and how it is scored:
    #: {"smoothing_mm": x, "position_normalise": true} (library inference, ours),
    #: {"scorer": "authors"} (the authors' inference masking on any network),
    #: {"scorer": "library"} (the library's AMCons inference on the reference network)
    base: Optional[str] = None
    inference: dict = field(default_factory=dict)
    #: run for every seed of --seeds (else the first seed only)
    all_seeds: bool = False


def default_variants() -> list[Variant]:
    """The study's variants, in run order (a base variant before its derived ones)."""
    return [
        Variant("intensity", "baseline", "intensity", "intensity thresholding (bright), raw map"),
        Variant("amcons", "ours", "amcons", "ours, paper settings (stage 1, beta 10, lambda_H 0.1)", all_seeds=True),
        Variant("amcons+smooth2", "ours", "amcons", "amcons network, map smoothed 2 mm", base="amcons",
                inference={"smoothing_mm": 2.0}),
        Variant("amcons+posnorm", "ours", "amcons", "amcons network, healthy position z-scores", base="amcons",
                inference={"position_normalise": True}, all_seeds=True),
        Variant("amcons+authors-inference", "ours", "amcons",
                "amcons network, authors' inference (align_corners, map zeroed outside the eroded non-zero mask)",
                base="amcons", inference={"scorer": "authors"}),
        Variant("reference", "reference", "amcons", "authors' AMCons training setup (re-implemented)", all_seeds=True),
        Variant("reference+library-inference", "reference", "amcons",
                "reference network, library AMCons inference (no erosion)", base="reference",
                inference={"scorer": "library"}),
        Variant("reference+posnorm", "reference", "amcons",
                "reference network, library inference with healthy position z-scores", base="reference",
                inference={"scorer": "library", "position_normalise": True}, all_seeds=True),
        Variant("gradcamcons", "ours", "gradcamcons", "ours, paper settings (beta 1, t 20, p 0.2, lambda_s 10)"),
        Variant("gradcamcons+smooth2", "ours", "gradcamcons", "gradcamcons network, map smoothed 2 mm",
                base="gradcamcons", inference={"smoothing_mm": 2.0}),
        Variant("gradcamcons+posnorm", "ours", "gradcamcons", "gradcamcons network, healthy position z-scores",
                base="gradcamcons", inference={"position_normalise": True}),
    
        Variant("amcons-96px", "ours", "amcons", "ours, 96 px images", image_size=96),
        Variant("amcons-96px+posnorm", "ours", "amcons", "amcons-96px network, healthy position z-scores",
                base="amcons-96px", inference={"position_normalise": True}),
        Variant("amcons-2x-epochs", "ours", "amcons", "ours, twice the epochs", epochs_factor=2.0),
        Variant("amcons-2x-epochs+posnorm", "ours", "amcons", "amcons-2x-epochs network, healthy position z-scores",
                base="amcons-2x-epochs", inference={"position_normalise": True}),
        Variant("amcons-stage2", "ours", "amcons", "ours, attention at stage 2 (layer2)", attention_stage=2),
        Variant("amcons-beta1", "ours", "amcons", "ours, beta 1", method_overrides={"beta": 1.0}),
        Variant("amcons-lh1", "ours", "amcons", "ours, lambda_H 1", method_overrides={"lambda_h": 1.0}),
        Variant("amcons-maxnorm", "ours", "amcons",
                "ours, max-like intensity normalisation (99.5th pct of foreground -> 0.9)",
                preprocessing_overrides={"reference_percentile": 99.5, "reference_level": 0.9}),
        Variant("intensity-s2", "baseline", "intensity", "intensity thresholding, 2 mm smoothing", smoothing_mm=2.0),
    ]


def extra_variants() -> list[Variant]:
    """Optional variants (by name with --variants): ablations of the reference towards ours."""
    return [
        Variant("ref-ourstem", "reference", "amcons", "reference with our stem (conv + BN + ReLU)",
                reference={"stem": "bn_relu"}),
        Variant("ref-ourdecoder", "reference", "amcons", "reference with our decoder", reference={"decoder": "ours"}),
        Variant("ref-permask", "reference", "amcons", "reference with our per-image tissue mask in the entropy",
                reference={"mask": "per_image"}),
        Variant("ref-otsumask", "reference", "amcons", "reference, batch-shared mask from one Otsu threshold",
                reference={"mask_foreground": "otsu"}),
        Variant("ref-ac-false", "reference", "amcons", "reference, align_corners=False, entropy from epoch 0",
                reference={"align_corners": False, "entropy_from_epoch": 0}),
        Variant("amcons-lh0", "ours", "amcons", "ours, lambda_H 0 (plain VAE activations)",
                method_overrides={"lambda_h": 0.0}),
        Variant("amcons-stage0", "ours", "amcons", "ours, attention at stage 0 (stem)", attention_stage=0),
        Variant("amcons-w32", "ours", "amcons", "ours, width 32", width=32),
        Variant("amcons-w8", "ours", "amcons", "ours, width 8", width=8),
        Variant("gradcamcons-2x-epochs", "ours", "gradcamcons", "gradcamcons, twice the epochs", epochs_factor=2.0),
    ]


def all_variants() -> dict[str, Variant]:
    return {v.name: v for v in default_variants() + extra_variants()}


# ============================================================================ reference (authors' setup)


@dataclass
class RefOptions:
    """The authors' AMCons training/inference setup (defaults), each switchable to ours.

    Facts from github.com/jusiro/constrained_anomaly_segmentation (code/models/models.py,
    code/methods/trainers/AMCons.py, code/methods/losses/losses.py):

    * encoder: ``Conv2d(1, 64, 7, stride 2, padding 3, bias=False)`` with PyTorch's default
      initialisation and **no BatchNorm and no ReLU** after it, then ResNet-18 ``layer1..4``
      (no max-pool); dense latent (two linear heads on the flattened layer4 activation);
    * decoder: ``Linear(z, 4w * s * s)`` (no activation), four stages of [upsampling basic
      block (conv3x3 -> x2 nearest -> BN -> ReLU -> conv3x3 -> BN, skip 1x1 conv -> x2 -> BN),
      basic block], channels 4w -> 2w -> w -> w/2 -> w/4, then a 3x3 conv to logits;
      convolutions with bias, default initialisation;
    * loss: ``BCEWithLogits(sum) / B + beta * KL(sum) / B - lambda_H * mean_b H(softmax)``;
      the entropy term is added only when ``epoch > 0`` (``i_epoch > pre_training_epochs``
      with ``pre_training_epochs = 0``);
    * attention map: channel mean of layer1 (``level_cams = -4``), bilinear upsampling to
      the image with ``align_corners=True``, softmax over the pixels of **one mask shared
      by the whole batch**: pixels that are non-zero in any image of the batch
      (``1 - mean_b(x == 0)``), eroded by a 6x6 square (BraTS branch, 224 px), ``> 0.5``;
      entropy ``-sum p log(p + 1e-12)``;
    * inference: the same map, zeroed outside the image's own non-zero mask eroded by 6x6.

    Erosions are scaled to the image size (``round(6 * S / 224)``, at least 1).
    """

    stem: str = "plain"  # "plain" (authors) | "bn_relu" (ours)
    decoder: str = "reference"  # "reference" (authors) | "ours"
    mask: str = "batch"  # "batch" (authors) | "per_image" (ours: Otsu + closing + fill per image)
    mask_foreground: str = "nonzero"  # batch mask from "nonzero" pixels (authors' code) | one "otsu" threshold
    align_corners: bool = True
    entropy_from_epoch: int = 1
    erode_at_224: int = 6

    def __post_init__(self) -> None:
        choices = {"stem": ("plain", "bn_relu"), "decoder": ("reference", "ours"), "mask": ("batch", "per_image"),
                   "mask_foreground": ("nonzero", "otsu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"RefOptions.{key} must be one of {allowed}, got {getattr(self, key)!r}")

    def erode_pixels(self, image_size: int) -> int:
        return max(1, int(round(self.erode_at_224 * image_size / 224.0)))


class _RefUpBlock(nn.Module):
    """Authors' decoder upsampling block: conv3x3 -> x2 -> BN -> ReLU -> conv3x3 -> BN (+ 1x1 conv -> x2 -> BN skip)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip_conv = nn.Conv2d(cin, cout, 1)
        self.skip_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.relu(self.bn1(F.interpolate(self.conv1(x), scale_factor=2.0, mode="nearest")))
        y = self.bn2(self.conv2(y))
        s = self.skip_bn(F.interpolate(self.skip_conv(x), scale_factor=2.0, mode="nearest"))
        return F.relu(y + s)


class _RefBlock(nn.Module):
    """Authors' decoder basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, identity skip, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + x)


class ReferenceDecoder(nn.Module):
    """Linear -> [4w, S/16, S/16] -> 4 x (up block, block), halving channels -> 3x3 conv logits."""

    def __init__(self, latent_dim: int, nf0: int, bottom: int, out_channels: int) -> None:
        super().__init__()
        self.nf0, self.bottom = nf0, bottom
        self.fc = nn.Linear(latent_dim, nf0 * bottom * bottom)
        chans = [max(1, nf0 // 2 ** i) for i in range(5)]
        self.stages = nn.Sequential(*[nn.Sequential(_RefUpBlock(chans[i], chans[i + 1]), _RefBlock(chans[i + 1]))
                                      for i in range(4)])
        self.out = nn.Conv2d(chans[4], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.fc(z).view(z.shape[0], self.nf0, self.bottom, self.bottom)
        return self.out(self.stages(h))


class ReferenceVAE(ConvVAE):
    """The authors' VAE, built on :class:`ConvVAE` so the library's scoring code accepts it.

    ``stem="plain"``: a bare 7x7/2 convolution (no BN, no ReLU, default init) replaces our
    conv+BN+ReLU stem; layer1-4 are ResNet-18 basic blocks (as ours); the latent heads get
    PyTorch's default Linear init; ``decoder="reference"`` swaps in :class:`ReferenceDecoder`.
    """

    def __init__(self, config: VAEConfig, options: Optional[RefOptions] = None) -> None:
        super().__init__(config)
        opts = options or RefOptions()
        w = config.base_width
        if opts.stem == "plain":
            self.stem = nn.Sequential(nn.Conv2d(config.in_channels, w, 7, stride=2, padding=3, bias=False))
        if opts.decoder == "reference":
            self.decoder = ReferenceDecoder(config.latent_dim, 4 * w, config.image_size // 16, config.in_channels)
        self.fc_mu.reset_parameters()
        self.fc_logvar.reset_parameters()


def batch_shared_mask(x: np.ndarray, *, foreground: str = "nonzero", erode: int = 6) -> np.ndarray:
    """One bool mask ``[S, S]`` for a whole batch ``x`` ``[B, (1,) S, S]``, as the authors' trainer.

    ``1 - mean_b(background)`` is > 0 wherever any image of the batch is foreground;
    ``binary_erosion`` (``erode`` x ``erode`` square) of that map then ``> 0.5`` keeps the
    eroded union. Foreground is ``x != 0`` (the authors' code) or ``x > t`` with one Otsu
    threshold ``t`` computed on all pixels of the batch (``foreground="otsu"``).
    """
    from skimage.filters import threshold_otsu

    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(x.shape[0], x.shape[-2], x.shape[-1])
    if foreground == "nonzero":
        fg = x != 0
    elif foreground == "otsu":
        fg = x > threshold_otsu(x) if x.max() > x.min() else np.zeros_like(x, dtype=bool)
    else:
        raise ValueError(f"foreground must be 'nonzero' or 'otsu', got {foreground!r}")
    share = 1.0 - np.mean(~fg, axis=0)
    eroded = ndimage.binary_erosion(share > 0, structure=np.ones((erode, erode), dtype=bool)) if erode > 0 \
        else share > 0
    return eroded.astype(np.float32) > 0.5


def image_eroded_nonzero(x: np.ndarray, erode: int) -> np.ndarray:
    """Per-image inference mask of the authors: ``x != 0`` eroded by an ``erode`` square; ``[B, S, S]``."""
    x = np.asarray(x).reshape(-1, x.shape[-2], x.shape[-1])
    out = np.zeros(x.shape, dtype=bool)
    for b in range(x.shape[0]):
        out[b] = ndimage.binary_erosion(x[b] != 0, structure=np.ones((erode, erode), dtype=bool))
    return out


def reference_losses(net: ReferenceVAE, x: torch.Tensor, lib_mask: Optional[torch.Tensor], *, beta: float,
                     lambda_h: float, epoch: int, opts: RefOptions) -> tuple[torch.Tensor, dict]:
    """The authors' AMCons loss of one batch (see :class:`RefOptions`)."""
    b, _, s, _ = x.shape
    out = net(x)
    rec = F.binary_cross_entropy_with_logits(out.logits, x, reduction="sum") / b
    kl = -0.5 * torch.sum(1 + out.logvar - out.mu.pow(2) - out.logvar.exp()) / b
    loss = rec + beta * kl
    am = out.features[net.config.attention_stage].mean(dim=1, keepdim=True)
    am = F.interpolate(am, size=(s, s), mode="bilinear", align_corners=opts.align_corners)[:, 0]
    if opts.mask == "batch":
        shared = batch_shared_mask(x.detach().cpu().numpy(), foreground=opts.mask_foreground,
                                   erode=opts.erode_pixels(s))
        idx = torch.from_numpy(np.flatnonzero(shared.ravel()))
        sel = torch.index_select(am.reshape(b, -1), 1, idx)
        p = torch.softmax(sel, dim=-1)
        entropy = torch.mean(-torch.sum(p * torch.log(p + 1e-12), dim=-1))
    else:
        entropy = masked_softmax_entropy(am, lib_mask).mean()
    if epoch >= opts.entropy_from_epoch and lambda_h > 0:
        loss = loss - lambda_h * entropy
    return loss, {"loss": float(loss.detach()), "rec": float(rec.detach()), "kl": float(kl.detach()),
                  "entropy": float(entropy.detach())}


def train_reference(images: np.ndarray, masks: np.ndarray, config: VAEConfig, opts: RefOptions, *, epochs: int,
                    batch_size: int, lr: float, seed: int, beta: float = 10.0, lambda_h: float = 0.1,
                    quiet: bool = True) -> tuple[ReferenceVAE, dict]:
    """Train the reference on model-space slices ``images`` [N, S, S] (same slices as ours)."""
    torch.manual_seed(seed)
    net = ReferenceVAE(config, opts)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    images_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    masks_t = torch.from_numpy(np.ascontiguousarray(masks))
    n = len(images_t)
    bs = min(batch_size, n)
    steps = max(1, n // bs)
    history = []
    started = time.time()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sums: dict = {}
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            loss, logs = reference_losses(net, images_t[idx].unsqueeze(1), masks_t[idx], beta=beta,
                                          lambda_h=lambda_h, epoch=epoch, opts=opts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not np.isfinite(logs["loss"]):
                raise AnomalySegError(f"reference training diverged at epoch {epoch + 1}")
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
        if not quiet:
            log(f"  reference epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items()
                                                                          if k != "epoch"))
    net.eval()
    return net, {"history": history, "seconds": round(time.time() - started, 1), "train_slices": n}


# ============================================================================ scorers


class PreparedCache:
    """Preprocessed volumes by (path, preprocessing settings): each volume is prepared once per setting."""

    def __init__(self) -> None:
        self._items: dict = {}

    def get(self, volume: Volume, config: PreprocessConfig) -> PreparedVolume:
        key = (str(volume.path) if volume.path is not None else id(volume),
               json.dumps(config.to_dict(), sort_keys=True))
        if key not in self._items:
            self._items[key] = prepare_volume(volume, config)
        return self._items[key]

    def get_path(self, path: Path, config: PreprocessConfig) -> tuple[Volume, PreparedVolume]:
        volume = read_volume(path)
        return volume, self.get(volume, config)


class LibraryScorer:
    """An :class:`AnomalyModel` scored exactly like ``inference.score_volume`` (with cached preprocessing)."""

    def __init__(self, model: Any, cache: PreparedCache, name: str) -> None:
        self.model = model
        self.cache = cache
        self.name = name
        self.version = f"study/{name}"
        self.preprocessing = model.preprocessing

    @property
    def calibration(self) -> Optional[Calibration]:
        return self.model.calibration

    @property
    def default_percentile(self) -> float:
        return float(self.model.default_percentile)

    def maps(self, prepared: PreparedVolume, batch_size: int = 64) -> np.ndarray:
        from AnomalySegLib.pipeline.inference import score_prepared

        return score_prepared(self.model, prepared, device="cpu", batch_size=batch_size)

    def grid_scores(self, prepared: PreparedVolume, volume: Optional[Volume], maps: Optional[np.ndarray] = None):
        from AnomalySegLib.pipeline.inference import scores_on_volume_grid

        maps = self.maps(prepared) if maps is None else maps
        return scores_on_volume_grid(maps, prepared, volume, smoothing_mm=self.model.method.smoothing_mm)

    def score_volume(self, volume: Volume, **_: Any):
        return self.grid_scores(self.cache.get(volume, self.preprocessing), volume)

    def predict_mask(self, scores: Any, percentile: float) -> tuple[np.ndarray, float]:
        from AnomalySegLib.pipeline.inference import threshold_scores

        result = threshold_scores(scores, self.model, percentile=percentile)
        return np.asarray(result.mask, dtype=bool), float(result.threshold)

    def calibrate(self, prepared: Sequence[PreparedVolume]) -> None:
        self.model.calibration = calibrate_prepared(self.model, list(prepared), device="cpu", batch_size=64,
                                                    source="held-out healthy volumes")


class AuthorsScorer:
    """The authors' AMCons inference on any ConvVAE: channel mean of the attention stage,
    bilinear upsampling with ``align_corners``, zeroed outside the image's non-zero mask
    eroded by ``erode`` pixels; then the library's mapping to the voxel grid, healthy
    calibration and thresholding rule (as for the intensity baseline)."""

    def __init__(self, network: ConvVAE, preprocessing: PreprocessConfig, cache: PreparedCache, name: str, *,
                 erode: int, align_corners: bool = True, smoothing_mm: float = 0.0,
                 start_percentile: float = 98.0) -> None:
        self.network = network.eval()
        self.preprocessing = preprocessing
        self.cache = cache
        self.name = name
        self.version = f"study/{name}"
        self.erode = erode
        self.align_corners = align_corners
        self.smoothing_mm = smoothing_mm
        self.start_percentile = start_percentile
        self.calibration: Optional[Calibration] = None

    @property
    def default_percentile(self) -> float:
        if self.calibration is not None:
            return self.calibration.default_percentile(self.start_percentile)
        return self.start_percentile

    def maps(self, prepared: PreparedVolume, batch_size: int = 64) -> np.ndarray:
        size = prepared.image_size
        out = np.zeros(prepared.images.shape, dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(prepared.images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(prepared.images[start:start + batch_size])).unsqueeze(1)
                am = self.network.attention_features(x).mean(dim=1, keepdim=True)
                am = F.interpolate(am, size=(size, size), mode="bilinear", align_corners=self.align_corners)[:, 0]
                keep = image_eroded_nonzero(x.numpy(), self.erode)
                out[start:start + len(x)] = np.where(keep, am.numpy(), 0.0)
        return out

    def grid_scores(self, prepared: PreparedVolume, volume: Optional[Volume], maps: Optional[np.ndarray] = None):
        from AnomalySegLib.pipeline.inference import scores_on_volume_grid

        maps = self.maps(prepared) if maps is None else maps
        return scores_on_volume_grid(maps, prepared, volume, smoothing_mm=self.smoothing_mm)

    def score_volume(self, volume: Volume, **_: Any):
        return self.grid_scores(self.cache.get(volume, self.preprocessing), volume)

    def predict_mask(self, scores: Any, percentile: float) -> tuple[np.ndarray, float]:
        voxel_ml = voxel_volume_ml(scores.volume.affine) if scores.volume is not None else None
        mask, thr = self.calibration.flag(scores.heatmap, scores.brain_mask, percentile, voxel_ml=voxel_ml)
        return mask, thr

    def calibrate(self, prepared: Sequence[PreparedVolume]) -> None:
        maps = []
        for p in prepared:
            s = self.grid_scores(p, None)
            maps.append((s.heatmap, s.brain_mask, voxel_volume_ml(p.affine)))
        self.calibration = Calibration.from_healthy_maps(
            maps, start_percentile=self.start_percentile, min_component_ml=DEFAULT_MIN_COMPONENT_ML,
            max_false_components=DEFAULT_MAX_FALSE_COMPONENTS, n_images=int(sum(p.num_slices for p in prepared)),
            source="held-out healthy volumes")


class BaselineScorer:
    """The library's intensity baseline with cached preprocessing (same scoring path as its score_volume)."""

    def __init__(self, baseline: Any, cache: PreparedCache, name: str) -> None:
        self.baseline = baseline
        self.cache = cache
        self.name = name
        self.version = f"study/{name}"
        self.preprocessing = baseline.preprocessing

    @property
    def calibration(self) -> Optional[Calibration]:
        return self.baseline.calibration

    @property
    def default_percentile(self) -> float:
        return float(self.baseline.default_percentile)

    def maps(self, prepared: PreparedVolume, batch_size: int = 64) -> np.ndarray:
        return self.baseline.score_prepared(prepared)

    def grid_scores(self, prepared: PreparedVolume, volume: Optional[Volume], maps: Optional[np.ndarray] = None):
        from AnomalySegLib.pipeline.inference import scores_on_volume_grid

        maps = self.maps(prepared) if maps is None else maps
        return scores_on_volume_grid(maps, prepared, volume, smoothing_mm=self.baseline.smoothing_mm)

    def score_volume(self, volume: Volume, **_: Any):
        return self.grid_scores(self.cache.get(volume, self.preprocessing), volume)

    def predict_mask(self, scores: Any, percentile: float) -> tuple[np.ndarray, float]:
        return self.baseline.predict_mask(scores, percentile)


# ============================================================================ healthy-map analysis


def healthy_map_analysis(scorer: Any, cal: Sequence[tuple[Volume, PreparedVolume]]) -> tuple[dict, dict]:
    """Where the top ``TOP_FRACTION`` of held-out healthy scores sit, and map/intensity correlation.

    Returns (numbers, per-volume top masks keyed by volume index, for the figure).
    """
    grids, tops = [], {}
    corr_x, corr_y = [], []
    for volume, prepared in cal:
        maps = scorer.maps(prepared)
        g = scorer.grid_scores(prepared, volume, maps)
        grids.append(g)
        m = prepared.masks
        corr_x.append(maps[m])
        corr_y.append(prepared.images[m])
    pooled = np.concatenate([g.heatmap[g.brain_mask] for g in grids])
    thr = float(np.quantile(pooled, 1.0 - TOP_FRACTION))
    n_top = n_top_near = n_brain = n_near = n_top_right = 0
    depth_top, depth_brain = [], []
    for i, g in enumerate(grids):
        top = (g.heatmap > thr) & g.brain_mask
        if not top.any():
            top = (g.heatmap >= thr) & g.brain_mask
        affine = np.asarray(g.volume.affine)
        spacing = voxel_spacing(affine)
        dist = ndimage.distance_transform_edt(g.brain_mask, sampling=spacing)
        near = g.brain_mask & (dist <= BOUNDARY_MM)
        n_top += int(top.sum())
        n_top_near += int((top & near).sum())
        n_brain += int(g.brain_mask.sum())
        n_near += int(near.sum())
        depth_top.append(dist[top])
        depth_brain.append(dist[g.brain_mask])
        # RAS x of the top voxels against the brain's centroid: > 0 = patient's right
        x_brain = (np.argwhere(g.brain_mask) @ affine[:3, :3].T + affine[:3, 3])[:, 0]
        x_top = (np.argwhere(top) @ affine[:3, :3].T + affine[:3, 3])[:, 0]
        n_top_right += int((x_top > x_brain.mean()).sum())
        tops[i] = top
    x, y = np.concatenate(corr_x), np.concatenate(corr_y)
    corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    return {
        "top_fraction": TOP_FRACTION, "boundary_mm": BOUNDARY_MM, "top_threshold": thr,
        "top_voxels": n_top,
        "top_within_boundary": n_top_near / n_top if n_top else float("nan"),
        "brain_within_boundary": n_near / n_brain if n_brain else float("nan"),
        "map_intensity_corr": corr,
        "top_depth_median_mm": float(np.median(np.concatenate(depth_top))) if n_top else float("nan"),
        "brain_depth_median_mm": float(np.median(np.concatenate(depth_brain))),
        "top_right_share": n_top_right / n_top if n_top else float("nan"),
    }, {"grids": grids, "tops": tops}


# ============================================================================ running


def _slice_dict(volume: Volume, heatmap: np.ndarray, pred: Optional[np.ndarray], truth: np.ndarray,
                k: Optional[int] = None, top: Optional[np.ndarray] = None) -> dict:
    from AnomalySegLib.evaluation.figures import canonical_ras, example_slice

    sl = example_slice(volume, heatmap, pred, truth, k)
    if top is not None:
        sl["top"] = canonical_ras(top.astype(np.uint8), np.asarray(volume.affine))[:, :, sl["slice"]]
    return sl


def evaluate_variant(scorer: Any, variant: Variant, seed: int, data: dict, kinds: Sequence[str], cal, args,
                     examples_dir: Optional[Path]) -> dict:
    """Harness evaluation on every kind + lesion-free set + healthy-map analysis; examples for the first seed."""
    from AnomalySegLib.evaluation.harness import evaluate_model

    started = time.perf_counter()
    entry: dict = {"variant": variant.name, "seed": seed, "kinds": {}}
    examples: dict = {}
    first = seed == args.seeds[0]
    if data["lesion_free"]:
        lf = evaluate_model(scorer, list(data["lesion_free"]), [None] * len(data["lesion_free"]), device="cpu",
                            batch_size=64)
        entry["lesion_free"] = {**lf["lesion_free"], "percentile": lf["percentile"], "threshold": lf["threshold"]}
    for kind in kinds:
        images, labels = data["test_sets"][kind]
        res = evaluate_model(scorer, images, labels, device="cpu", batch_size=64)
        entry["kinds"][kind] = rb.headline(res)
        if first and examples_dir is not None:
            volume = read_volume(images[0])
            truth = read_volume(labels[0]).data > 0
            scores = scorer.score_volume(volume)
            pred, _ = scorer.predict_mask(scores, res["percentile"])
            examples[kind] = _slice_dict(volume, scores.heatmap, pred, truth)
    analysis, extra = healthy_map_analysis(scorer, cal)
    entry["healthy_maps"] = analysis
    if first and examples_dir is not None:
        g = extra["grids"][0]
        pred, _ = scorer.predict_mask(g, scorer.default_percentile)
        from AnomalySegLib.evaluation.figures import canonical_ras

        bc = canonical_ras(g.brain_mask.astype(np.uint8), np.asarray(g.volume.affine))
        k = int(np.argmax(bc.reshape(-1, bc.shape[2]).sum(axis=0)))
        examples["healthy"] = _slice_dict(g.volume, g.heatmap, pred, np.zeros_like(g.brain_mask), k=k,
                                          top=extra["tops"][0])
        cal_table = scorer.calibration
        examples["_scale"] = {"vmin": cal_table.threshold(50.0), "vmax": cal_table.threshold(99.9)}
        save_examples(examples_dir / f"{variant.name}.npz", examples)
    entry["seconds_evaluate"] = round(time.perf_counter() - started, 1)
    return entry


def save_examples(path: Path, examples: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat: dict = {}
    for key, sl in examples.items():
        for name, value in sl.items():
            if value is None:
                continue
            flat[f"{key}::{name}"] = np.asarray(value)
    np.savez_compressed(path, **flat)


def load_examples(path: Path) -> dict:
    out: dict = {}
    with np.load(path) as z:
        for name in z.files:
            key, field_name = name.split("::", 1)
            value = z[name]
            out.setdefault(key, {})[field_name] = value.item() if value.ndim == 0 else value
    return out


def _train_config(variant: Variant, seed: int, args):
    from AnomalySegLib.pipeline.training import TrainConfig

    return TrainConfig(
        method=variant.method, epochs=max(1, int(round(args.epochs * variant.epochs_factor))),
        batch_size=args.batch_size, learning_rate=args.lr,
        image_size=variant.image_size or args.image_size, base_width=variant.width or args.width,
        latent_dim=args.latent_dim,
        attention_stage=args.attention_stage if variant.attention_stage is None else variant.attention_stage,
        seed=seed, device="cpu", amp=False, calibration_fraction=0.0,
        method_overrides=dict(variant.method_overrides),
        preprocessing_overrides=dict(variant.preprocessing_overrides))


def build_trained(variant: Variant, seed: int, train_paths, cal_prepared_for, train_prepared_for, cache, args
                  ) -> tuple[Any, dict, Any]:
    """Train ``variant`` (ours / reference) or fit it (baseline). Returns (scorer, build info, handle for derived)."""
    started = time.perf_counter()
    if variant.kind == "baseline":
        from AnomalySegLib.pipeline.baselines import IntensityBaseline

        prep = PreprocessConfig(image_size=args.image_size)
        base = IntensityBaseline("bright", prep, smoothing_mm=variant.smoothing_mm)
        cal_vols = [v for v, _ in cal_prepared_for(prep)]
        base.fit(cal_vols, reference=None)
        return BaselineScorer(base, cache, variant.name), {"seconds_fit": round(time.perf_counter() - started, 1)}, None
    if variant.kind == "ours":
        from AnomalySegLib.pipeline.training import train_model

        config = _train_config(variant, seed, args)
        model = train_model(list(train_paths), config)
        seconds = time.perf_counter() - started
        scorer = LibraryScorer(model, cache, variant.name)
        scorer.calibrate([p for _, p in cal_prepared_for(model.preprocessing)])
        hist = model.training.get("history") or [{}]
        return scorer, {"seconds_train": round(seconds, 1), "epochs": config.epochs,
                        "train_slices": model.training.get("train_slices"), "final_losses": hist[-1],
                        "history": hist}, model
    # reference
    opts = RefOptions(**variant.reference)
    size = variant.image_size or args.image_size
    width = variant.width or args.width
    prep = PreprocessConfig(image_size=size, **variant.preprocessing_overrides)
    train_prepared = train_prepared_for(prep)
    images = np.concatenate([p.images for _, p in train_prepared])
    masks = np.concatenate([p.masks for _, p in train_prepared])
    config = VAEConfig(image_size=size, base_width=width, latent_dim=args.latent_dim,
                       attention_stage=args.attention_stage if variant.attention_stage is None
                       else variant.attention_stage)
    params = MethodParams.defaults("amcons")
    beta = float(variant.method_overrides.get("beta", params.beta))
    lambda_h = float(variant.method_overrides.get("lambda_h", params.lambda_h))
    epochs = max(1, int(round(args.epochs * variant.epochs_factor)))
    net, info = train_reference(images, masks, config, opts, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                                seed=seed, beta=beta, lambda_h=lambda_h, quiet=args.quiet)
    scorer = AuthorsScorer(net, prep, cache, variant.name, erode=opts.erode_pixels(size),
                           align_corners=opts.align_corners)
    scorer.calibrate([p for _, p in cal_prepared_for(prep)])
    hist = info["history"]
    return scorer, {"seconds_train": info["seconds"], "epochs": epochs, "train_slices": info["train_slices"],
                    "final_losses": hist[-1], "history": hist, "reference_options": dataclasses.asdict(opts)}, \
        (net, prep, opts)


def _fit_position_stats(model: Any, train_prepared_for) -> None:
    """Healthy per-position statistics on the training volumes when the method asks for them."""
    if not model.method.position_normalise:
        return
    from AnomalySegLib.pipeline.training import fit_position_stats

    fitted = fit_position_stats(model, [p for _, p in train_prepared_for(model.preprocessing)], device="cpu")
    if isinstance(fitted, tuple):  # (map statistics, intensity statistics) in newer library versions
        model.position_stats, intensity_stats = fitted
        if hasattr(model, "intensity_stats"):
            model.intensity_stats = intensity_stats
    else:
        model.position_stats = fitted


def build_derived(variant: Variant, base_variant: Variant, handle: Any, cal_prepared_for, train_prepared_for, cache,
                  args) -> tuple[Any, dict]:
    """A scorer from the trained network of ``base_variant`` (no training)."""
    from AnomalySegLib.model.bundle import AnomalyModel

    started = time.perf_counter()
    inf = dict(variant.inference)
    scorer_kind = inf.pop("scorer", None)
    if base_variant.kind == "ours":
        model = handle
        if scorer_kind == "authors":
            erode = RefOptions().erode_pixels(model.preprocessing.image_size)
            scorer = AuthorsScorer(model.network, model.preprocessing, cache, variant.name, erode=erode,
                                   align_corners=True, smoothing_mm=float(inf.get("smoothing_mm", 0.0)))
            scorer.calibrate([p for _, p in cal_prepared_for(model.preprocessing)])
            return scorer, {"seconds_fit": round(time.perf_counter() - started, 1)}
        method = dataclasses.replace(model.method, **inf)
        derived = AnomalyModel(network=model.network, network_config=model.network_config,
                               preprocessing=model.preprocessing, method=method, training=model.training)
        _fit_position_stats(derived, train_prepared_for)
        scorer = LibraryScorer(derived, cache, variant.name)
        scorer.calibrate([p for _, p in cal_prepared_for(model.preprocessing)])
        return scorer, {"seconds_fit": round(time.perf_counter() - started, 1)}
    net, prep, opts = handle
    if scorer_kind == "library":
        method = dataclasses.replace(MethodParams.defaults("amcons"), **inf)
        model = AnomalyModel(network=net, network_config=net.config, preprocessing=prep, method=method,
                             training={"note": "reference network"})
        _fit_position_stats(model, train_prepared_for)
        scorer = LibraryScorer(model, cache, variant.name)
    else:
        scorer = AuthorsScorer(net, prep, cache, variant.name, erode=opts.erode_pixels(prep.image_size),
                               align_corners=opts.align_corners, smoothing_mm=float(inf.get("smoothing_mm", 0.0)))
    scorer.calibrate([p for _, p in cal_prepared_for(prep)])
    return scorer, {"seconds_fit": round(time.perf_counter() - started, 1)}


def run_study(variants: Sequence[Variant], data: dict, kinds: Sequence[str], args, output_dir: Path,
              state: dict, on_update) -> dict:
    """Train/evaluate every (variant, seed); ``state['entries']`` accumulates results (resumable)."""
    from AnomalySegLib.pipeline.training import split_volumes

    by_name = {v.name: v for v in variants}
    done = {(e["variant"], e["seed"]) for e in state["entries"]}
    cache = PreparedCache()
    examples_dir = output_dir / "examples"
    splits = {}
    for seed in args.seeds:
        train_idx, cal_idx = split_volumes(len(data["healthy"]), args.calibration_fraction, seed)
        if not cal_idx:
            raise InputError("no held-out healthy volume for calibration: use more healthy volumes")
        splits[seed] = ([data["healthy"][i] for i in train_idx], [data["healthy"][i] for i in cal_idx])

    def runs_seed(v: Variant, seed: int) -> bool:
        return seed == args.seeds[0] or v.all_seeds

    # variant-major: the key variants' extra seeds run early, the optional axes last
    for variant in variants:
        if variant.base is not None:
            continue
        for seed in args.seeds:
            if not runs_seed(variant, seed):
                continue
            train_paths, cal_paths = splits[seed]

            def cal_prepared_for(prep: PreprocessConfig, cal_paths=cal_paths):
                return [cache.get_path(p, prep) for p in cal_paths]

            def train_prepared_for(prep: PreprocessConfig, train_paths=train_paths):
                return [cache.get_path(p, prep) for p in train_paths]

            unit = [variant] + [v for v in variants if v.base == variant.name and runs_seed(v, seed)]
            todo = [v for v in unit if (v.name, seed) not in done]
            if not todo:
                continue
            log(f"seed {seed}: {variant.name}: training/fitting ({variant.description})")
            scorer, info, handle = build_trained(variant, seed, train_paths, cal_prepared_for, train_prepared_for,
                                                 cache, args)
            log(f"seed {seed}: {variant.name}: built in {info.get('seconds_train', info.get('seconds_fit'))} s")
            for v in unit:
                if (v.name, seed) in done:
                    continue
                if v is variant:
                    s, build = scorer, info
                else:
                    s, build = build_derived(v, by_name[v.base], handle, cal_prepared_for, train_prepared_for, cache,
                                             args)
                entry = evaluate_variant(s, v, seed, data, kinds, cal_prepared_for(s.preprocessing), args,
                                         examples_dir)
                entry["build"] = build
                entry["operating_percentile"] = s.default_percentile
                state["entries"].append(entry)
                done.add((v.name, seed))
                mean_auprc = np.mean([entry["kinds"][k]["auprc"] or 0.0 for k in kinds]) if kinds else float("nan")
                log(f"seed {seed}: {v.name}: mean AUPRC {mean_auprc:.3f}, top-0.5% within {BOUNDARY_MM:g} mm: "
                    f"{entry['healthy_maps']['top_within_boundary']:.2f} "
                    f"(evaluated in {entry['seconds_evaluate']} s)")
                on_update()
            del scorer, handle
    return state


# ============================================================================ reporting

TABLE_KEYS = ("auprc", "auroc", "dice_calibrated", "oracle_best_dice", "detection_rate", "fp_components_per_volume")


def aggregate_entries(entries: Sequence[dict], variants: Sequence[str], kinds: Sequence[str]) -> dict:
    """Mean/std over seeds per variant: kinds (headline keys), lesion-free, healthy maps, build."""
    table: dict = {}
    for name in variants:
        mine = [e for e in entries if e["variant"] == name]
        if not mine:
            continue
        row: dict = {"seeds": sorted(e["seed"] for e in mine), "kinds": {}}
        for kind in kinds:
            heads = [e["kinds"][kind] for e in mine if kind in e["kinds"]]
            row["kinds"][kind] = {key: rb._agg([h.get(key) for h in heads]) for key in TABLE_KEYS}
            row["kinds"][kind]["n_lesions"] = heads[0].get("n_lesions") if heads else None
        row["mean_auprc"] = rb._agg([float(np.mean([e["kinds"][k]["auprc"] or 0.0 for k in kinds])) for e in mine])
        row["mean_dice_calibrated"] = rb._agg([float(np.mean([e["kinds"][k]["dice_calibrated"] or 0.0 for k in kinds]))
                                               for e in mine])
        lfs = [e.get("lesion_free") for e in mine if e.get("lesion_free")]
        row["lesion_free_fp_components"] = rb._agg([(x.get("false_positive_components_per_volume") or {}).get("mean")
                                                    for x in lfs])
        row["lesion_free_fp_fraction"] = rb._agg([x.get("fp_fraction_pooled") for x in lfs])
        row["operating_percentile"] = rb._agg([e.get("operating_percentile") for e in mine])
        for key in ("top_within_boundary", "brain_within_boundary", "map_intensity_corr", "top_depth_median_mm",
                    "brain_depth_median_mm", "top_right_share"):
            row[key] = rb._agg([e["healthy_maps"].get(key) for e in mine])
        row["seconds_train"] = rb._agg([e["build"].get("seconds_train") for e in mine])
        row["final_entropy"] = rb._agg([(e["build"].get("final_losses") or {}).get("entropy") for e in mine])
        table[name] = row
    return table


def write_report(state: dict, variants: Sequence[Variant], kinds: Sequence[str], output_dir: Path,
                 figures: bool = True) -> None:
    from AnomalySegLib.evaluation.metrics import finite_or_none

    names = [v.name for v in variants]
    table = aggregate_entries(state["entries"], names, kinds)
    state["aggregate"] = table
    if not state.get("report_only"):
        state["seconds_total"] = time.time() - state["started"]
    if figures:
        state["figures"] = plot_maps(variants, kinds, output_dir)
    cfg, machine = state["config"], state["machine"]
    cell = rb._cell
    lines = ["# Attention-method study (AMCons / GradCAMCons) at CPU scale", "",
             f"Command: `{state['command']}`", "",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_cores_usable')} usable cores, shared with other "
             f"jobs; torch threads {cfg['threads']}), torch {machine.get('torch')}, AnomalySeg "
             f"{machine.get('anomalyseg')}" + (f", commit {machine['git_commit'][:10]}" if machine.get("git_commit")
                                               else "") + f", {machine.get('date_utc')}. "
             f"Total {state['seconds_total'] / 60:.1f} min"
             + (" (this invocation; earlier entries were kept by --resume)" if state.get("resumed") else "")
             + ".", "",
             f"Data: {state['data']}", "",
             f"Defaults: {cfg['epochs']} epochs, {cfg['image_size']} px, width {cfg['width']}, latent "
             f"{cfg['latent_dim']}, batch {cfg['batch_size']}, lr {cfg['lr']}, attention stage "
             f"{cfg['attention_stage']}; seeds {cfg['seeds']} (variants marked * use all seeds: mean ± std; the "
             "others use the first). Healthy split 80/20 per seed (run_benchmark). Thresholds: each method's "
             "healthy operating point (start percentile, raised until held-out healthy volumes carry <= 1 false "
             "component >= 0.1 mL). Voxel metrics on brain voxels.", "",
             "## Variants", "", "| variant | kind | what changes |", "|---|---|---|"]
    for v in variants:
        if v.name in table:
            lines.append(f"| {v.name}{'*' if v.all_seeds else ''} | {v.kind if v.base is None else 'derived'} | "
                         f"{v.description} |")
    lines += ["", "## Summary (mean over lesion kinds) and healthy maps", "",
              f"Top 0.5 %: share of the top {TOP_FRACTION:.1%} of held-out healthy brain-voxel scores lying within "
              f"{BOUNDARY_MM:g} mm of the brain boundary (next to: share of all brain voxels there). "
              "Depth: median distance (mm) of those voxels to the brain boundary (all brain voxels: "
              "see the last line). Right: share of them on the patient's right of the brain centroid (0.5 = "
              "symmetric). corr: Pearson correlation of the model-space map with the normalised image inside the "
              "tissue masks.",
              "",
              "| variant | mean AUPRC | mean Dice (cal.) | lesion-free FP comp./vol | op. percentile | "
              "top 0.5 % near boundary | brain near boundary | top 0.5 % depth mm | top 0.5 % right | "
              "corr(map, intensity) | train s | final H |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = table.get(name)
        if not r:
            continue
        lines.append(f"| {name} | {cell(r['mean_auprc'])} | {cell(r['mean_dice_calibrated'])} | "
                     f"{cell(r['lesion_free_fp_components'], 1)} | {cell(r['operating_percentile'], 2)} | "
                     f"{cell(r['top_within_boundary'], 2)} | {cell(r['brain_within_boundary'], 2)} | "
                     f"{cell(r['top_depth_median_mm'], 1)} | {cell(r['top_right_share'], 2)} | "
                     f"{cell(r['map_intensity_corr'], 2)} | {cell(r['seconds_train'], 0)} | "
                     f"{cell(r['final_entropy'], 3)} |")
    depths = [r["brain_depth_median_mm"]["mean"] for r in table.values() if r["brain_depth_median_mm"]["mean"]]
    if depths:
        lines += ["", f"Median depth of all held-out healthy brain voxels: {np.mean(depths):.1f} mm."]
    for kind in kinds:
        lines += ["", f"## {kind}", "",
                  "| variant | AUPRC | AUROC | Dice (cal.) | [Dice] ORACLE | detection rate | FP comp./vol |",
                  "|---|---|---|---|---|---|---|"]
        for name in names:
            r = table.get(name)
            if not r:
                continue
            k = r["kinds"][kind]
            lines.append(f"| {name} | {cell(k['auprc'])} | {cell(k['auroc'])} | {cell(k['dice_calibrated'])} | "
                         f"{cell(k['oracle_best_dice'])} | {cell(k['detection_rate'], 2)} of {k['n_lesions']} | "
                         f"{cell(k['fp_components_per_volume'], 1)} |")
    if state.get("figures"):
        lines += ["", "## Maps", "",
                  "Rows: variants (first seed). Columns: a held-out healthy slice (red: top 0.5 % healthy voxels) "
                  "and the first volume of each lesion set (slice with the largest lesion). Colour: the variant's "
                  "own healthy scale (black = healthy median, yellow = healthy 99.9th percentile); green: truth, "
                  "cyan: mask at the operating point.", ""]
        lines += [f"![{f}]({f})" for f in state["figures"]]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    saved = {k: v for k, v in state.items() if k != "report_only"}
    (output_dir / "results.json").write_text(json.dumps(finite_or_none(saved), indent=1) + "\n", encoding="utf-8")


MAIN_FIGURE = ("intensity", "amcons", "amcons+posnorm", "reference", "reference+library-inference",
               "gradcamcons", "amcons-96px", "amcons-96px+posnorm")


def plot_maps(variants: Sequence[Variant], kinds: Sequence[str], output_dir: Path) -> list[str]:
    """maps.png (every variant with examples) and maps_main.png (the key ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    available = [(v.name, load_examples(output_dir / "examples" / f"{v.name}.npz")) for v in variants
                 if (output_dir / "examples" / f"{v.name}.npz").is_file()]
    if not available:
        return []
    written = []
    for fname, rows in (("maps.png", available),
                        ("maps_main.png", [r for r in available if r[0] in MAIN_FIGURE])):
        if not rows:
            continue
        cols = ["healthy"] + [k for k in kinds]
        fig, axes = plt.subplots(len(rows) + 1, len(cols), figsize=(1.7 * len(cols), 1.75 * (len(rows) + 1)),
                                 squeeze=False)
        first = rows[0][1]
        for j, col in enumerate(cols):
            sl = first.get(col)
            ax = axes[0, j]
            if sl is not None:
                ax.imshow(sl["image"].T, cmap="gray", origin="lower", aspect=sl["aspect"])
                if "truth" in sl and np.any(sl["truth"]):
                    ax.contour(sl["truth"].T, levels=[0.5], colors="lime", linewidths=0.6)
            ax.set_title(col, fontsize=7)
        axes[0, 0].set_ylabel("image", fontsize=7)
        for i, (name, ex) in enumerate(rows, start=1):
            scale = ex.get("_scale", {})
            for j, col in enumerate(cols):
                ax = axes[i, j]
                sl = ex.get(col)
                if sl is None:
                    continue
                ax.imshow(sl["heatmap"].T, cmap="inferno", origin="lower", aspect=sl["aspect"],
                          vmin=scale.get("vmin"), vmax=scale.get("vmax"))
                if np.any(sl.get("truth", 0)):
                    ax.contour(sl["truth"].T, levels=[0.5], colors="lime", linewidths=0.6)
                if "pred" in sl and np.any(sl["pred"]):
                    ax.contour(sl["pred"].T, levels=[0.5], colors="cyan", linewidths=0.5)
                if "top" in sl and np.any(sl["top"]):
                    ax.contour(sl["top"].T, levels=[0.5], colors="red", linewidths=0.5)
            axes[i, 0].set_ylabel(name, fontsize=6)
        for ax in axes.ravel():
            ax.invert_xaxis()
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout(pad=0.3)
        fig.savefig(output_dir / fname, dpi=90 if fname == "maps_main.png" else 60)
        plt.close(fig)
        written.append(fname)
    return written


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder written by make_benchmark_data.py")
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--variants", nargs="+", default=None,
                   help="variant names (default: the standard list; see --list-variants). A derived variant "
                        "pulls in its base.")
    p.add_argument("--list-variants", action="store_true")
    p.add_argument("--kinds", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--attention-stage", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="the first seed runs every variant, later seeds only the key ones (marked *)")
    p.add_argument("--calibration-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids thrashing on shared cores)")
    p.add_argument("--resume", action="store_true", help="keep the entries of an earlier results.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and the figures from an existing results.json (no training)")
    p.add_argument("--quiet", action="store_true")
    return p


def select_variants(names: Optional[Sequence[str]]) -> list[Variant]:
    if names is None:
        return default_variants()
    known = all_variants()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown variant(s): {', '.join(unknown)} (see --list-variants)")
    wanted = list(dict.fromkeys(names))
    for n in list(wanted):
        base = known[n].base
        if base is not None and base not in wanted:
            wanted.insert(wanted.index(n), base)
    order = [v.name for v in default_variants() + extra_variants()]
    return [known[n] for n in sorted(wanted, key=order.index)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_variants:
        for v in default_variants() + extra_variants():
            print(f"{v.name:30s} {v.kind:10s} {v.description}")
        return 0
    torch.set_num_threads(max(1, args.threads))
    started = time.time()
    out = args.output_dir
    try:
        if args.report_only:
            state = json.loads((out / "results.json").read_text(encoding="utf-8"))
            state["report_only"] = True
            state.setdefault("resumed", "--resume" in state.get("command", ""))
            variants = [Variant(**v) for v in state["variants"]]
            write_report(state, variants, state["kinds"], out, figures=not args.no_figures)
            state.pop("report_only", None)
            print(f"rewrote {out / 'results.md'}")
            return 0
        variants = select_variants(args.variants)
        if (out / "results.json").exists() and not (args.overwrite or args.resume):
            raise InputError(f"{out / 'results.json'} exists (use --overwrite or --resume)")
        out.mkdir(parents=True, exist_ok=True)
        data = rb.load_benchmark_data(args.data)
        kinds = args.kinds or list(data["test_sets"])
        unknown = [k for k in kinds if k not in data["test_sets"]]
        if unknown:
            raise InputError(f"lesion set(s) not in {args.data}: {', '.join(unknown)}")
        from AnomalySegLib.evaluation.machine import machine_info

        entries: list = []
        if args.resume and (out / "results.json").exists():
            entries = json.loads((out / "results.json").read_text(encoding="utf-8")).get("entries", [])
        s = data["settings"]
        state = {
            "command": rb.command_line(__file__, argv),
            "machine": machine_info("cpu"),
            "data": (f"{args.data.name}: synthetic {s.get('template')} cohort ({s.get('contrast')}, "
                     f"{s.get('resolution_mm')} mm, seed {s.get('seed')}): {len(data['healthy'])} healthy, "
                     f"{len(data['lesion_free'])} lesion-free, "
                     + ", ".join(f"{len(data['test_sets'][k][0])} {k}" for k in kinds)),
            "config": {k: getattr(args, k) for k in ("epochs", "image_size", "width", "latent_dim", "batch_size", "lr",
                                                     "attention_stage", "seeds", "calibration_fraction", "threads")},
            "variants": [dataclasses.asdict(v) for v in variants],
            "kinds": list(kinds),
            "entries": entries,
            "resumed": bool(entries),
            "started": started,
        }

        def on_update() -> None:
            write_report(state, variants, kinds, out, figures=False)

        run_study(variants, data, kinds, args, out, state, on_update)
        write_report(state, variants, kinds, out, figures=not args.no_figures)
    except AnomalySegError as exc:
        print(f"study_attention: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'results.md'} ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
