"""Headless batch anomaly segmentation with 3D Slicer and the AnomalySeg module.

Usage (no window opens; the exit status tells whether every case succeeded)::

    Slicer --no-splash --no-main-window --python-script scripts/slicer_batch_segment.py \\
        --input DIR_OR_FILES... --output DIR [--model NAME_OR_PATH] [--percentile P] \\
        [--device auto|cpu|cuda] [--overwrite] [--install-dependencies]

For every volume found in ``--input`` (NIfTI, NRRD, MetaImage files and DICOM series
folders, scanned like the ``anomalyseg`` command line does) the module's logic runs the
model in its worker process, thresholds the map with the core's one post-processing
function and writes, in ``--output``, with the core's output writer (so the files and
the report fields are exactly those of ``anomalyseg segment``):

* ``NAME_heatmap.nii.gz``  the anomaly map on the input's voxel grid,
* ``NAME_mask.nii.gz``     the binary anomaly mask,
* ``NAME.seg.nrrd``        the segmentation (segment "Anomaly"),
* ``NAME_report.json``     threshold, percentile, model version and the lesion table.

``--model`` is a model name from the AnomalySeg model list or a model file; by default
the first calibrated model of the list is used. Existing outputs are never replaced
without ``--overwrite`` (checked before any work starts). Missing Python packages are
installed only with ``--install-dependencies`` (the batch script never asks).

``--self-test --output DIR`` checks the Slicer side without any model: an oblique
synthetic volume, its anomaly map and segmentation, a .seg.nrrd written and read back.

Exit status: 0 all cases done, 1 some case failed or any other error (one line on
standard error, never a traceback-and-hang), 2 usage error. Slicer is always left: an
uncaught exception in a ``--python-script`` would keep ``Slicer --no-main-window`` running.
"""

import argparse
import math
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _importModule():
    """The AnomalySeg scripted module (installed extension, else this source checkout).

    A checkout's ``AnomalySeg`` folder on sys.path imports as an empty namespace package:
    only a module that has the logic counts.
    """
    try:
        import AnomalySeg

        if hasattr(AnomalySeg, "AnomalySegLogic"):
            return AnomalySeg
    except ImportError:
        pass
    import importlib.util

    sys.path.insert(0, str(REPO_ROOT))  # AnomalySegLib of the checkout
    spec = importlib.util.spec_from_file_location("AnomalySeg", REPO_ROOT / "AnomalySeg" / "AnomalySeg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["AnomalySeg"] = module
    spec.loader.exec_module(module)
    return module


def _percentileType():
    """The core's ``--percentile`` type (AnomalySegLib.cli.args.percentile: the one percentile rule)."""
    try:
        import AnomalySegLib  # noqa: F401 - installed extension
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))  # AnomalySegLib of the checkout
    from AnomalySegLib.cli.args import percentile

    return percentile


def parseArguments(argv):
    """Command line of the batch script."""
    parser = argparse.ArgumentParser(
        prog="slicer_batch_segment.py",
        description="Segment brain anomalies in a batch of volumes with 3D Slicer (no main window).")
    parser.add_argument("--input", nargs="+", help="volume files and/or folders of volumes")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--model", help="model name (AnomalySeg model list) or model file; default: first calibrated")
    parser.add_argument("--percentile", type=_percentileType(),
                        help="healthy percentile used as threshold (default: the model's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the network runs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="install missing Python packages (PyTorch, nibabel, ...) without asking")
    parser.add_argument("--self-test", action="store_true", help="check the Slicer side without a model")
    args = parser.parse_args(argv)
    if not args.self_test and not args.input:
        parser.error("--input is required (or --self-test)")
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


def segmentCase(logic, path, stem, modelPath, args):
    """Segment one case (file or DICOM folder) and write its four outputs; returns the SegmentationResult."""
    from AnomalySegLib.pipeline.outputs import write_case_outputs

    volume, result, worker = logic.segmentFile(path, modelPath, percentile=args.percentile, device=args.device,
                                               progressCallback=ProgressPrinter(stem))
    write_case_outputs(args.output, stem, volume, result, overwrite=args.overwrite,
                       extra_report={"method": worker.get("method", ""), "model_file": str(modelPath),
                                     **{k: worker[k] for k in ("input_check", "brain_extraction", "bias_correction")
                                        if k in worker}})
    return result


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
    """Run the batch; returns the exit status (errors are printed, never raised)."""
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    try:
        module = _importModule()
        if logic is None:
            logic = module.AnomalySegLogic()
        # the post-processing needs nibabel & co. in this process; torch only in the worker
        logic.ensureDependencies(askUser=False, allowInstall=args.install_dependencies,
                                 includeTorch=not args.self_test)
        if args.self_test:
            return selfTest(logic, args.output)
        from AnomalySegLib.pipeline.outputs import check_outputs_writable
        from AnomalySegLib.io.volume_io import find_volumes, volume_stem

        cases = find_volumes(args.input)
        stems = [volume_stem(p) for p in cases]
        check_outputs_writable(args.output, stems, overwrite=args.overwrite)
        modelPath = chooseModel(logic, args.model)
    except Exception as e:  # noqa: BLE001 - any setup failure is one line and exit status 1
        _error(e)
        return 1
    print(f"AnomalySeg batch: {len(cases)} case(s), model {modelPath}", flush=True)
    failed = 0
    for path, stem in zip(cases, stems):
        start = time.monotonic()
        try:
            result = segmentCase(logic, path, stem, modelPath, args)
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch
            failed += 1
            print(f"{stem}: FAILED: {_oneLine(e)}", file=sys.stderr, flush=True)
            continue
        print(f"{stem}: {len(result.lesions)} lesion(s), {result.total_volume_ml:.2f} mL, "
              f"threshold {result.threshold:.4g} (p{result.percentile:g}), "
              f"{time.monotonic() - start:.1f} s", flush=True)
    print(f"AnomalySeg batch: {len(cases) - failed} done, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


def _oneLine(error):
    """The first line of an error; prefixed with its type unless the message is written for users."""
    text = (str(error).strip().splitlines() or [""])[0]
    userFacing = type(error).__name__ in ("DependencyError", "AnomalySegError", "InputError", "ModelFileError",
                                          "OutputError", "Cancelled")
    if userFacing and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _error(error):
    print(f"slicer_batch_segment: error: {_oneLine(error)}", file=sys.stderr, flush=True)


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


def run(argv=None):
    """``main`` that never raises: usage errors give 2, anything else 1 (one line on stderr)."""
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BaseException as e:  # noqa: BLE001 - Slicer must exit whatever happened (KeyboardInterrupt too)
        _error(e)
        return 1


if __name__ == "__main__":
    _exit(run())
