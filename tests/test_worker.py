"""The JSON-lines worker protocol, with real subprocesses.

Progress lines, result, error lines and exit statuses; cancel ends the worker *and* its
children (SIGTERM to the process group, SIGKILL after the grace period); stray output of
libraries never corrupts the protocol; one real ``segment`` run with a tiny model is
compared with the in-process core.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from AnomalySegLib import errors
from AnomalySegLib.worker.client import WorkerProcess
from AnomalySegLib.worker.protocol import (
    EXIT_BAD_REQUEST,
    EXIT_CANCELLED,
    EXIT_ERROR,
    TEST_TASKS_ENV,
    error_from_message,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="process-group signals are POSIX; Windows uses taskkill")


@pytest.fixture
def test_tasks(monkeypatch):
    """Enable the worker's test-only tasks for child processes."""
    monkeypatch.setenv(TEST_TASKS_ENV, "1")


def _process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting to be reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_process_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(_process_gone(p) for p in pids)


def _start_sleeper(**request):
    logs = []
    worker = WorkerProcess({"task": "sleep", **request},
                           on_event=lambda m: logs.append(m) if m["type"] == "log" else None).start()
    deadline = time.monotonic() + 20
    while not logs and time.monotonic() < deadline:
        worker.poll(timeout=0.1)
    assert logs, "worker did not report its children"
    return worker, logs[0]


def _write_request(tmp_path, request) -> Path:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    return path


def test_progress_lines_then_result(test_tasks):
    events = []
    worker = WorkerProcess({"task": "sleep", "seconds": 0.3, "children": 0}, on_progress=events.append).start()
    result = worker.wait(timeout=30)
    assert worker.returncode == 0
    assert result["type"] == "result" and result["task"] == "sleep"
    # one progress line per step, steps numbered 1..n, fractions in [0, 1] and non-decreasing
    assert len(events) == result["steps"] >= 3
    assert [e["step"] for e in events] == list(range(1, len(events) + 1))
    fractions = [e["fraction"] for e in events]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
    assert all(e["stage"] == "segment" and e["type"] == "progress" for e in events)


def test_stray_stdout_goes_to_stderr(test_tasks):
    worker = WorkerProcess({"task": "sleep", "seconds": 0.1, "children": 0, "noise": True}).start()
    worker.wait(timeout=30)
    assert "noise from print()" in worker.stderr_tail
    assert "noise written to file descriptor 1" in worker.stderr_tail


def test_missing_input_gives_error_line_and_exit_1(tmp_path):
    request = {"task": "segment", "input": str(tmp_path / "missing.nii.gz"), "model": str(tmp_path / "m.pt"),
               "heatmap": str(tmp_path / "heatmap.nii.gz")}
    proc = subprocess.run([sys.executable, "-m", "AnomalySegLib.worker", str(_write_request(tmp_path, request))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_ERROR
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1]["type"] == "error" and lines[-1]["kind"] == "InputError"
    assert "missing.nii.gz" in lines[-1]["message"]
    assert not (tmp_path / "heatmap.nii.gz").exists()
    # the client raises the matching exception class
    with pytest.raises(errors.InputError, match="missing.nii.gz"):
        WorkerProcess(request).start().wait(timeout=60)


def test_bad_requests_exit_2(tmp_path):
    for request in ({"task": "no-such-task"}, {"task": "segment", "model": "x.pt"}):
        proc = subprocess.run([sys.executable, "-m", "AnomalySegLib.worker", str(_write_request(tmp_path, request))],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == EXIT_BAD_REQUEST
        assert json.loads(proc.stdout.splitlines()[-1])["kind"] == "BadRequest"
    # test-only tasks are refused unless enabled
    assert os.environ.get(TEST_TASKS_ENV) != "1"
    proc = subprocess.run([sys.executable, "-m", "AnomalySegLib.worker",
                           str(_write_request(tmp_path, {"task": "sleep"}))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_BAD_REQUEST


def test_error_classes_by_kind():
    assert type(error_from_message({"kind": "ModelFileError", "message": "m"})) is errors.ModelFileError
    assert type(error_from_message({"kind": "OutputError", "message": "m"})) is errors.OutputError
    assert type(error_from_message({"kind": "InternalError", "message": "m"})) is errors.AnomalySegError


@posix_only
def test_cancel_kills_worker_and_children(test_tasks):
    worker, info = _start_sleeper(seconds=60, children=2)
    pids = [info["pid"], *info["child_pids"]]
    assert info["pid"] == worker.pid and len(pids) == 3
    assert not any(_process_gone(p) for p in pids)
    start = time.monotonic()
    worker.cancel(grace_s=5.0)
    with pytest.raises(errors.Cancelled):
        worker.wait(timeout=30)
    assert worker.returncode == EXIT_CANCELLED  # the worker turned SIGTERM into Cancelled itself
    assert _wait_gone(pids)
    assert time.monotonic() - start < 5.0


@posix_only
def test_cancel_escalates_to_sigkill(test_tasks):
    worker, info = _start_sleeper(seconds=60, children=1, ignore_sigterm=True)
    pids = [info["pid"], *info["child_pids"]]
    worker.cancel(grace_s=0.5, wait=True)
    with pytest.raises(errors.Cancelled):
        worker.wait(timeout=30)
    assert worker.returncode == -9
    assert _wait_gone(pids)


def test_wait_timeout_cancels(test_tasks):
    worker = WorkerProcess({"task": "sleep", "seconds": 60, "children": 0}).start()
    with pytest.raises(TimeoutError):
        worker.wait(timeout=0.5)
    assert worker.finished and _process_gone(worker.pid)


# ----------------------------------------------------------------------------- real segment task


def make_tiny_model(path: Path, healthy_path: Path, *, calibrated: bool = True, seed: int = 0):
    """A small random-weight AMCons model (32 px), calibrated on one healthy volume, saved to ``path``."""
    torch = pytest.importorskip("torch")
    from AnomalySegLib.pipeline.calibrate import calibrate
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.networks import ConvVAE, VAEConfig
    from AnomalySegLib.data.preprocessing import PreprocessConfig

    torch.manual_seed(seed)
    config = VAEConfig(image_size=32, base_width=4, latent_dim=8)
    model = AnomalyModel(network=ConvVAE(config).eval(), network_config=config,
                         preprocessing=PreprocessConfig(image_size=32), method=MethodParams.defaults("amcons"))
    if calibrated:
        model.calibration = calibrate(model, [healthy_path], device="cpu")
    model.save(path)
    return model


def test_segment_task_matches_in_process_core(tmp_path, make_oblique_volume):
    """The worker scores only; thresholding its map with the core gives `anomalyseg segment`'s result."""
    import nibabel as nib

    from AnomalySegLib.segmentation.calibration import Calibration
    from AnomalySegLib.pipeline.inference import segment_volume
    from AnomalySegLib.model.bundle import load_model
    from AnomalySegLib.segmentation.segment import segment_heatmap
    from AnomalySegLib.io.volume_io import read_volume

    healthy = make_oblique_volume(tmp_path, "healthy", shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0),
                                  centre_ras=(1.5, -2.0, 3.0), seed=1)
    case = make_oblique_volume(tmp_path, "case", shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0),
                               centre_ras=(1.5, -2.0, 3.0), seed=2)
    model_path = tmp_path / "tiny.pt"
    make_tiny_model(model_path, healthy.path)
    events = []
    request = {"task": "segment", "input": str(case.path), "model": str(model_path), "device": "cpu",
               "heatmap": str(tmp_path / "out" / "heatmap.nii.gz"),
               "brain_mask": str(tmp_path / "out" / "brain.nii.gz"), "percentile": 97.5}
    result = WorkerProcess(request, on_progress=events.append).start().wait(timeout=120)

    model = load_model(model_path)
    expected = segment_volume(model, read_volume(case.path), percentile=97.5, device="cpu")
    heat = nib.load(result["heatmap"])
    np.testing.assert_allclose(heat.affine, case.affine, atol=1e-5)  # the input's own grid
    assert heat.shape == case.data.shape and heat.get_data_dtype() == np.float32
    heatmap = np.asarray(heat.dataobj)
    np.testing.assert_allclose(heatmap, expected.heatmap, rtol=1e-5, atol=1e-6)
    brain = np.asarray(nib.load(result["brain_mask"]).dataobj) != 0
    assert not heatmap[~brain].any()  # the map is 0 outside the brain
    # what the caller needs to threshold without torch, through the one core function
    assert result["percentile"] == 97.5 and "report" not in result and "threshold" not in result
    assert result["default_percentile"] == model.default_percentile
    assert result["fallback_percentile"] == model.method.default_percentile
    calibration = Calibration.from_dict(result["calibration"])
    assert list(calibration.values) == pytest.approx(list(model.calibration.values))
    assert result["model_version"] == model.version and result["shape"] == list(case.data.shape)
    again = segment_heatmap(heatmap, brain, heat.affine, calibration, result["percentile"],
                            fallback_percentile=result["fallback_percentile"], model_version=result["model_version"])
    assert again.threshold == pytest.approx(expected.threshold)
    np.testing.assert_array_equal(again.mask, expected.mask)
    assert again.report()["lesions"] == expected.report()["lesions"]
    assert {e["stage"] for e in events} >= {"prepare", "segment", "write"}
    assert events[-1]["stage"] == "write" and events[-1]["fraction"] == 1.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["brain.nii.gz", "heatmap.nii.gz"]


def test_info_task_reports_the_operating_point(tmp_path, make_oblique_volume):
    from AnomalySegLib.model.bundle import load_model

    healthy = make_oblique_volume(tmp_path, "healthy", shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0),
                                  centre_ras=(1.5, -2.0, 3.0), seed=1)
    model_path = tmp_path / "tiny.pt"
    make_tiny_model(model_path, healthy.path)
    result = WorkerProcess({"task": "info", "model": str(model_path)}).start().wait(timeout=120)
    assert result["default_percentile"] == load_model(model_path).default_percentile


def test_uncalibrated_model_error_names_no_command_line_flags(tmp_path, make_oblique_volume):
    case = make_oblique_volume(tmp_path, "case", shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0),
                               centre_ras=(1.5, -2.0, 3.0), seed=2)
    model_path = tmp_path / "raw.pt"
    make_tiny_model(model_path, case.path, calibrated=False)
    request = {"task": "segment", "input": str(case.path), "model": str(model_path), "device": "cpu",
               "heatmap": str(tmp_path / "heatmap.nii.gz")}
    with pytest.raises(errors.ModelFileError, match="not calibrated") as info:
        WorkerProcess(request).start().wait(timeout=120)
    assert "--" not in str(info.value) and "anomalyseg " not in str(info.value)


# ----------------------------------------------------------------------------- train task: profiles

TINY_HEAD = dict(shape=(40, 34, 10), radii_mm=(13.0, 22.0, 14.0), centre_ras=(1.5, -2.0, 3.0))


def test_train_task_resolves_the_profile_and_reports_what_ran(tmp_path, make_oblique_volume):
    """``auto`` resolves against the device the worker trains on (CPU here: ``fast``); only the
    explicit overrides replace profile values; the settings come back before training starts
    and with the result, and the model stores the resolved profile."""
    pytest.importorskip("torch")
    from AnomalySegLib.model.bundle import load_model
    from AnomalySegLib.pipeline.profiles import DEFAULT_METHOD, PROFILES

    folder = tmp_path / "healthy"
    folder.mkdir()
    for seed in (1, 2, 3):
        make_oblique_volume(folder, f"healthy{seed}", seed=seed, **TINY_HEAD)
    overrides = {"epochs": 1, "image_size": 32, "base_width": 4, "batch_size": 8, "learning_rate": None}
    request = {"task": "train", "healthy_dir": str(folder), "output": str(tmp_path / "m.pt"), "profile": "auto",
               "overrides": overrides,
               "config": {"device": "cpu", "amp": False, "latent_dim": 8, "calibration_fraction": 0.34}}
    events = []
    result = WorkerProcess(request, on_progress=events.append).start().wait(timeout=300)

    expected = {"profile": "fast", "method": DEFAULT_METHOD, "epochs": 1, "image_size": 32, "base_width": 4,
                "batch_size": 8, "learning_rate": PROFILES["fast"]["learning_rate"], "device_type": "cpu",
                "overrides": ["base_width", "batch_size", "epochs", "image_size"]}  # None is no override
    announced = [e for e in events if "settings" in e]
    assert len(announced) == 1 and announced[0]["settings"] == expected
    assert events.index(announced[0]) < min(i for i, e in enumerate(events) if e["stage"] == "train")
    assert "profile fast: 32 px, width 4, 1 epochs" in announced[0]["message"]
    assert result["settings"] == expected
    model = load_model(result["model"])
    recorded = model.training["config"]
    assert (recorded["profile"], recorded["method"], recorded["learning_rate"]) == ("fast", "dae", 1e-3)
    assert model.method.method == "dae" and model.calibration is not None


def test_train_task_refuses_unknown_profiles_and_impossible_settings(tmp_path, make_oblique_volume):
    pytest.importorskip("torch")
    make_oblique_volume(tmp_path, "healthy1", seed=1, **TINY_HEAD)
    base = {"task": "train", "healthy": [str(tmp_path / "healthy1.nii.gz")], "output": str(tmp_path / "m.pt"),
            "config": {"device": "cpu"}}
    with pytest.raises(errors.AnomalySegError, match="unknown profile 'huge'"):
        WorkerProcess({**base, "profile": "huge"}).start().wait(timeout=120)
    with pytest.raises(errors.AnomalySegError, match="epochs must be >= 1"):
        WorkerProcess({**base, "profile": "paper", "overrides": {"epochs": 0}}).start().wait(timeout=120)
    with pytest.raises(errors.AnomalySegError, match="unknown method"):
        WorkerProcess({**base, "overrides": {"method": "nope"}}).start().wait(timeout=120)
    assert not (tmp_path / "m.pt").exists()
