"""AnomalySeg: unsupervised brain anomaly segmentation in 3D Slicer.

Segment panel (clinicians): pick a volume and a model, press "Segment anomalies", get
"<input> anomaly map" (heat map) and "<input> anomalies" (segmentation), move the
sensitivity slider to re-threshold instantly, read the lesion table.

Training panel (researchers): train a model on a healthy cohort, calibrate it on
held-out healthy volumes and register it for the Segment panel.

All torch work runs in a worker subprocess (``python -m AnomalySegLib.worker``) that
reports JSON lines; the GUI polls it with a timer and can kill the whole process tree.
The Logic also works without the GUI (``waitForCompletion=True``), in
``Slicer --no-main-window`` batch scripts and with the MRML-only PyPI package
``slicer-core`` (where ``slicer.app`` and Qt do not exist).
"""

import enum
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import unittest
from dataclasses import dataclass, field
from typing import Annotated, Optional, Sequence

import numpy as np
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:  # the Slicer application (GUI or --no-main-window)
    import ctk  # noqa: F401 - used by the .ui custom widgets
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    SLICER_APP = True
except ImportError:  # MRML only (PyPI slicer-core): the Logic works, the GUI does not exist
    SLICER_APP = False
    qt = None

    def _(text):
        return text

    def translate(context, text):  # noqa: ARG001 - same signature as slicer.i18n.translate
        return text

    class ScriptedLoadableModule:  # noqa: D101 - placeholders so this file imports without the app
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # noqa: D101
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # noqa: D101
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):  # noqa: D101
        def delayDisplay(self, message, msec=None):  # noqa: ARG002
            logging.info(message)

    class VTKObservationMixin:  # noqa: D101
        def __init__(self):
            pass


MODULE_DIR = pathlib.Path(__file__).resolve().parent
RESOURCES_DIR = MODULE_DIR / "Resources"
REQUIREMENTS_FILE = RESOURCES_DIR / "requirements.txt"
BUNDLED_MODELS_DIR = RESOURCES_DIR / "Models"

try:  # installed extension: AnomalySegLib is installed beside this file
    import AnomalySegLib  # noqa: F401
except ImportError:  # source checkout: the core package is one folder up
    sys.path.insert(0, str(MODULE_DIR.parent))
    import AnomalySegLib  # noqa: F401

from AnomalySegLib import errors as anomalyErrors  # noqa: E402 - after the path fix above
from AnomalySegLib.model.registry import MODEL_DIR_ENV, ModelEntry, ModelRegistry, default_model_dir  # noqa: E402
from AnomalySegLib.pipeline.profiles import DEFAULT_METHOD, PROFILES  # noqa: E402
from AnomalySegLib.progress import ProgressEvent, format_seconds, status_line  # noqa: E402
from AnomalySegLib.segmentation.calibration import Calibration, default_percentile  # noqa: E402
from AnomalySegLib.settings import check_percentile  # noqa: E402
from AnomalySegLib.worker.client import WorkerProcess  # noqa: E402


#
# AnomalySeg
#


class AnomalySeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AnomalySeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AnomalySeg developers"]
        self.parent.helpText = _(
            "Unsupervised segmentation of brain anomalies (lesions, tumours) with variational "
            "auto-encoders trained on healthy scans only. <b>Segment</b>: choose a volume and a model, "
            "press <i>Segment anomalies</i>; move the sensitivity slider to re-threshold instantly. "
            "<b>Training</b>: train and calibrate your own model on a healthy cohort. "
            "Results are for research use, not for diagnosis. See the "
            '<a href="https://github.com/anomalyseg/SlicerAnomalySeg/blob/main/docs/SLICER.md">user guide</a>.'
        )
        self.parent.acknowledgementText = _(
            "Implements J. Silva-Rodr\u00edguez, V. Naranjo and J. Dolz, \"Constrained unsupervised anomaly "
            "segmentation\", Medical Image Analysis 80 (2022) 102526 (AMCons, GradCAMCons). "
            "PyTorch is provided by the SlicerPyTorch extension."
        )


#
# Parameter node
#


class Device(enum.Enum):
    """Where the network runs."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self):
        """Combo box text."""
        return {"auto": _("Auto (GPU if available)"), "cuda": _("CUDA GPU"), "cpu": _("CPU")}[self.value]


class BrainExtraction(enum.Enum):
    """Brain extraction for a segmentation run (``anomalyseg segment --brain-extraction``)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def label(self):
        """Combo box text."""
        return {"auto": _("Auto (only when the skull is still there)"), "on": _("On (always)"),
                "off": _("Off (skull-stripped inputs only)")}[self.value]


class Method(enum.Enum):
    """Training method: every method of AnomalySegLib.nn.methods.METHODS (checked by the tests)."""

    DAE = "dae"
    AMCONS = "amcons"
    GRADCAMCONS = "gradcamcons"
    VAE = "vae"

    def label(self):
        """Combo box text."""
        return {"dae": _("Denoising auto-encoder (recommended)"), "amcons": _("AMCons (attention, the paper)"),
                "gradcamcons": _("GradCAMCons (the paper)"), "vae": _("VAE residual (baseline)")}[self.value]


class Profile(enum.Enum):
    """Training profile (AnomalySegLib.pipeline.profiles): the settings used without tuning, as ``anomalyseg train``."""

    AUTO = "auto"
    FAST = "fast"
    PAPER = "paper"

    def label(self):
        """Combo box text."""
        return {"auto": _("Auto (paper on a CUDA GPU, fast on CPU)"), "fast": _("Fast (CPU, minutes)"),
                "paper": _("Paper (the paper's scale, for a GPU)")}[self.value]


#: Parameter node name -> TrainConfig field, for the values a training profile sets.
PROFILE_PARAMETERS = {"epochs": "epochs", "imageSize": "image_size", "baseWidth": "base_width",
                      "learningRate": "learning_rate", "batchSize": "batch_size"}


if SLICER_APP:

    @parameterNodeWrapper
    class AnomalySegParameterNode:
        """Everything the panels edit; saved with the scene.

        inputVolume - volume to segment.
        modelPath - model file used by the Segment panel (chosen in the model list).
        device - where the network runs.
        brainExtraction - auto | on | off: deepbet brain extraction of the input (auto: when the input check finds a skull).
        percentile - sensitivity: healthy percentile used as threshold.
        anomalyMap, anomalySegmentation - outputs of the last run (re-thresholded by the slider).
        healthyFolder - folder of healthy volumes for training / calibration.
        profile - training profile (auto | fast | paper), as ``anomalyseg train --profile``.
        method - training method (default: the library's DEFAULT_METHOD).
        epochs, imageSize, baseWidth, learningRate, batchSize - the profile's values as shown;
            a value that differs from the shown profile's is sent as an explicit override.
        baseModelPath - optional model to fine-tune.
        modelName - name of the trained model in the model list.
        """

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: Device = Device.AUTO
        brainExtraction: BrainExtraction = BrainExtraction.AUTO
        percentile: Annotated[float, WithinRange(80.0, 99.999)] = 98.0
        anomalyMap: vtkMRMLScalarVolumeNode
        anomalySegmentation: vtkMRMLSegmentationNode
        healthyFolder: pathlib.Path
        profile: Profile = Profile.AUTO
        method: Method = Method(DEFAULT_METHOD)
        # defaults: the "fast" profile, what "auto" shows until the training device is known
        epochs: Annotated[int, WithinRange(1, 2000)] = PROFILES["fast"]["epochs"]
        imageSize: Annotated[int, WithinRange(32, 512)] = PROFILES["fast"]["image_size"]
        baseWidth: Annotated[int, WithinRange(1, 512)] = PROFILES["fast"]["base_width"]
        learningRate: Annotated[float, WithinRange(1e-6, 1.0)] = PROFILES["fast"]["learning_rate"]
        batchSize: Annotated[int, WithinRange(1, 512)] = PROFILES["fast"]["batch_size"]
        baseModelPath: pathlib.Path
        modelName: str = "my-model"

else:
    AnomalySegParameterNode = None


def _pathIsSet(path) -> bool:
    """A pathlib.Path parameter defaults to '.', which means 'not set' here."""
    return path is not None and str(path) not in ("", ".")


#
# AnomalySegWidget
#


class AnomalySegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The two panels; all work is delegated to AnomalySegLogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._appliedPercentile = None
        self._lastInputVolume = None
        self._lossHistory = []
        self._lossRedrawPending = False
        self._running = None  # None | "segment" | "train" | "calibrate"
        self._shownProfile = None  # the profile whose values the training fields were filled with

    def setup(self):
        """Load the .ui, create the logic, connect signals."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalySeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnomalySegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Segment panel
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModelList)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.lesionTableWidget.setColumnCount(4)
        self.ui.lesionTableWidget.setHorizontalHeaderLabels(
            [_("Lesion"), _("Volume (mL)"), _("Voxels"), _("Centre (RAS, mm)")])
        self.ui.lesionTableWidget.connect("cellDoubleClicked(int,int)", self.onLesionDoubleClicked)

        # Training panel
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrate)

        # The slider re-thresholds after a short pause (dragging stays smooth).
        self._rethresholdTimer = qt.QTimer()
        self._rethresholdTimer.setSingleShot(True)
        self._rethresholdTimer.setInterval(150)
        self._rethresholdTimer.connect("timeout()", self.applyRethreshold)

        self._lesionRows = []
        self.refreshModelList()
        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def enter(self):
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self):
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        """The scene is closing: stop any run (its results belong to the old scene), drop the parameter node."""
        if self.logic is not None and self.logic.isRunning:
            self.logic.cancel()
        self._rethresholdTimer.stop()
        self._lastInputVolume = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        """Recreate the parameter node if the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Ensure a parameter node exists, is observed and has an input volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.GetAttribute(AnomalySegLogic.ATTR_ROLE):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.modelPath and self.ui.modelComboBox.count > 0:
            self.onModelSelected(self.ui.modelComboBox.currentIndex)

    def setParameterNode(self, inputParameterNode):
        """Bind the GUI to a parameter node (SlicerParameterName properties in the .ui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._appliedPercentile = self._parameterNode.percentile
            self._selectModelInList(self._parameterNode.modelPath)
            # the fields keep the values stored in the node (they may hold the user's overrides)
            self._shownProfile = self._profileToShow()
            self._updateProfileLabel()
        self._updateButtons()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._updateButtons()
        p = self._parameterNode
        if p is None:
            return
        self._syncProfileFields()
        if self._running == "segment":
            return
        if p.inputVolume is not self._lastInputVolume:
            self._showOutputsOf(p.inputVolume)
            return
        if p.anomalyMap and p.anomalySegmentation:
            if self._appliedPercentile is None or abs(p.percentile - self._appliedPercentile) > 1e-9:
                self._rethresholdTimer.start()

    def _showOutputsOf(self, inputVolume):
        """Show the outputs made earlier for ``inputVolume`` exactly as they are.

        The slider is restored from the segmentation's stored percentile and the lesion
        table is measured on the segmentation itself, so edits made in the Segment
        Editor survive switching inputs: nothing is re-thresholded until the user
        moves the slider.
        """
        p = self._parameterNode
        self._lastInputVolume = inputVolume
        self._rethresholdTimer.stop()  # a slider move pending for the previous input is dropped
        mapNode, segNode = self.logic.findOutputs(inputVolume) if inputVolume else (None, None)
        stored = self.logic.storedPercentile(segNode) if mapNode and segNode else None
        wasModifying = p.StartModify()
        try:
            p.anomalyMap, p.anomalySegmentation = (mapNode, segNode) if stored is not None else (None, None)
            if stored is not None:
                p.percentile = sliderPercentile(stored)
            # set before EndModify: its ModifiedEvent must not look like a slider move
            self._appliedPercentile = p.percentile if stored is not None else None
        finally:
            p.EndModify(wasModifying)
        self._clearLesions()
        if stored is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to list the lesions.")):
                threshold = segNode.GetAttribute(AnomalySegLogic.ATTR_THRESHOLD)
                self._showLesions(self.logic.lesionTable(segNode), float(threshold) if threshold else float("nan"),
                                  stored)

    def _updateButtons(self):
        p = self._parameterNode
        busy = self._running is not None
        if self._running == "segment":
            self.ui.segmentButton.text = _("Cancel")
            self.ui.segmentButton.toolTip = _("Stop the running segmentation")
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = _("Segment anomalies")
            ready = bool(p and p.inputVolume and p.modelPath)
            self.ui.segmentButton.enabled = ready and not busy
            self.ui.segmentButton.toolTip = (_("Compute the anomaly map and segmentation") if ready
                                             else _("Select an input volume and a model"))
        training = self._running in ("train", "calibrate")
        self.ui.startTrainingButton.enabled = not busy
        self.ui.calibrateButton.enabled = not busy and bool(p and p.modelPath)
        self.ui.stopTrainingButton.enabled = training
        self.ui.importModelButton.enabled = not busy

    # ------------------------------------------------------------------ models
    def refreshModelList(self):
        """Fill the model combo box from the registry (user models, then bundled ones)."""
        current = self._parameterNode.modelPath if self._parameterNode else ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            entries = self.logic.listModels()
        except Exception as e:  # a broken registry folder must not break the panel
            logging.error(f"AnomalySeg: cannot list models: {e}")
            entries = []
        for entry in entries:
            combo.addItem(entry.label, str(entry.path))
            combo.setItemData(combo.count - 1, str(entry.path), qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        if not entries:
            combo.addItem(_("(no model: import or train one)"), "")
        self._selectModelInList(current)

    def _selectModelInList(self, path):
        combo = self.ui.modelComboBox
        for index in range(combo.count):
            if path and combo.itemData(index) == path:
                combo.setCurrentIndex(index)
                return
        if path and os.path.isfile(path):  # a model file set by a script or a saved scene: show it too
            combo.addItem(_("{name} (file)").format(name=os.path.basename(path)), path)
            combo.setCurrentIndex(combo.count - 1)
            return
        if combo.count and self._parameterNode:
            self.onModelSelected(combo.currentIndex)

    def onModelSelected(self, index):
        """Store the chosen model path in the parameter node."""
        if self._parameterNode is None or index < 0:
            return
        path = self.ui.modelComboBox.itemData(index) or ""
        if self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
            entry = self.logic.modelEntry(path) if path else None
            default = self.logic.entryDefaultPercentile(entry) if entry is not None else None
            if default is not None:
                # the model's operating point (chosen on healthy volumes), else its method's default
                self._parameterNode.percentile = sliderPercentile(default)

    def onImportModel(self):
        """Validate a model file (in the worker) and copy it into the model folder."""
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import AnomalySeg model"), "",
                                              _("AnomalySeg models (*.pt *.pth);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):  # the worker validates the file with torch
                return
            try:
                entry = self.logic.importModel(path)
            except anomalyErrors.OutputError:
                if not slicer.util.confirmYesNoDisplay(
                        _("A different model with this name is already in the list. Replace it?")):
                    return
                entry = self.logic.importModel(path, replace=True)
            self.refreshModelList()
            self._parameterNode.modelPath = str(entry.path)
            self._selectModelInList(str(entry.path))
            if not entry.calibrated:
                slicer.util.warningDisplay(_("This model is not calibrated: calibrate it on healthy volumes "
                                             "(Training panel) before segmenting."))

    # ------------------------------------------------------------------ segment
    def onSegmentButton(self):
        """Start a segmentation, or cancel the running one."""
        if self._running == "segment":
            self.logic.cancel()
            self.ui.segmentStatusLabel.text = _("Cancelling...")
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            extraction = p.brainExtraction.value
            if (extraction != "off" and not self.logic.ensureBrainExtraction(askUser=True)
                    and extraction == "on"):  # declined, and this run needs deepbet whatever the scan
                self.ui.segmentStatusLabel.text = _("Brain extraction is On but deepbet is not installed: accept "
                                                    "its installation, or set Brain extraction to Auto or Off.")
                return
            self._running = "segment"
            self._updateButtons()
            self.ui.segmentProgressBar.value = 0
            self.ui.segmentStatusLabel.text = _("Starting...")
            try:
                self.ui.inputCheckLabel.text = ""
                self.logic.process(p.inputVolume, p.modelPath, percentile=p.percentile, device=p.device.value,
                                   waitForCompletion=False, progressCallback=self._onSegmentProgress,
                                   finishedCallback=self._onSegmentFinished, brainExtraction=extraction)
            except Exception:
                self._running = None
                self._updateButtons()
                raise

    def _onSegmentProgress(self, message):
        self.ui.segmentProgressBar.value = int(round(100 * float(message.get("fraction", 0.0))))
        self.ui.segmentStatusLabel.text = formatProgress(message)

    def _onSegmentFinished(self, result, error):
        self._running = None
        self._updateButtons()
        p = self._parameterNode
        if error is not None:
            self.ui.segmentProgressBar.value = 0
            if isinstance(error, DiscardedResult):
                self.ui.segmentStatusLabel.text = str(error)
            elif isinstance(error, anomalyErrors.Cancelled):
                self.ui.segmentStatusLabel.text = _("Cancelled.")
            else:
                self.ui.segmentStatusLabel.text = _("Failed: {message}").format(message=error)
                slicer.util.errorDisplay(_("Segmentation failed: {message}").format(message=error))
            return
        self.ui.segmentProgressBar.value = 100
        self.ui.inputCheckLabel.text = formatInputCheck(result.inputCheck)
        if p is None or result.mapNode.GetNodeReference(AnomalySegLogic.INPUT_REFERENCE_ROLE) is not p.inputVolume:
            # module hidden, or the user picked another input meanwhile: keep the outputs, do not show them
            self.ui.segmentStatusLabel.text = _("Done: {name}").format(name=result.segmentationNode.GetName())
            return
        self._lastInputVolume = p.inputVolume
        wasModifying = p.StartModify()
        try:
            p.anomalyMap = result.mapNode
            p.anomalySegmentation = result.segmentationNode
            p.percentile = sliderPercentile(result.percentile)
            self._appliedPercentile = p.percentile
        finally:
            p.EndModify(wasModifying)
        self._showLesions(result.lesions, result.threshold, result.percentile)

    def applyRethreshold(self):
        """Re-threshold the stored anomaly map at the slider's percentile (no network run)."""
        p = self._parameterNode
        if not (p and p.anomalyMap and p.anomalySegmentation):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the segmentation.")):
            self._appliedPercentile = p.percentile
            # threshold, small-component removal and lesion list in one core call (no export back)
            result = self.logic.segmentMap(p.anomalyMap, p.anomalySegmentation, p.percentile)
            self._showLesions(result.lesions, result.threshold, result.percentile)

    def _clearLesions(self):
        self.ui.lesionTableWidget.setRowCount(0)
        self._lesionRows = []
        self.ui.segmentStatusLabel.text = ""

    def _showLesions(self, rows, threshold, percentile):
        table = self.ui.lesionTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            centre = ", ".join(f"{c:.1f}" for c in row["centroid_ras"])
            for c, text in enumerate([str(r + 1), f"{row['volume_ml']:.3f}", str(row["voxels"]), centre]):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(r, c, item)
        self._lesionRows = rows
        total = sum(row["volume_ml"] for row in rows)
        self.ui.segmentStatusLabel.text = _(
            "{count} lesion(s), {total:.2f} mL in total (healthy percentile {pct:.2f}, score > {thr:.4g})"
        ).format(count=len(rows), total=total, pct=percentile, thr=threshold)

    def onLesionDoubleClicked(self, row, column):
        """Centre the slice views on a lesion."""
        if 0 <= row < len(self._lesionRows):
            r, a, s = self._lesionRows[row]["centroid_ras"]
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    # ------------------------------------------------------------------ training
    def _healthyInputs(self):
        p = self._parameterNode
        folder = str(p.healthyFolder) if _pathIsSet(p.healthyFolder) else None
        nodes = list(self.ui.healthyVolumesSelector.checkedNodes())
        if not folder and not nodes:
            raise ValueError(_("Choose a folder of healthy volumes or check loaded healthy volumes."))
        return folder, nodes

    def _profileToShow(self) -> str:
        """The profile whose values the training fields show (``auto`` resolved as far as known here)."""
        p = self._parameterNode
        return displayedProfile(p.profile.value, p.device.value, self.logic.autoProfiles.get(p.device.value))

    def _syncProfileFields(self):
        """Selecting another profile (or a device that changes what ``auto`` means) fills the fields."""
        shown = self._profileToShow()
        if shown != self._shownProfile:
            self._shownProfile = shown  # first: the fill below re-enters through ModifiedEvent
            self._setProfileFields(PROFILES[shown])
        self._updateProfileLabel()

    def _setProfileFields(self, settings: dict):
        """Write TrainConfig-named ``settings`` (epochs, image_size, ...) into the training fields."""
        p = self._parameterNode
        wasModifying = p.StartModify()
        try:
            for name, key in PROFILE_PARAMETERS.items():
                if settings.get(key) is not None:
                    setattr(p, name, settings[key])
        finally:
            p.EndModify(wasModifying)

    def trainingRequestSettings(self):
        """``(profile, overrides, config)`` for the worker's train request.

        ``overrides`` holds only the fields whose value differs from the shown profile's
        (the user changed them); ``config`` the method and the device.
        """
        p = self._parameterNode
        values = {key: getattr(p, name) for name, key in PROFILE_PARAMETERS.items()}
        overrides = profileOverrides(values, self._shownProfile or self._profileToShow())
        return p.profile.value, overrides, {"method": p.method.value, "device": p.device.value}

    def _updateProfileLabel(self):
        p = self._parameterNode
        if p is None:
            return
        shown = self._shownProfile or self._profileToShow()
        _profile, overrides, _config = self.trainingRequestSettings()
        if p.profile == Profile.AUTO and p.device == Device.AUTO and p.device.value not in self.logic.autoProfiles:
            text = _("Auto: 'paper' on a CUDA GPU, 'fast' on CPU, decided when training starts; "
                     "the fields show 'fast'.")
        else:
            text = _("Profile '{name}'.").format(name=shown)
        if overrides:
            text += " " + _("Your values replace the profile's: {names}.").format(
                names=", ".join(sorted(overrides)))
        self.ui.profileInfoLabel.text = text

    def _showSettingsThatRun(self, settings: dict):
        """The worker resolved the settings (``auto`` against its device): show exactly those."""
        p = self._parameterNode
        if p is None:
            return
        if p.profile == Profile.AUTO and settings.get("profile") in PROFILES:
            self.logic.autoProfiles[p.device.value] = settings["profile"]
        self._shownProfile = self._profileToShow()
        self._setProfileFields(settings)
        self.ui.profileInfoLabel.text = _(
            "Training {method} on {device} with profile '{profile}': {size} px, width {width}, {epochs} epochs, "
            "batch {batch}, learning rate {lr:g}.").format(
            method=settings.get("method"), device=settings.get("device_type"), profile=settings.get("profile"),
            size=settings.get("image_size"), width=settings.get("base_width"), epochs=settings.get("epochs"),
            batch=settings.get("batch_size"), lr=float(settings.get("learning_rate") or 0.0))

    def onStartTraining(self):
        """Train a model on the healthy cohort in the worker; plot the loss live."""
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            folder, nodes = self._healthyInputs()
            if not self.logic.ensureDependencies(askUser=True):
                return
            outputPath = self.logic.registry.model_path(p.modelName)
            overwrite = False
            if outputPath.exists():
                if not slicer.util.confirmYesNoDisplay(
                        _("A model named '{name}' exists. Replace it?").format(name=p.modelName)):
                    return
                overwrite = True
            profile, overrides, config = self.trainingRequestSettings()
            self._lossHistory = []
            self._drawLossPlot()
            self._running = "train"
            self._updateButtons()
            try:
                self.logic.train(healthyFolder=folder, healthyVolumes=nodes, modelName=p.modelName, config=config,
                                 profile=profile, overrides=overrides,
                                 baseModelPath=str(p.baseModelPath) if _pathIsSet(p.baseModelPath) else None,
                                 overwrite=overwrite, waitForCompletion=False,
                                 progressCallback=self._onTrainingProgress, finishedCallback=self._onTrainingFinished)
            except Exception:
                self._running = None
                self._updateButtons()
                raise

    def onCalibrate(self):
        """Re-calibrate the selected model on the healthy cohort (never on anomalous scans)."""
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start calibration."), waitCursor=True):
            folder, nodes = self._healthyInputs()
            if not self.logic.ensureDependencies(askUser=True):
                return
            entry = self.logic.modelEntry(p.modelPath)
            if entry is not None and entry.source != "user":
                raise ValueError(_("Bundled models cannot be modified: import a copy first."))
            self._running = "calibrate"
            self._updateButtons()
            try:
                self.logic.calibrate(p.modelPath, healthyFolder=folder, healthyVolumes=nodes, device=p.device.value,
                                     waitForCompletion=False, progressCallback=self._onTrainingProgress,
                                     finishedCallback=self._onTrainingFinished)
            except Exception:
                self._running = None
                self._updateButtons()
                raise

    def onStopTraining(self):
        """Kill the training/calibration worker and its children."""
        self.logic.cancel()
        self.ui.trainingStatusLabel.text = _("Stopping...")

    def _onTrainingProgress(self, message):
        if isinstance(message.get("settings"), dict):
            self._showSettingsThatRun(message["settings"])
            return
        self.ui.trainingProgressBar.value = int(round(100 * float(message.get("fraction", 0.0))))
        self.ui.trainingStatusLabel.text = formatProgress(message)
        losses = message.get("losses") or {}
        if message.get("stage") == "train" and "loss" in losses:
            self._lossHistory.append(float(losses["loss"]))
            if not self._lossRedrawPending:  # at most ~5 redraws per second
                self._lossRedrawPending = True
                qt.QTimer.singleShot(200, self._drawLossPlot)

    def _drawLossPlot(self):
        self._lossRedrawPending = False
        label = self.ui.lossPlotLabel
        width, height = max(label.width, 200), 140
        pixmap = qt.QPixmap(width, height)
        pixmap.fill(qt.QColor("white"))
        painter = qt.QPainter(pixmap)
        painter.setPen(qt.QColor("gray"))
        m = LOSS_PLOT_MARGIN
        painter.drawRect(m, m, width - 2 * m, height - 2 * m)
        points, low, high = lossPlotPoints(self._lossHistory, width, height)
        pen = qt.QPen(qt.QColor(200, 60, 0))
        pen.setWidth(2)
        painter.setPen(pen)
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            painter.drawLine(qt.QPointF(x0, y0), qt.QPointF(x1, y1))
        painter.setPen(qt.QColor("black"))
        if self._lossHistory:
            painter.drawText(m + 4, m + 12, f"loss {high:.4g}")
            painter.drawText(m + 4, height - m - 4, f"{low:.4g}  (step {len(self._lossHistory)})")
        painter.end()
        label.setPixmap(pixmap)

    def _onTrainingFinished(self, entry, error):
        task = self._running
        self._running = None
        self._updateButtons()
        self._drawLossPlot()
        if error is not None:
            self.ui.trainingProgressBar.value = 0
            if isinstance(error, anomalyErrors.Cancelled):
                self.ui.trainingStatusLabel.text = _("Stopped; no model was saved.")
            else:
                self.ui.trainingStatusLabel.text = _("Failed: {message}").format(message=error)
                slicer.util.errorDisplay(_("{task} failed: {message}").format(task=task, message=error))
            return
        self.ui.trainingProgressBar.value = 100
        self.refreshModelList()
        if entry is not None:
            self._parameterNode.modelPath = str(entry.path)
            self._selectModelInList(str(entry.path))
            self.ui.trainingStatusLabel.text = _("Saved and calibrated: {label}").format(label=entry.label)


#
# Pure helpers (no Qt): progress text and loss plot geometry
#

LOSS_PLOT_MARGIN = 6


def displayedProfile(profile: str, device: str, autoResolved: Optional[str] = None) -> str:
    """The profile whose values the Training panel shows for ``profile`` on ``device``.

    ``fast``/``paper`` are themselves. ``auto`` resolves as the worker will: ``paper``
    on a CUDA device, ``fast`` on the CPU; with device ``auto`` the GUI cannot tell
    without importing torch, so it shows ``autoResolved`` (what ``auto`` resolved to
    in an earlier run on this machine) or else ``fast``.
    """
    if profile in PROFILES:
        return profile
    if profile != "auto":
        raise ValueError(f"unknown profile {profile!r}")
    if device == "cuda" or device.startswith("cuda:"):
        return "paper"
    if device == "cpu":
        return "fast"
    return autoResolved if autoResolved in PROFILES else "fast"


def profileOverrides(values: dict, profile: str) -> dict:
    """The entries of ``values`` (TrainConfig names) that differ from ``profile``'s: the explicit overrides."""
    base = PROFILES[profile]
    overrides = {}
    for key, value in values.items():
        reference = base.get(key)
        if isinstance(value, float) or isinstance(reference, float):
            same = reference is not None and math.isclose(float(value), float(reference), rel_tol=1e-6, abs_tol=0.0)
        else:
            same = value == reference
        if not same:
            overrides[key] = value
    return overrides


#: 'mm:ss' (or 'h:mm:ss'); '--:--' when unknown (the core's formatting).
formatSeconds = format_seconds


def formatProgress(message: dict) -> str:
    """Status line for a worker progress message (a ProgressEvent as a dict): stage, detail, epoch, loss, ETA."""
    return status_line(ProgressEvent.from_dict(message))


def formatInputCheck(record: dict) -> str:
    """Panel line for the worker's raw-input record (skull check, brain extraction, bias correction)."""
    check = (record or {}).get("input_check")
    if not check:
        return ""
    skull = _("skull present") if check.get("has_skull") else _("skull-stripped")
    extraction = record.get("brain_extraction") or {}
    if extraction.get("ran"):
        ml = extraction.get("brain_volume_ml")
        done = _("brain extracted (deepbet{volume}): segment \"Brain\"").format(
            volume=f", {ml:.0f} mL" if isinstance(ml, (int, float)) else "")
    else:
        done = _("no brain extraction")
    text = _("Input check: {skull}; {done}").format(skull=skull, done=done)
    if (record.get("bias_correction") or {}).get("ran"):
        text += _("; bias field corrected")
    return text + "."


#: Range of the sensitivity slider; the parameter node's WithinRange says the same (checked by the tests).
PERCENTILE_SLIDER_RANGE = (80.0, 99.999)


def sliderPercentile(percentile: float) -> float:
    """A healthy percentile placed on the sensitivity slider (clamped to its range)."""
    low, high = PERCENTILE_SLIDER_RANGE
    return min(max(float(percentile), low), high)


def lossPlotPoints(losses: Sequence[float], width: int, height: int, margin: int = LOSS_PLOT_MARGIN,
                   maxPoints: int = 400):
    """Pixel coordinates of a loss curve in a ``width`` x ``height`` image.

    x spans the steps, y spans [min, max] of the (finite) losses, larger losses higher
    (smaller y). Long histories are reduced to ``maxPoints`` bin means. Returns
    ``(points, low, high)``.
    """
    values = np.asarray([v for v in losses if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return [], 0.0, 0.0
    if values.size > maxPoints:
        edges = np.linspace(0, values.size, maxPoints + 1).astype(int)
        values = np.asarray([values[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    x0, x1 = margin, width - margin
    y0, y1 = height - margin, margin  # y grows downwards
    n = values.size
    xs = [x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    ys = [y0 + (y1 - y0) * ((v - low) / span if high > low else 0.5) for v in values]
    return list(zip(xs, ys)), low, high


#
# AnomalySegLogic
#


@dataclass
class AnomalySegResult:
    """Outputs of one segmentation run."""

    mapNode: object
    segmentationNode: object
    threshold: float
    percentile: float
    modelVersion: str
    lesions: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    #: The worker's raw-input record: ``input_check``, ``brain_extraction``, ``bias_correction``.
    inputCheck: dict = field(default_factory=dict)
    #: "<input> brain" segmentation (segment "Brain") when brain extraction ran, else None.
    brainSegmentationNode: object = None


class DiscardedResult(anomalyErrors.Cancelled):
    """A run finished for an input that is no longer in the scene (closed or deleted meanwhile)."""


class DependencyError(RuntimeError):
    """Python packages the worker needs are missing and could not be installed."""


class AnomalySegLogic(ScriptedLoadableModuleLogic):
    """Segmentation, re-thresholding, lesion table, training and calibration.

    Usable without the GUI: ``process(..., waitForCompletion=True)`` blocks and returns
    an :class:`AnomalySegResult`. ``scene`` defaults to ``slicer.mrmlScene``; tests with
    the PyPI ``slicer-core`` package pass their own scene.
    """

    MAP_SUFFIX = " anomaly map"
    SEGMENTATION_SUFFIX = " anomalies"
    SEGMENT_ID = "Anomaly"
    BRAIN_SEGMENTATION_SUFFIX = " brain"
    BRAIN_SEGMENT_ID = "Brain"
    BRAIN_COLOR = (0.35, 0.75, 0.95)
    #: deepbet (brain extraction), installed without its dependencies (GUI toolkit, pandas,
    #: cc3d, fill_voids): the worker needs only its two network files (docs/RAW_INPUT.md).
    DEEPBET_REQUIREMENT = "deepbet>=1.0.2"
    ATTR_ROLE = "AnomalySeg.Role"  # "anomaly map" | "anomalies" on output nodes
    ATTR_CALIBRATION = "AnomalySeg.Calibration"
    ATTR_MODEL_VERSION = "AnomalySeg.ModelVersion"
    ATTR_MODEL_PATH = "AnomalySeg.ModelPath"
    ATTR_THRESHOLD = "AnomalySeg.Threshold"
    ATTR_PERCENTILE = "AnomalySeg.Percentile"
    ATTR_FALLBACK_PERCENTILE = "AnomalySeg.FallbackPercentile"
    #: Healthy percentile for maps made before the fallback was stored (the AMCons default).
    DEFAULT_PERCENTILE = 98.0
    INPUT_REFERENCE_ROLE = "AnomalySegInput"
    MAP_REFERENCE_ROLE = "AnomalySegMap"
    #: Heat colour tables, first one present in the scene wins.
    HEAT_COLOR_NODE_IDS = (
        "vtkMRMLColorTableNodeFileInferno.txt",
        "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
        "vtkMRMLPETProceduralColorNodePET-Heat",
        "vtkMRMLColorTableNodeIron",
    )
    FOREGROUND_OPACITY = 0.45

    def __init__(self, scene=None, modelDir=None, pythonExecutable=None, bundledModelDirs=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.pythonExecutable = pythonExecutable
        bundled = [BUNDLED_MODELS_DIR] if bundledModelDirs is None else list(bundledModelDirs)
        self.registry = ModelRegistry(modelDir or self.defaultModelDir(), bundled_dirs=bundled,
                                      inspector=self.inspectModel)
        self._worker = None
        self._timer = None
        #: device choice ("auto", ...) -> the profile "auto" resolved to in a run on this machine
        self.autoProfiles = {}

    def getParameterNode(self):
        """Typed parameter node (Slicer application only)."""
        return AnomalySegParameterNode(super().getParameterNode())

    @property
    def scene(self):
        """The MRML scene the logic works in."""
        return self._scene if self._scene is not None else slicer.mrmlScene

    # ------------------------------------------------------------------ environment
    @staticmethod
    def hasApplication() -> bool:
        """True inside the Slicer application (GUI or --no-main-window)."""
        return SLICER_APP and hasattr(slicer, "app")

    @classmethod
    def canShowDialogs(cls) -> bool:
        """Dialogs only with a main window and outside testing mode."""
        if not cls.hasApplication():
            return False
        try:
            return not slicer.app.commandOptions().noMainWindow and not slicer.app.testingEnabled()
        except AttributeError:
            return False

    @classmethod
    def defaultModelDir(cls) -> pathlib.Path:
        """$ANOMALYSEG_MODEL_DIR, else <Slicer settings folder>/AnomalySeg/models, else ~/.anomalyseg/models."""
        if os.environ.get(MODEL_DIR_ENV, "").strip():
            return default_model_dir()
        if cls.hasApplication():
            settingsFile = slicer.app.slicerUserSettingsFilePath
            if settingsFile:
                return pathlib.Path(settingsFile).parent / "AnomalySeg" / "models"
        return default_model_dir()

    def workerPython(self) -> str:
        """Interpreter for the worker: PythonSlicer inside Slicer, else this Python.

        Inside the application ``sys.executable`` is SlicerApp-real (it would start a
        second Slicer), so a missing PythonSlicer is an error, never a fallback.
        """
        if self.pythonExecutable:
            return self.pythonExecutable
        if os.environ.get("ANOMALYSEG_PYTHON"):
            return os.environ["ANOMALYSEG_PYTHON"]
        if not self.hasApplication():
            return sys.executable
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        candidates = [shutil.which("PythonSlicer")]
        for folder in (getattr(slicer.app, "slicerHome", "") or "", os.path.dirname(sys.executable)):
            if folder:
                candidates += [os.path.join(folder, "bin", name), os.path.join(folder, name)]
        for candidate in candidates:
            if candidate and os.path.isfile(candidate):
                return candidate
        raise anomalyErrors.AnomalySegError(
            "cannot find PythonSlicer (Slicer's Python interpreter) next to this Slicer; "
            "reinstall Slicer or set the ANOMALYSEG_PYTHON environment variable to its path")

    @staticmethod
    def libraryParentDir() -> str:
        """Folder holding the AnomalySegLib package (put on the worker's PYTHONPATH)."""
        return str(pathlib.Path(AnomalySegLib.__file__).resolve().parent.parent)

    # ------------------------------------------------------------------ dependencies
    #: Torch comes from the PyTorch extension (right CUDA/CPU build), never from a plain pip install.
    TORCH_REQUIREMENT = ">=2.1"

    @staticmethod
    def _packaging():
        """``slicer.packaging`` (Slicer >= 5.10), or None in older Slicer and slicer-core."""
        try:
            from slicer import packaging
        except ImportError:
            return None
        return packaging if hasattr(packaging, "pip_ensure") else None

    def requirements(self) -> list:
        """Requirements of Resources/requirements.txt (without torch), as ``packaging`` Requirement objects."""
        packaging = self._packaging()
        if packaging is not None:
            return packaging.load_requirements(REQUIREMENTS_FILE)
        from packaging.requirements import Requirement  # bundled with every Slicer

        lines = REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
        return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith(("#", "-"))]

    def _satisfied(self, requirement) -> bool:
        packaging = self._packaging()
        if packaging is not None:
            return bool(packaging.pip_check(requirement))
        import importlib.metadata

        try:
            return requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            return False

    @staticmethod
    def torchInstalled() -> bool:
        """True when torch is importable in the worker's environment (checked without importing it)."""
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def missingDependencies(self, includeTorch: bool = True) -> list:
        """Requirement strings not satisfied in this Python environment (nothing is imported)."""
        missing = [str(req) for req in self.requirements() if not self._satisfied(req)]
        if includeTorch and not self.torchInstalled():
            missing.insert(0, "torch" + self.TORCH_REQUIREMENT)
        return missing

    def ensureDependencies(self, askUser: bool = True, allowInstall: bool = True, includeTorch: bool = True) -> bool:
        """Make sure the worker's packages are installed, the Slicer way; never runs at import time.

        Python packages go through ``slicer.packaging.pip_ensure`` with the module's
        requirements file, torch through the PyTorch extension's ``PyTorchUtils``. Both
        only with the user's consent: ``askUser`` lets them show their confirmation
        dialogs, ``askUser=False`` means the caller already has it (the batch script's
        ``--install-dependencies``). Returns False when the user declines. Without
        ``allowInstall``, or where no dialog can be shown, missing packages raise
        :class:`DependencyError` saying what to do.
        """
        missing = self.missingDependencies(includeTorch)
        if not missing:
            return True
        what = ", ".join(missing)
        if not allowInstall or not self.hasApplication() or (askUser and not self.canShowDialogs()):
            if not self.hasApplication():  # plain Python / slicer-core: the user runs pip
                how = _("install them into this Python environment with pip")
            else:  # headless Slicer: the batch flag is the consent
                how = _("run the batch script with --install-dependencies, or open the AnomalySeg module "
                        "in Slicer and accept the installation")
            raise DependencyError(_("AnomalySeg needs these Python packages: {what}. To install them, {how}.").format(
                what=what, how=how))
        torchMissing = includeTorch and not self.torchInstalled()
        others = [req for req in self.requirements() if not self._satisfied(req)]
        if torchMissing:
            try:
                import PyTorchUtils
            except ImportError:
                raise DependencyError(_("AnomalySeg needs PyTorch: install the 'PyTorch' extension from the "
                                        "Extensions Manager, restart Slicer and try again.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askUser,
                                                                 torchVersionRequirement=self.TORCH_REQUIREMENT)
            if torch is None:
                if askUser:
                    return False  # declined in the PyTorch dialog
                raise DependencyError(_("PyTorch could not be installed (see the PyTorch Utils module)."))
        if others:
            packaging = self._packaging()
            try:
                if packaging is not None:
                    packaging.pip_ensure(others, prompt_install=askUser, requester="AnomalySeg")
                else:  # Slicer without slicer.packaging: same consent, plain pip_install
                    if askUser and not slicer.util.confirmOkCancelDisplay(
                            _("AnomalySeg needs these Python packages, which will be downloaded and installed now:"
                              "\n\n{what}").format(what=", ".join(str(r) for r in others)),
                            _("AnomalySeg: install dependencies")):
                        return False
                    slicer.util.pip_install([str(r) for r in others])
            except RuntimeError:  # pip_ensure: the user declined
                if askUser:
                    return False
                raise
        stillMissing = self.missingDependencies(includeTorch)
        if stillMissing:
            raise DependencyError(_("installation did not provide: {what}").format(what=", ".join(stillMissing)))
        return True

    @staticmethod
    def brainExtractionInstalled() -> bool:
        """True when deepbet (its network files) is installed in the worker's Python."""
        import importlib.util

        return importlib.util.find_spec("deepbet") is not None

    def ensureBrainExtraction(self, askUser: bool = True) -> bool:
        """Install deepbet (``pip install --no-deps``, ~10 MB) after the user agrees.

        Its dependencies (a GUI toolkit, pandas, cc3d, fill_voids) are not needed: the
        worker loads only deepbet's two TorchScript files. Returns False when the user
        declines or no dialog can be shown; a run that then needs extraction stops with
        the worker's one-line message.
        """
        if self.brainExtractionInstalled():
            return True
        if not askUser or not self.hasApplication() or not self.canShowDialogs():
            return False
        if not slicer.util.confirmOkCancelDisplay(
                _("Brain extraction of scans that still have their skull uses deepbet (MIT licence, ~10 MB "
                  "download, trained on T1-weighted scans). Install it now?\n\n{what} (without its "
                  "dependencies)").format(what=self.DEEPBET_REQUIREMENT),
                _("AnomalySeg: install brain extraction")):
            return False
        slicer.util.pip_install(f"--no-deps {self.DEEPBET_REQUIREMENT}")
        import importlib

        importlib.invalidate_caches()
        return self.brainExtractionInstalled()

    # ------------------------------------------------------------------ worker runs
    @property
    def isRunning(self) -> bool:
        """True while a worker started by this logic is running."""
        return self._worker is not None and not self._worker.finished

    def cancel(self) -> None:
        """Stop the running worker and all its child processes (no-op when idle)."""
        if self._worker is not None and not self._worker.finished:
            self._worker.cancel()

    def startWorker(self, request: dict, progressCallback=None, logCallback=None) -> WorkerProcess:
        """Start ``python -m AnomalySegLib.worker`` on ``request`` in its own process group."""
        if self.isRunning:
            raise RuntimeError("AnomalySeg is already running a task; cancel it first")
        worker = WorkerProcess(request, python=self.workerPython(), pythonpath=[self.libraryParentDir()],
                               on_progress=progressCallback,
                               on_log=logCallback or (lambda text: logging.info(f"AnomalySeg worker: {text}")))
        self._worker = worker.start()
        return worker

    def _runWorker(self, request, *, onResult, waitForCompletion, progressCallback=None, finishedCallback=None,
                   cleanup=None):
        """Run a worker request: blocking (return ``onResult(result)``) or polled by a Qt timer.

        In the non-blocking mode ``finishedCallback(value, error)`` is called in the GUI
        thread when the worker ends; the WorkerProcess is returned.
        """
        try:
            if not waitForCompletion and (not self.hasApplication() or qt is None):
                raise RuntimeError("waitForCompletion=False needs the Slicer application (Qt event loop)")
            worker = self.startWorker(request, progressCallback)
        except Exception:
            if cleanup:
                cleanup()
            raise
        if waitForCompletion:
            try:
                return onResult(worker.wait())
            finally:
                if cleanup:
                    cleanup()

        timer = qt.QTimer()
        timer.setInterval(100)

        def onTimeout():
            try:
                if worker.poll():
                    return
            except Exception as e:  # keep the GUI alive whatever happens
                logging.error(f"AnomalySeg: worker polling failed: {e}")
            timer.stop()
            value, error = None, None
            try:
                value = onResult(worker.outcome())
            except Exception as e:
                error = e
            finally:
                if cleanup:
                    cleanup()
                self._timer = None
            if finishedCallback is not None:
                finishedCallback(value, error)
            elif error is not None:
                logging.error(f"AnomalySeg: {error}")

        timer.connect("timeout()", onTimeout)
        self._timer = timer
        timer.start()
        return worker

    # ------------------------------------------------------------------ models
    def inspectModel(self, path) -> dict:
        """Validate a model file in the worker (no torch in this process); return its summary."""
        request = {"task": "info", "model": str(path)}
        worker = WorkerProcess(request, python=self.workerPython(), pythonpath=[self.libraryParentDir()]).start()
        return worker.wait(timeout=300)["summary"]

    def listModels(self) -> list:
        """Registry entries: user models, then bundled ones (inspected once, in the worker, when torch is there)."""
        return self.registry.list_models(inspect_bundled=self.torchInstalled())

    @staticmethod
    def entryDefaultPercentile(entry) -> Optional[float]:
        """Default healthy percentile of a model list entry: its calibration's operating point, else the method's."""
        calibration = (entry.details or {}).get("calibration") or {}
        for value in (calibration.get("default_percentile"), calibration.get("operating_percentile"),
                      entry.default_percentile):
            if value is not None:
                return float(value)
        return None

    def importModel(self, path, name=None, replace=False) -> ModelEntry:
        """Validate ``path`` then copy it into the model folder (OutputError on a name clash)."""
        return self.registry.import_model(path, name=name, replace=replace)

    def modelEntry(self, nameOrPath):
        """Registry entry for a model name or path, or None."""
        try:
            return self.registry.find(nameOrPath)
        except anomalyErrors.AnomalySegError:
            return None

    def resolveModelPath(self, nameOrPath) -> str:
        """A model path from a path or a registry name."""
        if not nameOrPath:
            raise ValueError("no model selected")
        candidate = pathlib.Path(str(nameOrPath)).expanduser()
        if candidate.is_file():
            return str(candidate)
        entry = self.modelEntry(str(nameOrPath))
        if entry is None:
            raise anomalyErrors.ModelFileError(f"model not found: {nameOrPath}")
        return str(entry.path)

    # ------------------------------------------------------------------ volume IO (storage nodes: app or slicer-core)
    def loadVolume(self, path, name=None):
        """Load a scalar volume file into the scene (slicer.util.loadVolume in the app)."""
        if self.hasApplication() and self._scene is None:
            node = slicer.util.loadVolume(str(path), {"name": name} if name else {})
            return node
        from AnomalySegLib.io.volume_io import volume_stem

        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume_stem(path))
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            self.scene.RemoveNode(storage)
            self.scene.RemoveNode(node)
            raise anomalyErrors.InputError(f"cannot read volume {path}")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        self._shItem(node)
        return node

    @staticmethod
    def exportVolume(volumeNode, path) -> None:
        """Write a volume node's voxels and geometry (IJKToRAS) to ``path`` (.nii, .nii.gz, .nrrd)."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(str(path).lower().endswith((".gz", ".nrrd")))
        if not storage.WriteData(volumeNode):
            raise anomalyErrors.OutputError(f"cannot write {volumeNode.GetName()} to {path}")

    @staticmethod
    def readVolumeArray(path):
        """(voxels as a Slicer-ordered (K, J, I) array, IJKToRAS 4x4) of a file, read by Slicer's own reader."""
        node = slicer.vtkMRMLScalarVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise anomalyErrors.InputError(f"cannot read {path}")
        ijkToRas = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijkToRas)
        return np.array(slicer.util.arrayFromVolume(node), copy=True), slicer.util.arrayFromVTKMatrix(ijkToRas)

    def saveSegmentation(self, segmentationNode, path) -> None:
        """Write a segmentation node as .seg.nrrd (Slicer's own writer)."""
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(True)
        if not storage.WriteData(segmentationNode):
            raise anomalyErrors.OutputError(f"cannot write {segmentationNode.GetName()} to {path}")

    def saveVolume(self, volumeNode, path) -> None:
        """Write a volume node (e.g. the anomaly map) to a file."""
        self.exportVolume(volumeNode, path)

    # ------------------------------------------------------------------ segment
    def process(self, inputVolume, modelPath, percentile=None, device="auto", waitForCompletion=True,
                progressCallback=None, finishedCallback=None, batchSize=16, brainExtraction=None):
        """Segment anomalies in ``inputVolume`` with a model (file path or registry name).

        Exports the volume to a temporary NIfTI file, runs the worker (torch), loads the
        anomaly map onto exactly the input's voxel grid, thresholds it at the healthy
        ``percentile`` (model default if None) and fills "<input> anomalies".
        Blocking by default (returns an AnomalySegResult); with
        ``waitForCompletion=False`` returns the WorkerProcess and calls
        ``finishedCallback(result, error)`` later (Slicer application only).
        ``brainExtraction`` (auto | on | off, default: the model's setting) is passed to the
        worker; when the brain was extracted it is shown as segment "Brain" of "<input> brain".
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("input volume is missing or empty")
        if percentile is not None:
            percentile = check_percentile(percentile)  # before any export or worker start
        modelPath = self.resolveModelPath(modelPath)
        workDir = tempfile.mkdtemp(prefix="AnomalySeg-")
        inputPath = os.path.join(workDir, "input.nii")
        heatmapPath = os.path.join(workDir, "heatmap.nii")
        try:
            self.exportVolume(inputVolume, inputPath)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        request = {"task": "segment", "input": inputPath, "model": modelPath, "heatmap": heatmapPath,
                   "percentile": percentile, "device": device, "batch_size": int(batchSize),
                   "extracted_brain": os.path.join(workDir, "brain.nii")}
        if brainExtraction:
            request["brain_extraction"] = str(brainExtraction)
        return self._runWorker(
            request,
            onResult=lambda result: self.loadSegmentResult(inputVolume, result),
            waitForCompletion=waitForCompletion,
            progressCallback=progressCallback,
            finishedCallback=finishedCallback,
            cleanup=lambda: shutil.rmtree(workDir, ignore_errors=True),
        )

    def isInScene(self, node) -> bool:
        """True when ``node`` is (still) a node of this logic's scene.

        After a scene close, node IDs restart: a stale Python object's ID may name a
        different new node, so identity is checked, not just the ID.
        """
        return (node is not None and node.GetScene() is self.scene
                and self.scene.GetNodeByID(node.GetID()) is node)

    def loadSegmentResult(self, inputVolume, result: dict) -> AnomalySegResult:
        """Turn a worker ``segment`` result into the two output nodes (the MRML half of process).

        The worker only scores; the mask and the lesion list are computed here, once,
        by :func:`AnomalySegLib.segmentation.segment.segment_heatmap` (as ``anomalyseg segment`` does).
        """
        if not self.isInScene(inputVolume):
            # the scene was closed (or the volume deleted) while the worker ran
            raise DiscardedResult(_("the input volume is no longer in the scene; the segmentation result was discarded"))
        heatmap, heatmapIjkToRas = self.readVolumeArray(result["heatmap"])
        inputIjkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputIjkToRas)
        # The worker computed the map on the exported input grid; a different grid means a mix-up.
        if not np.allclose(heatmapIjkToRas, slicer.util.arrayFromVTKMatrix(inputIjkToRas), atol=1e-3):
            raise anomalyErrors.AnomalySegError("the anomaly map file is not on the input volume's voxel grid")
        mapNode = self.createAnomalyMapNode(inputVolume, heatmap, result["calibration"],
                                            modelVersion=result.get("model_version", ""),
                                            modelPath=result.get("model", ""),
                                            fallbackPercentile=result.get("fallback_percentile"))
        segmentationNode = self.createSegmentationNode(inputVolume, mapNode)
        out = self.segmentMap(mapNode, segmentationNode, result.get("percentile"))
        out.inputCheck = {k: result[k] for k in ("input_check", "brain_extraction", "bias_correction") if k in result}
        out.brainSegmentationNode = self.updateBrainSegmentation(inputVolume, result.get("extracted_brain"))
        self.showResults(inputVolume, mapNode)
        return out

    def updateBrainSegmentation(self, inputVolume, brainPath):
        """"<input> brain" with segment "Brain" from the worker's extracted brain mask; without
        one (extraction did not run) an older brain node of this input is removed. Returns the node or None."""
        old = self._findOutputNode("vtkMRMLSegmentationNode", inputVolume, "brain")
        if not brainPath:
            if old is not None:
                self.scene.RemoveNode(old)
            return None
        maskKJI, ijkToRas = self.readVolumeArray(brainPath)
        inputIjkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputIjkToRas)
        if not np.allclose(ijkToRas, slicer.util.arrayFromVTKMatrix(inputIjkToRas), atol=1e-3):
            raise anomalyErrors.AnomalySegError("the brain mask file is not on the input volume's voxel grid")
        segNode = self._outputNode("vtkMRMLSegmentationNode", inputVolume,
                                   inputVolume.GetName() + self.BRAIN_SEGMENTATION_SUFFIX, "brain")
        if segNode.GetDisplayNode() is None:
            segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segmentation = segNode.GetSegmentation()
        if segmentation.GetSegment(self.BRAIN_SEGMENT_ID) is None:
            segmentation.AddEmptySegment(self.BRAIN_SEGMENT_ID, "Brain", list(self.BRAIN_COLOR))
        from vtk.util import numpy_support

        k, j, i = maskKJI.shape
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(i, j, k)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)[:] = maskKJI != 0
        image.SetImageToWorldMatrix(inputIjkToRas)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, segNode, self.BRAIN_SEGMENT_ID, logic.MODE_REPLACE,
                                                image.GetExtent()):
            raise anomalyErrors.AnomalySegError("cannot fill the brain segment")
        display = segNode.GetDisplayNode()
        if display is not None and hasattr(display, "SetSegmentOpacity2DFill"):
            display.SetSegmentOpacity2DFill(self.BRAIN_SEGMENT_ID, 0.0)  # outline only over the anomaly map
        self.placeBesideInput(segNode, inputVolume)
        return segNode

    def segmentFile(self, path, modelPath, percentile=None, device="auto", progressCallback=None, batchSize=16):
        """Segment a volume file or DICOM series folder without loading it into the scene (batch use).

        The worker reads and scores ``path`` with the core reader (NIfTI, NRRD, MetaImage,
        DICOM series); the map is thresholded here by the same core function as in the
        GUI and in ``anomalyseg segment``, so the outputs and report match the CLI's.
        Returns ``(Volume, SegmentationResult, workerResult)``; blocking.
        """
        from AnomalySegLib.segmentation.segment import segment_heatmap
        from AnomalySegLib.io.volume_io import read_volume

        modelPath = self.resolveModelPath(modelPath)
        workDir = tempfile.mkdtemp(prefix="AnomalySeg-batch-")
        try:
            request = {"task": "segment", "input": str(path), "model": modelPath,
                       "heatmap": os.path.join(workDir, "heatmap.nii.gz"),
                       "brain_mask": os.path.join(workDir, "brain.nii.gz"),
                       "percentile": percentile, "device": device, "batch_size": int(batchSize)}
            result = self.startWorker(request, progressCallback).wait()
            volume = read_volume(path)
            heatmap = read_volume(result["heatmap"]).data
            brain = read_volume(result["brain_mask"]).data != 0
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
        segmentation = segment_heatmap(heatmap, brain, volume.affine, Calibration.from_dict(result["calibration"]),
                                       result["percentile"], fallback_percentile=result["fallback_percentile"],
                                       model_version=result.get("model_version", ""))
        return volume, segmentation, result

    def _findOutputNode(self, className, inputVolume, role):
        for index in range(self.scene.GetNumberOfNodesByClass(className)):
            node = self.scene.GetNthNodeByClass(index, className)
            if node.GetAttribute(self.ATTR_ROLE) == role and node.GetNodeReference(self.INPUT_REFERENCE_ROLE) is inputVolume:
                return node
        return None

    def findOutputs(self, inputVolume):
        """(anomaly map, segmentation) made earlier for ``inputVolume``; None for each missing one."""
        return (self._findOutputNode("vtkMRMLScalarVolumeNode", inputVolume, "anomaly map"),
                self._findOutputNode("vtkMRMLSegmentationNode", inputVolume, "anomalies"))

    def _outputNode(self, className, inputVolume, name, role):
        """The output node of this role made for this input earlier (reused), else a new one."""
        node = self._findOutputNode(className, inputVolume, role)
        if node is not None:
            node.SetName(name)
            return node
        node = self.scene.AddNewNodeByClass(className, name)
        node.SetAttribute(self.ATTR_ROLE, role)
        node.SetNodeReferenceID(self.INPUT_REFERENCE_ROLE, inputVolume.GetID())
        return node

    def _shItem(self, node) -> int:
        """Subject hierarchy item of a node (created under the scene if the app has not made one)."""
        shNode = self.scene.GetSubjectHierarchyNode()
        item = shNode.GetItemByDataNode(node)
        if not item:
            item = shNode.CreateItem(shNode.GetSceneItemID(), node)
        return item

    def placeBesideInput(self, node, inputVolume) -> None:
        """Put ``node`` under the same subject hierarchy parent as the input volume."""
        shNode = self.scene.GetSubjectHierarchyNode()
        parent = shNode.GetItemParent(self._shItem(inputVolume))
        shNode.SetItemParent(self._shItem(node), parent)

    def heatColorNodeID(self) -> Optional[str]:
        """First heat colour table available in the scene."""
        for nodeID in self.HEAT_COLOR_NODE_IDS:
            if self.scene.GetNodeByID(nodeID) is not None:
                return nodeID
        return None

    def createAnomalyMapNode(self, inputVolume, heatmapKJI, calibration: dict, modelVersion="", modelPath="",
                             fallbackPercentile=None):
        """"<input> anomaly map": the heat map on exactly the input's grid, heat colours, calibration stored.

        ``fallbackPercentile`` (the method's default) is used for calibrations without
        an operating point.
        """
        inputShape = slicer.util.arrayFromVolume(inputVolume).shape
        if tuple(heatmapKJI.shape) != tuple(inputShape):
            raise anomalyErrors.AnomalySegError(
                f"anomaly map grid {heatmapKJI.shape} differs from the input grid {inputShape}")
        Calibration.from_dict(calibration)  # validate before storing
        mapNode = self._outputNode("vtkMRMLScalarVolumeNode", inputVolume, inputVolume.GetName() + self.MAP_SUFFIX,
                                   "anomaly map")
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        mapNode.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(mapNode, np.ascontiguousarray(heatmapKJI, dtype=np.float32))
        mapNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        mapNode.SetAttribute(self.ATTR_CALIBRATION, json.dumps(calibration))
        mapNode.SetAttribute(self.ATTR_MODEL_VERSION, modelVersion)
        mapNode.SetAttribute(self.ATTR_MODEL_PATH, str(modelPath))
        mapNode.SetAttribute(self.ATTR_FALLBACK_PERCENTILE,
                             repr(float(self.DEFAULT_PERCENTILE if fallbackPercentile is None else fallbackPercentile)))
        if mapNode.GetDisplayNode() is None:
            mapNode.CreateDefaultDisplayNodes()
        displayNode = mapNode.GetDisplayNode()
        colorID = self.heatColorNodeID()
        if colorID:
            displayNode.SetAndObserveColorNodeID(colorID)
        positive = heatmapKJI[heatmapKJI > 0]
        high = float(np.percentile(positive, 99.5)) if positive.size else 1.0
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, high if high > 0 else 1.0)
        # 0 = outside the brain: transparent in the slice views
        displayNode.SetThreshold(high * 1e-3 if high > 0 else 1e-6, float(np.max(heatmapKJI)) + 1.0)
        displayNode.ApplyThresholdOn()
        self.placeBesideInput(mapNode, inputVolume)
        return mapNode

    def createSegmentationNode(self, inputVolume, mapNode):
        """"<input> anomalies": one segment, fixed colour and terminology, geometry of the input."""
        segNode = self._outputNode("vtkMRMLSegmentationNode", inputVolume,
                                   inputVolume.GetName() + self.SEGMENTATION_SUFFIX, "anomalies")
        if segNode.GetDisplayNode() is None:
            segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segNode.SetNodeReferenceID(self.MAP_REFERENCE_ROLE, mapNode.GetID())
        self.ensureAnomalySegment(segNode)
        self.placeBesideInput(segNode, inputVolume)
        return segNode

    def ensureAnomalySegment(self, segNode):
        """The "Anomaly" segment of ``segNode`` (re-created if the user deleted it), fixed name, colour, terminology."""
        from AnomalySegLib.io.segmentation_file import ANOMALY_COLOR, ANOMALY_SEGMENT_NAME, ANOMALY_TERMINOLOGY

        segmentation = segNode.GetSegmentation()
        segment = segmentation.GetSegment(self.SEGMENT_ID)
        if segment is None:
            segmentation.AddEmptySegment(self.SEGMENT_ID, ANOMALY_SEGMENT_NAME, list(ANOMALY_COLOR))
            segment = segmentation.GetSegment(self.SEGMENT_ID)
        segment.SetName(ANOMALY_SEGMENT_NAME)
        segment.SetColor(*ANOMALY_COLOR)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if hasattr(segment, "SetTerminology"):  # Slicer >= 5.8
            segment.SetTerminology(ANOMALY_TERMINOLOGY)
        else:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), ANOMALY_TERMINOLOGY)
        return segment

    @staticmethod
    def kjiAffine(volumeNode) -> np.ndarray:
        """Voxel-to-RAS matrix for indices in Slicer's array order (k, j, i).

        Lets the core work on ``arrayFromVolume`` views directly: transposing to (i, j, k)
        would hand it non-contiguous arrays, several times slower to label.
        """
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return slicer.util.arrayFromVTKMatrix(ijkToRas)[:, [2, 1, 0, 3]]

    def mapCalibration(self, mapNode) -> Calibration:
        """The calibration table stored on an anomaly map node."""
        text = mapNode.GetAttribute(self.ATTR_CALIBRATION) if mapNode is not None else None
        if not text:
            name = mapNode.GetName() if mapNode is not None else "the anomaly map"
            raise anomalyErrors.AnomalySegError(_("{name} has no AnomalySeg calibration table; "
                                                  "segment the volume again").format(name=name))
        return Calibration.from_dict(json.loads(text))

    def mapFallbackPercentile(self, mapNode) -> float:
        """The method's starting percentile stored with a map (for calibrations without an operating point)."""
        fallback = mapNode.GetAttribute(self.ATTR_FALLBACK_PERCENTILE)
        return float(fallback) if fallback else self.DEFAULT_PERCENTILE

    def mapDefaultPercentile(self, mapNode) -> float:
        """The healthy percentile a map is first thresholded at: the calibration's operating point, else the method's."""
        return default_percentile(self.mapCalibration(mapNode), self.mapFallbackPercentile(mapNode))

    def thresholdMap(self, mapNode, percentile: Optional[float]):
        """The map thresholded at a healthy percentile (None: its default), with its lesions.

        Runs :func:`AnomalySegLib.segmentation.segment.segment_heatmap`, the one path from a map to
        a mask and lesion list (small components removed, volumes in mL). Arrays are in
        Slicer's (K, J, I) order; the map is exactly 0 outside the brain, so non-zero
        marks brain voxels. Returns a ``SegmentationResult`` (centroids in the map's own
        RAS, not through parent transforms: see :meth:`lesionRows`).
        """
        from AnomalySegLib.segmentation.segment import segment_heatmap

        calibration = self.mapCalibration(mapNode)
        heatmap = slicer.util.arrayFromVolume(mapNode)
        try:
            return segment_heatmap(heatmap, heatmap != 0, self.kjiAffine(mapNode), calibration, percentile,
                                   fallback_percentile=self.mapFallbackPercentile(mapNode),
                                   model_version=mapNode.GetAttribute(self.ATTR_MODEL_VERSION) or "")
        except ValueError as e:  # e.g. a percentile outside (0, 100)
            raise anomalyErrors.AnomalySegError(str(e)) from e

    def segmentMap(self, mapNode, segmentationNode, percentile: Optional[float]) -> AnomalySegResult:
        """Threshold the stored map into the segmentation and list its lesions (numpy only, no network)."""
        result = self.thresholdMap(mapNode, percentile)
        self.setSegmentMask(segmentationNode, result.mask, mapNode)
        segmentationNode.SetAttribute(self.ATTR_MODEL_VERSION, result.model_version)
        segmentationNode.SetAttribute(self.ATTR_THRESHOLD, repr(float(result.threshold)))
        segmentationNode.SetAttribute(self.ATTR_PERCENTILE, repr(float(result.percentile)))
        return AnomalySegResult(mapNode=mapNode, segmentationNode=segmentationNode, threshold=result.threshold,
                                percentile=result.percentile, modelVersion=result.model_version,
                                lesions=self.lesionRows(result.lesions, mapNode), report=result.report())

    def rethreshold(self, mapNode, segmentationNode, percentile: float) -> float:
        """Re-threshold the stored map at ``percentile`` into the segmentation; returns the score threshold."""
        return self.segmentMap(mapNode, segmentationNode, percentile).threshold

    def storedPercentile(self, segmentationNode) -> Optional[float]:
        """The healthy percentile the segmentation was last thresholded at (None if never)."""
        text = segmentationNode.GetAttribute(self.ATTR_PERCENTILE) if segmentationNode is not None else None
        try:
            return float(text) if text else None
        except ValueError:
            return None

    def setSegmentMask(self, segmentationNode, maskKJI, referenceVolume) -> None:
        """Replace the anomaly segment's voxels with ``maskKJI`` on the reference volume's grid."""
        from vtk.util import numpy_support

        k, j, i = maskKJI.shape
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(i, j, k)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)[:] = maskKJI != 0
        ijkToRas = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(ijkToRas)
        image.SetImageToWorldMatrix(ijkToRas)
        self.ensureAnomalySegment(segmentationNode)  # the user may have deleted it in the Segment Editor
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, self.SEGMENT_ID, logic.MODE_REPLACE,
                                                image.GetExtent()):
            raise anomalyErrors.AnomalySegError("cannot update the anomaly segment")

    def segmentationMask(self, segmentationNode, referenceVolume=None) -> np.ndarray:
        """All segments of ``segmentationNode`` as one (K, J, I) uint8 mask on the reference grid."""
        if referenceVolume is None:
            referenceVolume = (segmentationNode.GetNodeReference(self.INPUT_REFERENCE_ROLE)
                               or segmentationNode.GetNodeReference(
                                   vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()))
        if referenceVolume is None:
            raise ValueError("a reference volume is needed to export the segmentation")
        before = {self.scene.GetNthNode(n).GetID() for n in range(self.scene.GetNumberOfNodes())}
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AnomalySegTemp__")
        try:
            ids = vtk.vtkStringArray()
            segmentationNode.GetSegmentation().GetSegmentIDs(ids)
            if ids.GetNumberOfValues() == 0:
                return np.zeros(slicer.util.arrayFromVolume(referenceVolume).shape, np.uint8)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, referenceVolume):
                raise anomalyErrors.AnomalySegError("cannot export the segmentation")
            return (slicer.util.arrayFromVolume(labelmap) != 0).astype(np.uint8)
        finally:
            # the export adds a display node and a colour table: remove everything it added
            for n in reversed(range(self.scene.GetNumberOfNodes())):
                node = self.scene.GetNthNode(n)
                if node is not None and node.GetID() not in before:
                    self.scene.RemoveNode(node)

    def lesionTable(self, source, referenceVolume=None, mapNode=None) -> list:
        """Connected components (26-neighbourhood), largest first, of a segmentation or a mask.

        ``source`` is a segmentation node (its segments exported on the reference grid:
        counts what the user sees, edits included) or a (K, J, I) mask array with
        ``referenceVolume``. Rows as :meth:`lesionRows`; the maximum anomaly score is
        added when the map is known.
        """
        from AnomalySegLib.segmentation.lesions import find_lesions

        if isinstance(source, np.ndarray):
            if referenceVolume is None:
                raise ValueError("referenceVolume is required with a mask array")
            maskKJI = source
        else:
            if referenceVolume is None:
                referenceVolume = (source.GetNodeReference(self.INPUT_REFERENCE_ROLE)
                                   or source.GetNodeReference(
                                       vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()))
            maskKJI = self.segmentationMask(source, referenceVolume)
            if mapNode is None:
                mapNode = source.GetNodeReference(self.MAP_REFERENCE_ROLE)
        heatmap = None
        if mapNode is not None and slicer.util.arrayFromVolume(mapNode).shape == maskKJI.shape:
            heatmap = slicer.util.arrayFromVolume(mapNode)
        lesions = find_lesions(np.asarray(maskKJI) != 0, self.kjiAffine(referenceVolume), heatmap)
        return self.lesionRows(lesions, referenceVolume)

    @staticmethod
    def lesionRows(lesions, referenceVolume) -> list:
        """Table rows of core ``Lesion`` objects, centroids in world coordinates.

        The core measures in the volume's own RAS; a volume under a parent transform is
        displayed moved, so "jump to lesion" needs the centroid through that transform.
        """
        transform = None
        parent = referenceVolume.GetParentTransformNode() if referenceVolume is not None else None
        if parent is not None:
            transform = vtk.vtkGeneralTransform()
            parent.GetTransformToWorld(transform)  # linear or not
        rows = []
        for lesion in lesions:
            centre = [float(c) for c in lesion.centroid_ras]
            if transform is not None:
                centre = [float(c) for c in transform.TransformPoint(centre)]
            rows.append({"label": lesion.label, "voxels": lesion.voxel_count, "volume_ml": lesion.volume_ml,
                         "centroid_ras": centre, "max_score": lesion.max_score})
        return rows

    def showResults(self, inputVolume, mapNode) -> None:
        """Input as background, anomaly map as semi-transparent foreground in every slice view."""
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = self.scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(inputVolume.GetID())
            composite.SetForegroundVolumeID(mapNode.GetID())
            composite.SetForegroundOpacity(self.FOREGROUND_OPACITY)

    # ------------------------------------------------------------------ training and calibration
    def _healthyRequest(self, healthyFolder, healthyVolumes, workDir) -> dict:
        """Worker arguments for a healthy cohort: a folder and/or loaded volumes (exported)."""
        request = {}
        if healthyFolder:
            request["healthy_dir"] = str(healthyFolder)
        paths = []
        for index, item in enumerate(healthyVolumes or []):
            if isinstance(item, (str, os.PathLike)):
                paths.append(str(item))
                continue
            path = os.path.join(workDir, f"healthy_{index:03d}.nii")
            self.exportVolume(item, path)
            paths.append(path)
        if paths:
            request["healthy"] = paths
        if not request:
            raise ValueError("no healthy volumes given")
        return request

    def train(self, healthyFolder=None, healthyVolumes=None, modelName="my-model", config=None, baseModelPath=None,
              outputPath=None, overwrite=False, waitForCompletion=True, progressCallback=None,
              finishedCallback=None, profile="auto", overrides=None):
        """Train (and calibrate on held-out healthy volumes) in the worker; register the model.

        ``profile`` (auto | fast | paper, see AnomalySegLib.pipeline.profiles) gives the settings;
        ``auto`` is resolved by the worker against the device it trains on. ``overrides``
        (epochs, image_size, base_width, batch_size, learning_rate, method) replace single
        profile values; ``config`` holds the other TrainConfig fields (device, seed, ...;
        its values override the profile's too). The worker reports the resolved settings
        in a progress message with ``settings`` and in the result. The model goes to the
        model folder as ``modelName.pt`` unless ``outputPath`` is given. Returns the
        registry entry (blocking) or the WorkerProcess.
        """
        if profile != "auto" and profile not in PROFILES:
            raise ValueError(f"unknown training profile {profile!r}")
        explicit = {**(config or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
        imageSize = int(explicit.get("image_size") or PROFILES["fast"]["image_size"])
        if imageSize < 32 or imageSize % 32:
            raise ValueError(f"image size must be a multiple of 32 (got {imageSize})")
        output = pathlib.Path(outputPath) if outputPath else self.registry.model_path(modelName)
        if output.exists() and not overwrite:
            raise anomalyErrors.OutputError(f"{output} already exists; choose another model name")
        output.parent.mkdir(parents=True, exist_ok=True)
        workDir = tempfile.mkdtemp(prefix="AnomalySeg-train-")
        try:
            request = {"task": "train", "output": str(output), "profile": profile,
                       "overrides": dict(overrides or {}), "config": dict(config or {}),
                       "init": str(baseModelPath) if baseModelPath else None, "overwrite": bool(overwrite),
                       **self._healthyRequest(healthyFolder, healthyVolumes, workDir)}
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return self._runWorker(request, onResult=lambda result: self._registerTrained(output, result),
                               waitForCompletion=waitForCompletion, progressCallback=progressCallback,
                               finishedCallback=finishedCallback,
                               cleanup=lambda: shutil.rmtree(workDir, ignore_errors=True))

    def _registerTrained(self, output, result):
        if output.parent.resolve() == self.registry.folder.resolve():
            return self.registry.register(output, summary=result.get("summary"))
        return ModelEntry.from_summary(output.stem, output, result.get("summary") or {}, source="file")

    def calibrate(self, modelPath, healthyFolder=None, healthyVolumes=None, outputPath=None, device="auto",
                  waitForCompletion=True, progressCallback=None, finishedCallback=None):
        """Re-calibrate a model on healthy volumes in the worker (in place unless ``outputPath``)."""
        modelPath = self.resolveModelPath(modelPath)
        output = pathlib.Path(outputPath or modelPath)
        workDir = tempfile.mkdtemp(prefix="AnomalySeg-calibrate-")
        try:
            request = {"task": "calibrate", "model": modelPath, "output": str(output), "device": device,
                       **self._healthyRequest(healthyFolder, healthyVolumes, workDir)}
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

        def onResult(result):
            if output.parent.resolve() == self.registry.folder.resolve():
                return self.registry.register(output)
            return ModelEntry(name=output.stem, path=output, calibrated=True, version=result.get("version", ""),
                              source="file")

        return self._runWorker(request, onResult=onResult, waitForCompletion=waitForCompletion,
                               progressCallback=progressCallback, finishedCallback=finishedCallback,
                               cleanup=lambda: shutil.rmtree(workDir, ignore_errors=True))


#
# AnomalySegTest
#


class AnomalySegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: ``Slicer --testing --python-code "..."`` or the Reload & Test button.

    Mirrors tests/test_slicer_logic.py (run in CI with the PyPI slicer-core): an oblique,
    anisotropic volume; heat map on exactly the input grid; segmentation from the
    thresholded map, saved as .seg.nrrd and compared in physical space; re-threshold;
    lesion table; subject hierarchy placement; worker progress and cancel.
    """

    def setUp(self):
        """Fresh scene; the light dependencies of the post-processing (not PyTorch)."""
        slicer.mrmlScene.Clear()
        AnomalySegLogic().ensureDependencies(askUser=False, includeTorch=False)

    def runTest(self):
        """Run all tests."""
        self.setUp()
        self.test_PostProcessingGeometry()
        self.setUp()
        self.test_WorkerCancel()

    @staticmethod
    def _obliqueVolume(name="oblique"):
        """A 20x24x10 anisotropic volume rotated 20 degrees about S (voxel values = i + 10 j)."""
        angle = math.radians(20.0)
        rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                             [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
        ijkToRas[:3, 3] = [-20.0, 10.0, 5.0]
        k, j, i = np.meshgrid(np.arange(10), np.arange(24), np.arange(20), indexing="ij")
        voxels = (i + 10.0 * j).astype(np.float32)
        node = slicer.util.addVolumeFromArray(voxels, ijkToRas, name)
        return node, ijkToRas

    @staticmethod
    def _calibration():
        percentiles = np.linspace(0.0, 100.0, 1001)
        return {"percentiles": percentiles.tolist(), "values": (percentiles / 100.0).tolist(),
                "n_pixels": 1000, "n_images": 10, "n_volumes": 1, "source": "test"}

    def test_PostProcessingGeometry(self):
        """Map/segmentation geometry, attributes, subject hierarchy, .seg.nrrd round trip, re-threshold."""
        self.delayDisplay("Post-processing geometry")
        logic = AnomalySegLogic()
        inputVolume, ijkToRas = self._obliqueVolume()
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        folder = shNode.CreateFolderItem(shNode.GetSceneItemID(), "Patient 1")
        shNode.SetItemParent(shNode.GetItemByDataNode(inputVolume), folder)

        heatmap = np.zeros((10, 24, 20), np.float32)  # (K, J, I), scores in [0, 1] like the table above
        heatmap[3:6, 5:9, 4:10] = 0.99
        heatmap[7, 15:17, 12:14] = 0.985
        heatmap[1:9, 2:22, 2:18] += 0.01  # brain: small positive scores
        mapNode = logic.createAnomalyMapNode(inputVolume, heatmap, self._calibration(), modelVersion="test/v1")
        segNode = logic.createSegmentationNode(inputVolume, mapNode)
        threshold = logic.rethreshold(mapNode, segNode, 98.0)
        self.assertAlmostEqual(threshold, 0.98, places=6)

        m = vtk.vtkMatrix4x4()
        mapNode.GetIJKToRASMatrix(m)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVTKMatrix(m), ijkToRas))
        self.assertEqual(mapNode.GetName(), "oblique anomaly map")
        self.assertEqual(segNode.GetName(), "oblique anomalies")
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(segNode)), folder)
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(mapNode)), folder)
        self.assertEqual(float(segNode.GetAttribute("AnomalySeg.Threshold")), threshold)
        self.assertEqual(segNode.GetAttribute("AnomalySeg.ModelVersion"), "test/v1")

        expected = ((heatmap > threshold) & (heatmap != 0)).astype(np.uint8)
        self.assertTrue(np.array_equal(logic.segmentationMask(segNode), expected))
        rows = logic.lesionTable(segNode)
        self.assertEqual([row["voxels"] for row in rows], [72, 4])

        path = os.path.join(slicer.app.temporaryPath, "AnomalySegTest.seg.nrrd")
        logic.saveSegmentation(segNode, path)
        loaded = slicer.util.loadSegmentation(path)
        self.assertTrue(np.array_equal(logic.segmentationMask(loaded, inputVolume), expected))

        logic.rethreshold(mapNode, segNode, 99.7)  # threshold 0.997: only the first blob (score 1.0) is left
        self.assertEqual([row["voxels"] for row in logic.lesionTable(segNode)], [72])
        self.delayDisplay("Post-processing geometry passed")

    def test_WorkerCancel(self):
        """The worker reports progress and cancel ends it and its child process."""
        self.delayDisplay("Worker progress and cancel")
        os.environ["ANOMALYSEG_WORKER_TEST_TASKS"] = "1"  # inherited by the worker: enables its "sleep" task
        try:
            logic = AnomalySegLogic()
            events = []
            worker = logic.startWorker({"task": "sleep", "seconds": 60, "children": 1}, progressCallback=events.append)
            while not events:
                worker.poll(timeout=0.2)
            logic.cancel()
            with self.assertRaises(anomalyErrors.Cancelled):
                worker.wait(timeout=30)
            self.assertFalse(logic.isRunning)
        finally:
            os.environ.pop("ANOMALYSEG_WORKER_TEST_TASKS", None)
        self.delayDisplay("Worker progress and cancel passed")
