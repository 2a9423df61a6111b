#!/usr/bin/env python
"""Render the AnomalySeg Slicer module's result offscreen: the docs' and the extension's screenshot.

The module runs as a user would run it, through its own Logic against a real MRML scene
(the PyPI package ``slicer-core``): import a model, load a volume, "Segment anomalies"
(the real worker subprocess), then the three slice views are drawn by Slicer's own slice
pipeline (``vtkMRMLSliceLogic``: reslicing, colour tables, layer compositing; no window
and no display needed) exactly as the module sets them up -- the input as background,
the anomaly map as the semi-transparent heat-coloured foreground -- with the
"<input> anomalies" segmentation as an outline, each view centred on the largest lesion
(what double-clicking it in the lesion table does). A title line with the lesion count,
volume and operating point is added with matplotlib.

Without ``--model``/``--input`` a small synthetic case is made first
(:func:`AnomalySegLib.data.synthetic.make_cohort`: 8 healthy volumes and one tumour case) and a
tiny model is trained on it with ``anomalyseg train`` (the default method, 64 px, width 16,
8 epochs: about 6 minutes on 2 busy CPU cores), the sensitivity is set to healthy p99 (the
slider; the tiny model's calibrated operating point flags almost nothing) and the views
are centred on the tumour's true position. It is a picture of the module, not of the
method's quality: docs/BENCHMARKS.md has the numbers.

Usage::

    python scripts/render_slicer_screenshot.py                      # -> Resources/Screenshots/AnomalySeg.png
    python scripts/render_slicer_screenshot.py --model m.pt --input case.nii.gz -o shot.png

Needs slicer-core, matplotlib and the core's dependencies (torch for the worker).

Differences from the Slicer application, all in how the picture looks, none in what is
computed: slicer-core ships no colour-table files, so the module's heat colour table
falls back from "Inferno" to "Iron" (its own fallback list); Slicer draws segmentations
with a displayable manager, which needs a render window, so the segmentation is shown
through the label layer's outline mode (the segment exported to a labelmap, the segment's
own colour), which is how Slicer outlines label maps in slice views.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "Resources" / "Screenshots" / "AnomalySeg.png"
#: Slice views as in Slicer's conventional layout: name, orientation, colour of the view bar.
VIEWS = (("Red", "Axial", "#f34a33"), ("Yellow", "Sagittal", "#edd54c"), ("Green", "Coronal", "#6eb04b"))


def make_demo_case(work: Path, seed: int = 7, epochs: int = 8) -> Tuple[Path, Path, List[float]]:
    """A synthetic tumour case and a tiny model trained on 8 synthetic healthy volumes.

    Returns (model, case, centre of the tumour's true label in RAS mm).
    """
    import nibabel as nib

    from AnomalySegLib.data.synthetic import make_cohort

    manifest = make_cohort(work / "cohort", n_healthy=8, n_lesion=1, lesion_kinds=("tumour",), seed=seed)
    case = work / "cohort" / manifest["test"][0]
    model = work / "model.pt"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "AnomalySegLib", "train", str(work / "cohort" / "healthy"),
                        "-o", str(model), "--epochs", str(epochs), "--image-size", "64", "--width", "16",
                        "--device", "cpu", "--seed", str(seed), "--quiet"], check=True, cwd=REPO)
    label = nib.load(str(work / "cohort" / manifest["labels"][0]))
    ijk = np.argwhere(np.asarray(label.dataobj) > 0).mean(axis=0)
    return model, case, [float(c) for c in label.affine[:3, :3] @ ijk + label.affine[:3, 3]]


class OffscreenScene:
    """An MRML scene with the module logics Slicer creates, the AnomalySeg Logic and three slice logics."""

    def __init__(self, model_dir: Path) -> None:
        import slicer

        sys.path.insert(0, str(REPO / "AnomalySeg"))
        import AnomalySeg

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        # keep references: a module logic removes what it added when it is destroyed
        self._module_logics = []
        for cls in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSegmentationsModuleLogic,
                    slicer.vtkSlicerSubjectHierarchyModuleLogic):
            logic = cls()
            logic.SetMRMLScene(self.scene)
            self._module_logics.append(logic)
        self.app_logic = slicer.vtkMRMLApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.slice_logics: Dict[str, object] = {}
        for name, orientation, _colour in VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            node = logic.AddSliceNode(name)
            node.SetOrientation(orientation)
            self.slice_logics[name] = logic
        self.logic = AnomalySeg.AnomalySegLogic(scene=self.scene, modelDir=model_dir,
                                                pythonExecutable=sys.executable, bundledModelDirs=[])

    def segment(self, model: Path, case: Path, percentile: Optional[float]):
        """Import the model, load the case and segment it through the module's Logic (the real worker)."""
        entry = self.logic.importModel(model, replace=True)
        volume = self.logic.loadVolume(case)
        result = self.logic.process(volume, entry.name, percentile=percentile, device="cpu")
        self.logic.showResults(volume, result.mapNode)
        return volume, result

    def outline_segmentation(self, segmentation_node, volume) -> None:
        """Show the segmentation as a label-layer outline in every view (its segment's colour)."""
        import vtk

        slicer = self.slicer
        label = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", volume.GetName() + " anomalies outline")
        ids = vtk.vtkStringArray()
        segmentation_node.GetSegmentation().GetSegmentIDs(ids)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, label, volume)
        if not ok:
            raise RuntimeError("could not export the segmentation to a label map")
        for logic in self.slice_logics.values():
            logic.GetSliceCompositeNode().SetLabelVolumeID(label.GetID())
            logic.GetSliceCompositeNode().SetLabelOpacity(1.0)
            logic.GetSliceNode().SetUseLabelOutline(True)

    def render(self, centre_ras: Sequence[float], size: int) -> List[np.ndarray]:
        """RGB images (size x size, uint8) of the three views, fitted to the volume and centred on ``centre_ras``."""
        from vtk.util.numpy_support import vtk_to_numpy

        images = []
        for name, _orientation, _colour in VIEWS:
            logic = self.slice_logics[name]
            node = logic.GetSliceNode()
            node.SetDimensions(size, size, 1)
            logic.FitSliceToAll()
            node.JumpSliceByCentering(*[float(c) for c in centre_ras])
            connection = logic.GetImageDataConnection()
            connection.GetProducer().Update()
            image = connection.GetProducer().GetOutputDataObject(0)
            dims = image.GetDimensions()
            pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
            images.append(np.ascontiguousarray(pixels[::-1, :, :3]))  # VTK rows run bottom-up
        return images


def compose(images: Sequence[np.ndarray], title: str, output: Path, dpi: int = 100) -> None:
    """The three views side by side with Slicer-coloured view bars and a title; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = images[0].shape[0]
    fig, axes = plt.subplots(1, len(images), figsize=(len(images) * size / dpi, size / dpi + 0.55), dpi=dpi,
                             facecolor="black")
    for ax, image, (name, orientation, colour) in zip(axes, images, VIEWS):
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{name} ({orientation})", color="black", fontsize=9, backgroundcolor=colour, pad=3)
    fig.suptitle(title, color="white", fontsize=10, y=0.995)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=(size / dpi + 0.1) / (size / dpi + 0.55),
                        wspace=0.02)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi, facecolor="black")
    plt.close(fig)


def render_screenshot(model: Path, case: Path, output: Path, work: Path, percentile: Optional[float] = None,
                      size: int = 320, centre: Optional[Sequence[float]] = None) -> dict:
    """Segment ``case`` with ``model`` through the module and write the screenshot; returns a summary.

    The views are centred on ``centre`` (RAS mm), else on the largest lesion found.
    """
    shot = OffscreenScene(work / "models")
    volume, result = shot.segment(model, case, percentile)
    shot.outline_segmentation(result.segmentationNode, volume)
    lesions = sorted(result.lesions, key=lambda row: -row["voxels"])
    if centre is not None:
        centre = [float(c) for c in centre]
    elif lesions:
        centre = lesions[0]["centroid_ras"]
    else:  # nothing above threshold: the centre of the volume
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    images = shot.render(centre, size)
    total = sum(row["volume_ml"] for row in result.lesions)
    title = (f"AnomalySeg: \"{volume.GetName()} anomaly map\" over the input, \"{volume.GetName()} anomalies\" "
             f"outlined - {len(result.lesions)} lesion(s), {total:.1f} mL at healthy p{result.percentile:g}")
    compose(images, title, output)
    return {"output": str(output), "lesions": len(result.lesions), "volume_ml": total,
            "percentile": result.percentile, "threshold": result.threshold, "centre_ras": list(centre)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file (default: train a tiny one on synthetic data)")
    parser.add_argument("--input", type=Path, help="volume to segment (default: a synthetic tumour case)")
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=Path, help="keep the synthetic data and model here (default: temporary)")
    parser.add_argument("--percentile", type=float, default=None,
                        help="sensitivity (healthy percentile); default: the model's operating point, or 99 for "
                             "the synthetic case (the tiny model's calibrated point flags almost nothing)")
    parser.add_argument("--centre", type=float, nargs=3, metavar=("R", "A", "S"),
                        help="centre of the views in RAS mm (default: the largest lesion; the synthetic "
                             "case: its tumour)")
    parser.add_argument("--size", type=int, default=320, help="pixels per slice view")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the tiny model")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.input is None):
        parser.error("give both --model and --input, or neither")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="anomalyseg-screenshot-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        percentile, centre = args.percentile, args.centre
        if args.model is None:
            model, case, tumour = make_demo_case(work, epochs=args.epochs)
            percentile = 99.0 if percentile is None else percentile
            centre = tumour if centre is None else centre
        else:
            model, case = args.model, args.input
        summary = render_screenshot(model, case, args.output, work, percentile, args.size, centre)
    print(f"wrote {summary['output']}: {summary['lesions']} lesion(s), {summary['volume_ml']:.1f} mL "
          f"at healthy p{summary['percentile']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
