"""Smoke runs of the benchmark scripts at minimal sizes (data generation, benchmark, BraTS runner, speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY = ["--epochs", "1", "--image-size", "32", "--width", "8", "--batch-size", "8", "--eval-batch-size", "8",
        "--device", "cpu", "--quiet", "--overlays", "1"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_templates() -> list[str]:
    """Both anatomies (the default) where Debian's mricron-data provides Colin27, else MNI152 alone."""
    from AnomalySegLib.data import synthetic

    return list(synthetic.TEMPLATES) if synthetic._COLIN27_FILE.is_file() else ["mni152"]


BENCH_ARGS = ["--n-healthy", "4", "--n-per-kind", "2", "--n-lesion-free", "1", "--kinds", "bright", "small",
              "--resolution", "4", "--slices", "6", "--templates", *_bench_templates()]


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data"
    make = _script("make_benchmark_data")
    assert make.main(["-o", str(out)] + BENCH_ARGS) == 0
    return out


def test_make_benchmark_data_layout_and_determinism(bench_data, tmp_path):
    index = json.loads((bench_data / "benchmark.json").read_text())
    assert len(index["healthy"]) == 4 and len(index["lesion_free"]) == 1
    assert set(index["kinds"]) == {"bright", "small"}
    for kind, entry in index["kinds"].items():
        for img, lab in zip(entry["images"], entry["labels"]):
            image = nib.load(str(bench_data / img))
            label = np.asarray(nib.load(str(bench_data / lab)).dataobj)
            assert image.shape == label.shape and image.shape[2] == 6
            assert label.any() and set(np.unique(label)) <= {0, 1}
    assert not np.asarray(nib.load(str(bench_data / "lesion_free" / "normal_000_label.nii.gz")).dataobj).any()
    assert not list(bench_data.glob("_*")) and not list(bench_data.parent.glob(".*partial"))
    # Anatomies alternate case by case within every set; lesions are placed in GM and WM.
    templates = _bench_templates()
    assert index["templates"] == templates and index["placement"] == "mixed"
    for name in ("healthy_000", "healthy_001", "healthy_002", "bright/lesion_000", "bright/lesion_001"):
        i = int(name[-3:])
        assert index["cases"][name]["template"] == templates[i % len(templates)]
        assert index["cases"][name]["placement"] == "mixed"
    assert index["cases"]["small/lesion_000"]["lesions"][0]["placement"] == "mixed"
    # The recorded per-case seeds are those the seed plan predicts.
    make = _script("make_benchmark_data")
    plan = make.case_seeds(0, n_healthy=4, n_per_kind=2, n_lesion_free=1, kinds=["bright", "small"])
    assert plan == {name: meta["seed"] for name, meta in index["cases"].items()}
    # test subjects are not training subjects
    h0 = np.asarray(nib.load(str(bench_data / index["healthy"][0])).dataobj)
    for entry in index["kinds"].values():
        assert not np.array_equal(np.asarray(nib.load(str(bench_data / entry["images"][0])).dataobj), h0)
    # the same arguments give the same data; existing data is not replaced without --overwrite
    again = tmp_path / "again"
    assert make.main(["-o", str(again)] + BENCH_ARGS) == 0
    for rel in index["kinds"]["small"]["images"] + index["healthy"][:1]:
        np.testing.assert_array_equal(np.asarray(nib.load(str(again / rel)).dataobj),
                                      np.asarray(nib.load(str(bench_data / rel)).dataobj))
    assert make.main(["-o", str(again), "--n-healthy", "4"]) == 1


def test_make_benchmark_data_eval_seed_disjoint_from_dev_seed(tmp_path, capsys):
    make = _script("make_benchmark_data")
    assert (make.DEV_SEED, make.EVAL_SEED) == (0, 9000)
    assert f"--seed {make.EVAL_SEED}" in make.__doc__
    # Default sizes and every kind: no subject of the evaluation data is a development subject.
    sizes = dict(n_healthy=40, n_per_kind=10, n_lesion_free=10)
    dev = make.case_seeds(make.DEV_SEED, **sizes)
    ev = make.case_seeds(make.EVAL_SEED, **sizes)
    assert len(dev) == len(ev) == 100 and len(set(dev.values())) == len(set(ev.values())) == 100
    assert not set(dev.values()) & set(ev.values())
    assert not make.shared_with_dev_seed(make.EVAL_SEED, n_healthy=200, n_per_kind=100, n_lesion_free=100)
    # A seed whose lesion sets reuse the development ones (1000 + 1000 k) is refused before any work.
    assert make.shared_with_dev_seed(1000, **sizes)
    assert make.main(["-o", str(tmp_path / "leak"), "--seed", "1000", "--n-healthy", "1", "--n-per-kind", "1"]) == 1
    assert "--seed 9000" in capsys.readouterr().err and not (tmp_path / "leak").exists()


def test_run_benchmark_smoke(bench_data, tmp_path):
    from AnomalySegLib.pipeline.baselines import IntensityBaseline
    from AnomalySegLib.evaluation.harness import evaluate_model
    from AnomalySegLib.model.bundle import load_model
    from AnomalySegLib.data.preprocessing import PreprocessConfig
    from AnomalySegLib.pipeline.training import split_volumes

    out = tmp_path / "out"
    bench = _script("run_benchmark")
    assert bench.main(["--data", str(bench_data), "-o", str(out), "--kinds", "bright"] + TINY) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == ["dae", "amcons", "gradcamcons", "vae", "intensity", "intensity-abs"]
    assert res["machine"]["cpu_cores_logical"] >= 1 and res["machine"]["device"] == "cpu"
    agg = res["aggregate"]
    for method in res["methods"]:
        k = agg[method]["kinds"]["bright"]
        assert 0.0 <= k["auprc"]["mean"] <= 1.0 and k["oracle_best_dice"]["mean"] >= k["dice_calibrated"]["mean"] - 1e-9
        assert agg[method]["lesion_free"]["n_volumes"] == 1
    for method in ("dae", "amcons", "gradcamcons", "vae"):
        model = load_model(out / "models" / f"{method}_seed0.pt")
        assert model.calibration is not None and model.calibration.n_volumes == 1  # the held-out volume
        assert agg[method]["build"]["train_images_per_second"]["mean"] > 0
    md = (out / "results.md").read_text()
    assert "## bright" in md and "[Dice] ORACLE" in md and "python scripts/run_benchmark.py" in md
    assert (out / "pr_bright.png").is_file() and (out / "examples_bright.png").is_file()
    assert (out / "eval" / "seed0" / "vae" / "bright" / "results.md").is_file()
    # the baseline row is reproducible from the library alone (same held-out split)
    index = json.loads((bench_data / "benchmark.json").read_text())
    healthy = [bench_data / p for p in index["healthy"]]
    train_idx, cal_idx = split_volumes(len(healthy), 0.2, 0)
    from AnomalySegLib.nn.methods import DAE_SMOOTHING_MM, MethodParams

    # the benchmark gives baselines the default method's post-processing (standardisation,
    # smoothing) and its bias flattening (statistics from the training volumes)
    base = IntensityBaseline("bright", PreprocessConfig(image_size=32), smoothing_mm=DAE_SMOOTHING_MM,
                             scan_normalise=MethodParams.defaults("dae").scan_normalise,
                             bias_flatten=MethodParams.defaults("dae").bias_flatten != "off").fit(
        [healthy[i] for i in cal_idx], reference=[healthy[i] for i in train_idx])
    direct = evaluate_model(base, [bench_data / p for p in index["kinds"]["bright"]["images"]],
                            [bench_data / p for p in index["kinds"]["bright"]["labels"]])
    assert agg["intensity"]["kinds"]["bright"]["auprc"]["mean"] == pytest.approx(direct["pooled"]["auprc"])
    assert bench.main(["--data", str(bench_data), "-o", str(out)] + TINY) == 1  # results exist
    # post-processing variants of the trained dae, without retraining (scripts/study_postprocessing.py)
    study = _script("study_postprocessing")
    pp = tmp_path / "pp"
    assert study.main(["--data", str(bench_data), "--model", str(out / "models" / "dae_seed0.pt"), "-o", str(pp),
                       "--device", "cpu", "--variants", "raw:smoothing_mm=0",
                       "fused:smoothing_mm=1,position_normalise=true,fuse_intensity=1"]) == 0
    pres = json.loads((pp / "results.json").read_text())
    assert set(pres["variants"]) == {"raw", "fused"}
    for variant in pres["variants"].values():
        assert 98.0 <= variant["operating_percentile"] < 100.0
        for scorer in ("model", "intensity"):
            assert 0.0 <= variant["kinds"][scorer]["bright"]["auprc"] <= 1.0
    # the baselines differ with the smoothing (each variant's post-processing is given to it)
    assert pres["variants"]["raw"]["kinds"]["intensity"]["bright"] != pres["variants"]["fused"]["kinds"]["intensity"]["bright"]
    assert "## bright" in (pp / "results.md").read_text()


def _fake_brats(root: Path, n_cases: int = 6) -> None:
    shape = (40, 36, 24)
    affine = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 130], [0, 0, 1.0, -60], [0, 0, 0, 1]])
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    brain = ((ii - 20) / 15.0) ** 2 + ((jj - 18) / 13.0) ** 2 + ((kk - 11.5) / 9.0) ** 2 <= 1.0
    for n in range(n_cases):
        rng = np.random.default_rng(n)
        flair = np.where(brain, 100 + 20 * (((ii - 20) / 15.0) ** 2 < 0.3) + rng.normal(0, 3, shape), 0)
        seg = np.zeros(shape, np.uint8)
        z0 = 8 + n % 4
        seg[16:22, 14:19, z0:z0 + 3] = 2
        flair[seg > 0] = 170
        case = f"BraTS19_X_{n:03d}_1"
        folder = root / "MICCAI_BraTS_2019_Data_Training" / "HGG" / case
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(flair.astype(np.float32), affine), str(folder / f"{case}_flair.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{case}_seg.nii.gz"))


def test_run_brats_on_brats_layout(tmp_path):
    _fake_brats(tmp_path / "brats")
    runner = _script("run_brats")
    out = tmp_path / "run"
    args = ["--brats-dir", str(tmp_path / "brats"), "-o", str(out), "--methods", "amcons", "intensity"] + TINY
    assert runner.main(args) == 0
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert {k: len(v) for k, v in manifest["split"].items()} == {"train": 4, "val": 1, "test": 1}
    res = json.loads((out / "results.json").read_text())
    assert res["kinds"] == ["brats_test"] and "BraTS" in res["data"]
    k = res["aggregate"]["amcons"]["kinds"]["brats_test"]
    assert k["n_volumes"] == 1 and k["n_lesions"] == 1
    # calibrated on the validation patient's lesion-free slices only
    from AnomalySegLib.model.bundle import load_model

    model = load_model(out / "models" / "amcons_seed0.pt")
    val_case = manifest["split"]["val"][0]
    assert model.calibration.n_volumes == 1 and val_case in model.calibration.source
    assert model.calibration.n_images <= 10 - len(manifest["cases"][val_case]["lesion_slices"])
    assert "AnomalySeg on BraTS" in (out / "results.md").read_text()


def test_benchmark_speed_smoke(tmp_path, capsys):
    speed = _script("benchmark_speed")
    out = tmp_path / "speed.json"
    code = speed.main(["--output", str(out), "--markdown", str(tmp_path / "speed.md"), "--device", "cpu",
                       "--image-size", "32", "--width", "8", "--batch-size", "4", "--eval-batch-size", "4",
                       "--train-steps", "2", "--repeats", "1", "--resolution", "4", "--slices", "6",
                       "--distinct-volumes", "1", "--methods", "amcons", "vae", "--no-isolate"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {(r["kind"], r["method"]): r for r in report["results"]}
    assert rows[("train", "amcons")]["images_per_second"] > 0 and rows[("train", "vae")]["steps_timed"] >= 1
    assert rows[("score_volume", "vae")]["seconds_per_volume"] > 0
    net = rows[("network", None)]
    assert set(net["seconds_per_volume"]) == {"amcons_attention_only", "gradcamcons_encoder_and_gradient",
                                              "vae_residual", "full_forward"}
    assert net["parameters"]["attention"] < net["parameters"]["encoder"] < net["parameters"]["all"]
    assert rows[("train", "amcons")]["peak_rss_mb"] > 0
    assert "training images/s" in (tmp_path / "speed.md").read_text()
    assert report["machine"]["torch"] and report["isolated"] is False


def test_scan_score_spread_coefficients_against_hand_values():
    """spread_cv: tails that scale with each scan's spread have no variation once divided by it."""
    spread = _script("scan_score_spread")
    rows = []  # (tail, p10, p25, p50, p75, p90, MAD, std) for three scans: scale 1, 2, 3, median 0.5 k
    for k in (1.0, 2.0, 3.0):
        med = 0.5 * k
        rows.append((med + 6.0 * k, med - 1.0 * k, med - 0.5 * k, med, med + 0.5 * k, med + 1.0 * k, 0.4 * k, 0.8 * k))
    cv = spread.spread_cv(rows)
    for name in ("MAD", "p75-median", "p90-median", "p90-p10", "std"):
        assert cv[name] == pytest.approx(0.0, abs=1e-12)
    raw = np.array([r[0] for r in rows])
    assert cv["raw"] == pytest.approx(raw.std() / raw.mean())
    centred = np.array([6.0, 12.0, 18.0])
    assert cv["minus median"] == pytest.approx(centred.std() / centred.mean())


def test_speed_report_shows_compiled_training_apart_from_its_compilation():
    speed = _script("benchmark_speed")
    ips = {"dae_before_nchw": 20.0, "dae_after_channels_last": 22.0, "amcons_ours": 70.0, "dae_mixed": 50.0,
           "amcons_ours_mixed": 100.0, "amcons_reference": 50.0, "amcons_ours_compiled": 160.0}
    report = {"results": [{"kind": "train_compare", "method": None, "image_size": 96, "width": 16, "batch_size": 32,
                           "images_per_second": ips, "dae_first_loss_rel_diff": 1e-7,
                           "ratios": {"dae_after_vs_before": 1.1, "amcons_ours_vs_reference": 1.4,
                                      "dae_mixed_vs_float32_nchw": 2.5, "amcons_ours_mixed_vs_reference": 2.0},
                           "compile_seconds": {"amcons_ours_compiled": 95.4, "dae_compiled": "failed: no compiler"},
                           "compiled_ratios": {"amcons_compiled_vs_reference": 3.2,
                                               "amcons_compiled_vs_eager": 1.6}}]}
    text = "\n".join(speed.compare_markdown(report))
    assert "amcons ours / authors' network and loss: **2.00x**." in text  # no shipped row: no shipped ratio
    report["results"][0]["ratios"].update(reference_shipped_vs_reference=0.7,
                                          amcons_ours_mixed_vs_reference_shipped=2.86)
    text = "\n".join(speed.compare_markdown(report))
    assert "0.70x the bare reference's speed" in text
    assert "/ the authors' shipped trainer (anomaly mode): **2.86x**." in text
    assert "amcons_ours_compiled: 95 s" in text and "dae_compiled: failed: no compiler" in text
    assert "amcons compiled vs reference **3.20x**" in text and "amcons compiled vs eager **1.60x**" in text


def test_make_foreign_cohort_layout_directions_and_determinism(tmp_path):
    """The cohort made differently (own contrast, fields, lesions) is readable by the benchmark
    scripts, its labels mark exactly the changed voxels with the documented sign, and the same
    seed gives the same files."""
    foreign = _script("make_foreign_cohort")
    args = ["--n-healthy", "2", "--n-lesion-free", "1", "--n-per-kind", "1", "--resolution-mm", "4"]
    out = tmp_path / "a"
    assert foreign.main(["--output-dir", str(out), "--seed", "5"] + args) == 0
    data = _script("run_benchmark").load_benchmark_data(out)
    assert len(data["healthy"]) == 2 and len(data["lesion_free"]) == 1
    assert set(data["test_sets"]) == set(foreign.KINDS)
    for kind, (images, labels) in data["test_sets"].items():
        image = np.asarray(nib.load(str(images[0])).dataobj)
        label = np.asarray(nib.load(str(labels[0])).dataobj)
        assert image.shape == label.shape and label.any(), kind
        assert not (label.astype(bool) & (image == 0)).any(), kind  # lesions lie in the brain
    assert foreign.main(["--output-dir", str(out), "--seed", "5"] + args) == 2  # never overwrites
    again = tmp_path / "b"
    assert foreign.main(["--output-dir", str(again), "--seed", "5"] + args) == 0
    for name in ("healthy/healthy_001.nii.gz", "tumour/lesion_000.nii.gz", "ms/lesion_000_label.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(str(out / name)).dataobj),
                              np.asarray(nib.load(str(again / name)).dataobj))

    # sign and extent of each kind's change, on a constant image (no bias or noise)
    from AnomalySegLib.data.synthetic import load_template

    template = load_template("mni152", 4.0)
    maps = {"brain": np.asarray(template.brain), "wm": np.asarray(template.wm), "gm": np.asarray(template.gm)}
    flat = maps["brain"].astype(np.float32) * 100.0
    for kind, sign in (("infarct", -1), ("haemorrhage", +1), ("ms", -1), ("subtle", -1), ("tumour", 0)):
        changed, label, info = foreign._lesion(kind, flat, maps, 4.0, np.random.default_rng(3))
        assert label.any() and not (label & ~maps["brain"]).any(), kind
        if kind == "subtle":  # label = where the diffuse change exceeds half its depth
            change = 1.0 - changed[maps["brain"]] / 100.0
            half = info["depth"] / 2
            inside = label[maps["brain"]]
            assert (change[inside] > half - 1e-6).all() and (change[~inside] <= half + 1e-6).all()
        else:  # hard-edged kinds change nothing outside their label
            assert np.array_equal(changed[~label], flat[~label]), kind
        if sign:
            inside = changed[label & ~(kind == "haemorrhage" and _rim(label))] - 100.0
            assert (np.sign(inside) == sign).all(), kind
        else:  # tumour: dark oedema and necrosis, a bright enhancing part
            assert (changed[label] < 100).any() and (changed[label] > 100).any()
        assert info["volume_ml"] == pytest.approx(label.sum() * 64 / 1000.0)


def _rim(label: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return label & ~ndimage.binary_erosion(label)
