"""The training checkpoint format: a run's state after an epoch, for ``--resume``.

Written with the model file's container (:mod:`.archive`: ``torch.save`` of tensors,
strings and numbers, atomic, read back with ``weights_only=True``) under its own format
name. It holds the run's settings and volume list (a resume must belong to the same run),
the network, optimiser and gradient-scaler state, the loss history and the torch RNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import MODEL_FORMAT_VERSION, __version__
from ..data.preprocessing import PreprocessConfig
from ..errors import InputError, ModelFileError
from ..nn.methods import MethodParams
from ..nn.networks import VAEConfig
from .archive import read_payload, write_payload

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_FORMAT = "anomalyseg-checkpoint"

#: Training settings that may legitimately differ when resuming (more epochs, other device,
#: precision or compilation: the same weights either way).
RESUMABLE_CHANGES = ("epochs", "device", "amp", "profile", "compile")


def write_checkpoint(path: PathLike, *, config: dict, network_config: VAEConfig, preprocessing: PreprocessConfig,
                     params: MethodParams, epoch: int, network: torch.nn.Module, optimizer, scaler,
                     history: list, names: Sequence[str], init_id: str) -> None:
    """Save the state after ``epoch`` epochs (``config``: the run's TrainConfig as a dict)."""
    write_payload(
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "library_version": __version__,
            "config": json.dumps(config),
            "network_config": json.dumps(network_config.to_dict()),
            "preprocessing": json.dumps(preprocessing.to_dict()),
            "method": json.dumps(params.to_dict()),
            "epochs_done": int(epoch),
            "history": json.dumps(history),
            "volumes": json.dumps(list(names)),
            "init_id": init_id,
            "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "torch_rng": torch.get_rng_state(),
        },
        path,
    )


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def read_checkpoint(path: Optional[Path], *, config: dict, names: Sequence[str]) -> dict:
    """The checkpoint at ``path``, checked to belong to this run (same settings but
    :data:`RESUMABLE_CHANGES`, same volumes); raises InputError/ModelFileError otherwise."""
    if path is None or not Path(path).is_file():
        raise InputError(f"cannot resume: checkpoint {path} not found")
    state = read_payload(path, CHECKPOINT_FORMAT)
    saved = json.loads(state["config"])
    saved.setdefault("lr_schedule", "constant")  # written before the setting existed: the constant rate
    if _comparable(saved) != _comparable(config) or json.loads(state["volumes"]) != list(names):
        raise ModelFileError(f"checkpoint {path} belongs to a different training run "
                             "(other settings or volumes); remove it or drop --resume")
    return state


def restore_checkpoint(state: dict, network: torch.nn.Module, optimizer, scaler,
                       *, init_id: str = "") -> "tuple[int, list, str]":
    """Load the saved states into ``network``/``optimizer``/``scaler`` and the torch RNG;
    returns ``(epochs done, loss history, id of the base model)`` (``init_id`` when the
    checkpoint does not record one)."""
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epochs_done"]), json.loads(state["history"]), state.get("init_id", init_id)
