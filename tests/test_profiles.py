"""Training profiles: device-dependent defaults, explicit overrides, recorded in the model."""

import json

import pytest

from AnomalySegLib.cli.commands import main
from AnomalySegLib.pipeline.profiles import DEFAULT_METHOD, LEARNING_RATES, PROFILES, profile_settings, resolve_profile
from AnomalySegLib.nn.methods import MethodParams


def test_auto_profile_follows_the_device():
    assert resolve_profile("auto", "cpu") == "fast"
    assert resolve_profile("auto", "cuda") == "paper"
    assert resolve_profile("paper", "cpu") == "paper"
    with pytest.raises(ValueError, match="fast"):
        resolve_profile("turbo", "cpu")


def test_profile_settings_and_overrides():
    fast = profile_settings("auto", "cpu")
    assert fast == {"method": DEFAULT_METHOD, "profile": "fast", **PROFILES["fast"]}
    assert DEFAULT_METHOD not in LEARNING_RATES["fast"]
    # the paper's learning rate for the VAE-based methods, also in the CPU profile
    assert profile_settings("fast", "cpu", {"method": "amcons"})["learning_rate"] == 1e-4
    paper = profile_settings("auto", "cuda")
    assert (paper["image_size"], paper["base_width"], paper["epochs"], paper["learning_rate"]) == (224, 64, 50, 1e-4)
    mixed = profile_settings("fast", "cpu", {"epochs": 3, "method": "amcons", "image_size": None})
    assert (mixed["epochs"], mixed["method"], mixed["image_size"]) == (3, "amcons", PROFILES["fast"]["image_size"])


def test_train_without_tuning_flags_uses_and_records_the_profile(synthetic_cohort, tmp_path, capsys):
    out = tmp_path / "m.pt"
    # the fast profile on this CPU, shrunk only where the test must stay fast
    # not --quiet: the resolved settings are announced on stderr (--quiet silences them)
    code = main(["train", *map(str, synthetic_cohort["healthy"][:4]), "-o", str(out),
                 "--epochs", "1", "--image-size", "32", "--width", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "profile fast" in err and "dae" in err
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    config = info["training"]["config"]
    assert config["profile"] == "fast" and config["method"] == DEFAULT_METHOD
    assert config["learning_rate"] == PROFILES["fast"]["learning_rate"]
    assert config["batch_size"] == PROFILES["fast"]["batch_size"]
    assert (config["image_size"], config["base_width"], config["epochs"]) == (32, 4, 1)
    assert info["network"]["architecture"] == "unet"
    assert info["method"]["intensity_term"] == "bright-position"  # the dae's default fusion term
    # the default flattens each scan's bias field, and the network was trained on flattened images
    assert info["method"]["bias_flatten"] == "all" and info["training"]["network_input"] == "bias-flattened"
    cal = info["calibration"]
    assert cal["operating_percentile"] >= info["method"]["default_percentile"]
    assert cal["min_component_ml"] > 0 and cal["false_components_per_volume"] is not None


def test_fine_tuning_keeps_the_base_models_method(trained_model_path, synthetic_cohort, tmp_path, capsys):
    out = tmp_path / "tuned.pt"
    code = main(["train", *map(str, synthetic_cohort["healthy"][:3]), "-o", str(out), "--init",
                 str(trained_model_path), "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "training amcons" in err  # the session model's method, not the profile's default
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"]["method"] == "amcons" and info["training"]["fine_tuned_from"]


def test_intensity_term_and_scan_normalise_flags_reach_the_training_settings(synthetic_cohort, tmp_path, capsys, monkeypatch):
    import AnomalySegLib.pipeline.training as training
    from AnomalySegLib.errors import AnomalySegError

    seen = {}

    def fake_train_model(healthy, config, **kwargs):
        seen["params"] = training.method_params_for(config)
        raise AnomalySegError("stopped by the test")

    monkeypatch.setattr(training, "train_model", fake_train_model)
    code = main(["train", *map(str, synthetic_cohort["healthy"][:2]), "-o", str(tmp_path / "m.pt"), "--quiet",
                 "--intensity-term", "abs-position", "--scan-normalise", "off", "--device", "cpu"])
    assert code == 1 and "stopped by the test" in capsys.readouterr().err
    assert seen["params"].intensity_term == "abs-position" and seen["params"].method == "dae"
    assert seen["params"].scan_normalise == "off"
    assert seen["params"].grow_percentile == 0.0  # the dae default: off
    code = main(["train", *map(str, synthetic_cohort["healthy"][:2]), "-o", str(tmp_path / "m.pt"), "--quiet",
                 "--grow-percentile", "99.5", "--device", "cpu"])
    assert code == 1 and seen["params"].grow_percentile == 99.5
    assert seen["params"].bias_field == MethodParams.defaults("dae").bias_field
    code = main(["train", *map(str, synthetic_cohort["healthy"][:2]), "-o", str(tmp_path / "m.pt"), "--quiet",
                 "--bias-flatten", "all", "--bias-field", "spline", "--device", "cpu"])
    assert code == 1 and (seen["params"].bias_flatten, seen["params"].bias_field) == ("all", "spline")
    capsys.readouterr()
    code = main(["train", *map(str, synthetic_cohort["healthy"][:2]), "-o", str(tmp_path / "m.pt"), "--quiet",
                 "--grow-percentile", "100", "--device", "cpu"])
    assert code not in (0, None) and "grow_percentile" in capsys.readouterr().err
    try:  # a usage error: refused before anything runs
        code = main(["train", str(synthetic_cohort["healthy"][0]), "-o", str(tmp_path / "x.pt"),
                     "--intensity-term", "dark"])
    except SystemExit as exc:
        code = exc.code
    assert code not in (0, None) and "--intensity-term" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_float32_cpu_training_says_how_to_halve_it_and_lr_schedule_reaches_the_config(synthetic_cohort, tmp_path,
                                                                                     capsys, monkeypatch):
    import AnomalySegLib.pipeline.training as training
    from AnomalySegLib.errors import AnomalySegError

    seen = {}

    def fake_train_model(healthy, config, **kwargs):
        seen["config"] = config
        raise AnomalySegError("stopped by the test")

    monkeypatch.setattr(training, "train_model", fake_train_model)
    healthy = [str(p) for p in synthetic_cohort["healthy"][:2]]
    # --no-amp: float32 on any CPU; the profile's epochs were not chosen by the user
    assert main(["train", *healthy, "-o", str(tmp_path / "m.pt"), "--no-amp", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert seen["config"].epochs == PROFILES["fast"]["epochs"] == 16
    assert "float32" in err and f"--epochs {PROFILES['fast']['epochs'] // 2} halves" in err
    assert seen["config"].lr_schedule == "constant"  # the profile's (measured: cosine was not better)
    # explicit epochs: the user chose; no note. --lr-schedule reaches the config
    assert main(["train", *healthy, "-o", str(tmp_path / "m.pt"), "--no-amp", "--device", "cpu", "--epochs", "3",
                 "--lr-schedule", "cosine"]) == 1
    err = capsys.readouterr().err
    assert "halves" not in err and seen["config"].epochs == 3 and seen["config"].lr_schedule == "cosine"
    assert "lr 0.001 cosine" in err
