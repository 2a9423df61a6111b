"""The module's real Widget methods against real MRML (PyPI ``slicer-core``), Qt faked minimally.

See AnomalySeg/Testing/Python/widget_harness.py for what is real and what is a
stand-in. Each test is a user story from issue 8: switching inputs keeps edits, closing
the scene during a run, importing a model on a fresh install, deleting the segment,
a fast slider, lesion centres under a transform, runs and cancel with
``waitForCompletion=False``, and the training panel's start/stop and live loss.

``ANOMALYSEG_WIDGET_MODULE=path/to/AnomalySeg.py`` runs the tests against another copy
of the module (used to check that they fail on the version before the fixes).
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402 - after the skip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "AnomalySeg" / "Testing" / "Python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import widget_harness  # noqa: E402

from AnomalySegLib import errors  # noqa: E402


@pytest.fixture
def h(tmp_path, monkeypatch):
    scene = slicer.vtkMRMLScene()
    logics = []
    for cls in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSegmentationsModuleLogic,
                slicer.vtkSlicerSubjectHierarchyModuleLogic):
        logic = cls()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    monkeypatch.setenv("ANOMALYSEG_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ANOMALYSEG_PYTHON", sys.executable)
    other = os.environ.get("ANOMALYSEG_WIDGET_MODULE")
    harness = widget_harness.install(scene, tmp_path, Path(other) if other else None)
    harness.logics = logics
    yield harness
    harness.close()


def _table(percentiles=None, values=None, **extra):
    p = np.linspace(0.0, 100.0, 1001) if percentiles is None else np.asarray(percentiles, float)
    v = p / 100.0 if values is None else np.asarray(values, float)
    return {"percentiles": p.tolist(), "values": v.tolist(), "n_pixels": 1000, "n_images": 4, "n_volumes": 1,
            "source": "test", **extra}


SHAPE = (10, 24, 20)  # (K, J, I)


def _volume(scene, name, origin=(-20.0, 10.0, 5.0)):
    ijk_to_ras = np.diag([0.9, 1.1, 3.0, 1.0])
    ijk_to_ras[:3, 3] = origin
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE))
    node.CreateDefaultDisplayNodes()
    return node


def _heat():
    heat = np.zeros(SHAPE, np.float32)
    heat[1:9, 2:22, 2:18] = 0.01  # brain
    heat[3:6, 5:9, 4:10] = 0.995  # 72 voxels
    heat[7, 15:17, 12:14] = 0.975  # 4 voxels
    return heat


def _segmented(h, volume, percentile=98.0):
    """Outputs for ``volume`` as a finished run leaves them (map, segmentation at ``percentile``)."""
    logic = h.widget.logic
    map_node = logic.createAnomalyMapNode(volume, _heat(), _table(), modelVersion="test/v1")
    seg_node = logic.createSegmentationNode(volume, map_node)
    logic.rethreshold(map_node, seg_node, percentile)
    return map_node, seg_node


def _select(h, volume):
    """The user picks ``volume`` in the input selector (after another one: the widget may have preselected it)."""
    h.ui.inputSelector.setCurrentNode(None)
    h.ui.inputSelector.setCurrentNode(volume)


def _mask(h, seg_node):
    return h.widget.logic.segmentationMask(seg_node)


# ----------------------------------------------------------------------------- bug 1


def test_switching_inputs_restores_the_slider_and_keeps_segment_edits(h):
    a, b = _volume(h.scene, "A"), _volume(h.scene, "B")
    w = h.createWidget()
    map_a, seg_a = _segmented(h, a, 98.0)
    _select(h, a)
    p = w._parameterNode
    assert p.inputVolume is a and p.anomalySegmentation is seg_a and p.percentile == 98.0
    assert h.ui.lesionTableWidget.rowCount() == 1  # only the 0.995 blob is above p98
    # the user erases A's segment in the Segment Editor
    w.logic.setSegmentMask(seg_a, np.zeros(SHAPE, np.uint8), map_a)
    h.ui.inputSelector.setCurrentNode(b)
    assert p.anomalySegmentation is None and h.ui.lesionTableWidget.rowCount() == 0
    h.ui.percentileSliderWidget.value = 90.0  # on B, which has no outputs
    h.processEvents()
    h.ui.inputSelector.setCurrentNode(a)
    assert p.percentile == 98.0 and h.ui.percentileSliderWidget.value == 98.0  # restored from the segmentation
    assert not h.rethresholdPending
    h.processEvents()
    assert _mask(h, seg_a).sum() == 0, "switching back re-thresholded the segmentation: the user's edit is lost"
    assert float(seg_a.GetAttribute("AnomalySeg.Percentile")) == 98.0
    assert h.ui.lesionTableWidget.rowCount() == 0  # the table shows the segmentation as it is
    # only a slider move re-thresholds
    h.ui.percentileSliderWidget.value = 97.0
    assert h.rethresholdPending
    h.processEvents()
    assert _mask(h, seg_a).sum() == 72 + 4 and h.ui.lesionTableWidget.rowCount() == 2


# ----------------------------------------------------------------------------- bug 2


class FakeWorker:
    """A worker the test finishes by hand; ``ignoreCancel`` makes it deliver its result anyway (a race)."""

    def __init__(self, result, ignoreCancel=False):
        self.result, self.ignoreCancel = result, ignoreCancel
        self.done = self.cancelled = self.finished = False
        self.progress = []

    def cancel(self, *args, **kwargs):
        self.cancelled = True
        if not self.ignoreCancel:
            self.done = True

    def poll(self, timeout=0.0):
        if self.done:
            self.finished = True
        return not self.finished

    def outcome(self):
        if self.cancelled and not self.ignoreCancel:
            raise errors.Cancelled("cancelled by the user")
        return self.result


def _worker_result(tmp_path, volume, logic):
    """A 'segment' result whose heat map file is on the volume's grid, as the worker writes it."""
    path = tmp_path / "heatmap.nrrd"
    node = slicer.vtkMRMLScalarVolumeNode()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(node, _heat())
    logic.exportVolume(node, path)
    return {"type": "result", "task": "segment", "heatmap": str(path), "model": "m.pt", "percentile": 98.0,
            "default_percentile": 98.0, "fallback_percentile": 98.0, "calibration": _table(),
            "model_version": "test/v1"}


def _start_segment(h, tmp_path, monkeypatch, worker_factory):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    w = h.widget
    w._parameterNode.modelPath = str(model)
    started = []

    def start(request, progressCallback=None, logCallback=None):
        worker = worker_factory(request)
        started.append(worker)
        w.logic._worker = worker
        return worker

    monkeypatch.setattr(w.logic, "startWorker", start)
    monkeypatch.setattr(w.logic, "ensureDependencies", lambda **kwargs: True)
    w.onSegmentButton()
    assert w._running == "segment" and h.ui.segmentButton.text == "Cancel"
    return started[0]


def test_closing_the_scene_cancels_the_run_and_discards_late_results(h, tmp_path, monkeypatch):
    a = _volume(h.scene, "A")
    w = h.createWidget()
    h.ui.inputSelector.setCurrentNode(a)
    result = _worker_result(tmp_path, a, w.logic)
    worker = _start_segment(h, tmp_path, monkeypatch, lambda request: FakeWorker(result, ignoreCancel=True))
    w.exit()  # the user switches to another module: the finish callback runs with the module hidden
    w.parent.isEntered = False
    h.scene.Clear(0)  # File / Close scene
    assert worker.cancelled, "closing the scene did not cancel the run"
    # the new scene reuses node IDs: a new volume gets the old input's ID
    newcomer = _volume(h.scene, "new patient")
    assert newcomer.GetID() == a.GetID()
    worker.done = True  # the result arrives anyway
    h.processEvents(until=lambda: not w.logic.isRunning and w._running is None)
    assert h.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not [n for n in _nodes(h.scene, "vtkMRMLScalarVolumeNode") if n.GetAttribute("AnomalySeg.Role")]
    assert h.errors == [] and "no longer in the scene" in h.ui.segmentStatusLabel.text


def _nodes(scene, className):
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]


def test_run_without_and_with_cancel(h, tmp_path, monkeypatch):
    """waitForCompletion=False: progress, finish (outputs shown, table filled), then cancel from the button."""
    a = _volume(h.scene, "A")
    w = h.createWidget()
    h.ui.inputSelector.setCurrentNode(a)
    worker = _start_segment(h, tmp_path, monkeypatch, lambda request: FakeWorker(_worker_result(tmp_path, a, w.logic)))
    w._onSegmentProgress({"stage": "segment", "fraction": 0.5, "eta_s": 3})
    assert h.ui.segmentProgressBar.value == 50 and "ETA 00:03" in h.ui.segmentStatusLabel.text
    worker.done = True
    h.processEvents(until=lambda: w._running is None)
    p = w._parameterNode
    assert p.anomalyMap.GetName() == "A anomaly map" and p.anomalySegmentation.GetName() == "A anomalies"
    assert h.ui.segmentProgressBar.value == 100 and h.ui.lesionTableWidget.rowCount() == 1
    assert h.ui.lesionTableWidget.rowTexts()[0][2] == "72"
    assert not h.rethresholdPending and h.errors == []

    worker = _start_segment(h, tmp_path, monkeypatch, lambda request: FakeWorker(None))
    w.onSegmentButton()  # the button reads "Cancel" while running
    assert worker.cancelled
    h.processEvents(until=lambda: w._running is None)
    assert h.ui.segmentStatusLabel.text == "Cancelled." and h.errors == []
    assert h.ui.segmentButton.text == "Segment anomalies"


def test_run_with_the_real_worker_and_cancel(h, tmp_path, monkeypatch):
    """The real worker process, polled by the module's timer, ended by the Cancel button."""
    from AnomalySegLib.worker.protocol import TEST_TASKS_ENV

    monkeypatch.setenv(TEST_TASKS_ENV, "1")
    a = _volume(h.scene, "A")
    w = h.createWidget()
    h.ui.inputSelector.setCurrentNode(a)
    real_start = w.logic.startWorker
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    w._parameterNode.modelPath = str(model)
    monkeypatch.setattr(w.logic, "ensureDependencies", lambda **kwargs: True)
    monkeypatch.setattr(w.logic, "startWorker", lambda request, progressCallback=None, logCallback=None: real_start(
        {"task": "sleep", "seconds": 60, "children": 1}, progressCallback))
    w.onSegmentButton()
    h.processEvents(until=lambda: h.ui.segmentProgressBar.value > 0)
    start = time.monotonic()
    w.onSegmentButton()
    h.processEvents(until=lambda: w._running is None, timeout=30)
    assert time.monotonic() - start < 15 and not w.logic.isRunning
    assert h.ui.segmentStatusLabel.text == "Cancelled."


# ----------------------------------------------------------------------------- bug 3


def test_import_model_ensures_dependencies_first(h, tmp_path, monkeypatch):
    w = h.createWidget()
    model = tmp_path / "downloaded.pt"
    model.write_bytes(b"x")
    import qt

    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", lambda *args: str(model))
    calls = []
    monkeypatch.setattr(w.logic, "ensureDependencies", lambda **kwargs: calls.append(kwargs) or False)
    monkeypatch.setattr(w.logic, "importModel", lambda *args, **kwargs: pytest.fail("imported without torch"))
    w.onImportModel()  # the user declines the installation: nothing else happens
    assert calls == [{"askUser": True}] and h.errors == []


# ----------------------------------------------------------------------------- bug 4


def test_deleted_anomaly_segment_is_recreated_by_the_slider(h):
    a = _volume(h.scene, "A")
    h.createWidget()
    _, seg = _segmented(h, a)
    _select(h, a)
    seg.GetSegmentation().RemoveSegment("Anomaly")  # Segment Editor: delete
    h.ui.percentileSliderWidget.value = 97.0
    h.processEvents()
    assert h.errors == []
    segment = seg.GetSegmentation().GetSegment("Anomaly")
    assert segment is not None and segment.GetName() == "Anomaly"
    assert _mask(h, seg).sum() == 76 and h.ui.lesionTableWidget.rowCount() == 2


# ----------------------------------------------------------------------------- bug 5


def test_slider_move_is_fast_on_a_full_size_map(h):
    """256x256x176 map: re-threshold + segment update + lesion table in one slider move (target 0.3 s)."""
    rng = np.random.default_rng(0)
    shape = (176, 256, 256)
    volume = h.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "big")
    slicer.util.updateVolumeFromArray(volume, np.zeros(shape, np.float32))
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    brain = ((k - 88) / 80.0) ** 2 + ((j - 128) / 110.0) ** 2 + ((i - 128) / 90.0) ** 2 < 1.0
    heat = np.where(brain, rng.random(shape, dtype=np.float32) * 0.5, 0.0).astype(np.float32)
    heat[40:60, 100:130, 90:120] = 0.99  # a tumour
    heat[120:126, 60:66, 150:156] = 0.97
    w = h.createWidget()
    logic = w.logic
    map_node = logic.createAnomalyMapNode(volume, heat, _table([0, 90, 99, 100], [0, 0.45, 0.5, 1.0]))
    seg = logic.createSegmentationNode(volume, map_node)
    h.ui.inputSelector.setCurrentNode(volume)
    logic.rethreshold(map_node, seg, 99.0)
    w._showOutputsOf(volume)
    timings = []
    for value in (99.5, 99.9, 99.5):
        h.ui.percentileSliderWidget.value = value
        start = time.perf_counter()
        h.processEvents()
        timings.append(time.perf_counter() - start)
    print(f"slider move on {shape}: {', '.join(f'{t:.3f}' for t in timings)} s")
    assert h.ui.lesionTableWidget.rowTexts()[0][2] == str(20 * 30 * 30)
    # generous bound for shared CI cores; the target (0.3 s) holds on an idle 2-core machine
    assert min(timings) < 1.5


# ----------------------------------------------------------------------------- bug 6


def test_lesion_centres_and_jumps_are_in_world_coordinates(h):
    a = _volume(h.scene, "A")
    transform = h.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = [40.0, 0.0, 0.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    a.SetAndObserveTransformNodeID(transform.GetID())
    w = h.createWidget()
    h.ui.inputSelector.setCurrentNode(a)
    _segmented(h, a)
    w._showOutputsOf(a)
    ijk = np.array([(4 + 9) / 2, (5 + 8) / 2, (3 + 5) / 2, 1.0])  # blob centre, (i, j, k)
    m = vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(m)
    local = slicer.util.arrayFromVTKMatrix(m) @ ijk
    row = w._lesionRows[0]
    np.testing.assert_allclose(row["centroid_ras"], local[:3] + [40.0, 0.0, 0.0], atol=1e-6)
    red = h.scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")  # a slice view, moved by the real JumpAllSlices
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    w.onLesionDoubleClicked(0, 0)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())
    np.testing.assert_allclose(slice_to_ras[:3, 3], local[:3] + [40.0, 0.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- training panel


def test_training_start_live_loss_and_stop(h, tmp_path, monkeypatch):
    w = h.createWidget()
    folder = tmp_path / "healthy"
    folder.mkdir()
    w._parameterNode.healthyFolder = folder
    requests, worker = _capture_training(w, monkeypatch)
    w.onStartTraining()
    assert requests[0]["task"] == "train" and requests[0]["healthy_dir"] == str(folder)
    assert not h.ui.startTrainingButton.enabled and h.ui.stopTrainingButton.enabled
    assert not h.ui.segmentButton.enabled  # one task at a time
    for step, loss in enumerate([5.0, 3.0, 2.5, 2.0], start=1):
        worker.progressCallback({"stage": "train", "fraction": step / 10, "epoch": 1, "epochs": 2, "step": step,
                                 "losses": {"loss": loss}})
    h.processEvents()  # the throttled redraw
    assert w._lossHistory == [5.0, 3.0, 2.5, 2.0]
    assert h.ui.lossPlotLabel.pixmap is not None
    assert "loss 2" in h.ui.trainingStatusLabel.text and h.ui.trainingProgressBar.value == 40
    w.onStopTraining()
    assert worker.cancelled
    h.processEvents(until=lambda: w._running is None)
    assert h.ui.trainingStatusLabel.text == "Stopped; no model was saved."
    assert h.ui.startTrainingButton.enabled and not h.ui.stopTrainingButton.enabled


def _choose(combo, member_name):
    """The user picks the item of ``combo`` whose data is the enum member ``member_name``."""
    combo.setCurrentIndex([item[1]["user"] for item in combo.items].index(member_name))


def _capture_training(w, monkeypatch):
    """Start training with the worker replaced: returns the requests sent and the fake worker."""
    worker = FakeWorker(None)
    requests = []

    def start(request, progressCallback=None, logCallback=None):
        requests.append(request)
        worker.progressCallback = progressCallback
        w.logic._worker = worker
        return worker

    monkeypatch.setattr(w.logic, "startWorker", start)
    monkeypatch.setattr(w.logic, "ensureDependencies", lambda **kwargs: True)
    return requests, worker


def _fields(h):
    ui = h.ui
    return {"epochs": ui.epochsSpinBox.value, "image_size": ui.imageSizeSpinBox.value,
            "base_width": ui.baseWidthSpinBox.value, "learning_rate": ui.learningRateSpinBox.value,
            "batch_size": ui.batchSizeSpinBox.value}


def test_training_panel_offers_every_method_and_profile_with_the_library_defaults(h):
    from AnomalySegLib.nn.methods import METHODS
    from AnomalySegLib.pipeline.profiles import DEFAULT_METHOD, PROFILE_CHOICES, PROFILES

    w = h.createWidget()
    module = h.module
    methods = [module.Method[item[1]["user"]].value for item in h.ui.methodComboBox.items]
    profiles = [module.Profile[item[1]["user"]].value for item in h.ui.profileComboBox.items]
    assert sorted(methods) == sorted(METHODS) and profiles == list(PROFILE_CHOICES)
    p = w._parameterNode
    assert (p.profile.value, p.method.value, p.device.value) == ("auto", DEFAULT_METHOD, "auto")
    assert h.ui.methodComboBox.currentText.startswith("Denoising auto-encoder")
    # auto on an unknown device shows the fast profile, and says so
    assert _fields(h) == PROFILES["fast"]
    assert "decided when training starts" in h.ui.profileInfoLabel.text


def test_selecting_a_profile_fills_the_fields(h):
    from AnomalySegLib.pipeline.profiles import PROFILES

    w = h.createWidget()
    _choose(h.ui.profileComboBox, "PAPER")
    assert _fields(h) == PROFILES["paper"] and w._parameterNode.imageSize == 224
    assert h.ui.profileInfoLabel.text == "Profile 'paper'."
    _choose(h.ui.profileComboBox, "FAST")
    assert _fields(h) == PROFILES["fast"]
    # auto follows the device the worker will train on
    _choose(h.ui.profileComboBox, "AUTO")
    _choose(h.ui.deviceComboBox, "CUDA")
    assert _fields(h) == PROFILES["paper"]
    _choose(h.ui.deviceComboBox, "CPU")
    assert _fields(h) == PROFILES["fast"]
    # a changed value is kept until another profile is chosen, and the panel names it
    h.ui.epochsSpinBox.value = 3
    assert w._parameterNode.epochs == 3 and "replace the profile's: epochs" in h.ui.profileInfoLabel.text
    _choose(h.ui.profileComboBox, "PAPER")
    assert h.ui.epochsSpinBox.value == 50


def test_training_request_carries_the_profile_and_only_changed_values(h, tmp_path, monkeypatch):
    w = h.createWidget()
    folder = tmp_path / "healthy"
    folder.mkdir()
    w._parameterNode.healthyFolder = folder
    requests, worker = _capture_training(w, monkeypatch)
    _choose(h.ui.profileComboBox, "PAPER")
    _choose(h.ui.methodComboBox, "AMCONS")
    h.ui.epochsSpinBox.value = 3
    h.ui.learningRateSpinBox.value = 5e-4
    w.onStartTraining()
    request = requests[0]
    assert (request["task"], request["profile"]) == ("train", "paper")
    assert request["overrides"] == {"epochs": 3, "learning_rate": 5e-4}
    assert request["config"] == {"method": "amcons", "device": "auto"}
    worker.done = True
    h.processEvents(until=lambda: w._running is None)

    # untouched fields are no overrides: the worker keeps the profile's values
    requests.clear()
    _choose(h.ui.profileComboBox, "FAST")
    w.logic._worker = None
    w.onStartTraining()
    assert requests[0]["profile"] == "fast" and requests[0]["overrides"] == {}


def test_panel_shows_the_settings_the_worker_resolved(h, tmp_path, monkeypatch):
    """Auto on device auto: the worker trains on a GPU and reports 'paper'; the fields show what runs,
    and the next request still sends no overrides (the panel now knows what auto means here)."""
    from AnomalySegLib.pipeline.profiles import PROFILES

    w = h.createWidget()
    folder = tmp_path / "healthy"
    folder.mkdir()
    w._parameterNode.healthyFolder = folder
    requests, worker = _capture_training(w, monkeypatch)
    w.onStartTraining()
    assert requests[0]["profile"] == "auto" and requests[0]["overrides"] == {}
    settings = {**PROFILES["paper"], "profile": "paper", "method": "dae", "device_type": "cuda", "overrides": []}
    worker.progressCallback({"type": "progress", "stage": "prepare", "fraction": 0.0,
                             "message": "training dae ...", "settings": settings})
    assert _fields(h) == PROFILES["paper"]
    assert w.logic.autoProfiles == {"auto": "paper"}
    assert "with profile 'paper': 224 px, width 64, 50 epochs" in h.ui.profileInfoLabel.text
    assert h.ui.trainingProgressBar.value == 0 and w._lossHistory == []  # not a training step
    worker.done = True
    h.processEvents(until=lambda: w._running is None)
    requests.clear()
    w.logic._worker = None
    w.onStartTraining()
    assert requests[0]["profile"] == "auto" and requests[0]["overrides"] == {}
    worker.done = True
    h.processEvents(until=lambda: w._running is None)
    h.ui.epochsSpinBox.value = 5  # a change measured against what auto means here: paper
    assert h.ui.profileInfoLabel.text == "Profile 'paper'. Your values replace the profile's: epochs."


# ----------------------------------------------------------------------------- dependencies, the Slicer way


class FakePackaging:
    """``slicer.packaging`` as Slicer >= 5.10 has it: load_requirements, pip_check, pip_ensure (recorded)."""

    def __init__(self, installed=(), decline=False):
        from packaging.requirements import Requirement

        self.Requirement, self.installed, self.decline, self.calls = Requirement, set(installed), decline, []

    def load_requirements(self, path):
        self.loaded = Path(path)
        return [self.Requirement(line) for line in Path(path).read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def pip_check(self, requirement):
        return requirement.name in self.installed

    def pip_ensure(self, requirements, prompt_install=True, requester=None, **kwargs):
        self.calls.append(([str(r) for r in requirements], prompt_install, requester))
        if self.decline:
            raise RuntimeError("declined")
        self.installed |= {r.name for r in requirements}


def _packaging(monkeypatch, module, **kwargs):
    fake = FakePackaging(**kwargs)
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    requirements = Path(module.REQUIREMENTS_FILE).read_text().splitlines()
    return fake, [line for line in requirements if line.strip() and not line.startswith("#")]


def test_dependencies_use_slicer_packaging_with_the_requirements_file(h, monkeypatch):
    logic = h.createWidget().logic
    fake, lines = _packaging(monkeypatch, h.module)
    assert logic.missingDependencies(includeTorch=False) == lines
    assert logic.ensureDependencies(askUser=True, includeTorch=False) is True
    assert fake.loaded == Path(h.module.REQUIREMENTS_FILE)
    assert fake.calls == [(lines, True, "AnomalySeg")]  # pip_ensure shows its own consent dialog
    assert logic.missingDependencies(includeTorch=False) == []

    fake, _ = _packaging(monkeypatch, h.module, decline=True)
    assert logic.ensureDependencies(askUser=True, includeTorch=False) is False  # the user said no


def test_torch_comes_from_the_pytorch_extension_only_with_consent(h, monkeypatch):
    import types

    logic = h.createWidget().logic
    fake, _ = _packaging(monkeypatch, h.module, installed={"nibabel", "scikit-image", "scipy"})
    installs = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            installs.append((askConfirmation, torchVersionRequirement))
            return None  # declined in the extension's dialog

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(h.module.AnomalySegLogic, "torchInstalled", staticmethod(lambda: False))
    assert logic.ensureDependencies(askUser=True) is False
    assert installs == [(True, ">=2.1")] and fake.calls == []
    # batch: no consent flag -> one actionable error, nothing installed
    with pytest.raises(h.module.DependencyError, match="--install-dependencies"):
        logic.ensureDependencies(askUser=False, allowInstall=False)
    assert len(installs) == 1
    # without the PyTorch extension: say which extension to install (no plain pip install of torch)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(h.module.DependencyError, match="'PyTorch' extension"):
        logic.ensureDependencies(askUser=True)


def test_worker_interpreter_is_pythonslicer_never_the_application(h, tmp_path, monkeypatch):
    logic = h.createWidget().logic
    monkeypatch.delenv("ANOMALYSEG_PYTHON")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(errors.AnomalySegError, match="PythonSlicer"):
        logic.workerPython()  # sys.executable would be SlicerApp-real: no fallback
    binary = tmp_path / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    binary.parent.mkdir()
    binary.write_text("")
    assert logic.workerPython() == str(binary)  # found in Slicer's home (slicer.app.slicerHome)
