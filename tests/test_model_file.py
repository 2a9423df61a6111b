"""The model file: round trip, safe loading, clear errors for foreign/newer/corrupt files."""

import json
import os

import numpy as np
import pytest
import torch

from AnomalySegLib import MODEL_FORMAT_VERSION
from AnomalySegLib.errors import ModelFileError
from AnomalySegLib.model.archive import FORMAT_NAME, read_payload
from AnomalySegLib.model.bundle import load_model


def test_round_trip_preserves_everything(tiny_model, tmp_path):
    path = tmp_path / "copy.pt"
    tiny_model.save(path)
    back = load_model(path)
    for (name, a), (_, b) in zip(tiny_model.network.state_dict().items(), back.network.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    assert back.network_config == tiny_model.network_config
    assert back.preprocessing == tiny_model.preprocessing
    assert back.method == tiny_model.method
    np.testing.assert_array_equal(back.calibration.values, tiny_model.calibration.values)
    assert back.model_id == tiny_model.model_id and len(back.model_id) == 12
    assert back.version.endswith("/amcons/" + back.model_id)
    assert back.training["config"]["image_size"] == 64
    # atomic save: no temporary files left behind
    assert sorted(os.listdir(tmp_path)) == ["copy.pt"]


def test_weights_only_loading_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 1, "payload": Evil()}, path)
    with pytest.raises(ModelFileError, match="could not be read safely"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", b"PK\x03\x04garbage"])
def test_foreign_or_corrupt_bytes(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not an AnomalySeg model file"):
        load_model(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError, match="not an AnomalySeg model"):
        load_model(path)


def test_newer_format_names_the_fix(tiny_model, tmp_path):
    path = tmp_path / "new.pt"
    tiny_model.save(path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = MODEL_FORMAT_VERSION + 1
    payload["library_version"] = "9.0.0"
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=r"newer AnomalySeg \(9\.0\.0.*pip install -U anomalyseg"):
        load_model(path)


def test_inconsistent_weights_are_reported(tiny_model, tmp_path):
    path = tmp_path / "broken.pt"
    tiny_model.save(path)
    payload = read_payload(path)
    cfg = json.loads(payload["network_config"])
    cfg["base_width"] = 8
    payload["network_config"] = json.dumps(cfg)
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="damaged or inconsistent"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
