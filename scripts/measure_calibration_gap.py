#!/usr/bin/env python
"""False blobs per healthy scan at each high healthy percentile: on a model's own held-out
calibration scans (in-sample and leave-one-scan-out thresholds), on the benchmark's
lesion-free test scans and on fresh healthy scans of another seed.

Answers "do the calibration scans predict what new healthy scans will carry?" (the
false-blob budget is chosen on the first and promised for the others)::

    python scripts/make_benchmark_data.py -o data81000 --seed 81000        # fresh healthy scans
    python scripts/measure_calibration_gap.py MODEL.pt DATA data81000 -o gap.json

``DATA`` is the benchmark folder the model was trained on (its ``healthy/`` holds the
calibration scans named in the model, ``lesion_free/`` the test scans).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from AnomalySegLib.io.geometry import voxel_volume_ml
from AnomalySegLib.io.volume_io import read_volume
from AnomalySegLib.model.bundle import load_model
from AnomalySegLib.pipeline.training import position_stats_indices
from AnomalySegLib.segmentation.calibration import TABLE_PERCENTILES
from AnomalySegLib.segmentation.postprocess import count_components, min_component_voxels, threshold_mask


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path, help="benchmark folder the model was trained on")
    p.add_argument("fresh", type=Path, help="benchmark folder of another seed: its healthy/ scans are the fresh ones")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model = load_model(args.model)
    cal = model.calibration
    cal_names = set(model.training.get("calibration_names") or [])
    healthy = sorted((args.data / "healthy").glob("*.nii.gz"))
    training = [q for q in healthy if q.name not in cal_names]
    # the training volumes the position statistics were fitted on (fit_position_stats' choice)
    in_stats = set(position_stats_indices(len(training)))
    sets = {"calibration": [q for q in healthy if q.name in cal_names],
            "lesion_free": sorted(q for q in (args.data / "lesion_free").glob("*.nii.gz") if "_label" not in q.name),
            "fresh": sorted((args.fresh / "healthy").glob("*.nii.gz")),
            # scans the network was trained on: could they calibrate too? (in the statistics / not)
            "training_in_stats": [q for i, q in enumerate(training) if i in in_stats],
            "training_other": [q for i, q in enumerate(training) if i not in in_stats]}
    if not sets["calibration"]:
        p.error(f"none of the model's calibration scans is in {args.data / 'healthy'}")
    maps = {}
    for name, paths in sets.items():
        maps[name] = []
        for path in paths:
            volume = read_volume(path)
            s = model.score_volume(volume, device=args.device)
            n = min_component_voxels(cal.min_component_ml, voxel_volume_ml(volume.affine))
            maps[name].append((s.heatmap, s.brain_mask, n))
    scores = [h[b] for h, b, _ in maps["calibration"]]

    def thr(values, q):
        return float(np.percentile(np.concatenate(values), q))

    def count(item, t):
        h, b, n = item
        return count_components(threshold_mask(h, b, t), n)

    rows = []
    for q in [float(v) for v in TABLE_PERCENTILES if 99.9 <= v < 100]:
        t = thr(scores, q)
        row = {"percentile": q, "threshold": t,
               "calibration": [count(m, t) for m in maps["calibration"]],
               # each calibration scan against the threshold of the others: a new scan's view
               "calibration_loo": [count(m, thr(scores[:i] + scores[i + 1:], q))
                                   for i, m in enumerate(maps["calibration"])],
               "lesion_free": [count(m, t) for m in maps["lesion_free"]],
               "fresh": [count(m, t) for m in maps["fresh"]],
               "training_in_stats": [count(m, t) for m in maps["training_in_stats"]],
               "training_other": [count(m, t) for m in maps["training_other"]]}
        rows.append(row)
        print(f"p{q:<8g} threshold {t:.3f}  false blobs / scan: calibration {np.mean(row['calibration']):.2f} "
              f"(leave-one-out {np.mean(row['calibration_loo']):.2f}, {len(scores)} scans)  "
              f"lesion-free {np.mean(row['lesion_free']):.2f} ({len(maps['lesion_free'])})  "
              f"fresh {np.mean(row['fresh']):.2f} ({len(maps['fresh'])})  "
              f"training: in the statistics {np.mean(row['training_in_stats']):.2f} "
              f"({len(maps['training_in_stats'])}), other {np.mean(row['training_other']):.2f} "
              f"({len(maps['training_other'])})", flush=True)
    op = next((r for r in rows if r["percentile"] == cal.operating_percentile), None)
    if op is not None:
        upper = stats.chi2.ppf(0.9, 2 * (sum(op["fresh"]) + 1)) / (2 * len(op["fresh"]))
        print(f"operating point p{cal.operating_percentile:g}: fresh scans carry {np.mean(op['fresh']):.2f} "
              f"(90 % upper bound {upper:.2f}); per fresh scan: {op['fresh']}")
    args.output.write_text(json.dumps({"model": str(args.model), "operating_percentile": cal.operating_percentile,
                                       "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
