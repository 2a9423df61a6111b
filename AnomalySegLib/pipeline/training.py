"""Training on healthy volumes only, then healthy-only calibration.

Adam (lr 1e-4, batch 32 as in the paper), seeded, with per-epoch checkpoints and resume,
progress/cancel callbacks, CUDA + mixed precision when present (CPU otherwise),
fine-tuning from an existing model, and data-parallel training with
DistributedDataParallel when launched by ``torchrun`` (any backend: gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from ..data.preprocessing import PreparedVolume, PreprocessConfig, prepare_volume
from ..data.bias_flatten import fit_flattened_intensity_stats, flatten_bias
from ..errors import AnomalySegError, InputError
from ..io.volume_io import Volume, read_volume
from ..model.bundle import AnomalyModel, load_model
from ..model.checkpoint import read_checkpoint, restore_checkpoint, write_checkpoint
from ..model.position_stats import DEFAULT_GRID, PositionStats
from ..nn.device import resolve_device, training_autocast
from ..nn.methods import (ARCHITECTURE_OF, METHODS, MethodParams, default_warmup_epochs, intensity_term_is_global,
                          training_loss)
from ..nn.networks import VAEConfig, build_network
from ..nn.speed import configure_cpu_allocator, mixed_precision_training
from ..progress import CancelCallback, EtaEstimator, ProgressCallback, ProgressEvent, check_cancel, emit
from ..settings import CALIBRATE_WITH_TRAINING_DEFAULT, LR_SCHEDULES, JsonSettings
from .calibrate import calibrate_prepared
from .inference import score_prepared


def learning_rate_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run of ``total_steps``:
    ``base`` (constant) or ``base * (1 + cos(pi * step / total_steps)) / 2`` (cosine)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


@dataclass
class TrainConfig(JsonSettings):
    """Everything that defines a training run (stored in the model's training summary)."""

    method: str = "amcons"
    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-4
    image_size: int = 224
    base_width: int = 64
    latent_dim: int = 32
    attention_stage: int = 1
    seed: int = 0
    device: str = "auto"
    #: Mixed precision where the hardware has it natively: CUDA (bf16 or fp16 autocast) and
    #: CPUs with AMX / AVX512-BF16 (bf16 autocast + channels-last, ~2.3x faster training
    #: here, same quality measured: docs/BENCHMARKS.md); float32 elsewhere or when False.
    amp: bool = True
    #: Compile the training step with ``torch.compile`` (inductor). It costs a one-off
    #: compilation (~1-2 min on a 2-core CPU) and then runs each step faster (measured
    #: 1.3x for amcons at the CPU profile's size: docs/BENCHMARKS.md), so it pays off in
    #: long runs only; off by default. Only :data:`COMPILED_METHODS` are compiled; the eager
    #: step runs, with a message, for the others, under torchrun, and when compilation
    #: fails (e.g. no C++ compiler).
    compile: bool = False
    calibration_fraction: float = 0.2
    #: Also calibrate (quantile table and false-blob budget) on the training volumes that the
    #: position statistics were not fitted on, besides the held-out ones: the budget's
    #: confidence margin shrinks with more scans, and at the CPU profile the network carries
    #: as many false blobs on its training scans as on new ones (measured: docs/BENCHMARKS.md,
    #: stop 20). Files trained before it: False.
    calibrate_with_training: bool = CALIBRATE_WITH_TRAINING_DEFAULT
    #: Learning rate over the run: ``constant`` (the paper's Adam) or ``cosine`` (decays per
    #: step from ``learning_rate`` to 0 along half a cosine over all the run's steps; a resumed
    #: run given more epochs continues on the longer run's curve). Measured no better than
    #: constant for the CPU profile (docs/BENCHMARKS.md), so no profile uses it.
    lr_schedule: str = "constant"
    method_overrides: dict = field(default_factory=dict)
    preprocessing_overrides: dict = field(default_factory=dict)
    #: Name of the profile these settings came from (profiles.py), "" for hand-made configs.
    profile: str = ""

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for impossible settings."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning rate must be > 0")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError("calibration fraction must be in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        for name in ("amp", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer from 0 to {2**32 - 1}, got {self.seed!r}")


def method_params_for(config: TrainConfig) -> MethodParams:
    """The paper's settings for the method, with the user's overrides applied.

    GradCAMCons trains as a plain VAE before the size constraint is switched on (the paper
    warms up for 300 epochs; here a third of the run unless the user gives a number).
    """
    data = MethodParams.defaults(config.method).to_dict()
    data["warmup_epochs"] = default_warmup_epochs(config.method, config.epochs)
    unknown = set(config.method_overrides) - set(data)
    if unknown:
        raise ValueError(f"unknown method parameter(s): {', '.join(sorted(unknown))}")
    data.update(config.method_overrides)
    data["method"] = config.method
    if "bias_flatten" not in config.method_overrides and (
            float(data.get("fuse_intensity", 0)) <= 0 or intensity_term_is_global(str(data.get("intensity_term", "")))):
        # flattening needs the per-position intensity statistics: a user who turns those off
        # turns the default flattening off with them (an explicit --bias-flatten still errors)
        data["bias_flatten"] = "off"
    return MethodParams.from_dict(data)


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_spec: str) -> _Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_spec != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


#: Methods whose training step ``TrainConfig.compile`` compiles: the VAE network's (amcons
#: measured 1.3x faster than its eager mixed-precision step on the benchmark CPU; vae shares
#: the network and the loss but the entropy term). The dae U-Net's compiled step measured
#: 0.5x (slower), and GradCAMCons needs double backward.
COMPILED_METHODS = ("amcons", "vae")


class _LossModule(torch.nn.Module):
    """Wraps network + method loss so DistributedDataParallel sees one forward per step."""

    def __init__(self, network: torch.nn.Module, params: MethodParams) -> None:
        super().__init__()
        self.network = network
        self.params = params

    def forward(self, x: torch.Tensor, mask: torch.Tensor, epoch: int):  # noqa: D401
        return training_loss(self.network, x, mask, self.params, epoch=epoch)


# ----------------------------------------------------------------------------- data


def _load_and_prepare(
    healthy: Sequence[Union[str, Path, Volume]],
    preprocessing: PreprocessConfig,
    progress: Optional[ProgressCallback],
    cancel: Optional[CancelCallback],
) -> "tuple[list[PreparedVolume], list[str]]":
    prepared, names = [], []
    for index, item in enumerate(healthy):
        check_cancel(cancel)
        volume = item if isinstance(item, Volume) else read_volume(item)
        prepared.append(prepare_volume(volume, preprocessing, progress=progress, cancel=cancel))
        names.append(str(volume.path) if volume.path is not None else f"<volume {index}>")
        emit(progress, ProgressEvent("prepare", (index + 1) / len(healthy),
                                     message=f"preprocessed {index + 1}/{len(healthy)} healthy volumes"))
    return prepared, names


#: Training volumes scored to fit the position statistics (enough for stable per-bin
#: moments; more only costs time).
POSITION_STATS_MAX_VOLUMES = 16


def position_stats_indices(count: int) -> "list[int]":
    """Which of ``count`` training volumes :func:`fit_position_stats` scores: up to
    :data:`POSITION_STATS_MAX_VOLUMES`, evenly spread."""
    step = max(1, int(math.ceil(count / POSITION_STATS_MAX_VOLUMES)))
    return list(range(0, count, step))


def outside_position_stats(count: int, position_normalise: bool = True) -> "list[int]":
    """Which of ``count`` training volumes the position statistics are *not* fitted on (all of
    them when the method has none): those that can also calibrate
    (:attr:`TrainConfig.calibrate_with_training`)."""
    in_stats = set(position_stats_indices(count)) if position_normalise else set()
    return [k for k in range(count) if k not in in_stats]


def fit_intensity_stats(method: MethodParams, volumes: Sequence[PreparedVolume]) -> Optional[PositionStats]:
    """Healthy per-position intensity statistics of (up to 16 evenly spread) training volumes,
    bias-flattened when the method flattens; None when the method fuses no intensity."""
    if method.fuse_intensity <= 0:
        return None
    chosen = [volumes[i] for i in position_stats_indices(len(volumes))]
    # a global term is the same statistics on a single bin: one mean/std of the brain
    grid = (1, 1, 1) if intensity_term_is_global(method.intensity_term) else DEFAULT_GRID
    if method.bias_flatten != "off":
        return fit_flattened_intensity_stats(chosen, grid=grid, model=method.bias_field)
    return PositionStats.fit([v.images for v in chosen], [v.masks for v in chosen],
                             [v.slice_indices for v in chosen], grid=grid)


def fit_position_stats(model: AnomalyModel, volumes: Sequence[PreparedVolume], *, device,
                       cancel: Optional[CancelCallback] = None,
                       intensity: Optional[PositionStats] = None) -> "tuple[PositionStats, Optional[PositionStats]]":
    """Healthy per-position statistics of the model's raw maps on (up to 16 evenly spread)
    training volumes, and of their intensities when the method fuses intensity
    (``intensity``: those already fitted by :func:`fit_intensity_stats` on the same volumes)."""
    chosen = [volumes[i] for i in position_stats_indices(len(volumes))]
    masks, indices = [v.masks for v in chosen], [v.slice_indices for v in chosen]
    if intensity is None:
        intensity = fit_intensity_stats(model.method, volumes)
    saved = model.intensity_stats
    model.intensity_stats = intensity  # score_prepared flattens the network's input with them
    try:
        maps = [score_prepared(model, v, device=device, cancel=cancel, normalise=False) for v in chosen]
    finally:
        model.intensity_stats = saved
    return PositionStats.fit(maps, masks, indices), intensity


def split_volumes(count: int, fraction: float, seed: int) -> "tuple[list[int], list[int]]":
    """Deterministic split into (training, held-out calibration) volume indices.

    Calibration volumes are whole volumes (not slices of training volumes), so their
    scores are not optimistically low. With a single volume there is nothing to hold out.
    """
    if count < 2 or fraction <= 0:
        return list(range(count)), []
    n_cal = min(count - 1, max(1, int(round(fraction * count))))
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[n_cal:]), sorted(int(i) for i in order[:n_cal])


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run in steps, each a method a variant can override (the hooks):

    :meth:`setup` (device, configurations, data and split, network and optimiser,
    resume), :meth:`run_epoch` (one pass over the training slices), :meth:`end_epoch`
    (loss history, checkpoint) and :meth:`finish` (training summary, position
    statistics, calibration on the held-out volumes, save). :meth:`fit` runs them in order.
    Under ``torchrun`` each process trains on its share of every batch; only rank 0
    reports progress, calibrates and writes files.
    """

    def __init__(self, config: TrainConfig, ddp: Optional[_Dist] = None, *,
                 init: Union[str, Path, AnomalyModel, None] = None, checkpoint: Union[str, Path, None] = None,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None) -> None:
        self.config = config
        self.ddp = ddp if ddp is not None else _Dist()
        self.init = init
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        self.progress = progress
        self.cancel = cancel
        self.history: list = []
        self.start_epoch = 0
        self.done_steps = 0
        self.compiled_step = None
        self.compile_notes: list = []
        self.compiled_steps = 0

    # -- setup ------------------------------------------------------------------------
    def setup(self, healthy: Sequence[Union[str, Path, Volume]], *, resume: bool = False) -> None:
        """Everything before the first epoch, in the order that fixes the random streams."""
        self.device = self._device()
        torch.manual_seed(self.config.seed)
        self._configure()
        self._load_data(healthy)
        self._build_network()
        self.init_id = self.init_model.model_id if self.init_model is not None else ""
        if resume:
            self._resume()
        self.module = _LossModule(self.network, self.params)
        if self.ddp.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled_step = self._compile_step()

    def _compile_step(self):
        """The compiled loss ``f(x, mask)`` when ``config.compile`` and it can apply, else None.

        The epoch is left out of the compiled function (it only switches the GradCAMCons
        barrier, which is never compiled): an epoch argument would recompile every epoch.
        """
        if not self.config.compile:
            return None
        reason = None
        if self.params.method == "gradcamcons":
            reason = "gradcamcons needs double backward, which torch.compile does not support"
        elif self.params.method not in COMPILED_METHODS:
            reason = (f"{self.params.method}: its compiled step measured slower than the eager one "
                      "(docs/BENCHMARKS.md)")
        elif self.ddp.world > 1:
            reason = "not under torchrun"
        elif not hasattr(torch, "compile"):
            reason = "this PyTorch has no torch.compile"
        if reason is not None:
            self._compile_note(f"training step not compiled ({reason}); training eagerly")
            return None
        network, params = self.network, self.params
        return torch.compile(lambda x, mask: training_loss(network, x, mask, params, epoch=0), dynamic=False)

    def _compile_note(self, message: str) -> None:
        self.compile_notes.append(message)
        if self.ddp.main:
            total = max(1, getattr(self, "_total_steps", 1))
            emit(self.progress, ProgressEvent("train", min(1.0, self.done_steps / total), message=message))

    def _device(self) -> torch.device:
        if self.ddp.world > 1:
            use_cuda = torch.cuda.is_available() and self.config.device != "cpu"
            return torch.device(f"cuda:{self.ddp.local_rank}") if use_cuda else torch.device("cpu")
        return resolve_device(self.config.device)

    def _configure(self) -> None:
        """Network and preprocessing settings (a base model's when fine-tuning) and the method's."""
        config = self.config
        self.init_model: Optional[AnomalyModel] = None
        if self.init is not None:
            self.init_model = self.init if isinstance(self.init, AnomalyModel) else load_model(self.init)
            self.network_config = self.init_model.network_config
            self.preprocessing = self.init_model.preprocessing
        else:
            try:
                self.network_config = VAEConfig(image_size=config.image_size, base_width=config.base_width,
                                                latent_dim=config.latent_dim, attention_stage=config.attention_stage,
                                                architecture=ARCHITECTURE_OF[config.method])
                self.preprocessing = PreprocessConfig(image_size=config.image_size, **config.preprocessing_overrides)
            except (TypeError, ValueError) as exc:
                raise AnomalySegError(f"invalid training settings: {exc}") from exc
        try:
            self.params = method_params_for(config)
        except ValueError as exc:
            raise AnomalySegError(str(exc)) from exc

    def _load_data(self, healthy) -> None:
        """Preprocess, split off the held-out calibration volumes, stack the training slices."""
        config, ddp = self.config, self.ddp
        self.prepared, self.names = _load_and_prepare(healthy, self.preprocessing, self.progress, self.cancel)
        self.train_idx, self.cal_idx = split_volumes(len(self.prepared), config.calibration_fraction, config.seed)
        training = [self.prepared[i] for i in self.train_idx]
        # bias_flatten=all: the network is trained on the flattened images it is given at
        # inference (one preprocessing path), flattened against the statistics the model stores
        self.intensity_stats = fit_intensity_stats(self.params, training) if self.params.bias_flatten == "all" else None
        if self.intensity_stats is not None:
            emit(self.progress, ProgressEvent("prepare", 1.0, message="flattening the training volumes' bias fields"))
            stacked = [flatten_bias(v.images, v.masks, v.slice_indices, self.intensity_stats, self.params.bias_field)
                       for v in training]
        else:
            stacked = [v.images for v in training]
        self.images = np.concatenate(stacked).astype(np.float16)
        self.masks = np.concatenate([v.masks for v in training])
        self.n_images = len(self.images)
        if self.n_images < ddp.world:
            raise InputError(f"only {self.n_images} training slices for {ddp.world} processes")
        # --batch-size is the global batch; each process takes its share. Incomplete last
        # batches are dropped (every rank must run the same number of steps).
        per_rank_batch = max(1, config.batch_size // ddp.world)
        self.global_batch = per_rank_batch * ddp.world
        self.steps_per_epoch = max(1, self.n_images // self.global_batch)

    def _build_network(self) -> None:
        config = self.config
        if self.network_config.architecture != ARCHITECTURE_OF[config.method]:
            raise AnomalySegError(f"cannot fine-tune a {self.network_config.architecture} model with method "
                                  f"{config.method!r}; use --method {self.init_model.name if self.init_model else '?'}")
        self.network = build_network(self.network_config)
        if self.init_model is not None:
            self.network.load_state_dict(self.init_model.network.state_dict())
        self.network.to(self.device)
        if self.device.type == "cpu":
            configure_cpu_allocator()  # reuse freed activations instead of faulting pages in again
        # on a CPU with native bfloat16: autocast + channels-last, faster but not bit-close
        # to float32 (quality measured equal: docs/BENCHMARKS.md); float32 NCHW on other CPUs
        self.use_amp = mixed_precision_training(self.device, config.amp)
        self.cpu_amp = self.use_amp and self.device.type == "cpu"
        if self.cpu_amp:
            self.network.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.scaler = (torch.amp.GradScaler("cuda")
                       if self.use_amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported() else None)

    def _resume(self) -> None:
        state = read_checkpoint(self.checkpoint_path, config=asdict(self.config), names=self.names)
        self.start_epoch, self.history, self.init_id = restore_checkpoint(
            state, self.network, self.optimizer, self.scaler, init_id=self.init_id)

    # -- epochs -----------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict:
        """One pass over the training slices; returns the summed losses of its steps."""
        config, ddp = self.config, self.ddp
        # same permutation on every rank (seeded by epoch), each rank takes its own stride
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(self.n_images, generator=generator)
        sums: dict = {}
        for step in range(self.steps_per_epoch):
            check_cancel(self.cancel)
            idx = order[step * self.global_batch: (step + 1) * self.global_batch][ddp.rank::ddp.world]
            x, m = self._images_t[idx].float().unsqueeze(1), self._masks_t[idx]
            if self.device.type == "cuda":  # pinned pages: the copies below overlap with compute
                x, m = x.pin_memory(), m.pin_memory()
            x = x.to(self.device, non_blocking=True)
            m = m.to(self.device, non_blocking=True)
            # the schedule counts steps over the whole run, so a resumed run continues it
            lr = learning_rate_at(config.learning_rate, config.lr_schedule, epoch * self.steps_per_epoch + step,
                                  config.epochs * self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            logs = self._step(x, m, epoch)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            self.done_steps += 1
            fraction = self.done_steps / self._total_steps
            emit(self.progress, ProgressEvent("train", fraction, epoch=epoch + 1, epochs=config.epochs,
                                              step=step + 1, steps=self.steps_per_epoch,
                                              losses={k: float(v) for k, v in logs.items()},
                                              eta_s=self._eta.eta(fraction)))
        return sums

    def _step(self, x: torch.Tensor, m: torch.Tensor, epoch: int) -> dict:
        """One optimiser step (mixed precision on CUDA and on CPUs with native bf16); stops on a
        non-finite loss."""
        if self.cpu_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = logs = None
        if self.compiled_step is not None:
            loss, logs = self._compiled_forward_backward(x, m)
        if loss is None:
            with training_autocast(self.device, self.use_amp):
                loss, logs = self.module(x, m, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if not math.isfinite(float(loss.detach())):
            raise AnomalySegError(
                f"training diverged (loss is {float(loss.detach())}) at epoch {epoch + 1}; "
                "try a lower learning rate or check the input volumes")
        return logs

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _compiled_forward_backward(self, x: torch.Tensor, m: torch.Tensor):
        """Forward and backward through the compiled step; ``(None, None)`` when its first
        use fails (compilation error), after which training continues eagerly."""
        first = self.compiled_steps == 0
        if first:
            self._compile_note("compiling the training step (torch.compile; a one-off wait, then faster steps)")
        try:
            with training_autocast(self.device, self.use_amp):
                loss, logs = self.compiled_step(x, m)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
        except (AnomalySegError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 -- any compiler failure: fall back, say why
            if not first:
                raise
            self.compiled_step = None
            self.optimizer.zero_grad(set_to_none=True)
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self._compile_note(f"torch.compile failed ({detail}); training eagerly")
            return None, None
        self.compiled_steps += 1
        return loss, logs

    def end_epoch(self, epoch: int, sums: dict) -> None:
        """Record the epoch's mean losses and write the checkpoint (rank 0)."""
        self.history.append({"epoch": epoch + 1, **{k: v / self.steps_per_epoch for k, v in sums.items()}})
        if self.checkpoint_path is not None and self.ddp.main:
            write_checkpoint(self.checkpoint_path, config=asdict(self.config), network_config=self.network_config,
                             preprocessing=self.preprocessing, params=self.params, epoch=epoch + 1,
                             network=self.network, optimizer=self.optimizer, scaler=self.scaler,
                             history=self.history, names=self.names, init_id=self.init_id)

    # -- the end ----------------------------------------------------------------------
    def summary(self) -> dict:
        """The training summary stored in the model file."""
        config, network_config = self.config, self.network_config
        recorded = asdict(config)
        if self.init_model is not None:  # the architecture comes from the base model, not from the config
            recorded.update(image_size=network_config.image_size, base_width=network_config.base_width,
                            latent_dim=network_config.latent_dim, attention_stage=network_config.attention_stage)
        return {
            "config": recorded,
            "epochs_trained": config.epochs,
            "train_volumes": len(self.train_idx),
            "train_slices": int(self.n_images),
            "calibration_volumes": len(self.cal_idx),
            # file names (no folders) of the held-out healthy volumes, so a baseline or a study
            # can be calibrated on exactly the same ones
            "calibration_names": [Path(self.names[i]).name for i in self.cal_idx],
            # training volumes calibrated on as well (TrainConfig.calibrate_with_training)
            "calibration_training_names": [Path(self.names[i]).name for i in self.calibration_training_indices()],
            "seconds": round(time.time() - self._started, 1),
            "device": str(self.device),
            "world_size": self.ddp.world,
            "amp": bool(self.use_amp),
            "cpu_bfloat16": bool(self.cpu_amp),
            # whether the steps really ran compiled (config.compile asks; it may fall back)
            "compiled": self.compiled_steps > 0,  # a failed first compiled step counts none
            "compile_notes": list(self.compile_notes),
            "fine_tuned_from": self.init_id or None,
            # whether the network was trained on bias-flattened images (bias_flatten=all)
            "network_input": "bias-flattened" if self.intensity_stats is not None else "preprocessed",
            "history": self.history,
        }

    def calibration_training_indices(self) -> "list[int]":
        """Training volumes that also calibrate (:attr:`TrainConfig.calibrate_with_training`):
        those the position statistics were not fitted on (all of them without statistics);
        none without a held-out set (then the training volumes calibrate alone)."""
        if not (self.config.calibrate_with_training and self.cal_idx):
            return []
        return [self.train_idx[k] for k in outside_position_stats(len(self.train_idx), self.params.position_normalise)]

    def finish(self, output: Union[str, Path, None] = None, *, overwrite: bool = True) -> AnomalyModel:
        """The model: position statistics, calibration on the held-out volumes, saved (rank 0)."""
        self.network.eval()
        self.network.to(memory_format=torch.contiguous_format)  # the model file's usual layout
        model = AnomalyModel(network=self.network, network_config=self.network_config,
                             preprocessing=self.preprocessing, method=self.params, training=self.summary())
        if self.ddp.main:
            prepared, names, train_idx, cal_idx = self.prepared, self.names, self.train_idx, self.cal_idx
            if self.params.position_normalise:
                model.position_stats, model.intensity_stats = fit_position_stats(
                    model, [prepared[i] for i in train_idx], device=self.device, cancel=self.cancel,
                    intensity=self.intensity_stats)
            extra_idx = self.calibration_training_indices()
            cal_set = [prepared[i] for i in (cal_idx + extra_idx)] or [prepared[i] for i in train_idx]
            source_names = [names[i] for i in (cal_idx or train_idx)]
            source = ("held-out healthy volumes: " if cal_idx else "TRAINING volumes (no held-out volume available): ") \
                + ", ".join(Path(n).name for n in source_names[:5]) + (" ..." if len(source_names) > 5 else "")
            if extra_idx:
                source += f" + {len(extra_idx)} training volume(s) outside the position statistics"
            model.calibration = calibrate_prepared(model, cal_set, device=self.device, source=source,
                                                   progress=self.progress, cancel=self.cancel)
            if output is not None:
                model.save(output, overwrite=overwrite)
            if self.checkpoint_path is not None and self.checkpoint_path.exists():
                self.checkpoint_path.unlink()
        if self.ddp.world > 1:
            dist.barrier()
        return model

    def fit(self, healthy: Sequence[Union[str, Path, Volume]], *, output: Union[str, Path, None] = None,
            resume: bool = False, overwrite: bool = True) -> AnomalyModel:
        """Setup, every remaining epoch, finish."""
        self.setup(healthy, resume=resume)
        self._images_t = torch.from_numpy(self.images)
        self._masks_t = torch.from_numpy(self.masks)
        self._total_steps = max(1, (self.config.epochs - self.start_epoch) * self.steps_per_epoch)
        self._eta = EtaEstimator()
        self._started = time.time()
        self.network.train()
        for epoch in range(self.start_epoch, self.config.epochs):
            self.end_epoch(epoch, self.run_epoch(epoch))
        return self.finish(output, overwrite=overwrite)


def train_model(
    healthy: Sequence[Union[str, Path, Volume]],
    config: TrainConfig,
    *,
    output: Union[str, Path, None] = None,
    init: Union[str, Path, AnomalyModel, None] = None,
    checkpoint: Union[str, Path, None] = None,
    resume: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    overwrite: bool = True,
) -> AnomalyModel:
    """Train a model on healthy volumes, calibrate it on held-out healthy volumes, save it.

    Without ``overwrite`` an ``output`` that exists when the model is saved (a concurrent
    run wrote it) is not replaced: OutputError, and the checkpoint is kept.

    ``init`` fine-tunes from an existing model (its network and preprocessing settings are
    kept). ``checkpoint`` is written after every epoch; with ``resume`` training continues
    from it. Under ``torchrun`` each process trains on its share of every batch and only
    rank 0 calibrates and writes files.
    """
    try:
        config.validate()
    except ValueError as exc:
        raise AnomalySegError(str(exc)) from exc
    if not healthy:
        raise InputError("no healthy volumes given for training")

    ddp = _init_distributed(config.device)
    try:
        trainer = Trainer(config, ddp, init=init, checkpoint=checkpoint,
                          progress=progress if ddp.main else None, cancel=cancel)
        return trainer.fit(healthy, output=output, resume=resume, overwrite=overwrite)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()
