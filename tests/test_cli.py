"""Command-line contract: clear one-line errors, non-zero exits, nothing half-written."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from AnomalySegLib.cli.commands import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("anomalyseg: error:")]
    assert len(lines) >= 1, err
    return lines[0]


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture()
def case(synthetic_cohort):
    return synthetic_cohort["test"][0]


def test_segment_missing_input(trained_model_path, tmp_path, capsys):
    code, _, err = run_cli(["segment", tmp_path / "missing.nii.gz", "--model", trained_model_path,
                            "--output-dir", tmp_path / "out"], capsys)
    assert code == 1
    assert "missing.nii.gz" in _error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nan", "2d", "4d", "empty", "corrupt"])
def test_segment_bad_volumes(kind, trained_model_path, tmp_path, capsys):
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "nan":
        data = np.random.default_rng(0).random((20, 20, 10)).astype(np.float32)
        data[3, 3, 3] = np.nan
        _write(path, data)
    elif kind == "2d":
        _write(path, np.ones((20, 20), np.float32))
    elif kind == "4d":
        _write(path, np.ones((20, 20, 10, 3), np.float32))
    elif kind == "empty":
        _write(path, np.zeros((20, 20, 10), np.float32))
    else:
        path.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", path, "--model", trained_model_path, "--output-dir", out], capsys)
    assert code == 1
    line = _error_line(err)
    expected = {"nan": "NaN", "2d": "3D", "4d": "3D", "empty": "", "corrupt": ""}[kind]
    assert expected in line
    assert len(line) < 300
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for a bad input"


def test_segment_wrong_model_file(case, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_text("not a model")
    code, _, err = run_cli(["segment", case, "--model", fake, "--output-dir", tmp_path / "o"], capsys)
    assert code == 1 and "not an AnomalySeg model file" in _error_line(err)


def test_existing_outputs_are_kept_without_overwrite(case, trained_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["segment", case, "--model", trained_model_path, "--output-dir", out, "-q"], capsys)[0] == 0
    report = out / "lesion_000_report.json"
    report.write_text("sentinel")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(["segment", case, "--model", trained_model_path, "--output-dir", out, "-q"], capsys)
    assert code == 1 and "--overwrite" in _error_line(err)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert report.read_text() == "sentinel"
    code, _, _ = run_cli(["segment", case, "--model", trained_model_path, "--output-dir", out, "-q",
                          "--overwrite"], capsys)
    assert code == 0 and json.loads(report.read_text())["lesion_count"] >= 0
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output(case, trained_model_path, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run_cli(["segment", case, "--model", trained_model_path, "--output-dir", ro], capsys)
    assert code == 1 and "not writable" in _error_line(err)


def test_output_dir_is_a_file(case, trained_model_path, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_cli(["segment", case, "--model", trained_model_path, "--output-dir", target], capsys)
    assert code == 1 and "is a file" in _error_line(err)


def test_bad_input_among_good_ones_still_processes_the_rest(case, trained_model_path, tmp_path, capsys):
    bad = _write(tmp_path / "bad.nii.gz", np.zeros((10, 10, 5), np.float32))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["segment", bad, case, "--model", trained_model_path, "--output-dir", out, "-q"],
                                capsys)
    assert code == 1
    assert "bad" in _error_line(err) and "1 of 2 input(s) failed" in err
    assert (out / "lesion_000.seg.nrrd").exists() and not list(out.glob("bad*"))


def test_uncalibrated_model_is_refused_before_work(tiny_model, case, tmp_path, capsys):
    tiny_model.calibration = None
    path = tmp_path / "uncal.pt"
    tiny_model.save(path)
    code, _, err = run_cli(["segment", case, "--model", path, "--output-dir", tmp_path / "o"], capsys)
    assert code == 1 and "anomalyseg calibrate" in _error_line(err)


def test_train_refuses_to_overwrite_model(trained_model_path, synthetic_cohort, capsys):
    before = trained_model_path.stat().st_mtime_ns
    code, _, err = run_cli(["train", *synthetic_cohort["healthy"][:2], "--output", trained_model_path], capsys)
    assert code == 1 and "--overwrite" in _error_line(err)
    assert trained_model_path.stat().st_mtime_ns == before


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.nii.gz", "--model", "m.pt", "--output-dir", "o", "--percentile", "120"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "x", "--output", "m.pt", "--image-size", "100"])
    assert exc.value.code == 2


def test_calibrate_updates_threshold_and_percentile(tiny_model, synthetic_cohort, tmp_path, capsys):
    path = tmp_path / "m.pt"
    tiny_model.save(path)
    code, out, err = run_cli(["calibrate", path, *synthetic_cohort["healthy"][:3], "--percentile", "99", "-q"], capsys)
    assert code == 0 and "p99" in out
    # three healthy volumes are too few for a trustworthy operating point: the user is told
    assert "warning: the operating point was chosen on only 3 healthy volume(s)" in err
    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.model.bundle import load_model

    updated = load_model(path)
    assert updated.method.default_percentile == 99.0
    assert updated.calibration.n_volumes == 3
    expected = calibrate(tiny_model, synthetic_cohort["healthy"][:3], device="cpu")
    assert updated.calibration.threshold(99.0) == pytest.approx(expected.threshold(99.0), rel=1e-6)


def test_console_script_and_module_entry_point(trained_model_path):
    # the installed entry point and `python -m AnomalySegLib` both work and exit non-zero on errors
    proc = subprocess.run([sys.executable, "-m", "AnomalySegLib", "info", str(trained_model_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["method"]["method"] == "amcons" and info["calibrated"] is True
    proc = subprocess.run([sys.executable, "-m", "AnomalySegLib", "info", "/nonexistent.pt"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "anomalyseg: error: model file not found: /nonexistent.pt"


def test_calibration_warning_follows_the_budget_rule(capsys):
    """``train`` / ``calibrate`` warn when the operating point could not keep the false-blob
    budget under the stored rule (90 % upper bound), and stay quiet when it did."""
    import numpy as np

    from AnomalySegLib.cli.commands import _warn_about_calibration
    from AnomalySegLib.segmentation.calibration import Calibration

    cal = Calibration(np.array([0.0, 50.0, 100.0]), np.array([0.0, 1.0, 2.0]), n_pixels=10, n_images=8, n_volumes=8,
                      operating_percentile=99.99, max_false_components=1.0, budget_confidence=0.9)
    cal.false_components_per_volume = 5 / 8  # bound chi2.ppf(0.9, 12) / 16 = 1.16 > 1
    _warn_about_calibration(cal)
    err = capsys.readouterr().err
    assert "0.62 false component(s) each" in err and "with 90% confidence" in err and "p99.99" in err
    cal.false_components_per_volume = 4 / 8  # bound 0.999 <= 1: met
    _warn_about_calibration(cal)
    assert capsys.readouterr().err == ""
    cal.budget_confidence = None  # a file from before the margin: the plain mean, 0.62 <= 1
    cal.false_components_per_volume = 5 / 8
    _warn_about_calibration(cal)
    assert capsys.readouterr().err == ""
