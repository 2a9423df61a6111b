#!/usr/bin/env python
"""Compare AMCons attention stages on synthetic data (the numbers quoted in docs/METHOD.md).

Trains small AMCons models (64-pixel slices, width 16) on a synthetic healthy cohort with
the map taken at the stem (stage 0) and at the first residual block (stage 1, the paper's
choice), then reports voxel AUROC / AUPRC on lesion cases of each kind next to the plain
intensity of the image. Example (about 10 min on 2 CPU cores)::

    python scripts/compare_attention_stages.py --epochs 30 --stages 0 1 --output stages.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n-healthy", type=int, default=16)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--cases-per-kind", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    from AnomalySegLib.evaluation import auroc, average_precision
    from AnomalySegLib.inference import score_volume
    from AnomalySegLib.synthetic import LESION_KINDS, load_template, synthesize_case
    from AnomalySegLib.training import TrainConfig, train_model
    from AnomalySegLib.volume_io import Volume

    template = load_template("mni152", 2.0)
    healthy = []
    for i in range(args.n_healthy):
        case = synthesize_case(template, args.seed * 1000 + i, contrast="flair", n_slices=args.slices)
        healthy.append(Volume(case.image, case.affine))
    tests = {kind: [synthesize_case(template, 10_000 + 100 * k + j, lesions=[kind], contrast="flair",
                                    n_slices=args.slices) for j in range(args.cases_per_kind)]
             for k, kind in enumerate(LESION_KINDS)}
    results = {"settings": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                     "torch": torch.__version__, "threads": torch.get_num_threads()},
               "intensity": {}, "stages": {}}
    for kind, cases in tests.items():
        results["intensity"][kind] = {
            "auroc": float(np.mean([auroc(c.image[c.brain], c.label[c.brain] > 0) for c in cases])),
            "auprc": float(np.mean([average_precision(c.image[c.brain], c.label[c.brain] > 0) for c in cases])),
        }
    for stage in args.stages:
        started = time.time()
        config = TrainConfig(epochs=args.epochs, batch_size=32, learning_rate=args.lr, image_size=64, base_width=16,
                             attention_stage=stage, seed=args.seed, device="cpu")
        model = train_model(healthy, config)
        row = {"train_seconds": round(time.time() - started, 1)}
        for kind, cases in tests.items():
            aurocs, aps = [], []
            for c in cases:
                scores = score_volume(model, Volume(c.image, c.affine), device="cpu")
                aurocs.append(auroc(scores.heatmap[c.brain], c.label[c.brain] > 0))
                aps.append(average_precision(scores.heatmap[c.brain], c.label[c.brain] > 0))
            row[kind] = {"auroc": float(np.mean(aurocs)), "auprc": float(np.mean(aps))}
        results["stages"][str(stage)] = row
        print(f"stage {stage}: " + ", ".join(f"{k} AUROC {row[k]['auroc']:.3f} AUPRC {row[k]['auprc']:.3f}"
                                            for k in tests), flush=True)
    print("intensity: " + ", ".join(f"{k} AUROC {v['auroc']:.3f} AUPRC {v['auprc']:.3f}"
                                    for k, v in results["intensity"].items()))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
