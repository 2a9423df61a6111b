"""The Slicer module's Logic against real MRML (PyPI ``slicer-core``, no desktop application).

What slicer-core provides (and what these tests rely on): ``slicer.vtkMRMLScene`` and the
MRML node classes, storage nodes (ITK NIfTI/NRRD readers and writers, the .seg.nrrd
writer), ``vtkSlicerSegmentationsModuleLogic`` (static labelmap import/export; creating
one with the scene registers the conversion rules), ``vtkSlicerColorLogic`` (built-in
colour tables), the subject hierarchy node and ``slicer.util`` array helpers. It has no
``slicer.app``, no ``slicer.mrmlScene``, no Qt and no ``slicer.modules``: the Widget,
``waitForCompletion=False`` (Qt timer) and dialogs are not testable here; the subject
hierarchy plugins that create items for new nodes are absent (the Logic creates the items
it needs, as the application would have).
"""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402 - after the skip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "AnomalySeg"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_tiny_model from test_worker, any import mode
import AnomalySeg  # noqa: E402

from AnomalySegLib.errors import ModelFileError  # noqa: E402
from AnomalySegLib.io.segmentation_file import ANOMALY_COLOR, ANOMALY_SEGMENT_NAME, ANOMALY_TERMINOLOGY  # noqa: E402


class Mrml:
    """A scene with the module logics the application would have created."""

    def __init__(self, model_dir):
        self.scene = slicer.vtkMRMLScene()
        # keep references: destroying a module logic removes what it added to the scene
        self.module_logics = []
        for cls in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSegmentationsModuleLogic,
                    slicer.vtkSlicerSubjectHierarchyModuleLogic):
            logic = cls()
            logic.SetMRMLScene(self.scene)
            self.module_logics.append(logic)
        self.logic = AnomalySeg.AnomalySegLogic(scene=self.scene, modelDir=model_dir, pythonExecutable=sys.executable,
                                                bundledModelDirs=[])


@pytest.fixture
def mrml(tmp_path):
    return Mrml(tmp_path / "models")


HEAD = dict(shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0), centre_ras=(1.5, -2.0, 3.0))


@pytest.fixture
def oblique_case(tmp_path, make_oblique_volume):
    """Oblique, anisotropic, axis-permuted synthetic head written as NIfTI with nibabel."""
    return make_oblique_volume(tmp_path, "case", seed=2, **HEAD)


def _matrix(node, getter="GetIJKToRASMatrix"):
    m = vtk.vtkMatrix4x4()
    getattr(node, getter)(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _table(percentiles=None, values=None):
    p = np.linspace(0.0, 100.0, 1001) if percentiles is None else np.asarray(percentiles, float)
    v = p / 100.0 if values is None else np.asarray(values, float)
    return {"percentiles": p.tolist(), "values": v.tolist(), "n_pixels": 1000, "n_images": 4, "n_volumes": 1,
            "source": "test"}


def to_grid(data_ijk, affine_src, affine_dst, shape_dst):
    """The voxels of ``data_ijk`` on another grid of the same physical lattice.

    Used where Slicer's reader re-orders the voxels of a file (it flips an axis of a
    left-handed grid): for every destination voxel centre, the source voxel at the same
    RAS position (which must be a voxel centre there too).
    """
    ijk_dst = np.indices(shape_dst).reshape(3, -1).T
    ras = ijk_dst @ affine_dst[:3, :3].T + affine_dst[:3, 3]
    ijk_src = (ras - affine_src[:3, 3]) @ np.linalg.inv(affine_src[:3, :3]).T
    rounded = np.rint(ijk_src)
    assert np.abs(ijk_src - rounded).max() < 1e-3, "grids are not the same physical lattice"
    return data_ijk[tuple(rounded.astype(int).T)].reshape(shape_dst)


def _node_grid(node):
    """(IJKToRAS, (I, J, K) shape) of a volume node."""
    return _matrix(node), slicer.util.arrayFromVolume(node).shape[::-1]


def _blobs(case):
    """Hand-made anomaly scores on the original NIfTI grid (I, J, K)."""
    heat = np.zeros(case.data.shape, np.float32)
    heat[case.head] = 0.01  # brain: small positive scores; exactly 0 outside
    heat[10:14, 8:13, 3:6] = 0.995  # blob A: 4*5*3 = 60 voxels
    heat[25:27, 20:22, 6:7] = 0.985  # blob B: 2*2*1 = 4 voxels
    heat[30, 5, 2] = 0.97  # blob C: 1 voxel
    return heat


def _hand_made_result(tmp_path, case, input_node, logic):
    """A worker 'segment' result whose heat map is written like the worker does.

    The Logic hands the worker the volume exported from Slicer; the worker writes the map
    on that volume's grid with volume_io. Returns (scores on the original NIfTI grid,
    scores on the Slicer node grid as (K, J, I), result dict).
    """
    from AnomalySegLib.io.volume_io import read_volume, write_nifti

    exported = tmp_path / "exported_input.nii"
    logic.exportVolume(input_node, exported)
    volume = read_volume(exported)
    heat = _blobs(case)
    heat_on_input_grid = to_grid(heat, case.affine, volume.affine, volume.shape)
    path = tmp_path / "heatmap.nii"
    write_nifti(path, heat_on_input_grid, volume)
    result = {"type": "result", "task": "segment", "heatmap": str(path), "model": "/models/m.pt",
              "percentile": 98.0, "threshold": 0.98, "calibration": _table(), "model_version": "0.1.0/amcons/abc",
              "report": {}}
    return heat, heat_on_input_grid.transpose(2, 1, 0), result


def test_load_oblique_nifti_keeps_geometry(mrml, oblique_case):
    node = mrml.logic.loadVolume(oblique_case.path)
    assert node.GetName() == "case"
    affine, shape = _node_grid(node)
    # the synthetic grid is left-handed: Slicer's reader flips an axis to make it right-handed,
    # so voxel order may differ; every voxel centre and value is the same in physical space
    assert np.linalg.det(oblique_case.affine[:3, :3]) < 0 < np.linalg.det(affine[:3, :3])
    np.testing.assert_allclose(np.abs(np.linalg.det(affine[:3, :3])), abs(np.linalg.det(oblique_case.affine[:3, :3])),
                               rtol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node),
                                  to_grid(oblique_case.data, oblique_case.affine, affine, shape).transpose(2, 1, 0))


def test_postprocessing_geometry_attributes_hierarchy_and_seg_nrrd(mrml, oblique_case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    logic, scene = mrml.logic, mrml.scene
    input_node = logic.loadVolume(oblique_case.path)
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 1")
    sh.SetItemParent(sh.GetItemByDataNode(input_node), folder)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view

    heat, heat_kji, result = _hand_made_result(tmp_path, oblique_case, input_node, logic)
    out = logic.loadSegmentResult(input_node, result)
    map_node, seg_node = out.mapNode, out.segmentationNode

    # anomaly map: exactly the input grid, values of the worker's file, heat colours, in front
    assert map_node.GetName() == "case anomaly map" and seg_node.GetName() == "case anomalies"
    assert np.array_equal(_matrix(map_node), _matrix(input_node))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(map_node), heat_kji)
    assert map_node.GetDisplayNode().GetColorNodeID() in AnomalySeg.AnomalySegLogic.HEAT_COLOR_NODE_IDS
    assert composite.GetBackgroundVolumeID() == input_node.GetID()
    assert composite.GetForegroundVolumeID() == map_node.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(AnomalySeg.AnomalySegLogic.FOREGROUND_OPACITY)

    # both outputs beside the input in the subject hierarchy
    for node in (map_node, seg_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder

    # segmentation: one segment, fixed colour, terminology, reference geometry = input, attributes
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(AnomalySeg.AnomalySegLogic.SEGMENT_ID)
    assert segment.GetName() == ANOMALY_SEGMENT_NAME
    assert segment.GetColor() == pytest.approx(ANOMALY_COLOR)
    assert segment.GetTerminology() == ANOMALY_TERMINOLOGY
    assert seg_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) \
        is input_node
    assert float(seg_node.GetAttribute("AnomalySeg.Threshold")) == pytest.approx(0.98)
    assert float(seg_node.GetAttribute("AnomalySeg.Percentile")) == 98.0
    assert seg_node.GetAttribute("AnomalySeg.ModelVersion") == "0.1.0/amcons/abc"
    assert json.loads(map_node.GetAttribute("AnomalySeg.Calibration"))["values"] == _table()["values"]

    # mask = score above the p98 threshold (0.98): blobs A and B, not C
    expected = (heat > 0.98).astype(np.uint8)  # on the original NIfTI grid
    assert expected.sum() == 64
    np.testing.assert_array_equal(logic.segmentationMask(seg_node), (heat_kji > 0.98).astype(np.uint8))

    # .seg.nrrd written by Slicer's writer, read back with slicerio, compared in physical space
    seg_path = tmp_path / "case.seg.nrrd"
    logic.saveSegmentation(seg_node, seg_path)
    seg = slicerio.read_segmentation(str(seg_path))
    (info,) = seg["segments"]
    assert info["name"] == ANOMALY_SEGMENT_NAME and info["color"] == pytest.approx(ANOMALY_COLOR)
    assert info["terminology"]["type"][1] == ANOMALY_TERMINOLOGY.split("~")[2].split("^")[1]
    ijk_seg = np.argwhere(seg["voxels"] == info["labelValue"])
    ijk_to_ras_seg = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"], float)
    ras_seg = ijk_seg @ ijk_to_ras_seg[:3, :3].T + ijk_to_ras_seg[:3, 3]
    ijk_ref = np.argwhere(expected)
    ras_ref = ijk_ref @ oblique_case.affine[:3, :3].T + oblique_case.affine[:3, 3]  # nibabel geometry of the input
    assert len(ras_seg) == len(ras_ref) == 64

    def lexsorted(points):
        return points[np.lexsort(np.round(points, 2).T[::-1])]

    np.testing.assert_allclose(lexsorted(ras_seg), lexsorted(ras_ref), atol=1e-3)

    # lesion table: 26-connected components, largest first, volumes from the voxel size
    voxel_ml = abs(np.linalg.det(oblique_case.affine[:3, :3])) / 1000.0
    rows = logic.lesionTable(seg_node)
    assert [r["voxels"] for r in rows] == [60, 4]
    assert [r["volume_ml"] for r in rows] == pytest.approx([60 * voxel_ml, 4 * voxel_ml], rel=1e-5)
    centre_a = oblique_case.affine @ np.array([11.5, 10.0, 4.0, 1.0])
    np.testing.assert_allclose(rows[0]["centroid_ras"], centre_a[:3], atol=1e-3)
    assert rows[0]["max_score"] == pytest.approx(0.995)
    assert out.lesions == rows and out.threshold == pytest.approx(0.98)


def test_rethreshold_uses_stored_table_only(mrml, oblique_case, tmp_path):
    logic = mrml.logic
    input_node = logic.loadVolume(oblique_case.path)
    _, heat_kji, result = _hand_made_result(tmp_path, oblique_case, input_node, logic)
    out = logic.loadSegmentResult(input_node, result)
    Path(result["heatmap"]).unlink()  # no file, no worker: only the map node and its table
    counts = {}
    for percentile in (96.0, 98.0, 99.0, 99.9):
        threshold = logic.rethreshold(out.mapNode, out.segmentationNode, percentile)
        assert threshold == pytest.approx(percentile / 100.0)
        mask = logic.segmentationMask(out.segmentationNode)
        np.testing.assert_array_equal(mask, heat_kji > threshold)
        counts[percentile] = int(mask.sum())
        assert float(out.segmentationNode.GetAttribute("AnomalySeg.Percentile")) == percentile
    assert counts == {96.0: 65, 98.0: 64, 99.0: 60, 99.9: 0}
    assert logic.lesionTable(out.segmentationNode) == []

    # a non-linear table: threshold interpolated in it (p = 50 -> 0.2, p = 75 -> 0.6)
    out.mapNode.SetAttribute("AnomalySeg.Calibration",
                             json.dumps(_table([0.0, 50.0, 100.0], [0.0, 0.2, 1.0])))
    assert logic.rethreshold(out.mapNode, out.segmentationNode, 75.0) == pytest.approx(0.6)


def test_rerun_reuses_output_nodes(mrml, oblique_case, tmp_path):
    logic, scene = mrml.logic, mrml.scene
    input_node = logic.loadVolume(oblique_case.path)
    _, _, result = _hand_made_result(tmp_path, oblique_case, input_node, logic)
    first = logic.loadSegmentResult(input_node, result)
    second = logic.loadSegmentResult(input_node, result)
    assert first.mapNode is second.mapNode and first.segmentationNode is second.segmentationNode
    assert logic.findOutputs(input_node) == (first.mapNode, first.segmentationNode)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # temporary export nodes removed
    # a second input gets its own outputs
    other = logic.loadVolume(oblique_case.path, name="other")
    assert logic.findOutputs(other) == (None, None)
    third = logic.loadSegmentResult(other, result)
    assert third.mapNode is not first.mapNode and third.mapNode.GetName() == "other anomaly map"


def test_grid_mismatch_and_missing_calibration_are_refused(mrml, oblique_case):
    logic = mrml.logic
    input_node = logic.loadVolume(oblique_case.path)
    with pytest.raises(Exception, match="grid"):
        logic.createAnomalyMapNode(input_node, np.zeros((3, 4, 5), np.float32), _table())
    plain = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain")
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    with pytest.raises(Exception, match="calibration"):
        logic.rethreshold(plain, seg, 98.0)


def test_lesion_table_from_mask_array(mrml, oblique_case):
    from AnomalySegLib.segmentation.lesions import find_lesions

    input_node = mrml.logic.loadVolume(oblique_case.path)
    affine, shape = _node_grid(input_node)
    mask = np.zeros(shape, np.uint8)  # (I, J, K) of the node grid
    mask[2:4, 2:4, 2:4] = 1
    mask[20, 20, 5] = 1
    mask[21, 21, 6] = 1  # diagonal neighbour: same 26-connected lesion
    rows = mrml.logic.lesionTable(mask.transpose(2, 1, 0), referenceVolume=input_node)
    expected = find_lesions(mask, affine)
    assert [r["voxels"] for r in rows] == [8, 2] == [lesion.voxel_count for lesion in expected]
    np.testing.assert_allclose(rows[1]["centroid_ras"], expected[1].centroid_ras)


def test_headless_rules(mrml, monkeypatch, tmp_path):
    logic = mrml.logic
    assert not logic.hasApplication() and not logic.canShowDialogs()
    assert logic.missingDependencies() == []  # this environment has everything
    assert logic.ensureDependencies(askUser=True) is True
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnibabel>=1.0\nsurely-not-installed-package-xyz>=1.0\n")
    monkeypatch.setattr(AnomalySeg, "REQUIREMENTS_FILE", requirements)
    assert logic.missingDependencies() == ["surely-not-installed-package-xyz>=1.0"]
    monkeypatch.setattr(AnomalySeg.AnomalySegLogic, "torchInstalled", staticmethod(lambda: False))
    assert logic.missingDependencies(includeTorch=False) == ["surely-not-installed-package-xyz>=1.0"]
    assert logic.missingDependencies() == ["torch>=2.1", "surely-not-installed-package-xyz>=1.0"]
    with pytest.raises(AnomalySeg.DependencyError, match="surely-not-installed.*pip"):
        logic.ensureDependencies(askUser=True)  # no dialog, no installation without the application
    with pytest.raises(RuntimeError, match="Qt"):
        logic.process(logic.loadVolume(_write_tiny_nifti(tmp_path)), _write_dummy_file(tmp_path),
                      waitForCompletion=False)
    assert not logic.isRunning
    with pytest.raises(ModelFileError):
        logic.resolveModelPath("no-such-model")


def _write_tiny_nifti(tmp_path):
    import nibabel as nib

    path = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), str(path))
    return path


def _write_dummy_file(tmp_path):
    path = tmp_path / "dummy.pt"
    path.write_bytes(b"x")
    return str(path)


def test_loss_plot_and_progress_text():
    points, low, high = AnomalySeg.lossPlotPoints([4.0, 2.0, 1.0, 1.0], 106, 56, margin=3)
    assert (low, high) == (1.0, 4.0)
    assert points[0] == pytest.approx((3.0, 3.0)) and points[-1] == pytest.approx((103.0, 53.0))
    assert points[1] == pytest.approx((3.0 + 100.0 / 3, 3.0 + 50.0 * 2 / 3))
    many, _, _ = AnomalySeg.lossPlotPoints(list(np.arange(1000.0)), 500, 100, maxPoints=100)
    assert len(many) == 100
    assert AnomalySeg.lossPlotPoints([], 10, 10) == ([], 0.0, 0.0)
    text = AnomalySeg.formatProgress({"stage": "train", "fraction": 0.5, "epoch": 2, "epochs": 5,
                                      "losses": {"loss": 123.456}, "eta_s": 75})
    assert text == "Train \u2013 epoch 2/5 \u2013 loss 123.5 \u2013 ETA 01:15"
    assert AnomalySeg.formatSeconds(3725) == "1:02:05" and AnomalySeg.formatSeconds(None) == "--:--"


# ----------------------------------------------------------------------------- with the real worker and core


def test_process_end_to_end_matches_core(mrml, oblique_case, tmp_path, make_oblique_volume):
    """Import a model (validated in the worker), segment by model name, compare with the core."""
    from test_worker import make_tiny_model

    from AnomalySegLib.pipeline.inference import segment_volume
    from AnomalySegLib.model.bundle import load_model
    from AnomalySegLib.io.volume_io import read_volume

    healthy = make_oblique_volume(tmp_path, "healthy", seed=1, **HEAD)
    source = tmp_path / "src" / "tiny.pt"
    source.parent.mkdir()
    make_tiny_model(source, healthy.path)
    logic = mrml.logic
    entry = logic.importModel(source)
    assert entry.calibrated and entry.method == "amcons" and logic.listModels()[0].name == "tiny"

    input_node = logic.loadVolume(oblique_case.path)
    events = []
    out = logic.process(input_node, "tiny", percentile=97.0, device="cpu", progressCallback=events.append)
    assert not logic.isRunning and events and events[-1]["fraction"] == 1.0

    # the core on the original file; Slicer worked on its own (flipped) grid: compare in physical space
    expected = segment_volume(load_model(source), read_volume(oblique_case.path), percentile=97.0, device="cpu")
    affine, shape = _node_grid(input_node)
    expected_heat = to_grid(expected.heatmap, oblique_case.affine, affine, shape).transpose(2, 1, 0)
    expected_mask = to_grid(expected.mask, oblique_case.affine, affine, shape).transpose(2, 1, 0)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.mapNode), expected_heat, rtol=1e-4, atol=1e-5)
    assert out.threshold == pytest.approx(expected.threshold)
    assert expected.mask.sum() > 0
    np.testing.assert_array_equal(mrml.logic.segmentationMask(out.segmentationNode), expected_mask)
    assert [r["voxels"] for r in out.lesions] == [lesion.voxel_count for lesion in expected.lesions]
    assert out.segmentationNode.GetAttribute("AnomalySeg.ModelVersion") == load_model(source).version


def _load_batch_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slicer_batch_segment", REPO / "scripts" / "slicer_batch_segment.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    return batch


def test_batch_script_matches_the_cli(mrml, oblique_case, tmp_path, make_oblique_volume, capsys):
    """scripts/slicer_batch_segment.py writes what `anomalyseg segment` writes: same files, same report fields."""
    import nibabel as nib
    import SimpleITK as sitk
    from test_worker import make_tiny_model

    from AnomalySegLib.cli.commands import main as cli_main

    batch = _load_batch_script()
    assert batch.main(["--self-test", "--output", str(tmp_path / "selftest")], logic=mrml.logic) == 0
    assert (tmp_path / "selftest" / "selftest.seg.nrrd").is_file()

    healthy = make_oblique_volume(tmp_path, "healthy", seed=1, **HEAD)
    model = tmp_path / "tiny.pt"
    make_tiny_model(model, healthy.path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(oblique_case.path, inputs / "patient1.nii.gz")
    # a DICOM series folder (Slicer's file reader cannot load a folder: the core reader does)
    image = sitk.ReadImage(str(oblique_case.path))
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    _write_dicom_series(inputs / "patientB", image)
    out, cli_out = tmp_path / "out", tmp_path / "cli"
    args = ["--input", str(inputs), "--output", str(out), "--model", str(model), "--device", "cpu",
            "--percentile", "97"]
    volumes_before = mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert batch.main(args, logic=mrml.logic) == 0
    assert cli_main(["segment", str(inputs), "--model", str(model), "--output-dir", str(cli_out), "--device", "cpu",
                     "--percentile", "97", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in cli_out.iterdir()) == [
        "patient1.seg.nrrd", "patient1_heatmap.nii.gz", "patient1_mask.nii.gz", "patient1_report.json",
        "patientB.seg.nrrd", "patientB_heatmap.nii.gz", "patientB_mask.nii.gz", "patientB_report.json"]
    for stem in ("patient1", "patientB"):
        report = json.loads((out / f"{stem}_report.json").read_text())
        expected = json.loads((cli_out / f"{stem}_report.json").read_text())
        assert set(report) == set(expected)  # one report schema
        for key in ("percentile", "threshold", "min_component_ml", "lesion_count", "total_volume_ml", "lesions",
                    "model_version", "method", "voxel_volume_ml", "outputs"):
            assert report[key] == expected[key], key
        assert report["lesion_count"] == len(report["lesions"]) and report["percentile"] == 97.0
        mask, cli_mask = nib.load(str(out / f"{stem}_mask.nii.gz")), nib.load(str(cli_out / f"{stem}_mask.nii.gz"))
        np.testing.assert_allclose(mask.affine, cli_mask.affine, atol=1e-5)  # the input's own grid
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(cli_mask.dataobj))
    assert json.loads((out / "patient1_report.json").read_text())["lesion_count"] > 0
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before
    # existing outputs: refused before any work, files untouched, one clear line
    before = (out / "patient1_report.json").read_text()
    capsys.readouterr()
    assert batch.main(args, logic=mrml.logic) == 1
    assert (out / "patient1_report.json").read_text() == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slicer_batch_segment: error:") and "already exists" in err[0]


def _write_dicom_series(folder, image):
    """Write a 3D SimpleITK image as a DICOM series (one file per slice, geometry in each)."""
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    series = "1.2.826.0.1.3680043.2.1125.1.77"
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series}.{k + 1}",
                "0020|000d": series + ".0", "0020|000e": series, "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1])),
                "0018|0050": f"{image.GetSpacing()[2]:.6f}",
                "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_batch_script_exits_at_once_with_one_line_on_any_error(tmp_path):
    """Run as Slicer would (a script, its own process): any error ends it fast with status 1 and one line."""
    import subprocess
    import time

    script = str(REPO / "scripts" / "slicer_batch_segment.py")
    cases = [
        (["--input", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path / "o"), "--model", "x.pt"], 1,
         "no such file"),
        (["--output", str(tmp_path / "o")], 2, "--input is required"),
    ]
    for argv, status, text in cases:
        start = time.monotonic()
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == status, done.stderr
        assert text in done.stderr and "Traceback" not in done.stderr
        assert time.monotonic() - start < 60


def test_batch_script_turns_any_exception_into_status_1(monkeypatch, capsys):
    batch = _load_batch_script()

    def boom(argv):
        raise KeyError("unexpected")

    monkeypatch.setattr(batch, "main", boom)
    assert batch.run(["--self-test", "--output", "x"]) == 1
    assert capsys.readouterr().err.strip() == "slicer_batch_segment: error: KeyError: 'unexpected'"


def test_train_registers_a_calibrated_model(mrml, tmp_path, make_oblique_volume):
    """Training panel path: worker 'train' task, per-step losses, model saved, calibrated and listed."""
    from AnomalySegLib.errors import OutputError
    from AnomalySegLib.model.bundle import load_model

    folder = tmp_path / "healthy"
    folder.mkdir()
    for seed in (1, 2, 3):
        make_oblique_volume(folder, f"healthy{seed}", seed=seed, **HEAD)
    # what the panel sends: a profile, the values the user changed, and the other settings
    overrides = {"method": "amcons", "epochs": 1, "batch_size": 8, "image_size": 32, "base_width": 4}
    config = {"latent_dim": 8, "device": "cpu", "amp": False, "calibration_fraction": 0.34}
    events = []
    entry = mrml.logic.train(healthyFolder=folder, modelName="mini model", config=config, profile="paper",
                             overrides=overrides, progressCallback=events.append)
    (announced,) = [e["settings"] for e in events if "settings" in e]
    assert announced == {"profile": "paper", "method": "amcons", "epochs": 1, "image_size": 32, "base_width": 4,
                         "batch_size": 8, "learning_rate": 1e-4, "device_type": "cpu",
                         "overrides": ["base_width", "batch_size", "epochs", "image_size", "method"]}
    training = [e for e in events if e["stage"] == "train"]
    assert training and all(math.isfinite(e["losses"]["loss"]) for e in training)
    assert [e["step"] for e in training] == list(range(1, len(training) + 1)) and training[-1]["epoch"] == 1
    assert entry.path == mrml.logic.registry.folder / "mini_model.pt"
    assert (entry.method, entry.calibrated, entry.source) == ("amcons", True, "user")
    model = load_model(entry.path)
    assert model.calibration is not None and model.calibration.n_volumes == 1  # one held-out healthy volume
    assert (model.training["train_volumes"], model.training["calibration_volumes"]) == (2, 1)
    assert model.training["config"]["profile"] == "paper"  # explicit profile, kept even on a CPU
    assert [e.name for e in mrml.logic.listModels()] == ["mini_model"]
    with pytest.raises(OutputError):  # never replaces a model silently
        mrml.logic.train(healthyFolder=folder, modelName="mini model", config=config, overrides=overrides)
    with pytest.raises(ValueError, match="unknown training profile"):
        mrml.logic.train(healthyFolder=folder, modelName="other", profile="huge")


def test_module_test_case_runs_against_slicer_core(mrml, tmp_path, monkeypatch):
    """AnomalySegTest (written for real Slicer) run with the few application services it uses emulated.

    Emulated: ``slicer.mrmlScene``, ``slicer.app.temporaryPath``, ``slicer.util.loadSegmentation``
    and the subject hierarchy plugin that gives every new data node an item.
    """
    from types import SimpleNamespace

    scene = mrml.scene

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def on_node_added(caller, event, node):
        if isinstance(node, (slicer.vtkMRMLVolumeNode, slicer.vtkMRMLSegmentationNode)):
            sh = scene.GetSubjectHierarchyNode()
            if not sh.GetItemByDataNode(node):
                sh.CreateItem(sh.GetSceneItemID(), node)

    tag = scene.AddObserver(scene.NodeAddedEvent, on_node_added)

    def load_segmentation(path):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        return node

    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    monkeypatch.setattr(slicer.util, "loadSegmentation", load_segmentation)
    monkeypatch.setenv("ANOMALYSEG_MODEL_DIR", str(tmp_path / "models"))
    try:
        case = AnomalySeg.AnomalySegTest()
        case.setUp = lambda: None  # Clear() would also drop the colour tables the fixture set up
        case.runTest()
    finally:
        scene.RemoveObserver(tag)
    assert (tmp_path / "AnomalySegTest.seg.nrrd").is_file()


def test_extracted_brain_becomes_a_brain_segment_and_the_check_is_shown(mrml, oblique_case, tmp_path):
    """A worker result with ``extracted_brain`` gives "<input> brain" (segment "Brain") on the
    input's grid and the input check line; a later run without extraction removes it."""
    from AnomalySegLib.io.volume_io import read_volume, write_nifti

    logic = mrml.logic
    input_node = logic.loadVolume(oblique_case.path)
    _, _, result = _hand_made_result(tmp_path, oblique_case, input_node, logic)
    exported = read_volume(tmp_path / "exported_input.nii")
    brain = to_grid(oblique_case.head.astype(np.uint8), oblique_case.affine, exported.affine, exported.shape)
    brain_path = tmp_path / "brain.nii"
    write_nifti(brain_path, brain, exported, dtype=np.uint8)
    record = {"input_check": {"has_skull": True, "reason": "skull present"},
              "brain_extraction": {"setting": "auto", "ran": True, "brain_volume_ml": 1234.4},
              "bias_correction": {"ran": False}}
    out = logic.loadSegmentResult(input_node, {**result, **record, "extracted_brain": str(brain_path)})
    node = out.brainSegmentationNode
    assert node is not None and node.GetName() == "case brain"
    segment = node.GetSegmentation().GetSegment(logic.BRAIN_SEGMENT_ID)
    assert segment is not None and segment.GetName() == "Brain"
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(logic.BRAIN_SEGMENT_ID, labelmap)
    assert labelmap.GetPointData().GetScalars() is not None
    # the anomaly segmentation still holds only the anomaly segment
    assert out.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1
    line = AnomalySeg.formatInputCheck(out.inputCheck)
    assert "skull present" in line and "brain extracted" in line and "1234 mL" in line
    again = logic.loadSegmentResult(input_node, {**result, "input_check": {"has_skull": False},
                                                 "brain_extraction": {"setting": "auto", "ran": False}})
    assert again.brainSegmentationNode is None and mrml.scene.GetNodeByID(node.GetID()) is None
    assert AnomalySeg.formatInputCheck(again.inputCheck) == "Input check: skull-stripped; no brain extraction."
    assert AnomalySeg.formatInputCheck({}) == ""
