"""`anomalyseg demo`: the whole pipeline offline, on synthetic data, in a few minutes on a CPU.

1. builds a small healthy cohort and lesion test cases from the MNI152 template shipped in
   nilearn's wheel (random deformation, contrast, bias field, noise; lesions inserted
   before the noise);
2. trains the default method (the coarse-noise denoising auto-encoder, ``dae``) with the
   CPU ``fast`` profile of ``anomalyseg train`` on the healthy volumes, and calibrates it
   (threshold and minimum lesion size, the operating point) on held-out healthy volumes only;
3. segments the test cases with exactly the code path of ``anomalyseg segment``;
4. scores them against the known lesion masks, next to the plain intensity-threshold
   baseline given the same post-processing and operating-point rule, and writes a PNG overlay.

The demo cohort is small (16 healthy volumes of 40 slices), so the numbers show the
software works end to end; docs/BENCHMARKS.md has the measured quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import OutputError
from ..pipeline.profiles import DEFAULT_METHOD, PROFILES
from ..progress import ProgressCallback

#: Small enough for a 2-core CPU in a few minutes; the network settings are the CPU
#: profile of `anomalyseg train` (profiles.PROFILES["fast"]) with the default method.
DEMO_SETTINGS = {
    "n_healthy": 16,
    "n_lesion": 3,
    "lesion_kinds": ("tumour", "bright", "small"),
    "n_lesion_free_test": 1,
    "resolution_mm": 2.0,
    "n_slices": 40,
    "method": DEFAULT_METHOD,
    "profile": "fast",
    **PROFILES["fast"],
}


def _save_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, label: np.ndarray,
                  affine: np.ndarray, title: str) -> None:
    """Three axial slices through the largest lesion: image, anomaly map, contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))

    def ras(a: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(a, to_ras)

    image, heatmap, mask, label = (ras(a) for a in (image, heatmap, mask, label))
    z_profile = label.sum(axis=(0, 1)) if label.any() else mask.sum(axis=(0, 1))
    centre = int(np.argmax(z_profile)) if z_profile.any() else image.shape[2] // 2
    slices = sorted({max(0, centre - 4), centre, min(image.shape[2] - 1, centre + 4)})
    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    vmax = float(np.percentile(heatmap[heatmap > 0], 99.5)) if (heatmap > 0).any() else 1.0
    for row, k in enumerate(slices):
        # radiological display: rows anterior->posterior, patient right on the left
        img = np.rot90(image[:, :, k])
        axes[row][0].imshow(img, cmap="gray")
        axes[row][0].set_title(f"input, slice {k}")
        axes[row][1].imshow(img, cmap="gray")
        axes[row][1].imshow(np.ma.masked_equal(np.rot90(heatmap[:, :, k]), 0), cmap="inferno", alpha=0.7,
                            vmin=0, vmax=vmax)
        axes[row][1].set_title("anomaly map")
        axes[row][2].imshow(img, cmap="gray")
        if label[:, :, k].any():
            axes[row][2].contour(np.rot90(label[:, :, k]), levels=[0.5], colors="lime", linewidths=1.2)
        if mask[:, :, k].any():
            axes[row][2].contour(np.rot90(mask[:, :, k]), levels=[0.5], colors="red", linewidths=1.2)
        axes[row][2].set_title("truth (green) vs AnomalySeg (red)")
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_demo(
    output_dir: "str | Path" = "anomalyseg-demo",
    *,
    epochs: Optional[int] = None,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
    settings: Optional[dict] = None,
    echo=print,
) -> dict:
    """Run the offline demo into ``output_dir`` and return its summary (also ``summary.json``)."""
    from ..pipeline.baselines import IntensityBaseline
    from ..evaluation.harness import evaluate_model
    from ..evaluation.report import summary_row
    from ..pipeline.inference import segment_volume
    from ..pipeline.outputs import write_case_outputs
    from ..data.synthetic import make_cohort
    from ..pipeline.training import TrainConfig, train_model
    from ..io.volume_io import read_volume, volume_stem

    cfg = {**DEMO_SETTINGS, **(settings or {})}
    if epochs is not None:
        cfg["epochs"] = epochs
    out = Path(output_dir)
    if not str(output_dir).strip():
        raise OutputError("the output folder name is empty")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} is not empty (use --overwrite, or choose another --output-dir)")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    echo(f"[1/4] building a synthetic cohort from the MNI152 template in {out / 'data'}")
    manifest = make_cohort(out / "data", n_healthy=cfg["n_healthy"], n_lesion=cfg["n_lesion"],
                           lesion_kinds=cfg["lesion_kinds"], n_lesion_free_test=cfg["n_lesion_free_test"],
                           seed=seed, resolution_mm=cfg["resolution_mm"], n_slices=cfg["n_slices"])
    data = out / "data"
    healthy = [data / p for p in manifest["healthy"]]
    tests = [data / p for p in manifest["test"]]
    labels = [data / p for p in manifest["labels"]]

    method = cfg["method"]
    echo(f"[2/4] training {method} on {len(healthy)} healthy volumes (profile {cfg['profile']}: {cfg['epochs']} "
         f"epochs, {cfg['image_size']} px slices) and calibrating on held-out healthy volumes")
    config = TrainConfig(method=method, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                         learning_rate=cfg["learning_rate"], image_size=cfg["image_size"],
                         base_width=cfg["base_width"], seed=seed, device=device, profile=cfg["profile"])
    model_path = out / "demo_model.pt"
    model = train_model(healthy, config, output=model_path, progress=progress)

    echo(f"[3/4] segmenting {len(tests)} test volumes into {out / 'segmentations'}")
    seg_dir = out / "segmentations"
    first_lesion = None
    for image_path, label_path in zip(tests, labels):
        volume = read_volume(image_path)
        result = segment_volume(model, volume, device=device)
        write_case_outputs(seg_dir, volume_stem(image_path), volume, result, overwrite=True,
                           extra_report={"method": method, "model_file": str(model_path)})
        label = read_volume(label_path).data > 0
        if first_lesion is None and label.any():
            first_lesion = (image_path, volume, result, label)

    echo("[4/4] evaluating against the known lesion masks (thresholds from healthy scans only)")
    learned = evaluate_model(model, tests, labels, device=device, output_dir=out / "evaluation" / method,
                             overwrite=True, n_overlays=1)
    # the baseline gets the model's per-scan standardisation, smoothing, bias flattening (its
    # statistics from the training volumes), minimum lesion size and operating-point rule,
    # calibrated on the same held-out healthy volumes as the model
    cal_names = set(model.training.get("calibration_names") or []) | set(
        model.training.get("calibration_training_names") or [])  # the model's calibration volumes, all of them
    cal_volumes = [p for p in healthy if p.name in cal_names] or healthy[: max(1, len(healthy) // 4)]
    baseline = IntensityBaseline.like_model(model).fit(
        cal_volumes, reference=[p for p in healthy if p not in cal_volumes] or None)
    intensity = evaluate_model(baseline, tests, labels, output_dir=out / "evaluation" / "intensity",
                               overwrite=True, n_overlays=1)

    overlay = out / "overlay.png"
    if first_lesion is not None:
        path, volume, result, label = first_lesion
        _save_overlay(overlay, volume.data, result.heatmap, result.mask, label.astype(np.uint8), volume.affine,
                      f"{volume_stem(path)}: {method}, threshold = healthy p{result.percentile:g}")

    summary = {
        "output_dir": str(out),
        "model": str(model_path),
        "model_version": model.version,
        "seconds": round(time.time() - started, 1),
        "method": method,
        "model_row": summary_row(learned),
        "intensity_baseline": summary_row(intensity),
        "overlay": str(overlay) if first_lesion is not None else None,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    echo("")
    rows = ((f"{method} (default)", summary["model_row"], model.default_percentile),
            ("intensity threshold", summary["intensity_baseline"], baseline.default_percentile))
    echo(f"{'method':<22}{'AUPRC':>8}{'AUROC':>8}{'Dice':>8}{'at healthy':>12}{'oracle Dice':>13}")
    for name, row, pct in rows:
        echo(f"{name:<22}{fmt(row['AUPRC']):>8}{fmt(row['AUROC']):>8}{fmt(row['Dice (calibrated)']):>8}"
             f"{'p' + format(pct, 'g'):>12}{fmt(row['[Dice] ORACLE']):>13}")
    echo("(Dice at each method's healthy operating point, same post-processing for both; oracle Dice uses "
         "the lesion masks to pick the threshold of the map alone, without the minimum lesion volume, "
         "so post-processing can beat it: a reference, not a result)")
    echo(f"outputs: {seg_dir}  overlay: {summary['overlay']}  model: {model_path}  ({summary['seconds']} s)")
    return summary
