#!/usr/bin/env python
"""How much does each post-processing step add? One trained model, several scoring variants.

Smoothing, position normalisation and intensity fusion act after the network, so one
trained model (e.g. ``models/dae_seed0.pt`` written by ``scripts/run_benchmark.py``) is
re-calibrated and re-evaluated under each variant without retraining. Each variant is
``NAME:KEY=VALUE,KEY=VALUE`` over :class:`~AnomalySegLib.nn.methods.MethodParams` fields
(``smoothing_mm``, ``position_normalise``, ``fuse_intensity``, ``scan_normalise``, ...);
position statistics are fitted on the same training volumes as the model, the operating
point on the same held-out healthy volumes (seeded 80/20 split of the benchmark's healthy
cohort, as in ``run_benchmark.py``). The intensity baseline is evaluated under the same smoothing and
per-scan standardisation (``scan_normalise``) as each variant, so every comparison has equal
post-processing. No lesion is used before the final metrics.

Example::

    python scripts/study_postprocessing.py --data bench_data --model bench_out/models/dae_seed0.pt \\
        --output-dir pp_study --variants raw:smoothing_mm=0 smooth2:smoothing_mm=2 \\
        "pos:smoothing_mm=2,position_normalise=true"
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_benchmark as bench  # noqa: E402  (the benchmark's data loading and headline numbers)

from AnomalySegLib.errors import AnomalySegError  # noqa: E402


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,...`` -> (name, overrides); values are JSON when they parse as JSON."""
    name, sep, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"variant needs a name: {text!r}")
    overrides = {}
    for item in filter(None, rest.split(",")) if sep else []:
        key, value = bench._key_value(item)
        overrides[key] = value
    return name, overrides


def evaluate_variant(model, overrides: dict, train, cal, data: dict, device: str,
                     baseline_cache: Optional[dict] = None, baselines: Sequence[str] = ("intensity",)) -> dict:
    """Apply ``overrides`` to a copy of ``model``, refit its statistics and calibration, evaluate.

    ``baseline_cache`` is shared by the variants of one run: baseline results per (smoothing,
    standardisation) and position statistics per model-space setting are computed once."""
    from AnomalySegLib.pipeline.baselines import IntensityBaseline
    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.evaluation.harness import evaluate_model
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.data.preprocessing import prepare_volume
    from AnomalySegLib.pipeline.training import fit_position_stats
    from AnomalySegLib.io.volume_io import read_volume

    overrides = dict(overrides)
    # not a method setting: also calibrate on the training volumes that the position statistics
    # were not fitted on (more scans for the false-blob budget; docs/BENCHMARKS.md, stop 20)
    with_training = bool(overrides.pop("calibrate_with_training", False))
    variant = copy.copy(model)
    variant.method = MethodParams.from_dict({**model.method.to_dict(), **overrides})
    variant.position_stats = variant.intensity_stats = None
    cache = baseline_cache if baseline_cache is not None else {}
    if variant.method.position_normalise:
        # the statistics are fitted in model space, before smoothing and scan standardisation:
        # variants differing only in those share them
        key = ("position_stats",) + tuple(sorted((k, repr(v)) for k, v in variant.method.to_dict().items()
                                                  if k not in ("smoothing_mm", "scan_normalise", "grow_percentile")))
        if key not in cache:
            prepared = [prepare_volume(read_volume(p), variant.preprocessing) for p in train]
            cache[key] = fit_position_stats(variant, prepared, device=device)
        variant.position_stats, variant.intensity_stats = cache[key]
    extra = []
    if with_training:
        from AnomalySegLib.pipeline.training import outside_position_stats

        extra = [train[k] for k in outside_position_stats(len(train), variant.method.position_normalise)]
    variant.calibration = calibrate(variant, list(cal) + extra, device=device)
    out: dict = {"overrides": {**overrides, **({"calibrate_with_training": True} if with_training else {})},
                 "calibration_volumes": len(cal) + len(extra), "operating_percentile": variant.default_percentile,
                 "healthy_false_components": variant.calibration.false_components_per_volume, "kinds": {}}
    # a baseline only depends on the smoothing, the scan standardisation and the mask's growth:
    # evaluate it once per combination
    post = (variant.method.smoothing_mm, variant.method.scan_normalise, variant.method.grow_percentile,
            variant.method.bias_flatten != "off", variant.method.bias_field, with_training)
    scorers = [("model", variant)]
    for name in baselines:
        if (name,) + post in cache:
            out["kinds"][name] = cache[(name,) + post]
            continue
        baseline = IntensityBaseline(bench.BASELINES[name], variant.preprocessing, smoothing_mm=post[0],
                                     scan_normalise=post[1], grow_percentile=post[2], bias_flatten=post[3],
                                     bias_field=post[4])
        baseline.fit(list(cal) + extra, reference=list(train))  # the same calibration volumes
        scorers.append((name, baseline))
    for name, scorer in scorers:
        rows = out["kinds"].setdefault(name, {})
        lf = evaluate_model(scorer, list(data["lesion_free"]), [None] * len(data["lesion_free"]), device=device)
        rows["lesion_free"] = lf["lesion_free"]
        for kind, (images, labels) in data["test_sets"].items():
            rows[kind] = bench.headline(evaluate_model(scorer, images, labels, device=device))
    for name in baselines:
        cache.setdefault((name,) + post, out["kinds"][name])
    return out


def markdown(results: dict) -> str:
    """One table per lesion kind: rows = variant x (model, baselines)."""
    lines = ["# Post-processing study", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}. Model: `{results['model']}`.", ""]
    kinds = list(results["kinds"])
    for kind in kinds + ["lesion_free"]:
        lines += [f"## {kind}", ""]
        if kind == "lesion_free":
            lines += ["| variant | scorer | FP components / volume | flagged brain fraction |", "|---|---|---|---|"]
        else:
            lines += ["| variant | scorer | AUPRC | AUROC | Dice (cal.) | detection rate | FP components / volume |",
                      "|---|---|---|---|---|---|---|"]
        for name, res in results["variants"].items():
            for scorer in res["kinds"]:
                row = res["kinds"][scorer][kind]
                if kind == "lesion_free":
                    fp = (row.get("false_positive_components_per_volume") or {}).get("mean")
                    lines.append(f"| {name} | {scorer} | {_fmt(fp, 2)} | {_fmt(row.get('fp_fraction_pooled'), 4)} |")
                else:
                    lines.append(f"| {name} | {scorer} | {_fmt(row['auprc'])} | {_fmt(row['auroc'])} | "
                                 f"{_fmt(row['dice_calibrated'])} | {_fmt(row['detection_rate'], 2)} | "
                                 f"{_fmt(row['fp_components_per_volume'], 1)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder written by make_benchmark_data.py")
    p.add_argument("--model", required=True, type=Path, help="model trained on this data's training split")
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--variants", nargs="+", type=parse_variant, required=True, metavar="NAME:KEY=VALUE,...")
    p.add_argument("--baselines", nargs="+", default=["intensity"], choices=sorted(bench.BASELINES),
                   help="model-free baselines evaluated with each variant's smoothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the training/calibration split (as the model's)")
    p.add_argument("--calibration-fraction", type=float, default=0.2)
    p.add_argument("--kinds", nargs="+", default=None)
    p.add_argument("--pool-kinds", action="store_true",
                   help="evaluate all lesion volumes of the chosen kinds as one set (pooled metrics)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        from AnomalySegLib.evaluation.machine import machine_info
        from AnomalySegLib.model.bundle import load_model
        from AnomalySegLib.pipeline.training import split_volumes

        started = time.time()
        data = bench.load_benchmark_data(args.data)
        if args.kinds:
            data["test_sets"] = {k: v for k, v in data["test_sets"].items() if k in args.kinds}
        if args.pool_kinds:  # one set of every lesion volume: the pooled AUPRC over all kinds
            sets = list(data["test_sets"].values())
            data["test_sets"] = {"all kinds pooled": ([p for s in sets for p in s[0]], [p for s in sets for p in s[1]])}
        healthy = data["healthy"]
        train_idx, cal_idx = split_volumes(len(healthy), args.calibration_fraction, args.seed)
        train, cal = [healthy[i] for i in train_idx], [healthy[i] for i in cal_idx]
        model = load_model(args.model)
        results: dict = {"command": "python scripts/study_postprocessing.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
                         "model": str(args.model), "kinds": {k: len(v[0]) for k, v in data["test_sets"].items()},
                         "variants": {}}
        baseline_cache: dict = {}
        for name, overrides in args.variants:
            bench.log(f"variant {name}: {overrides}")
            results["variants"][name] = evaluate_variant(model, overrides, train, cal, data, args.device, baseline_cache,
                                                         args.baselines)
            args.output_dir.mkdir(parents=True, exist_ok=True)  # partial results after every variant
            (args.output_dir / "results.partial.json").write_text(json.dumps(results, indent=1, default=float),
                                                                 encoding="utf-8")
        info = machine_info(args.device)
        results["machine"] = (f"{info.get('cpu', '?')} ({info.get('cpu_cores_usable', '?')} usable cores), "
                              f"device {info.get('device', '?')}, torch {info.get('torch', '?')}, "
                              f"{info.get('date_utc', '')}")
        results["seconds"] = round(time.time() - started, 1)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
        (args.output_dir / "results.md").write_text(markdown(results) + "\n", encoding="utf-8")
        (args.output_dir / "results.partial.json").unlink(missing_ok=True)
    except AnomalySegError as exc:
        print(f"study_postprocessing: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
