"""Evaluation reports: ``results.json``, ``results.md`` and ``pr_curve.png``; comparison tables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from ..errors import OutputError
from ..io.atomic import replacing
from .figures import plot_pr_curves
from .metrics import finite_or_none, format_value

PathLike = Union[str, "os.PathLike[str]"]


def _report_targets(output_dir: Path) -> list[Path]:
    return [output_dir / "results.json", output_dir / "results.md", output_dir / "pr_curve.png"]


def check_report_writable(output_dir: PathLike, overwrite: bool = False) -> None:
    """Raise OutputError if a report exists in ``output_dir`` (unless ``overwrite``) or it is not writable."""
    output_dir = Path(output_dir)
    if not overwrite:
        existing = [p.name for p in _report_targets(output_dir) if p.exists()]
        if existing:
            raise OutputError(f"{output_dir / existing[0]} exists (use --overwrite to replace it)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {output_dir}: {exc.strerror or exc}") from None
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"output folder {output_dir} is not writable")


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluation, for comparison tables."""
    pooled = results.get("pooled", {})
    return {
        "method": results.get("method"),
        "AUPRC": pooled.get("auprc"),
        "AUROC": pooled.get("auroc"),
        "Dice (calibrated)": pooled.get("dice_calibrated"),
        "Dice per volume (calibrated)": results.get("per_volume", {}).get("dice_calibrated"),
        "[Dice] ORACLE": pooled.get("oracle_best_dice"),
        "Detection rate": results.get("detection", {}).get("detection_rate"),
        "FP fraction lesion-free": results.get("lesion_free", {}).get("fp_fraction_pooled"),
        "percentile": results.get("percentile"),
    }


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown summary of one :func:`evaluate_model` result."""
    p = results["pooled"]
    pv = results["per_volume"]
    lf = results["lesion_free"]
    det = results["detection"]
    lines = [
        f"# Evaluation: {results['method']}",
        "",
        f"Model: `{results['model_version']}`; lesion volumes: {results['n_volumes']['lesion']}, "
        f"lesion-free volumes: {results['n_volumes']['lesion_free']}; healthy percentile "
        f"{results['percentile']:g} -> threshold {format_value(results['threshold'], 4)}"
        + ("" if results["calibrated"] else " (model not calibrated: calibrated metrics unavailable)"),
        "",
        "## Dataset level (brain voxels pooled)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUPRC | {format_value(p.get('auprc'))} |",
        f"| AUROC | {format_value(p.get('auroc'))} |",
        f"| Dice at healthy-calibrated threshold | {format_value(p.get('dice_calibrated'))} |",
        f"| IoU at healthy-calibrated threshold | {format_value(p.get('iou_calibrated'))} |",
        f"| Precision / recall at calibrated threshold | {format_value(p.get('precision_calibrated'))} / {format_value(p.get('recall_calibrated'))} |",
        f"| [Dice] ORACLE best over thresholds (uses test labels) | {format_value(p.get('oracle_best_dice'))} |",
        f"| ORACLE threshold (healthy percentile) | {format_value(p.get('oracle_threshold'), 4)} ({format_value(p.get('oracle_threshold_healthy_percentile'), 2)}) |",
        "",
        "## Per volume (mean ± std over lesion volumes)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUPRC | {format_value(pv['auprc'])} |",
        f"| AUROC | {format_value(pv['auroc'])} |",
        f"| Dice at calibrated threshold | {format_value(pv['dice_calibrated'])} |",
        f"| Dice at ORACLE dataset threshold | {format_value(pv['oracle_dice_at_pooled_threshold'])} |",
        f"| ORACLE best Dice per volume | {format_value(pv['oracle_best_dice'])} |",
        "",
        "## Lesions and lesion-free volumes (calibrated threshold)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Lesions detected | {format_value(det.get('n_detected'))} / {det.get('n_lesions')} "
        f"(rate {format_value(det.get('detection_rate'))}; detected = "
        + (f">= {det.get('overlap_fraction'):.0%} of the lesion predicted" if det.get("overlap_fraction") else ">= 1 voxel predicted")
        + ") |",
        f"| False-positive components per lesion volume | {format_value(det.get('false_positive_components_per_volume'))} |",
        f"| False-positive fraction on lesion-free volumes (pooled) | {format_value(lf.get('fp_fraction_pooled'), 4)} "
        f"(expected {format_value(lf.get('expected_fp_fraction'), 4)}, {lf['n_volumes']} volumes) |",
        "",
        "## Volumes",
        "",
        "| volume | kind | AUPRC | AUROC | Dice (cal.) | ORACLE best Dice | lesions detected | FP fraction | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["volumes"]:
        detected = f"{r['n_detected']}/{r['n_lesions']}" if r.get("n_detected") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['kind']} | {format_value(r.get('auprc'))} | {format_value(r.get('auroc'))} | "
            f"{format_value(r.get('dice_calibrated'))} | {format_value(r.get('oracle_best_dice'))} | {detected} | "
            f"{format_value(r.get('fp_fraction'), 4)} | {format_value(r.get('seconds'), 2)} |")
    lines += ["", "Notes:"] + [f"- {note}" for note in results.get("notes", [])]
    lines += ["", "![precision-recall curve](pr_curve.png)", ""]  # written next to it by write_report
    lines += [f"![{f}]({f})" for f in results.get("figures", {}).get("overlays", [])]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], output_dir: PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``pr_curve.png`` into ``output_dir``.

    Each file is written to a temporary name and renamed, so no half-written report is left.
    """
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    paths = dict(zip(("json", "markdown", "pr_curve"), _report_targets(out)))
    results = finite_or_none(results)
    with replacing(paths["json"], paths["markdown"], paths["pr_curve"]) as (tmp_json, tmp_md, tmp_png):
        tmp_json.write_text(json.dumps(results, indent=2) + "\n")
        tmp_md.write_text(results_markdown(results))
        plot_pr_curves([(results["method"], results)], tmp_png)
    return paths
