"""Where numbers were measured: machine, library versions and git commit (for reports)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..cpus import usable_cpu_count
from ..nn.device import resolve_device


def machine_info(device: Any = None) -> dict[str, Any]:
    """Where numbers were measured: CPU, cores, memory, GPU, library versions, git commit."""
    cpu = platform.processor() or platform.machine()
    memory_gb = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    usable = usable_cpu_count()
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gb": memory_gb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "anomalyseg": __version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if device is not None:
        try:
            dev = resolve_device(device)
            info["device"] = str(dev)
            if dev.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(dev)
        except Exception as exc:  # noqa: BLE001 - informational only
            info["device"] = f"{device} ({exc})"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info
