"""Device selection: CUDA only when present, messages usable from the GUI and the CLI alike."""

import pytest
import torch

from AnomalySegLib.nn.device import autocast_for, resolve_device
from AnomalySegLib.errors import AnomalySegError


def test_cuda_request_without_gpu_is_a_clear_error_without_cli_syntax(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(AnomalySegError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "no CUDA GPU" in message and "--" not in message  # shown in the Slicer panel too
    with pytest.raises(AnomalySegError, match="unknown device"):
        resolve_device("tpu")


def test_autocast_is_a_no_op_on_cpu():
    with autocast_for(torch.device("cpu")):
        assert (torch.ones(2) * 2).dtype == torch.float32
