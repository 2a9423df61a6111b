"""Figures of an evaluation: example slices with overlays and precision-recall curves (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .metrics import format_value

PathLike = Union[str, "os.PathLike[str]"]


def canonical_ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient ``arr`` so axes point R, A, S (no resampling) for display."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.apply_orientation(arr, ornt)


def example_slice(volume: Any, heatmap: np.ndarray, pred: Optional[np.ndarray], truth: np.ndarray,
                  k: Optional[int] = None) -> dict:
    """One axial slice (RAS-canonical arrays, ``[x, y]``) for figures: by default the one with
    the largest lesion area. Keys: image, heatmap, truth, pred (or None), slice, aspect."""
    affine = np.asarray(volume.affine)
    img = canonical_ras(np.asarray(volume.data, dtype=np.float32), affine)
    hm = canonical_ras(np.asarray(heatmap, dtype=np.float32), affine)
    gt = canonical_ras(truth.astype(np.uint8), affine)
    pr = canonical_ras(pred.astype(np.uint8), affine) if pred is not None else None
    if k is None:
        k = int(np.argmax(gt.reshape(-1, gt.shape[2]).sum(axis=0)))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt_axes = np.asarray(_ornt_axes(affine))
    spacing = zooms[ornt_axes]
    return {
        "image": img[:, :, k], "heatmap": hm[:, :, k], "truth": gt[:, :, k],
        "pred": None if pr is None else pr[:, :, k], "slice": k, "aspect": float(spacing[1] / spacing[0]),
    }


def _ornt_axes(affine: np.ndarray) -> list[int]:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    # Output axis j takes input axis i where ornt[i, 0] == j.
    return [int(np.flatnonzero(ornt[:, 0] == j)[0]) for j in range(3)]


def save_overlay(path: Path, name: str, sl: dict, threshold: Optional[float]) -> None:
    """PNG of an :func:`example_slice`: image, anomaly score, truth (green) vs prediction (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    extent_kw = {"origin": "lower", "aspect": sl["aspect"]}
    axes[0].imshow(sl["image"].T, cmap="gray", **extent_kw)
    axes[0].set_title(f"{name} (axial {sl['slice']})", fontsize=9)
    hm_img = axes[1].imshow(sl["heatmap"].T, cmap="inferno", **extent_kw)
    axes[1].set_title("anomaly score", fontsize=9)
    fig.colorbar(hm_img, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(sl["image"].T, cmap="gray", **extent_kw)
    axes[2].contour(sl["truth"].T, levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
    if sl["pred"] is not None and sl["pred"].any():
        axes[2].contour(sl["pred"].T, levels=[0.5], colors="red", linewidths=1.0, origin="lower")
    title = "truth (green) vs predicted (red)" if sl["pred"] is not None else "truth (green); not calibrated"
    if threshold is not None:
        title += f"\nthreshold {threshold:.4g}"
    axes[2].set_title(title, fontsize=9)
    for ax in axes:
        ax.invert_xaxis()  # radiological view like Slicer: the patient's right on the left
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(curves: Sequence[tuple[str, dict[str, Any]]], path: PathLike, title: str = "Precision-recall (brain voxels)") -> None:
    """Plot the ``pr_curve`` of several results (``(label, results)`` pairs) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for label, res in curves:
        pr = res.get("pr_curve") or {}
        if pr.get("recall"):
            ap = res.get("pooled", {}).get("auprc")
            ax.step(pr["recall"], pr["precision"], where="pre",
                    label=f"{label} (AUPRC {format_value(ap)})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
