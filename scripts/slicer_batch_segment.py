"""Headless batch anomaly segmentation with 3D Slicer and the AnomalySeg module.

Usage (no window opens; the exit status tells whether every case succeeded)::

    Slicer --no-splash --no-main-window --python-script scripts/slicer_batch_segment.py \\
        --input DIR_OR_FILES... --output DIR [--model NAME_OR_PATH] [--percentile P] \\
        [--device auto|cpu|cuda] [--overwrite] [--install-dependencies]

For every volume found in ``--input`` (NIfTI, NRRD, MetaImage files and DICOM folders,
scanned like the ``anomalyseg`` command line does) the Slicer logic loads the volume,
runs the model in its worker process and writes, in ``--output``:

* ``NAME.seg.nrrd``        the "NAME anomalies" segmentation (Slicer's own writer),
* ``NAME_heatmap.nii.gz``  the anomaly map on the input's voxel grid,
* ``NAME_mask.nii.gz``     the binary anomaly mask,
* ``NAME_report.json``     threshold, percentile, model version and the lesion table.

``--model`` is a model name from the AnomalySeg model list or a model file; by default
the first calibrated model of the list is used. Existing outputs are never replaced
without ``--overwrite`` (checked before any work starts). Missing Python packages are
installed only with ``--install-dependencies`` (the batch script never asks).

``--self-test --output DIR`` checks the Slicer side without any model: an oblique
synthetic volume, its anomaly map and segmentation, a .seg.nrrd written and read back.

Exit status: 0 all cases done, 1 some case failed, 2 usage error.
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _importModule():
    """The AnomalySeg scripted module (installed extension, else this source checkout)."""
    try:
        import AnomalySeg
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "AnomalySeg"))
        sys.path.insert(0, str(REPO_ROOT))
        import AnomalySeg
    return AnomalySeg


def parseArguments(argv):
    """Command line of the batch script."""
    parser = argparse.ArgumentParser(
        prog="slicer_batch_segment.py",
        description="Segment brain anomalies in a batch of volumes with 3D Slicer (no main window).")
    parser.add_argument("--input", nargs="+", help="volume files and/or folders of volumes")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--model", help="model name (AnomalySeg model list) or model file; default: first calibrated")
    parser.add_argument("--percentile", type=float, help="healthy percentile used as threshold (default: the model's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the network runs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="install missing Python packages (PyTorch, nibabel, ...) without asking")
    parser.add_argument("--self-test", action="store_true", help="check the Slicer side without a model")
    args = parser.parse_args(argv)
    if not args.self_test and not args.input:
        parser.error("--input is required (or --self-test)")
    if args.percentile is not None and not 0.0 < args.percentile < 100.0:
        parser.error("--percentile must be between 0 and 100")
    return args


def chooseModel(logic, requested):
    """Model path from a name/path, or the first calibrated model of the list."""
    if requested:
        return logic.resolveModelPath(requested)
    for entry in logic.listModels():
        if entry.calibrated:
            return str(entry.path)
    raise RuntimeError(f"no calibrated model in {logic.registry.folder}: give --model NAME_OR_PATH")


class ProgressPrinter:
    """One log line per stage and per 10 %, for readable batch logs."""

    def __init__(self, name):
        self.name = name
        self.last = None

    def __call__(self, message):
        stage = message.get("stage", "")
        bucket = int(10 * float(message.get("fraction", 0.0)))
        if (stage, bucket) != self.last:
            self.last = (stage, bucket)
            print(f"  {self.name}: {stage} {10 * bucket:3d}%", flush=True)


def removeNodes(scene, nodes):
    """Remove nodes with their display and storage nodes (keeps memory flat over many cases)."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        extra = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
            extra.append(node.GetStorageNode())
        for other in extra:
            if other is not None and other.GetScene() is not None:
                scene.RemoveNode(other)
        scene.RemoveNode(node)


def saveMask(logic, segmentationNode, inputVolume, path):
    """Write the segmentation as a binary labelmap (uint8) on the input grid."""
    import slicer
    import vtk

    mask = logic.segmentationMask(segmentationNode, inputVolume)
    labelmap = logic.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AnomalySegMask__")
    try:
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        labelmap.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(labelmap, mask)
        logic.exportVolume(labelmap, path)
    finally:
        removeNodes(logic.scene, [labelmap])


def segmentCase(logic, path, outputPaths, modelPath, args):
    """Load, segment and write one case; returns its report."""
    from AnomalySegLib.volume_io import volume_stem

    name = volume_stem(path)
    inputVolume = logic.loadVolume(str(path), name=name)
    nodes = [inputVolume]
    try:
        result = logic.process(inputVolume, modelPath, percentile=args.percentile, device=args.device,
                               waitForCompletion=True, progressCallback=ProgressPrinter(name))
        nodes += [result.mapNode, result.segmentationNode]
        report = {
            "input": str(path),
            "model": modelPath,
            "model_version": result.modelVersion,
            "percentile": result.percentile,
            "threshold": result.threshold,
            "lesion_count": len(result.lesions),
            "total_volume_ml": float(sum(row["volume_ml"] for row in result.lesions)),
            "lesions": result.lesions,
            "outputs": {kind: p.name for kind, p in outputPaths.items()},
            "created_with": "3D Slicer AnomalySeg module (slicer_batch_segment.py)",
        }
        token = f".tmp-{os.getpid()}-"
        temps = {kind: p.with_name(token + p.name) for kind, p in outputPaths.items()}
        try:
            logic.saveSegmentation(result.segmentationNode, temps["segmentation"])
            logic.saveVolume(result.mapNode, temps["heatmap"])
            saveMask(logic, result.segmentationNode, inputVolume, temps["mask"])
            temps["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            for kind, target in outputPaths.items():
                os.replace(temps[kind], target)
        finally:
            for temp in temps.values():
                if temp.exists():
                    temp.unlink()
        return report
    finally:
        removeNodes(logic.scene, nodes)


def selfTest(logic, outputDir):
    """Oblique volume -> anomaly map -> segmentation -> .seg.nrrd -> read back; 0 if all checks pass."""
    import numpy as np
    import slicer
    import vtk

    outputDir = pathlib.Path(outputDir)
    outputDir.mkdir(parents=True, exist_ok=True)
    angle = math.radians(25.0)
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = np.array([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                                 [-math.sin(angle), 0.0, math.cos(angle)]]) @ np.diag([1.2, 0.8, 2.5])
    ijkToRas[:3, 3] = [12.0, -30.0, 7.0]
    inputVolume = logic.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "selftest")
    inputVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
    slicer.util.updateVolumeFromArray(inputVolume, np.arange(9 * 16 * 14, dtype=np.float32).reshape(9, 16, 14))
    heatmap = np.zeros((9, 16, 14), np.float32)
    heatmap[2:7, 3:13, 2:12] = 0.01
    heatmap[3:5, 4:8, 5:9] = 1.0
    percentiles = np.linspace(0.0, 100.0, 1001)
    calibration = {"percentiles": percentiles.tolist(), "values": (percentiles / 100.0).tolist(),
                   "n_pixels": 1, "n_images": 1, "n_volumes": 1, "source": "self-test"}
    mapNode = logic.createAnomalyMapNode(inputVolume, heatmap, calibration, modelVersion="self-test")
    segNode = logic.createSegmentationNode(inputVolume, mapNode)
    logic.rethreshold(mapNode, segNode, 98.0)
    path = outputDir / "selftest.seg.nrrd"
    logic.saveSegmentation(segNode, path)
    loaded = logic.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    failures = []
    if not storage.ReadData(loaded):
        failures.append("cannot read the .seg.nrrd back")
    else:
        expected = (heatmap > 0.98).astype(np.uint8)
        if not np.array_equal(logic.segmentationMask(loaded, inputVolume), expected):
            failures.append("segmentation read back differs from the thresholded map")
    matrix = vtk.vtkMatrix4x4()
    mapNode.GetIJKToRASMatrix(matrix)
    if not np.array_equal(slicer.util.arrayFromVTKMatrix(matrix), ijkToRas):
        failures.append("anomaly map geometry differs from the input")
    rows = logic.lesionTable(segNode)
    if [row["voxels"] for row in rows] != [2 * 4 * 4]:
        failures.append(f"unexpected lesion table {rows}")
    for failure in failures:
        print(f"self-test FAILED: {failure}", flush=True)
    if not failures:
        print(f"self-test passed ({path})", flush=True)
    return 0 if not failures else 1


def main(argv=None, logic=None):
    """Run the batch; returns the exit status."""
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    module = _importModule()
    from AnomalySegLib.errors import AnomalySegError

    if logic is None:
        logic = module.AnomalySegLogic()
    if args.self_test:
        return selfTest(logic, args.output)
    try:
        logic.ensureDependencies(askUser=False, allowInstall=args.install_dependencies)
        from AnomalySegLib.outputs import case_output_paths, check_outputs_writable
        from AnomalySegLib.volume_io import find_volumes, volume_stem

        cases = find_volumes(args.input)
        stems = [volume_stem(p) for p in cases]
        check_outputs_writable(args.output, stems, overwrite=args.overwrite)
        pathlib.Path(args.output).mkdir(parents=True, exist_ok=True)
        modelPath = chooseModel(logic, args.model)
    except (AnomalySegError, RuntimeError, OSError) as e:
        print(f"slicer_batch_segment: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"AnomalySeg batch: {len(cases)} case(s), model {modelPath}", flush=True)
    failed = 0
    for path, stem in zip(cases, stems):
        start = time.monotonic()
        try:
            report = segmentCase(logic, path, case_output_paths(args.output, stem), modelPath, args)
        except Exception as e:  # one bad case must not stop the batch
            failed += 1
            print(f"{stem}: FAILED: {e}", file=sys.stderr, flush=True)
            continue
        print(f"{stem}: {report['lesion_count']} lesion(s), {report['total_volume_ml']:.2f} mL, "
              f"threshold {report['threshold']:.4g} (p{report['percentile']:g}), "
              f"{time.monotonic() - start:.1f} s", flush=True)
    print(f"AnomalySeg batch: {len(cases) - failed} done, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


def _exit(status):
    """Leave Slicer with ``status`` (plain sys.exit outside Slicer)."""
    try:
        import slicer

        if hasattr(slicer, "app"):
            slicer.util.exit(status)
            return
    except ImportError:
        pass
    sys.exit(status)


if __name__ == "__main__":
    try:
        _status = main()
    except SystemExit as _e:  # argparse usage errors
        _status = _e.code if isinstance(_e.code, int) else 2
    _exit(_status)
