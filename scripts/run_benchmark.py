#!/usr/bin/env python
"""Train AMCons, GradCAMCons and the VAE on a healthy cohort, add the intensity baselines,
calibrate every method on held-out healthy volumes, and evaluate each on every lesion set.

Input: a folder written by ``scripts/make_benchmark_data.py``. Output folder::

    results.json          every number (per method, kind and seed), settings, machine info
    results.md            the tables published in docs/BENCHMARKS.md, with the command line
    pr_<kind>.png         precision-recall curves of all methods
    examples_<kind>.png   one test slice: image, truth, each method's map and mask
    models/               trained model files (usable with `anomalyseg segment`)
    eval/seed<S>/<method>/<kind>/   per-run evaluation reports (results.md, overlays)

Protocol: the healthy cohort is split (seeded, 80/20 by default) into training volumes
and held-out calibration volumes. Networks are trained on the first part only; each
method's threshold is the method's default percentile (AMCons/VAE/intensity 98,
GradCAMCons 95, as in the paper's Table 2) of its scores on the held-out part. The
intensity baselines are calibrated on the same held-out volumes. No lesion volume is
used for anything but the final metrics; oracle numbers are labelled as such.

Small CPU smoke run::

    python scripts/run_benchmark.py --data bench_small --output-dir bench_small_out \
        --epochs 1 --image-size 32 --width 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from AnomalySegLib.errors import AnomalySegError, InputError, OutputError
from AnomalySegLib.nn.methods import DAE_SMOOTHING_MM, MethodParams
from AnomalySegLib.settings import BIAS_FIELDS, SCAN_NORMALISATIONS

NETWORK_METHODS = ("amcons", "gradcamcons", "vae", "dae")
BASELINES = {"intensity": "bright", "intensity-abs": "abs", "intensity-dark": "dark", "intensity-zscore": "zscore"}
ALL_METHODS = NETWORK_METHODS + tuple(BASELINES)
DEFAULT_METHODS = ("dae", "amcons", "gradcamcons", "vae", "intensity", "intensity-abs")


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (numbers, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def log(message: str) -> None:
    """Progress lines on stderr (stdout stays for the final summary)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def load_benchmark_data(data_dir: Path) -> dict:
    """The benchmark index with absolute paths: healthy, lesion_free, kinds{kind: images, labels}."""
    index_path = Path(data_dir) / "benchmark.json"
    if not index_path.is_file():
        raise InputError(f"{index_path} not found: create the data with scripts/make_benchmark_data.py")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    root = Path(data_dir)
    return {
        "healthy": [root / p for p in index["healthy"]],
        "lesion_free": [root / p for p in index["lesion_free"]],
        "test_sets": {k: ([root / p for p in v["images"]], [root / p for p in v["labels"]])
                      for k, v in index["kinds"].items()},
        "settings": {k: index.get(k) for k in ("seed", "resolution_mm", "n_slices", "contrast", "template",
                                                "placement")},
    }


# ----------------------------------------------------------------------------- methods


class _TrainTimer:
    """Progress callback measuring training throughput (steps after the first epoch's first step)."""

    def __init__(self, batch_size: int, inner: Optional[Callable] = None) -> None:
        self.batch_size = batch_size
        self.inner = inner
        self.times: list[float] = []

    def __call__(self, event) -> None:
        if event.stage == "train":
            self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner(event)

    def images_per_second(self) -> Optional[float]:
        # The first step includes one-off costs (allocations, cuDNN autotuning): skip it.
        if len(self.times) < 2:
            return None
        return self.batch_size * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def build_method(method: str, train: Sequence[Path], calibration: Sequence[Path], args, seed: int,
                 model_dir: Optional[Path]) -> tuple[Any, dict]:
    """Train (networks) or fit (baselines) ``method``; calibrate on ``calibration``. Returns (scorer, info)."""
    from AnomalySegLib.data.preprocessing import PreprocessConfig

    started = time.perf_counter()
    if method in BASELINES:
        from AnomalySegLib.pipeline.baselines import IntensityBaseline

        # same standardisation, smoothing, minimum lesion size and operating-point rule as the
        # default method
        scorer = IntensityBaseline(BASELINES[method], PreprocessConfig(image_size=args.image_size),
                                   smoothing_mm=args.baseline_smoothing,
                                   scan_normalise=args.baseline_scan_normalise,
                                   grow_percentile=args.baseline_grow_percentile,
                                   bias_flatten=args.baseline_bias_flatten == "on",
                                   bias_field=args.baseline_bias_field)
        scorer.fit(calibration, reference=train)
        return scorer, {"seconds_fit": round(time.perf_counter() - started, 2),
                        "calibration_volumes": len(calibration), "healthy_median": scorer.healthy_median}

    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.progress import TextProgressBar
    from AnomalySegLib.pipeline.training import TrainConfig, train_model

    config = TrainConfig(method=method, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                         image_size=args.image_size, base_width=args.width, latent_dim=args.latent_dim,
                         attention_stage=args.attention_stage, seed=seed, device=args.device, amp=not args.no_amp,
                         calibration_fraction=0.0,  # the held-out split is made here, shared with the baselines
                         method_overrides=dict(args.method_param or {}))
    timer = _TrainTimer(args.batch_size, None if args.quiet else TextProgressBar(sys.stderr))
    model = train_model(list(train), config, progress=timer)
    seconds_train = time.perf_counter() - started
    t0 = time.perf_counter()
    model.calibration = calibrate(model, list(calibration), device=args.device)
    info = {
        "seconds_train": round(seconds_train, 2),
        "seconds_calibrate": round(time.perf_counter() - t0, 2),
        "train_images_per_second": timer.images_per_second(),
        "train_slices": model.training.get("train_slices"),
        "train_volumes": len(train),
        "calibration_volumes": len(calibration),
        "final_losses": (model.training.get("history") or [{}])[-1],
        "device": model.training.get("device"),
        "amp": model.training.get("amp"),
        "threshold": model.calibration.threshold(model.default_percentile),
        "operating_percentile": model.default_percentile,
        "healthy_false_components_per_volume": model.calibration.false_components_per_volume,
    }
    if model_dir is not None:
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / f"{method}_seed{seed}.pt"
        model.save(path)
        info["model_file"] = str(path)
    return model, info


def headline(results: dict) -> dict:
    """Numbers kept for the tables from one evaluate_model result."""
    p, pv, det = results["pooled"], results["per_volume"], results["detection"]
    return {
        "auprc": p.get("auprc"), "auroc": p.get("auroc"),
        "dice_calibrated": p.get("dice_calibrated"),
        "dice_calibrated_per_volume": pv["dice_calibrated"]["mean"],
        "dice_calibrated_per_volume_std": pv["dice_calibrated"]["std"],
        "oracle_best_dice": p.get("oracle_best_dice"),
        "oracle_threshold_healthy_percentile": p.get("oracle_threshold_healthy_percentile"),
        "detection_rate": det.get("detection_rate"),
        "n_lesions": det.get("n_lesions"),
        "fp_components_per_volume": (det.get("false_positive_components_per_volume") or {}).get("mean"),
        "percentile": results.get("percentile"), "threshold": results.get("threshold"),
        "n_volumes": results["n_volumes"]["lesion"],
        "seconds_per_volume": float(np.mean([v["seconds"] for v in results["volumes"]])) if results["volumes"] else None,
    }


def run_methods(methods: Sequence[str], healthy: Sequence[Path], test_sets: dict, lesion_free: Sequence[Path],
                args, output_dir: Path, *, calibration: Optional[Sequence[Path]] = None) -> dict:
    """Build every method for every seed and evaluate it on each test set and the lesion-free set.

    Without ``calibration`` the healthy volumes are split (seeded) into training and
    held-out calibration volumes with ``args.calibration_fraction``.
    """
    from AnomalySegLib.evaluation.figures import example_slice
    from AnomalySegLib.evaluation.harness import as_scorer, evaluate_model
    from AnomalySegLib.pipeline.training import split_volumes
    from AnomalySegLib.io.volume_io import read_volume

    runs: list[dict] = []
    examples: dict[str, dict] = {}  # kind -> {"base": slice dict, "methods": {method: slice}}
    for seed in args.seeds:
        if calibration is None:
            train_idx, cal_idx = split_volumes(len(healthy), args.calibration_fraction, seed)
            if not cal_idx:
                raise InputError("no held-out healthy volume for calibration: use more healthy volumes "
                                 "or a larger --calibration-fraction")
            train = [healthy[i] for i in train_idx]
            cal = [healthy[i] for i in cal_idx]
        else:
            train, cal = list(healthy), list(calibration)
        for method in methods:
            log(f"seed {seed}: {method}: building on {len(train)} healthy volumes, calibrating on {len(cal)}")
            built, info = build_method(method, train, cal, args, seed,
                                       None if args.no_models else output_dir / "models")
            scorer = as_scorer(built)
            run: dict = {"seed": seed, "method": method, "build": info, "kinds": {}}
            if lesion_free:
                lf = evaluate_model(scorer, list(lesion_free), [None] * len(lesion_free), device=args.device,
                                    batch_size=args.eval_batch_size)
                run["lesion_free"] = {**lf["lesion_free"], "seconds_per_volume": float(
                    np.mean([v["seconds"] for v in lf["volumes"]]))}
            for kind, (images, labels) in test_sets.items():
                log(f"seed {seed}: {method}: evaluating on {kind} ({len(images)} volumes)")
                res = evaluate_model(scorer, images, labels, device=args.device, batch_size=args.eval_batch_size,
                                     output_dir=output_dir / "eval" / f"seed{seed}" / method / kind,
                                     overwrite=True, n_overlays=args.overlays)
                run["kinds"][kind] = {"headline": headline(res), "pr_curve": res["pr_curve"],
                                      "report": str(Path("eval") / f"seed{seed}" / method / kind / "results.md")}
                if seed == args.seeds[0]:
                    volume = read_volume(images[0])
                    truth = read_volume(labels[0]).data > 0
                    scores = scorer.score_volume(volume, device=args.device)
                    pred, _ = scorer.predict_mask(scores, res["percentile"])
                    entry = examples.setdefault(kind, {"name": Path(images[0]).name, "methods": {}})
                    sl = example_slice(volume, scores.heatmap, pred, truth)
                    entry.setdefault("base", sl)
                    entry["methods"][method] = sl
            runs.append(run)
            del scorer, built
    return {"runs": runs, "examples": examples}


# ----------------------------------------------------------------------------- reporting


def _agg(values: Sequence[Optional[float]]) -> dict:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}


def aggregate(runs: Sequence[dict], methods: Sequence[str], kinds: Sequence[str]) -> dict:
    """Mean and std over seeds of every headline number, per method and kind."""
    table: dict = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        table[method] = {"kinds": {}, "lesion_free": {}, "build": {}}
        for kind in kinds:
            heads = [r["kinds"][kind]["headline"] for r in mine if kind in r["kinds"]]
            table[method]["kinds"][kind] = {key: _agg([h.get(key) for h in heads]) for key in (heads[0] if heads else {})
                                            if key not in ("n_lesions", "n_volumes")}
            if heads:
                table[method]["kinds"][kind]["n_volumes"] = heads[0]["n_volumes"]
                table[method]["kinds"][kind]["n_lesions"] = heads[0]["n_lesions"]
        lfs = [r["lesion_free"] for r in mine if "lesion_free" in r]
        if lfs:
            table[method]["lesion_free"] = {
                "fp_fraction": _agg([x.get("fp_fraction_pooled") for x in lfs]),
                "expected_fp_fraction": lfs[0].get("expected_fp_fraction"),
                "fp_components_per_volume": _agg([(x.get("false_positive_components_per_volume") or {}).get("mean")
                                                  for x in lfs]),
                "n_volumes": lfs[0].get("n_volumes"),
                "seconds_per_volume": _agg([x.get("seconds_per_volume") for x in lfs]),
            }
        builds = [r["build"] for r in mine]
        table[method]["build"] = {key: _agg([b.get(key) for b in builds]) for key in (
            "seconds_train", "seconds_fit", "seconds_calibrate", "train_images_per_second") if any(key in b for b in builds)}
    return table


def _cell(stat: Any, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    if isinstance(stat, dict):
        if stat.get("mean") is None:
            return "n/a"
        if stat.get("n", 1) > 1:
            return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}"
    if isinstance(stat, float):
        return f"{stat:.{digits}f}"
    return str(stat)


def plot_examples(examples: dict, methods: Sequence[str], path: Path, kind: str) -> None:
    """Image, truth and each method's map + predicted contour on one slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = examples[kind]
    base = entry["base"]
    cols = 1 + len(methods)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 2.9))
    kw = {"origin": "lower", "aspect": base["aspect"]}
    axes[0].imshow(base["image"].T, cmap="gray", **kw)
    axes[0].contour(base["truth"].T, levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
    axes[0].set_title(f"{entry['name']}\ntruth (green)", fontsize=8)
    for ax, method in zip(axes[1:], methods):
        sl = entry["methods"].get(method)
        if sl is None:
            ax.set_visible(False)
            continue
        ax.imshow(sl["heatmap"].T, cmap="inferno", **kw)
        ax.contour(sl["truth"].T, levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
        if sl["pred"] is not None and sl["pred"].any():
            ax.contour(sl["pred"].T, levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
        ax.set_title(f"{method}\nmask (cyan)", fontsize=8)
    for ax in axes:
        ax.invert_xaxis()  # radiological, like Slicer
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{kind}: axial slice {base['slice']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_benchmark_report(summary: dict, output_dir: Path, examples: Optional[dict] = None,
                           title: str = "AnomalySeg benchmark") -> None:
    """results.json, results.md and the PNG figures of a :func:`run_methods` summary."""
    from AnomalySegLib.evaluation.figures import plot_pr_curves
    from AnomalySegLib.evaluation.metrics import finite_or_none

    methods, kinds = summary["methods"], summary["kinds"]
    table = summary["aggregate"]
    first_seed = summary["config"]["seeds"][0]
    figures: dict = {}
    for kind in kinds:
        curves = []
        for run in summary["runs"]:
            if run["seed"] == first_seed and kind in run["kinds"]:
                k = run["kinds"][kind]
                curves.append((run["method"], {"pr_curve": k["pr_curve"], "pooled": {"auprc": k["headline"]["auprc"]}}))
        plot_pr_curves(curves, output_dir / f"pr_{kind}.png", title=f"{kind}: precision-recall (brain voxels)")
        figures.setdefault(kind, []).append(f"pr_{kind}.png")
        if examples and kind in examples:
            plot_examples(examples, methods, output_dir / f"examples_{kind}.png", kind)
            figures[kind].append(f"examples_{kind}.png")
    summary["figures"] = figures

    seeds = summary["config"]["seeds"]
    machine = summary["machine"]
    lines = [f"# {title}", "",
             f"Command: `{summary['command']}`", "",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_cores_usable')} usable cores), "
             f"device `{machine.get('device')}`" + (f" ({machine.get('gpu')})" if machine.get("gpu") else "")
             + f", torch {machine.get('torch')}, AnomalySeg {machine.get('anomalyseg')}"
             + (f", commit {machine['git_commit'][:10]}" if machine.get("git_commit") else "")
             + f", {machine.get('date_utc')}. Total {summary['seconds_total'] / 60:.1f} min.", "",
             f"Data: {summary['data']}", "",
             f"Seeds: {', '.join(str(s) for s in seeds)}" + (" (mean ± std over seeds)" if len(seeds) > 1 else ""), "",
             "Dice (cal.) = Dice at the healthy-calibrated threshold (the method's percentile of held-out "
             "healthy scores): the honest number. **[Dice] ORACLE** = best Dice over all thresholds chosen "
             "with the test labels: an upper bound no user can reach. Voxel metrics count brain voxels only.", ""]
    for kind in kinds:
        lines += [f"## {kind}", "",
                  "| method | AUPRC | AUROC | Dice (cal.) | Dice per volume (cal.) | [Dice] ORACLE | "
                  "detection rate (of N lesions) | FP components / volume | s / volume |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in methods:
            k = table[method]["kinds"].get(kind, {})
            if not k:
                continue
            pv = k.get("dice_calibrated_per_volume")
            pv_std = k.get("dice_calibrated_per_volume_std")
            per_volume = "n/a" if not pv or pv.get("mean") is None else \
                f"{pv['mean']:.3f} ± {(pv_std or {}).get('mean') or 0.0:.3f}"
            lines.append(f"| {method} | {_cell(k.get('auprc'))} | {_cell(k.get('auroc'))} | "
                         f"{_cell(k.get('dice_calibrated'))} | {per_volume} | {_cell(k.get('oracle_best_dice'))} | "
                         f"{_cell(k.get('detection_rate'), 2)} of {k.get('n_lesions')} | "
                         f"{_cell(k.get('fp_components_per_volume'), 1)} | {_cell(k.get('seconds_per_volume'), 2)} |")
        lines += [""] + [f"![{f}]({f})" for f in figures.get(kind, [])] + [""]
    if any(table[m]["lesion_free"] for m in methods):
        lines += ["## Lesion-free test volumes (false positives at the calibrated threshold)", "",
                  "| method | flagged brain fraction | expected (1 - percentile) | FP components / volume | volumes |",
                  "|---|---|---|---|---|"]
        for method in methods:
            lf = table[method]["lesion_free"]
            if lf:
                lines.append(f"| {method} | {_cell(lf['fp_fraction'], 4)} | {_cell(lf['expected_fp_fraction'], 4)} | "
                             f"{_cell(lf['fp_components_per_volume'], 1)} | {lf['n_volumes']} |")
        lines.append("")
    lines += ["## Training / fitting cost", "",
              "| method | train s | train images/s | calibrate s |", "|---|---|---|---|"]
    for method in methods:
        b = table[method]["build"]
        lines.append(f"| {method} | {_cell(b.get('seconds_train') or b.get('seconds_fit'), 1)} | "
                     f"{_cell(b.get('train_images_per_second'), 1)} | {_cell(b.get('seconds_calibrate'), 1)} |")
    cfg = summary["config"]
    lines += ["", f"Settings: epochs {cfg['epochs']}, image size {cfg['image_size']}, width {cfg['width']}, "
              f"latent {cfg['latent_dim']}, batch {cfg['batch_size']}, lr {cfg['lr']}, "
              f"calibration fraction {cfg['calibration_fraction']}.", ""]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (output_dir / "results.json").write_text(json.dumps(finite_or_none(summary), indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared with scripts/run_brats.py."""
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--image-size", type=int, default=128, help="slice size, multiple of 32 (paper: 224)")
    p.add_argument("--width", type=int, default=64, help="encoder base width (64 = ResNet-18 as the paper)")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--attention-stage", type=int, default=1, choices=range(0, 5),
                   help="encoder stage of the attention map (1 = first residual block, as the paper)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--baseline-smoothing", type=float, default=DAE_SMOOTHING_MM,
                   help="Gaussian sigma (mm) of the baselines' maps (default: the dae's, so post-processing is equal)")
    p.add_argument("--baseline-scan-normalise", choices=SCAN_NORMALISATIONS,
                   default=MethodParams.defaults("dae").scan_normalise,
                   help="per-scan standardisation of the baselines' maps (default: the dae's)")
    p.add_argument("--baseline-grow-percentile", type=float, default=MethodParams.defaults("dae").grow_percentile,
                   help="hysteresis percentile of the baselines' masks, 0 = off (default: the dae's)")
    p.add_argument("--baseline-bias-flatten", choices=("on", "off"),
                   default="off" if MethodParams.defaults("dae").bias_flatten == "off" else "on",
                   help="divide out each scan's smooth bias field before the intensity baselines score it "
                        "(default: as the dae)")
    p.add_argument("--baseline-bias-field", choices=BIAS_FIELDS, default=MethodParams.defaults("dae").bias_field,
                   help="shape of the baselines' flattened field (default: the dae's)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed (paper: 3)")
    p.add_argument("--calibration-fraction", type=float, default=0.2,
                   help="share of healthy volumes held out for calibration")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--overlays", type=int, default=2, help="overlay PNGs per method and set")
    p.add_argument("--no-models", action="store_true", help="do not keep the trained model files")
    p.add_argument("--method-param", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="override a method parameter of every network, e.g. smoothing_mm=0 or "
                        "position_normalise=true (repeatable; see AnomalySegLib.nn.methods.MethodParams)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no training progress bars")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if (output_dir / "results.json").exists() and not overwrite:
        raise OutputError(f"{output_dir / 'results.json'} exists (use --overwrite)")
    output_dir.mkdir(parents=True, exist_ok=True)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run (script path relative to the repository)."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["python", path.as_posix()] + args)


def make_summary(args, methods, kinds, result: dict, data_desc: str, started: float, command: str) -> dict:
    from AnomalySegLib.evaluation.machine import machine_info

    return {
        "command": command,
        "machine": machine_info(args.device),
        "data": data_desc,
        "config": {k: getattr(args, k) for k in ("epochs", "image_size", "width", "latent_dim", "batch_size", "lr",
                                                 "seeds", "calibration_fraction", "device")},
        "methods": list(methods), "kinds": list(kinds),
        "aggregate": aggregate(result["runs"], methods, kinds),
        "runs": result["runs"],
        "seconds_total": time.time() - started,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder written by make_benchmark_data.py")
    p.add_argument("--kinds", nargs="+", default=None, help="lesion sets to evaluate (default: all in the data)")
    add_training_args(p)
    args = p.parse_args(argv)
    started = time.time()
    try:
        check_output_dir(args.output_dir, args.overwrite)
        data = load_benchmark_data(args.data)
        kinds = args.kinds or list(data["test_sets"])
        unknown = [k for k in kinds if k not in data["test_sets"]]
        if unknown:
            raise InputError(f"lesion set(s) not in {args.data}: {', '.join(unknown)}")
        test_sets = {k: data["test_sets"][k] for k in kinds}
        result = run_methods(args.methods, data["healthy"], test_sets, data["lesion_free"], args, args.output_dir)
        s = data["settings"]
        anatomy = str(s.get("template") or "mni152").replace("+", " + ")
        desc = (f"synthetic cohort (anatomy {anatomy}, lesion placement {s.get('placement') or 'deep'}, "
                f"{s['contrast']}, {s['resolution_mm']} mm, "
                f"{'whole brain' if not s['n_slices'] else str(s['n_slices']) + ' central slices'}, seed {s['seed']}): "
                f"{len(data['healthy'])} healthy, {len(data['lesion_free'])} lesion-free test, "
                + ", ".join(f"{len(v[0])} {k}" for k, v in test_sets.items()))
        summary = make_summary(args, args.methods, kinds, result, desc, started, command_line(__file__, argv))
        write_benchmark_report(summary, args.output_dir, result["examples"])
    except AnomalySegError as exc:
        print(f"run_benchmark: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir / 'results.md'} ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
