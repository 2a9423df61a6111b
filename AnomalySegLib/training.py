"""Training on healthy volumes only, then healthy-only calibration.

Adam (lr 1e-4, batch 32 as in the paper), seeded, with per-epoch checkpoints and resume,
progress/cancel callbacks, CUDA + mixed precision when present (CPU otherwise),
fine-tuning from an existing model, and data-parallel training with
DistributedDataParallel when launched by ``torchrun`` (any backend: gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from . import MODEL_FORMAT_VERSION, __version__
from .calibration import calibrate_prepared
from .errors import AnomalySegError, InputError, ModelFileError
from .device import autocast_for, resolve_device
from .methods import ARCHITECTURE_OF, METHODS, MethodParams, default_warmup_epochs, training_loss
from .model_file import AnomalyModel, atomic_torch_save, load_model, read_payload
from .models import VAEConfig, build_network
from .position_stats import PositionStats
from .preprocessing import PreparedVolume, PreprocessConfig, prepare_volume
from .progress import CancelCallback, EtaEstimator, ProgressCallback, ProgressEvent, check_cancel, emit
from .settings import JsonSettings
from .volume_io import Volume, read_volume

CHECKPOINT_FORMAT = "anomalyseg-checkpoint"


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
    amp: bool = True
    calibration_fraction: float = 0.2
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
        prepared.append(prepare_volume(volume, preprocessing))
        names.append(str(volume.path) if volume.path is not None else f"<volume {index}>")
        emit(progress, ProgressEvent("prepare", (index + 1) / len(healthy),
                                     message=f"preprocessed {index + 1}/{len(healthy)} healthy volumes"))
    return prepared, names


#: Training volumes scored to fit the position statistics (enough for stable per-bin
#: moments; more only costs time).
POSITION_STATS_MAX_VOLUMES = 16


def fit_position_stats(model: AnomalyModel, volumes: Sequence[PreparedVolume], *, device,
                       cancel: Optional[CancelCallback] = None) -> "tuple[PositionStats, Optional[PositionStats]]":
    """Healthy per-position statistics of the model's raw maps on (up to 16 evenly spread)
    training volumes, and of their intensities when the method fuses intensity."""
    from .inference import score_prepared

    step = max(1, int(math.ceil(len(volumes) / POSITION_STATS_MAX_VOLUMES)))
    chosen = list(volumes)[::step]
    maps = [score_prepared(model, v, device=device, cancel=cancel, normalise=False) for v in chosen]
    masks, indices = [v.masks for v in chosen], [v.slice_indices for v in chosen]
    intensity = None
    if model.method.fuse_intensity > 0:
        intensity = PositionStats.fit([v.images for v in chosen], masks, indices)
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


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, *, config: TrainConfig, network_config: VAEConfig, preprocessing: PreprocessConfig,
                     params: MethodParams, epoch: int, network: torch.nn.Module, optimizer, scaler, history: list,
                     names: list, init_id: str) -> None:
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "library_version": __version__,
            "config": json.dumps(asdict(config)),
            "network_config": json.dumps(network_config.to_dict()),
            "preprocessing": json.dumps(preprocessing.to_dict()),
            "method": json.dumps(params.to_dict()),
            "epochs_done": int(epoch),
            "history": json.dumps(history),
            "volumes": json.dumps(names),
            "init_id": init_id,
            "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "torch_rng": torch.get_rng_state(),
        },
        path,
    )


def _comparable(config_dict: dict) -> dict:
    # settings that may legitimately differ when resuming (more epochs, other device)
    return {k: v for k, v in config_dict.items() if k not in ("epochs", "device", "amp", "profile")}


# ----------------------------------------------------------------------------- training


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
) -> AnomalyModel:
    """Train a model on healthy volumes, calibrate it on held-out healthy volumes, save it.

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
        return _train(healthy, config, ddp, output=output, init=init, checkpoint=checkpoint, resume=resume,
                      progress=progress if ddp.main else None, cancel=cancel)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(healthy, config: TrainConfig, ddp: _Dist, *, output, init, checkpoint, resume, progress, cancel) -> AnomalyModel:
    if ddp.world > 1:
        device = torch.device(f"cuda:{ddp.local_rank}") if (torch.cuda.is_available() and config.device != "cpu") \
            else torch.device("cpu")
    else:
        device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    # --- base model / configurations
    init_model: Optional[AnomalyModel] = None
    if init is not None:
        init_model = init if isinstance(init, AnomalyModel) else load_model(init)
        network_config = init_model.network_config
        preprocessing = init_model.preprocessing
    else:
        try:
            network_config = VAEConfig(image_size=config.image_size, base_width=config.base_width,
                                       latent_dim=config.latent_dim, attention_stage=config.attention_stage,
                                       architecture=ARCHITECTURE_OF[config.method])
            preprocessing = PreprocessConfig(image_size=config.image_size, **config.preprocessing_overrides)
        except (TypeError, ValueError) as exc:
            raise AnomalySegError(f"invalid training settings: {exc}") from exc
    try:
        params = method_params_for(config)
    except ValueError as exc:
        raise AnomalySegError(str(exc)) from exc

    # --- data
    prepared, names = _load_and_prepare(healthy, preprocessing, progress, cancel)
    train_idx, cal_idx = split_volumes(len(prepared), config.calibration_fraction, config.seed)
    images = np.concatenate([prepared[i].images for i in train_idx]).astype(np.float16)
    masks = np.concatenate([prepared[i].masks for i in train_idx])
    n_images = len(images)
    if n_images < ddp.world:
        raise InputError(f"only {n_images} training slices for {ddp.world} processes")
    # --batch-size is the global batch; each process takes its share. Incomplete last
    # batches are dropped (every rank must run the same number of steps).
    per_rank_batch = max(1, config.batch_size // ddp.world)
    global_batch = per_rank_batch * ddp.world
    steps_per_epoch = max(1, n_images // global_batch)

    # --- network and optimiser
    if network_config.architecture != ARCHITECTURE_OF[config.method]:
        raise AnomalySegError(f"cannot fine-tune a {network_config.architecture} model with method {config.method!r}; "
                              f"use --method {init_model.method.method if init_model else '?'}")
    network = build_network(network_config)
    if init_model is not None:
        network.load_state_dict(init_model.network.state_dict())
    network.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None

    history: list = []
    start_epoch = 0
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    init_id = init_model.model_id if init_model is not None else ""
    if resume:
        if checkpoint_path is None or not checkpoint_path.is_file():
            raise InputError(f"cannot resume: checkpoint {checkpoint_path} not found")
        state = read_payload(checkpoint_path, CHECKPOINT_FORMAT)
        saved = json.loads(state["config"])
        if _comparable(saved) != _comparable(asdict(config)) or json.loads(state["volumes"]) != names:
            raise ModelFileError(f"checkpoint {checkpoint_path} belongs to a different training run "
                                 "(other settings or volumes); remove it or drop --resume")
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epochs_done"])
        history = json.loads(state["history"])
        init_id = state.get("init_id", init_id)

    module = _LossModule(network, params)
    if ddp.world > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    images_t = torch.from_numpy(images)
    masks_t = torch.from_numpy(masks)
    total_steps = max(1, (config.epochs - start_epoch) * steps_per_epoch)
    eta = EtaEstimator()
    started = time.time()
    done_steps = 0
    network.train()
    for epoch in range(start_epoch, config.epochs):
        # same permutation on every rank (seeded by epoch), each rank takes its own stride
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n_images, generator=generator)
        sums: dict = {}
        for step in range(steps_per_epoch):
            check_cancel(cancel)
            idx = order[step * global_batch: (step + 1) * global_batch][ddp.rank::ddp.world]
            x = images_t[idx].float().unsqueeze(1).to(device, non_blocking=True)
            m = masks_t[idx].to(device, non_blocking=True)
            with autocast_for(device, use_amp):
                loss, logs = module(x, m, epoch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if not math.isfinite(float(loss.detach())):
                raise AnomalySegError(
                    f"training diverged (loss is {float(loss.detach())}) at epoch {epoch + 1}; "
                    "try a lower learning rate or check the input volumes")
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            done_steps += 1
            fraction = done_steps / total_steps
            emit(progress, ProgressEvent("train", fraction, epoch=epoch + 1, epochs=config.epochs,
                                         step=step + 1, steps=steps_per_epoch,
                                         losses={k: float(v) for k, v in logs.items()}, eta_s=eta.eta(fraction)))
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}})
        if checkpoint_path is not None and ddp.main:
            _save_checkpoint(checkpoint_path, config=config, network_config=network_config,
                             preprocessing=preprocessing, params=params, epoch=epoch + 1, network=network,
                             optimizer=optimizer, scaler=scaler, history=history, names=names, init_id=init_id)

    network.eval()
    recorded = asdict(config)
    if init_model is not None:  # the architecture comes from the base model, not from the config
        recorded.update(image_size=network_config.image_size, base_width=network_config.base_width,
                        latent_dim=network_config.latent_dim, attention_stage=network_config.attention_stage)
    training_summary = {
        "config": recorded,
        "epochs_trained": config.epochs,
        "train_volumes": len(train_idx),
        "train_slices": int(n_images),
        "calibration_volumes": len(cal_idx),
        # file names (no folders) of the held-out healthy volumes, so a baseline or a study
        # can be calibrated on exactly the same ones
        "calibration_names": [Path(names[i]).name for i in cal_idx],
        "seconds": round(time.time() - started, 1),
        "device": str(device),
        "world_size": ddp.world,
        "amp": bool(use_amp),
        "fine_tuned_from": init_id or None,
        "history": history,
    }
    model = AnomalyModel(network=network, network_config=network_config, preprocessing=preprocessing,
                         method=params, training=training_summary)
    if ddp.main:
        if params.position_normalise:
            model.position_stats, model.intensity_stats = fit_position_stats(
                model, [prepared[i] for i in train_idx], device=device, cancel=cancel)
        cal_set = [prepared[i] for i in cal_idx] or [prepared[i] for i in train_idx]
        source_names = [names[i] for i in (cal_idx or train_idx)]
        source = ("held-out healthy volumes: " if cal_idx else "TRAINING volumes (no held-out volume available): ") \
            + ", ".join(Path(n).name for n in source_names[:5]) + (" ..." if len(source_names) > 5 else "")
        model.calibration = calibrate_prepared(model, cal_set, device=device, source=source,
                                               progress=progress, cancel=cancel)
        if output is not None:
            model.save(output)
        if checkpoint_path is not None and checkpoint_path.exists():
            checkpoint_path.unlink()
    if ddp.world > 1:
        dist.barrier()
    return model
