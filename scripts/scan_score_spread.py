#!/usr/bin/env python
"""How much does a healthy scan's score tail move from scan to scan, raw and standardised?

Scores the healthy calibration split (the seeded 80/20 split of ``DATA/healthy``, as in
``run_benchmark.py``) and ``DATA/lesion_free`` of each benchmark folder with the given model
(with its stored settings, but the per-scan standardisation switched off), then prints,
per folder and pooled, the coefficient of variation across scans of the top percentile
(default p99.95) of each scan's brain-voxel map: raw, minus the scan's median, and
divided by each candidate spread (MAD, p75 - median, p90 - median, p90 - p10, std). A small
coefficient means one healthy threshold fits every scan (``MethodParams.scan_normalise``).

Example::

    python scripts/scan_score_spread.py --pair eval30000 g30000/model.pt --pair eval9000 g9000/model.pt
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_benchmark as bench  # noqa: E402  (the benchmark's data index)

from AnomalySegLib.io.volume_io import read_volume  # noqa: E402
from AnomalySegLib.model.bundle import load_model  # noqa: E402
from AnomalySegLib.pipeline.inference import score_volume  # noqa: E402
from AnomalySegLib.pipeline.training import split_volumes  # noqa: E402

SPREADS = ("raw", "minus median", "MAD", "p75-median", "p90-median", "p90-p10", "std")


def scan_statistics(model, files: Sequence[Path], top: float) -> list:
    """Per scan: (top percentile, p10, p25, p50, p75, p90, MAD, std) of its brain-voxel map."""
    rows = []
    for path in files:
        scores = score_volume(model, read_volume(path), device="cpu")
        h = scores.heatmap[scores.brain_mask].astype(np.float64)
        q = np.percentile(h, [top, 10, 25, 50, 75, 90])
        rows.append((*q, float(np.median(np.abs(h - q[3]))), float(h.std())))
        print(f"  {path.name}: p{top:g} {q[0]:.2f}  median {q[3]:.2f}  p90-p10 {q[5] - q[1]:.2f}", flush=True)
    return rows


def spread_cv(rows: list) -> dict:
    """Coefficient of variation across scans of the tail under each standardisation."""
    a = np.array(rows)
    tail, p10, p25, med, p75, p90, mad, std = a.T
    centred = tail - med
    values = {"raw": tail, "minus median": centred, "MAD": centred / mad, "p75-median": centred / (p75 - med),
              "p90-median": centred / (p90 - med), "p90-p10": centred / (p90 - p10), "std": centred / std}
    return {k: float(v.std() / abs(v.mean())) for k, v in values.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("DATA", "MODEL"),
                   help="a benchmark folder (make_benchmark_data.py) and a model trained on its healthy split")
    p.add_argument("--top", type=float, default=99.95, help="tail percentile compared across scans")
    p.add_argument("--calibration-fraction", type=float, default=0.2)
    args = p.parse_args(argv)
    pooled = []
    lines = ["| data | scans | " + " | ".join(SPREADS) + " |", "|---" * (len(SPREADS) + 2) + "|"]
    for data, model_path in args.pair:
        model = copy.copy(load_model(model_path))
        model.method = dataclasses.replace(model.method, scan_normalise="off")
        index = bench.load_benchmark_data(Path(data))
        _, cal = split_volumes(len(index["healthy"]), args.calibration_fraction, 0)
        files = [index["healthy"][i] for i in cal] + list(index["lesion_free"])
        print(f"{data}: {len(files)} healthy scans", flush=True)
        rows = scan_statistics(model, files, args.top)
        pooled += rows
        cv = spread_cv(rows)
        lines.append(f"| {data} | {len(rows)} | " + " | ".join(f"{cv[k]:.3f}" for k in SPREADS) + " |")
    cv = spread_cv(pooled)
    lines.append(f"| all | {len(pooled)} | " + " | ".join(f"{cv[k]:.3f}" for k in SPREADS) + " |")
    print(f"\nCoefficient of variation across healthy scans of p{args.top:g} (lower = one threshold fits all):\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
