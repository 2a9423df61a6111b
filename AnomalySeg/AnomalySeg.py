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
from AnomalySegLib.calibration import Calibration  # noqa: E402
from AnomalySegLib.model_registry import MODEL_DIR_ENV, ModelEntry, ModelRegistry, default_model_dir  # noqa: E402
from AnomalySegLib.worker import WorkerProcess  # noqa: E402


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
            '<a href="https://github.com/anomalyseg/AnomalySeg/blob/main/docs/SLICER.md">user guide</a>.'
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


class Method(enum.Enum):
    """Training method (see the paper)."""

    AMCONS = "amcons"
    GRADCAMCONS = "gradcamcons"
    VAE = "vae"

    def label(self):
        """Combo box text."""
        return {"amcons": _("AMCons (attention, recommended)"), "gradcamcons": _("GradCAMCons"),
                "vae": _("VAE residual (baseline)")}[self.value]


if SLICER_APP:

    @parameterNodeWrapper
    class AnomalySegParameterNode:
        """Everything the panels edit; saved with the scene.

        inputVolume - volume to segment.
        modelPath - model file used by the Segment panel (chosen in the model list).
        device - where the network runs.
        percentile - sensitivity: healthy percentile used as threshold.
        anomalyMap, anomalySegmentation - outputs of the last run (re-thresholded by the slider).
        healthyFolder - folder of healthy volumes for training / calibration.
        method, epochs, imageSize, batchSize - training settings.
        baseModelPath - optional model to fine-tune.
        modelName - name of the trained model in the model list.
        """

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: Device = Device.AUTO
        percentile: Annotated[float, WithinRange(80.0, 99.99)] = 98.0
        anomalyMap: vtkMRMLScalarVolumeNode
        anomalySegmentation: vtkMRMLSegmentationNode
        healthyFolder: pathlib.Path
        method: Method = Method.AMCONS
        epochs: Annotated[int, WithinRange(1, 2000)] = 50
        imageSize: Annotated[int, WithinRange(32, 512)] = 224
        batchSize: Annotated[int, WithinRange(1, 512)] = 32
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
        """The parameter node is about to go away."""
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
        self._updateButtons()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._updateButtons()
        p = self._parameterNode
        if p and p.inputVolume is not self._lastInputVolume and self._running != "segment":
            # show the outputs that belong to the newly selected input (if it was segmented before)
            self._lastInputVolume = p.inputVolume
            mapNode, segNode = self.logic.findOutputs(p.inputVolume) if p.inputVolume else (None, None)
            if mapNode is not p.anomalyMap or segNode is not p.anomalySegmentation:
                self._appliedPercentile = None
                p.anomalyMap, p.anomalySegmentation = mapNode, segNode
                self._clearLesions()
                return
        if p and p.anomalyMap and p.anomalySegmentation and self._running != "segment":
            if self._appliedPercentile is None or abs(p.percentile - self._appliedPercentile) > 1e-9:
                self._rethresholdTimer.start()

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
            if entry is not None and entry.default_percentile is not None:
                # each method has its own recommended sensitivity (e.g. 98 AMCons, 95 GradCAMCons)
                self._parameterNode.percentile = min(max(float(entry.default_percentile), 80.0), 99.99)

    def onImportModel(self):
        """Validate a model file (in the worker) and copy it into the model folder."""
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import AnomalySeg model"), "",
                                              _("AnomalySeg models (*.pt *.pth);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
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
            self._running = "segment"
            self._updateButtons()
            self.ui.segmentProgressBar.value = 0
            self.ui.segmentStatusLabel.text = _("Starting...")
            try:
                self.logic.process(p.inputVolume, p.modelPath, percentile=p.percentile, device=p.device.value,
                                   waitForCompletion=False, progressCallback=self._onSegmentProgress,
                                   finishedCallback=self._onSegmentFinished)
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
        self._lastInputVolume = self._parameterNode.inputVolume
        if error is not None:
            self.ui.segmentProgressBar.value = 0
            if isinstance(error, anomalyErrors.Cancelled):
                self.ui.segmentStatusLabel.text = _("Cancelled.")
            else:
                self.ui.segmentStatusLabel.text = _("Failed: {message}").format(message=error)
                slicer.util.errorDisplay(_("Segmentation failed: {message}").format(message=error))
            return
        self.ui.segmentProgressBar.value = 100
        p = self._parameterNode
        if result.mapNode.GetNodeReference(AnomalySegLogic.INPUT_REFERENCE_ROLE) is not p.inputVolume:
            # the user picked another input while this one was running: keep its outputs, do not show them
            self.ui.segmentStatusLabel.text = _("Done: {name}").format(name=result.segmentationNode.GetName())
            return
        wasModifying = p.StartModify()
        p.anomalyMap = result.mapNode
        p.anomalySegmentation = result.segmentationNode
        p.percentile = min(max(result.percentile, 80.0), 99.99)
        self._appliedPercentile = p.percentile
        p.EndModify(wasModifying)
        self._showLesions(result.lesions, result.threshold, result.percentile)

    def applyRethreshold(self):
        """Re-threshold the stored anomaly map at the slider's percentile (no network run)."""
        p = self._parameterNode
        if not (p and p.anomalyMap and p.anomalySegmentation):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the segmentation.")):
            threshold = self.logic.rethreshold(p.anomalyMap, p.anomalySegmentation, p.percentile)
            self._appliedPercentile = p.percentile
            rows = self.logic.lesionTable(p.anomalySegmentation)
            self._showLesions(rows, threshold, p.percentile)

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
            config = {"method": p.method.value, "epochs": p.epochs, "image_size": p.imageSize,
                      "batch_size": p.batchSize, "device": p.device.value}
            self._lossHistory = []
            self._drawLossPlot()
            self._running = "train"
            self._updateButtons()
            try:
                self.logic.train(healthyFolder=folder, healthyVolumes=nodes, modelName=p.modelName, config=config,
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


def formatSeconds(seconds) -> str:
    """'mm:ss' (or 'h:mm:ss'); '--:--' when unknown."""
    if seconds is None or not math.isfinite(float(seconds)):
        return "--:--"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def formatProgress(message: dict) -> str:
    """Status line for a worker progress message: stage, detail, epoch, loss, ETA."""
    parts = [str(message.get("stage", "")).capitalize()]
    if message.get("epoch") is not None and message.get("epochs"):
        parts.append(f"epoch {message['epoch']}/{message['epochs']}")
    if message.get("message"):
        parts.append(str(message["message"]))
    losses = message.get("losses") or {}
    if "loss" in losses:
        parts.append(f"loss {float(losses['loss']):.4g}")
    parts.append(f"ETA {formatSeconds(message.get('eta_s'))}")
    return " \u2013 ".join(p for p in parts if p)


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
    ATTR_ROLE = "AnomalySeg.Role"  # "anomaly map" | "anomalies" on output nodes
    ATTR_CALIBRATION = "AnomalySeg.Calibration"
    ATTR_MODEL_VERSION = "AnomalySeg.ModelVersion"
    ATTR_MODEL_PATH = "AnomalySeg.ModelPath"
    ATTR_THRESHOLD = "AnomalySeg.Threshold"
    ATTR_PERCENTILE = "AnomalySeg.Percentile"
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
        """Interpreter for the worker: PythonSlicer inside Slicer, else this Python."""
        if self.pythonExecutable:
            return self.pythonExecutable
        if os.environ.get("ANOMALYSEG_PYTHON"):
            return os.environ["ANOMALYSEG_PYTHON"]
        if self.hasApplication():
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    @staticmethod
    def libraryParentDir() -> str:
        """Folder holding the AnomalySegLib package (put on the worker's PYTHONPATH)."""
        return str(pathlib.Path(AnomalySegLib.__file__).resolve().parent.parent)

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def requirements() -> list:
        """Requirement lines of Resources/requirements.txt plus torch (installed via SlicerPyTorch)."""
        lines = ["torch>=2.1"]
        if REQUIREMENTS_FILE.exists():
            for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    lines.append(line)
        return lines

    @staticmethod
    def _requirementSatisfied(line: str) -> bool:
        import importlib.metadata

        try:
            from packaging.requirements import Requirement

            requirement = Requirement(line)
            name, specifier = requirement.name, requirement.specifier
        except Exception:  # packaging missing: check presence only
            name, specifier = line.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip(), None
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return specifier is None or specifier.contains(version, prereleases=True)

    def missingDependencies(self, includeTorch: bool = True) -> list:
        """Requirement lines not satisfied in this Python environment (nothing is imported)."""
        return [line for line in self.requirements() if not self._requirementSatisfied(line)
                and (includeTorch or not line.startswith("torch"))]

    def ensureDependencies(self, askUser: bool = True, allowInstall: bool = True, includeTorch: bool = True) -> bool:
        """Make sure the worker's packages are installed; never runs at import time.

        Installs only with the user's agreement: ``askUser`` shows a confirmation dialog
        (impossible headless or in testing: then DependencyError), ``askUser=False`` means
        the caller already has the agreement (e.g. ``--install-dependencies``).
        Returns False when the user declines. ``includeTorch=False`` checks only what
        the GUI process itself needs (post-processing and lesion table).
        """
        missing = self.missingDependencies(includeTorch)
        if not missing:
            return True
        what = ", ".join(missing)
        if not allowInstall or not self.hasApplication():
            raise DependencyError(f"AnomalySeg needs these Python packages: {what}. Install them in Slicer "
                                  "(open the AnomalySeg module and accept the installation, or run the batch "
                                  "script with --install-dependencies).")
        if askUser:
            if not self.canShowDialogs():
                raise DependencyError(f"AnomalySeg needs these Python packages: {what}; cannot ask for permission "
                                      "without a main window (use --install-dependencies in batch mode).")
            if not slicer.util.confirmOkCancelDisplay(
                    _("AnomalySeg needs these Python packages, which will be downloaded and installed now "
                      "(this can take several minutes and needs an internet connection):\n\n{what}").format(what=what),
                    _("AnomalySeg: install dependencies")):
                return False
        torchMissing = [line for line in missing if line.startswith("torch")]
        others = [line for line in missing if not line.startswith("torch")]
        if torchMissing:
            try:
                import PyTorchUtils
            except ImportError:
                logging.warning("AnomalySeg: the PyTorch extension is not installed; installing torch with pip")
                self._pipInstall(torchMissing[0])
            else:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                     torchVersionRequirement=">=2.1")
                if torch is None:
                    raise DependencyError("PyTorch could not be installed (see the PyTorch Utils module)")
        if others:
            self._pipInstall(" ".join(others))
        stillMissing = self.missingDependencies(includeTorch)
        if stillMissing:
            raise DependencyError(f"installation did not provide: {', '.join(stillMissing)}")
        return True

    @staticmethod
    def _pipInstall(requirements: str) -> None:
        """pip-install without a second confirmation (the user already agreed, or passed a flag)."""
        install = slicer.util.pip_install
        kwargs = {}
        try:  # Slicer >= 5.12: slicer.packaging asks again unless interactive=False
            import inspect

            from slicer import packaging

            if "interactive" in inspect.signature(packaging.pip_install).parameters:
                install, kwargs = packaging.pip_install, {"interactive": False}
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
        install(requirements, **kwargs)

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
        """Registry entries: user models, then bundled ones (inspected once, in the worker)."""
        return self.registry.list_models(inspect_bundled=True)

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
        from AnomalySegLib.volume_io import volume_stem

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
                progressCallback=None, finishedCallback=None, batchSize=16):
        """Segment anomalies in ``inputVolume`` with a model (file path or registry name).

        Exports the volume to a temporary NIfTI file, runs the worker (torch), loads the
        anomaly map onto exactly the input's voxel grid, thresholds it at the healthy
        ``percentile`` (model default if None) and fills "<input> anomalies".
        Blocking by default (returns an AnomalySegResult); with
        ``waitForCompletion=False`` returns the WorkerProcess and calls
        ``finishedCallback(result, error)`` later (Slicer application only).
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("input volume is missing or empty")
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
                   "percentile": percentile, "device": device, "batch_size": int(batchSize)}
        return self._runWorker(
            request,
            onResult=lambda result: self.loadSegmentResult(inputVolume, result),
            waitForCompletion=waitForCompletion,
            progressCallback=progressCallback,
            finishedCallback=finishedCallback,
            cleanup=lambda: shutil.rmtree(workDir, ignore_errors=True),
        )

    def loadSegmentResult(self, inputVolume, result: dict) -> AnomalySegResult:
        """Turn a worker ``segment`` result into the two output nodes (the MRML half of process)."""
        heatmap, heatmapIjkToRas = self.readVolumeArray(result["heatmap"])
        inputIjkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputIjkToRas)
        # The worker computed the map on the exported input grid; a different grid means a mix-up.
        if not np.allclose(heatmapIjkToRas, slicer.util.arrayFromVTKMatrix(inputIjkToRas), atol=1e-3):
            raise anomalyErrors.AnomalySegError("the anomaly map file is not on the input volume's voxel grid")
        mapNode = self.createAnomalyMapNode(inputVolume, heatmap, result["calibration"],
                                            modelVersion=result.get("model_version", ""),
                                            modelPath=result.get("model", ""))
        segmentationNode = self.createSegmentationNode(inputVolume, mapNode)
        threshold = self.rethreshold(mapNode, segmentationNode, float(result["percentile"]))
        self.showResults(inputVolume, mapNode)
        return AnomalySegResult(mapNode=mapNode, segmentationNode=segmentationNode, threshold=threshold,
                                percentile=float(result["percentile"]), modelVersion=result.get("model_version", ""),
                                lesions=self.lesionTable(segmentationNode), report=result.get("report", {}))

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

    def createAnomalyMapNode(self, inputVolume, heatmapKJI, calibration: dict, modelVersion="", modelPath=""):
        """"<input> anomaly map": the heat map on exactly the input's grid, heat colours, calibration stored."""
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
        from AnomalySegLib.segmentation_file import ANOMALY_COLOR, ANOMALY_SEGMENT_NAME, ANOMALY_TERMINOLOGY

        segNode = self._outputNode("vtkMRMLSegmentationNode", inputVolume,
                                   inputVolume.GetName() + self.SEGMENTATION_SUFFIX, "anomalies")
        if segNode.GetDisplayNode() is None:
            segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segNode.SetNodeReferenceID(self.MAP_REFERENCE_ROLE, mapNode.GetID())
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
        self.placeBesideInput(segNode, inputVolume)
        return segNode

    def thresholdMap(self, mapNode, percentile: float):
        """(threshold, mask) for the map at a healthy percentile, from the stored calibration table.

        The mask (Slicer (K, J, I) order, uint8) is ``score > threshold`` inside the brain;
        the map is exactly 0 outside the brain, so non-zero marks brain voxels.
        """
        text = mapNode.GetAttribute(self.ATTR_CALIBRATION)
        if not text:
            raise anomalyErrors.AnomalySegError(f"{mapNode.GetName()} has no AnomalySeg calibration table")
        heatmap = slicer.util.arrayFromVolume(mapNode)
        threshold, mask = Calibration.from_dict(json.loads(text)).flag(heatmap, heatmap != 0, float(percentile))
        return threshold, mask.astype(np.uint8)

    def rethreshold(self, mapNode, segmentationNode, percentile: float) -> float:
        """Re-threshold the stored map at ``percentile`` into the segmentation (numpy only, no network)."""
        threshold, mask = self.thresholdMap(mapNode, percentile)
        self.setSegmentMask(segmentationNode, mask, mapNode)
        segmentationNode.SetAttribute(self.ATTR_MODEL_VERSION, mapNode.GetAttribute(self.ATTR_MODEL_VERSION) or "")
        segmentationNode.SetAttribute(self.ATTR_THRESHOLD, repr(float(threshold)))
        segmentationNode.SetAttribute(self.ATTR_PERCENTILE, repr(float(percentile)))
        return threshold

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
        """Connected components (26-neighbourhood), largest first: label, voxels, volume (mL), centre (RAS).

        ``source`` is a segmentation node (its segments on the reference grid) or a
        (K, J, I) mask array with ``referenceVolume``. Volumes use the voxel size of the
        reference volume; the maximum anomaly score is added when the map is known.
        """
        from AnomalySegLib.lesions import find_lesions

        if isinstance(source, np.ndarray):
            if referenceVolume is None:
                raise ValueError("referenceVolume is required with a mask array")
            maskKJI = source
        else:
            if referenceVolume is None:
                referenceVolume = source.GetNodeReference(self.INPUT_REFERENCE_ROLE)
            maskKJI = self.segmentationMask(source, referenceVolume)
            if referenceVolume is None:
                referenceVolume = source.GetNodeReference(
                    vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
            if mapNode is None:
                mapNode = source.GetNodeReference(self.MAP_REFERENCE_ROLE)
        ijkToRas = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(ijkToRas)
        affine = slicer.util.arrayFromVTKMatrix(ijkToRas)
        heatmap = None
        if mapNode is not None and slicer.util.arrayFromVolume(mapNode).shape == maskKJI.shape:
            heatmap = slicer.util.arrayFromVolume(mapNode).transpose(2, 1, 0)
        lesions = find_lesions(np.asarray(maskKJI).transpose(2, 1, 0) != 0, affine, heatmap)
        return [{"label": lesion.label, "voxels": lesion.voxel_count, "volume_ml": lesion.volume_ml,
                 "centroid_ras": list(lesion.centroid_ras), "max_score": lesion.max_score} for lesion in lesions]

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
              finishedCallback=None):
        """Train (and calibrate on held-out healthy volumes) in the worker; register the model.

        ``config`` holds TrainConfig fields (method, epochs, image_size, batch_size, device...).
        The model goes to the model folder as ``modelName.pt`` unless ``outputPath`` is given.
        Returns the registry entry (blocking) or the WorkerProcess.
        """
        imageSize = int((config or {}).get("image_size", 224))
        if imageSize < 32 or imageSize % 32:
            raise ValueError(f"image size must be a multiple of 32 (got {imageSize})")
        output = pathlib.Path(outputPath) if outputPath else self.registry.model_path(modelName)
        if output.exists() and not overwrite:
            raise anomalyErrors.OutputError(f"{output} already exists; choose another model name")
        output.parent.mkdir(parents=True, exist_ok=True)
        workDir = tempfile.mkdtemp(prefix="AnomalySeg-train-")
        try:
            request = {"task": "train", "output": str(output), "config": dict(config or {}),
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
