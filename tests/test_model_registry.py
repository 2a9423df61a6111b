"""The per-user model folder: validation before copy, no silent overwrite, atomic copy, listing."""

import json
import os
import shutil
from pathlib import Path

import pytest

from AnomalySegLib.model import registry as model_registry
from AnomalySegLib.errors import InputError, ModelFileError, OutputError
from AnomalySegLib.model.registry import ModelRegistry, default_model_dir, file_sha256, safe_model_name

torch = pytest.importorskip("torch")


def _tiny_model_file(path: Path, *, seed: int, calibrated: bool):
    """A valid model file (random 32 px AMCons network); calibration from a synthetic score table."""
    import numpy as np

    from AnomalySegLib.segmentation.calibration import Calibration
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.networks import ConvVAE, VAEConfig
    from AnomalySegLib.data.preprocessing import PreprocessConfig

    torch.manual_seed(seed)
    config = VAEConfig(image_size=32, base_width=4, latent_dim=8)
    model = AnomalyModel(network=ConvVAE(config), network_config=config, preprocessing=PreprocessConfig(image_size=32),
                         method=MethodParams.defaults("gradcamcons"))
    if calibrated:
        scores = np.random.default_rng(seed).random(5000)
        model.calibration = Calibration.from_scores(scores, n_images=5, n_volumes=1, source="test")
    model.save(path)
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models_src")
    a = _tiny_model_file(folder / "brainA.pt", seed=0, calibrated=True)
    (folder / "other").mkdir()
    b = _tiny_model_file(folder / "other" / "brainA.pt", seed=1, calibrated=False)
    return {"a": (folder / "brainA.pt", a), "b": (folder / "other" / "brainA.pt", b)}


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_default_folder_and_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv(model_registry.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".anomalyseg" / "models"
    monkeypatch.setenv(model_registry.MODEL_DIR_ENV, str(tmp_path / "custom"))
    assert default_model_dir() == tmp_path / "custom"
    assert ModelRegistry().folder == tmp_path / "custom"
    assert ModelRegistry().list_models() == []  # a folder that does not exist yet is an empty list


def test_import_validates_before_copying(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    foreign = tmp_path / "notamodel.pt"
    foreign.write_bytes(b"\x00not a torch archive" * 100)
    with pytest.raises(ModelFileError):
        registry.import_model(foreign)
    pickled = tmp_path / "plain.pt"
    torch.save({"format": "something-else"}, pickled)
    with pytest.raises(ModelFileError):
        registry.import_model(pickled)
    with pytest.raises(ModelFileError):
        registry.import_model(tmp_path / "missing.pt")
    assert _files(registry.folder) == []  # nothing entered the folder, not even temporary files


def test_import_list_find_and_idempotence(tmp_path, model_files):
    source, model = model_files["a"]
    registry = ModelRegistry(tmp_path / "models")
    entry = registry.import_model(source)
    assert entry.name == "brainA" and entry.path == registry.folder / "brainA.pt"
    assert (entry.method, entry.version, entry.calibrated, entry.source) == ("gradcamcons", model.version, True, "user")
    assert entry.default_percentile == 95.0  # GradCAMCons' recommended sensitivity (paper, Table 2)
    assert file_sha256(entry.path) == file_sha256(source) == entry.sha256
    sidecar = json.loads((registry.folder / "brainA.json").read_text())
    assert sidecar["version"] == model.version and sidecar["calibrated"] is True
    assert _files(registry.folder) == ["brainA.json", "brainA.pt"]

    listed = registry.list_models()
    assert [(e.name, e.method, e.calibrated, e.default_percentile) for e in listed] == [("brainA", "gradcamcons", True, 95.0)]
    assert "calibrated" in listed[0].label and "gradcamcons" in listed[0].label
    assert registry.find("brainA").path == entry.path
    assert registry.find(str(entry.path)).name == "brainA"
    with pytest.raises(InputError):
        registry.find("nope")

    # importing the very same file again is harmless
    again = registry.import_model(source)
    assert again.path == entry.path and _files(registry.folder) == ["brainA.json", "brainA.pt"]
    # another name makes a second copy
    renamed = registry.import_model(source, name="brain A v2")
    assert renamed.name == "brain_A_v2" and renamed.path.name == "brain_A_v2.pt"


def test_different_model_with_same_name_is_refused(tmp_path, model_files):
    registry = ModelRegistry(tmp_path / "models")
    first = registry.import_model(model_files["a"][0])
    digest = file_sha256(first.path)
    other_source = model_files["b"][0]  # same file name, different weights
    with pytest.raises(OutputError, match="already exists"):
        registry.import_model(other_source)
    assert file_sha256(first.path) == digest  # untouched
    replaced = registry.import_model(other_source, replace=True)
    assert file_sha256(replaced.path) == file_sha256(other_source)
    assert replaced.calibrated is False and "NOT calibrated" in replaced.label


def test_copy_is_atomic(tmp_path, model_files, monkeypatch):
    registry = ModelRegistry(tmp_path / "models")

    def broken_copy(src, dst, *args, **kwargs):
        with open(dst, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OutputError, match="No space left"):
        registry.import_model(model_files["a"][0])
    assert _files(registry.folder) == []  # neither a partial model nor a temporary file remains


def test_bundled_models_are_inspected_once_and_read_only(tmp_path, model_files):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copyfile(model_files["a"][0], bundled / "demo.pt")
    calls = []

    def inspector(path):
        calls.append(Path(path).name)
        return model_registry.inspect_model(path)

    registry = ModelRegistry(tmp_path / "models", bundled_dirs=[bundled], inspector=inspector)
    quick = registry.list_models()  # without inspection: listed, method unknown, nothing loaded
    assert [(e.name, e.source, e.method) for e in quick] == [("demo", "bundled", "unknown")] and calls == []
    for _ in range(2):
        entries = registry.list_models(inspect_bundled=True)
        assert [(e.name, e.source, e.method, e.calibrated) for e in entries] == [("demo", "bundled", "gradcamcons", True)]
    assert calls == ["demo.pt"]
    assert "bundled" in entries[0].label
    with pytest.raises(OutputError):
        registry.remove_model("demo")


def test_register_and_remove(tmp_path, model_files):
    registry = ModelRegistry(tmp_path / "models")
    registry.folder.mkdir(parents=True)
    trained = registry.model_path("trained")
    shutil.copyfile(model_files["a"][0], trained)
    assert registry.list_models()[0].method == "unknown"  # no sidecar yet
    entry = registry.register(trained)
    assert entry.method == "gradcamcons" and registry.list_models()[0].method == "gradcamcons"
    with pytest.raises(InputError):
        registry.register(model_files["a"][0])  # not inside the folder
    registry.remove_model("trained")
    assert _files(registry.folder) == []


def test_safe_names():
    assert safe_model_name("my model (v2)") == "my_model_v2"
    assert safe_model_name("../../etc/passwd") == "etc_passwd"
    with pytest.raises(InputError):
        safe_model_name("../")
    assert os.sep not in safe_model_name("a/b\\c")
