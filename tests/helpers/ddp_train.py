"""Launched by tests/test_distributed.py through ``torchrun --nproc_per_node 2``.

Each rank trains on its half of every batch; afterwards every rank writes a digest of its
final weights so the test can check DistributedDataParallel kept the replicas identical.
"""

import json
import os
import sys
from pathlib import Path

import torch

from AnomalySegLib.model.bundle import weights_digest
from AnomalySegLib.pipeline.training import TrainConfig, train_model


def main() -> None:
    out = Path(sys.argv[1])
    volumes = sys.argv[2:]
    torch.set_num_threads(1)
    config = TrainConfig(epochs=2, batch_size=8, image_size=32, base_width=4, latent_dim=8, device="cpu", seed=1)
    model = train_model(volumes, config, output=out / "ddp_model.pt")
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({
        # parameters only: BatchNorm running statistics are per-replica buffers
        "digest": weights_digest(dict(model.network.named_parameters())),
        "model_id": weights_digest(model.network.state_dict()),
        "world_size": model.training["world_size"],
        "calibrated": model.calibration is not None,
        "initialized_after": torch.distributed.is_initialized(),
    }))


if __name__ == "__main__":
    main()
