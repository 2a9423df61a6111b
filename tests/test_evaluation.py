"""Evaluation metrics against hand-computed values and scikit-learn; the evaluate harness end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from AnomalySegLib.evaluation import harness as ev_harness
from AnomalySegLib.evaluation import labels as ev_labels
from AnomalySegLib.evaluation import metrics as ev
from AnomalySegLib.evaluation import report as ev_report
from AnomalySegLib.errors import InputError, OutputError

# scores / labels with a tie (0.8) across classes; values worked out by hand below.
S = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
Y = np.array([1, 0, 1, 0, 1], dtype=bool)


def test_average_precision_by_hand():
    # thresholds 0.9, 0.8, 0.3, 0.1 -> (R, P) = (1/3, 1), (2/3, 2/3), (2/3, 1/2), (1, 3/5)
    assert ev.average_precision(S, Y) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3) + (1 / 3) * 0.6)
    assert ev.average_precision(S, Y) == pytest.approx(34 / 45)


def test_auroc_by_hand_ties_count_half():
    # pairs (pos, neg): 0.9>0.8, 0.9>0.3, 0.8=0.8 (1/2), 0.8>0.3, 0.1<0.8, 0.1<0.3 -> 3.5 / 6
    assert ev.auroc(S, Y) == pytest.approx(3.5 / 6)


def test_oracle_best_dice_by_hand():
    # Dice at t=0.9: 2/4, t=0.8: 4/6, t=0.3: 4/7, t=0.1: 6/8 -> best 0.75 at 0.1
    best, thr = ev.oracle_best_dice(S, Y)
    assert best == pytest.approx(0.75)
    assert thr == pytest.approx(0.1)
    assert ev.dice(S >= thr, Y) == pytest.approx(best)


def test_degenerate_cases():
    assert math.isnan(ev.average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    assert math.isnan(ev.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert ev.average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert ev.auroc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert ev.auroc(np.array([0.1, 0.9]), np.array([0, 1])) == pytest.approx(1.0)
    assert ev.dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    with pytest.raises(ValueError):
        ev.average_precision(np.array([np.nan, 1.0]), np.array([0, 1]))


def test_against_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.random(3000) < 0.1
        s = np.round(rng.normal(size=3000) + 1.2 * y, 1)  # rounding makes many ties
        assert ev.average_precision(s, y) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
        assert ev.auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        w = rng.uniform(0.5, 3.0, size=3000)
        assert ev.average_precision(s, y, w) == pytest.approx(
            metrics.average_precision_score(y, s, sample_weight=w), abs=1e-12)
        assert ev.auroc(s, y, w) == pytest.approx(metrics.roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_best_dice_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.2
    s = np.round(rng.random(500) + 0.5 * y, 2)
    brute = max(ev.dice(s >= t, y) for t in np.unique(s))
    assert ev.oracle_best_dice(s, y)[0] == pytest.approx(brute)


def test_mask_metrics_and_false_positive_fraction():
    pred = np.array([1, 1, 0, 0, 1, 0], bool)
    truth = np.array([1, 0, 1, 0, 0, 0], bool)
    brain = np.array([1, 1, 1, 1, 0, 0], bool)
    assert ev.overlap_counts(pred, truth) == (1, 2, 1)
    assert ev.overlap_counts(pred, truth, brain) == (1, 1, 1)  # voxel 4 is outside the brain
    assert ev.dice(pred, truth, brain) == pytest.approx(2 / 4)
    assert ev.false_positive_fraction(pred, brain) == pytest.approx(2 / 4)


def test_lesion_detection_26_connectivity_and_overlap():
    truth = np.zeros((6, 6, 6), bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # diagonal neighbours: one 26-connected lesion
    truth[4:6, 4:6, 4:6] = True  # second lesion, 8 voxels
    pred = np.zeros_like(truth)
    pred[1, 1, 1] = True  # hits 1 of 2 voxels of lesion 1
    pred[5, 5, 5] = True  # hits 1 of 8 voxels of lesion 2
    pred[0, 5, 0] = True  # touches nothing
    det = ev.lesion_detection(pred, truth)
    assert det["n_lesions"] == 2 and det["n_detected"] == 2
    assert sorted(det["lesion_sizes"]) == [2, 8]
    assert det["n_pred_components"] == 3 and det["n_false_positive_components"] == 1
    det = ev.lesion_detection(pred, truth, overlap_fraction=0.5)
    assert det["n_detected"] == 1  # 1/2 of lesion 1 is enough, 1/8 of lesion 2 is not
    assert ev.lesion_detection(np.zeros_like(truth), truth)["n_detected"] == 0


def test_pooled_scores_exact_and_subsampled():
    rng = np.random.default_rng(1)
    vols = []
    for _ in range(3):
        y = rng.random(20000) < 0.05
        s = rng.normal(size=20000).astype(np.float32) + 1.5 * y
        vols.append((s, y))
    s_all = np.concatenate([v[0] for v in vols])
    y_all = np.concatenate([v[1] for v in vols])
    exact = ev.PooledScores()
    sub = ev.PooledScores(max_negatives_per_volume=5000)
    for s, y in vols:
        exact.add(s, y)
        sub.add(s, y)
    assert not exact.subsampled and sub.subsampled
    assert exact.curve().average_precision() == pytest.approx(ev.average_precision(s_all, y_all), abs=1e-12)
    c = sub.curve()
    assert c.n_pos == y_all.sum()
    assert c.n_neg == pytest.approx((~y_all).sum())  # weights restore the healthy count
    assert c.average_precision() == pytest.approx(ev.average_precision(s_all, y_all), abs=0.02)
    assert c.auroc() == pytest.approx(ev.auroc(s_all, y_all), abs=0.01)
    # Deterministic: the same input gives the same sample.
    sub2 = ev.PooledScores(max_negatives_per_volume=5000)
    for s, y in vols:
        sub2.add(s, y)
    assert sub2.curve().average_precision() == c.average_precision()
    # Per-volume Dice at a threshold: exact without subsampling.
    assert exact.dice_at(1.0) == pytest.approx([ev.dice(s >= 1.0, y) for s, y in vols])


def test_mean_std_and_json_cleaning():
    assert ev.mean_std([1.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert ev.mean_std([]) == {"mean": None, "std": None, "n": 0}
    cleaned = ev.finite_or_none({"a": np.float32(1.5), "b": [float("inf"), np.int64(2)], "c": np.bool_(True)})
    assert cleaned == {"a": 1.5, "b": [None, 2], "c": True}


def test_label_file_naming(tmp_path):
    assert ev_labels.is_label_file("case1_label.nii.gz")
    assert not ev_labels.is_label_file("case1.nii.gz")
    assert ev_labels.is_label_file("case1_seg.nii", "{name}_seg.nii")
    (tmp_path / "case1.nii.gz").write_bytes(b"")
    assert ev_labels.find_label(tmp_path / "case1.nii.gz") is None
    (tmp_path / "case1_label.nii.gz").write_bytes(b"")
    assert ev_labels.find_label(tmp_path / "case1.nii.gz") == tmp_path / "case1_label.nii.gz"


# ----------------------------------------------------------------------------- harness

AFF = np.diag([2.0, 2.0, 3.0, 1.0])


class FakeScorer:
    """Score = the voxel value inside a fixed brain box; threshold = a fixed table percentile."""

    name = "fake"
    version = "test/fake/0"
    default_percentile = 90.0

    def __init__(self):
        from AnomalySegLib.segmentation.calibration import Calibration

        self.calibration = Calibration.from_scores(np.linspace(0, 1, 1001), n_images=1, n_volumes=1)

    def score_volume(self, volume, **kwargs):
        brain = np.zeros(volume.data.shape, bool)
        brain[1:-1, 1:-1, :] = True
        return SimpleNamespace(heatmap=np.where(brain, volume.data, 0).astype(np.float32), brain_mask=brain,
                               volume=volume)

    def predict_mask(self, scores, percentile):
        thr = self.calibration.threshold(percentile)
        return (scores.heatmap > thr) & scores.brain_mask, thr


def _write(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFF), str(path))
    return path


@pytest.fixture
def fake_set(tmp_path):
    rng = np.random.default_rng(5)
    images, labels, truths, datas = [], [], [], []
    for i in range(3):
        truth = np.zeros((10, 9, 6), bool)
        truth[3:6, 3:5, 1:3] = True
        truth[7, 6, 4] = True  # a second, one-voxel lesion
        data = np.round(rng.random(truth.shape) * 0.8 + 0.35 * truth, 2)  # ties on purpose
        images.append(_write(tmp_path / f"case{i}.nii.gz", data))
        labels.append(_write(tmp_path / f"case{i}_label.nii.gz", truth))
        truths.append(truth)
        datas.append(data)
    free = rng.random((10, 9, 6)) * 0.95
    images.append(_write(tmp_path / "free.nii.gz", free))
    labels.append(None)
    images.append(_write(tmp_path / "zero.nii.gz", free[::-1]))
    labels.append(_write(tmp_path / "zero_label.nii.gz", np.zeros((10, 9, 6))))
    return SimpleNamespace(images=images, labels=labels, truths=truths, datas=datas, free=free, tmp=tmp_path)


def test_evaluate_model_numbers_match_independent_computation(fake_set, tmp_path):
    out = tmp_path / "report"
    res = ev_harness.evaluate_model(FakeScorer(), fake_set.images, fake_set.labels, output_dir=out, percentile=90.0)
    brain = np.zeros((10, 9, 6), bool)
    brain[1:-1, 1:-1, :] = True
    s = np.concatenate([d.astype(np.float32)[brain] for d in fake_set.datas])
    y = np.concatenate([t[brain] for t in fake_set.truths])
    assert res["n_volumes"] == {"lesion": 3, "lesion_free": 2}
    assert res["pooled"]["auprc"] == pytest.approx(ev.average_precision(s, y))
    assert res["pooled"]["auroc"] == pytest.approx(ev.auroc(s, y))
    metrics = pytest.importorskip("sklearn.metrics")
    assert res["pooled"]["auprc"] == pytest.approx(metrics.average_precision_score(y, s))
    thr = 0.9  # 90th percentile of linspace(0, 1)
    assert res["threshold"] == pytest.approx(thr)
    assert res["pooled"]["dice_calibrated"] == pytest.approx(ev.dice(s > thr, y))
    best, best_thr = ev.oracle_best_dice(s, y)
    assert res["pooled"]["oracle_best_dice"] == pytest.approx(best)
    assert res["pooled"]["oracle_threshold_healthy_percentile"] == pytest.approx(100 * best_thr, abs=1e-6)
    # lesion-free: "free" (no label) and "zero" (all-zero label); FP fraction = voxels > 0.9 in the brain
    flagged = sum(np.count_nonzero(f[brain] > thr) for f in (fake_set.free, fake_set.free[::-1]))
    assert res["lesion_free"]["fp_fraction_pooled"] == pytest.approx(flagged / (2 * brain.sum()))
    assert res["lesion_free"]["expected_fp_fraction"] == pytest.approx(0.1)
    # detection: per case, lesions with >= 1 voxel above threshold
    expected = 0
    for d, t in zip(fake_set.datas, fake_set.truths):
        big = t.copy()
        big[7, 6, 4] = False
        expected += int((d[big] > thr).any()) + int(d[7, 6, 4] > thr)
    assert res["detection"]["n_lesions"] == 6 and res["detection"]["n_detected"] == expected
    per = [v for v in res["volumes"] if v["kind"] == "lesion"]
    assert [v["name"] for v in per] == ["case0", "case1", "case2"]
    assert res["per_volume"]["auprc"]["mean"] == pytest.approx(np.mean(
        [ev.average_precision(d.astype(np.float32)[brain], t[brain]) for d, t in zip(fake_set.datas, fake_set.truths)]))
    # every oracle number says so in its key
    flat = json.dumps(res)
    assert "best_dice" not in flat.replace("oracle_best_dice", "")
    # files
    saved = json.loads((out / "results.json").read_text())
    assert saved["pooled"]["auprc"] == pytest.approx(res["pooled"]["auprc"])
    md = (out / "results.md").read_text()
    assert "ORACLE" in md and "| case1 | lesion |" in md
    assert (out / "pr_curve.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("overlay_*.png")) == ["overlay_case0.png", "overlay_case1.png",
                                                                 "overlay_case2.png"]
    with pytest.raises(OutputError):
        ev_harness.evaluate_model(FakeScorer(), fake_set.images, fake_set.labels, output_dir=out)


def test_evaluate_model_rejects_misaligned_labels(fake_set):
    bad = _write(fake_set.tmp / "bad_label.nii.gz", np.zeros((10, 9, 5)))
    with pytest.raises(InputError):
        ev_harness.evaluate_model(FakeScorer(), fake_set.images[:1], [bad])
    shifted = fake_set.tmp / "shift_label.nii.gz"
    aff = AFF.copy()
    aff[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((10, 9, 6), np.float32), aff), str(shifted))
    with pytest.raises(InputError):
        ev_harness.evaluate_model(FakeScorer(), fake_set.images[:1], [shifted])


def test_uncalibrated_scorer_reports_threshold_free_metrics(fake_set):
    scorer = FakeScorer()
    scorer.calibration = None
    res = ev_harness.evaluate_model(scorer, fake_set.images[:3], fake_set.labels[:3])
    assert res["calibrated"] is False and res["threshold"] is None
    assert res["pooled"]["auprc"] is not None and "dice_calibrated" not in res["pooled"]
    assert res["detection"]["detection_rate"] is None
    paths = ev_report.write_report(res, fake_set.tmp / "later")
    assert json.loads(paths["json"].read_text())["calibrated"] is False
    assert "not calibrated" in paths["markdown"].read_text() and paths["pr_curve"].stat().st_size > 0


def test_evaluate_cli_with_a_trained_model(tmp_path, capsys):
    """`anomalyseg evaluate` on a tiny trained model agrees with segment's mask and the API."""
    from AnomalySegLib.cli import commands as cli
    from AnomalySegLib.pipeline import inference
    from AnomalySegLib.data.synthetic import make_cohort
    from AnomalySegLib.pipeline.training import TrainConfig, train_model
    from AnomalySegLib.io.volume_io import read_volume

    make_cohort(tmp_path / "c", n_healthy=3, n_lesion=2, lesion_kinds=["bright"], n_lesion_free_test=1,
                resolution_mm=4.0, n_slices=6)
    healthy = sorted((tmp_path / "c" / "healthy").glob("*.nii.gz"))
    model = train_model(healthy, TrainConfig(epochs=1, batch_size=8, image_size=32, base_width=8, device="cpu",
                                             calibration_fraction=0.34), output=tmp_path / "m.pt")
    test = tmp_path / "c" / "test"
    (tmp_path / "free").mkdir()
    (test / "normal_000.nii.gz").rename(tmp_path / "free" / "normal_000.nii.gz")
    (test / "normal_000_label.nii.gz").unlink()
    out = tmp_path / "ev"
    code = cli.main(["evaluate", "--model", str(tmp_path / "m.pt"), "--images", str(test),
                     "--healthy", str(tmp_path / "free"), "-o", str(out), "--device", "cpu", "-q"])
    assert code == 0
    assert "AUPRC" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_volumes"] == {"lesion": 2, "lesion_free": 1}
    assert saved["machine"]["torch"] and saved["method"] == "amcons"
    # the API on the model file gives the same numbers
    images = sorted(p for p in test.glob("lesion_*.nii.gz") if "_label" not in p.name)
    api = ev_harness.evaluate_model(str(tmp_path / "m.pt"), images, [ev_labels.find_label(p) for p in images], device="cpu")
    assert api["pooled"]["auprc"] == pytest.approx(saved["pooled"]["auprc"])
    assert api["model_version"] == model.version == saved["model_version"]
    # the calibrated mask is segment's mask
    vol = read_volume(test / "lesion_000.nii.gz")
    seg = inference.segment_volume(model, vol, device="cpu")
    truth = read_volume(test / "lesion_000_label.nii.gz").data > 0
    brain = inference.score_volume(model, vol, device="cpu").brain_mask
    first = next(v for v in saved["volumes"] if v["name"] == "lesion_000")
    assert first["dice_calibrated"] == pytest.approx(ev.dice(seg.mask > 0, truth, brain))
    # refuses to overwrite, and errors are one line with exit code 1
    assert cli.main(["evaluate", "--model", str(tmp_path / "m.pt"), "--images", str(test), "-o", str(out), "-q"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "c" / "healthy"),
                     "-o", str(tmp_path / "ev2"), "-q"]) == 1
    assert "no label for healthy_000.nii.gz" in capsys.readouterr().err
    # the baseline through the CLI
    code = cli.main(["evaluate", "--baseline", "intensity", "--calibration-images", str(tmp_path / "c" / "healthy"),
                     "--image-size", "32", "--images", str(test), "-o", str(tmp_path / "ev3"), "-q"])
    assert code == 0 and json.loads((tmp_path / "ev3" / "results.json").read_text())["method"] == "intensity"
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--images", str(test), "-o", str(tmp_path / "ev4")])  # neither --model nor --baseline
    # the fair baseline: the model's preprocessing, post-processing and rule, scores from intensity
    from AnomalySegLib.pipeline.baselines import IntensityBaseline

    calibration = sorted(p for p in (tmp_path / "c" / "healthy").glob("*.nii.gz"))
    code = cli.main(["evaluate", "--baseline", "intensity", "--baseline-like", str(tmp_path / "m.pt"),
                     "--calibration-images", str(tmp_path / "c" / "healthy"), "--images", str(test),
                     "-o", str(tmp_path / "ev5"), "-q"])
    assert code == 0
    like = json.loads((tmp_path / "ev5" / "results.json").read_text())
    direct = ev_harness.evaluate_model(IntensityBaseline.like_model(model).fit(calibration), images,
                                       [ev_labels.find_label(p) for p in images], device="cpu")
    assert like["pooled"]["auprc"] == pytest.approx(direct["pooled"]["auprc"])
    assert like["threshold"] == pytest.approx(direct["threshold"]) and like["source"].endswith("as " + str(tmp_path / "m.pt"))
    for bad, message in ((["--reference-images", str(tmp_path / "c" / "healthy")], "--baseline-like"),
                         (["--baseline-like", str(tmp_path / "m.pt"), "--image-size", "64"], "preprocessing is the model's")):
        assert cli.main(["evaluate", "--baseline", "intensity", "--calibration-images", str(tmp_path / "c" / "healthy"),
                         "--images", str(test), "-o", str(tmp_path / "ev6"), "-q", *bad]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "ev6").exists()
    assert cli.main(["evaluate", "--model", str(tmp_path / "m.pt"), "--baseline-like", str(tmp_path / "m.pt"),
                     "--images", str(test), "-o", str(tmp_path / "ev6"), "-q"]) == 1
    assert "options of --baseline" in capsys.readouterr().err
