"""Training mechanics: split, determinism, checkpoint/resume, cancel, progress, fine-tuning."""

import numpy as np
import pytest
import torch

from AnomalySegLib.errors import AnomalySegError, Cancelled, ModelFileError
from AnomalySegLib.pipeline.training import TrainConfig, learning_rate_at, split_volumes, train_model

FAST = dict(epochs=2, batch_size=8, image_size=32, base_width=4, latent_dim=8, device="cpu", seed=3)


@pytest.fixture(scope="module")
def small_volumes(healthy_volumes):
    # 4 volumes of 8 slices each keep these tests to seconds
    from AnomalySegLib.io.volume_io import Volume

    out = []
    for v in healthy_volumes[:4]:
        k0 = v.data.shape[2] // 2 - 4
        affine = v.affine.copy()
        affine[:3, 3] = v.affine[:3, :3] @ np.array([0, 0, k0]) + v.affine[:3, 3]
        out.append(Volume(v.data[:, :, k0:k0 + 8].copy(), affine, v.path))
    return out


def _weights(model):
    return {k: v.clone() for k, v in model.network.state_dict().items()}


def test_split_is_deterministic_and_disjoint():
    train, cal = split_volumes(10, 0.2, seed=5)
    assert (train, cal) == split_volumes(10, 0.2, seed=5)
    assert len(cal) == 2 and not set(train) & set(cal) and sorted(train + cal) == list(range(10))
    assert split_volumes(1, 0.2, 0) == ([0], [])
    assert split_volumes(3, 0.0, 0) == ([0, 1, 2], [])


def test_same_seed_same_model_and_resume_equals_straight_run(small_volumes, tmp_path):
    straight = train_model(small_volumes, TrainConfig(**FAST))
    again = train_model(small_volumes, TrainConfig(**FAST))
    for k, v in _weights(straight).items():
        assert torch.equal(v, again.network.state_dict()[k]), k

    # interrupt after the first epoch, then resume from the checkpoint
    ckpt = tmp_path / "run.ckpt"
    _interrupt_after_first_epoch(small_volumes, TrainConfig(**FAST), ckpt)
    assert ckpt.exists()
    resumed = train_model(small_volumes, TrainConfig(**FAST), checkpoint=ckpt, resume=True,
                          output=tmp_path / "m.pt")
    for k, v in _weights(straight).items():
        assert torch.allclose(v, resumed.network.state_dict()[k], atol=1e-6), k
    assert [h["epoch"] for h in resumed.training["history"]] == [1, 2]
    assert (tmp_path / "m.pt").exists() and not ckpt.exists()  # checkpoint removed after success


def test_cosine_schedule_formula_and_the_rates_the_optimiser_used(small_volumes, tmp_path, monkeypatch):
    assert learning_rate_at(1e-3, "constant", 7, 10) == 1e-3
    assert learning_rate_at(2.0, "cosine", 0, 8) == pytest.approx(2.0)
    assert learning_rate_at(2.0, "cosine", 2, 8) == pytest.approx(1.0 + np.cos(np.pi / 4))
    assert learning_rate_at(2.0, "cosine", 4, 8) == pytest.approx(1.0)
    assert learning_rate_at(2.0, "cosine", 8, 8) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_at(1.0, "linear", 0, 1)
    with pytest.raises(AnomalySegError, match="schedule must be one of"):
        train_model(small_volumes, TrainConfig(**{**FAST, "lr_schedule": "linear"}))

    # record the rate of every optimiser step of a straight run and of an interrupted + resumed one
    used = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    config = {**FAST, "lr_schedule": "cosine", "learning_rate": 1e-3}
    straight = train_model(small_volumes, TrainConfig(**config))
    steps = len(used)
    assert steps >= 4 and steps % FAST["epochs"] == 0
    assert used == pytest.approx([learning_rate_at(1e-3, "cosine", i, steps) for i in range(steps)])
    assert used[0] == pytest.approx(1e-3) and used[-1] < 1e-3 * 0.2
    assert straight.training["config"]["lr_schedule"] == "cosine"

    used.clear()
    ckpt = tmp_path / "run.ckpt"
    _interrupt_after_first_epoch(small_volumes, TrainConfig(**config), ckpt)
    resumed = train_model(small_volumes, TrainConfig(**config), checkpoint=ckpt, resume=True)
    assert used == pytest.approx([learning_rate_at(1e-3, "cosine", i, steps) for i in range(steps)])
    for k, v in _weights(straight).items():
        assert torch.allclose(v, resumed.network.state_dict()[k], atol=1e-6), k


def _interrupt_after_first_epoch(volumes, config, checkpoint):
    """Run ``config`` until its first epoch is complete, then cancel it (leaving ``checkpoint``)."""
    stop = _StopAfterEpoch(1)
    with pytest.raises(Cancelled):
        train_model(volumes, config, checkpoint=checkpoint, progress=stop.progress, cancel=stop.cancel)


class _StopAfterEpoch:
    """Progress + cancel callbacks that stop a run once ``epoch`` epochs are complete."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.done = False

    def progress(self, event):
        if event.stage == "train" and event.epoch == self.epoch and event.step == event.steps:
            self.done = True

    def cancel(self):
        return self.done


def test_resume_refuses_other_run(small_volumes, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    _interrupt_after_first_epoch(small_volumes, TrainConfig(**FAST), ckpt)
    other = TrainConfig(**{**FAST, "learning_rate": 5e-4})
    with pytest.raises(ModelFileError, match="different training run"):
        train_model(small_volumes, other, checkpoint=ckpt, resume=True)


def test_cancel_writes_no_model(small_volumes, tmp_path):
    out = tmp_path / "model.pt"
    stop = _StopAfterEpoch(1)
    with pytest.raises(Cancelled):
        train_model(small_volumes, TrainConfig(**FAST), output=out, progress=stop.progress, cancel=stop.cancel)
    assert not out.exists()


def test_progress_events_and_calibration_split(small_volumes):
    events = []
    model = train_model(small_volumes, TrainConfig(**{**FAST, "calibration_fraction": 0.25}), progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "prepare" and "train" in stages and stages[-1] == "calibrate"
    train_fractions = [e.fraction for e in events if e.stage == "train"]
    assert train_fractions == sorted(train_fractions) and train_fractions[-1] == pytest.approx(1.0)
    last = [e for e in events if e.stage == "train"][-1]
    assert last.epoch == 2 and set(last.losses) >= {"loss", "rec", "kl", "entropy"}
    assert model.training["train_volumes"] == 3 and model.training["calibration_volumes"] == 1
    assert model.calibration.n_volumes == 1  # held-out volume only
    assert "held-out" in model.calibration.source


def test_fine_tuning_starts_from_the_base_model(small_volumes):
    base = train_model(small_volumes, TrainConfig(**FAST))
    # a learning rate of ~0 keeps the weights: the fine-tuned model must equal its base
    tuned = train_model(small_volumes, TrainConfig(**{**FAST, "learning_rate": 1e-30, "image_size": 64}), init=base)
    assert tuned.network_config == base.network_config  # architecture comes from the base model
    assert tuned.training["config"]["image_size"] == base.network_config.image_size == 32
    for k, v in _weights(base).items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics keep updating
        assert torch.allclose(v, tuned.network.state_dict()[k], atol=1e-6), k
    assert tuned.training["fine_tuned_from"] == base.model_id or base.model_id == ""


def test_bad_settings_are_user_errors(small_volumes):
    with pytest.raises(AnomalySegError, match="unknown method"):
        train_model(small_volumes, TrainConfig(**{**FAST, "method": "nope"}))
    with pytest.raises(AnomalySegError, match="multiple of 32"):
        train_model(small_volumes, TrainConfig(**{**FAST, "image_size": 40}))
    with pytest.raises(AnomalySegError, match="unknown method parameter"):
        train_model(small_volumes, TrainConfig(**{**FAST, "method_overrides": {"gamma": 1}}))


@pytest.mark.parametrize("method", ["gradcamcons", "vae"])
def test_other_methods_train_and_score(small_volumes, method):
    from AnomalySegLib.pipeline.inference import score_volume

    model = train_model(small_volumes, TrainConfig(**{**FAST, "method": method}))
    assert model.method.method == method
    if method == "gradcamcons":
        assert model.method.warmup_epochs == 0 and model.method.default_percentile == 95.0
        assert "barrier" in model.training["history"][-1]
    scores = score_volume(model, small_volumes[0], device="cpu")
    assert scores.heatmap.shape == small_volumes[0].data.shape
    assert np.all(scores.heatmap[~scores.brain_mask] == 0)


@pytest.mark.parametrize("method", ["dae", "amcons"])
def test_cpu_mixed_precision_trains_close_to_float32(small_volumes, tmp_path, method):
    """``amp`` (the default) on a CPU: bfloat16 autocast + channels-last where the CPU has
    native bfloat16, float32 elsewhere (then identical to ``amp=False``). Either way the run
    is recorded, the saved weights are float32 in the usual layout, and training goes where
    float32 training goes (first-step loss within bfloat16 precision)."""
    from AnomalySegLib.model.bundle import load_model
    from AnomalySegLib.nn.speed import cpu_bf16_supported

    first_losses = {}

    def record(name):
        def on_event(event):
            if event.stage == "train" and event.step == 1 and event.epoch == 1:
                first_losses[name] = event.losses["loss"]
        return on_event

    config = {**FAST, "method": method}
    fp32 = train_model(small_volumes, TrainConfig(**config, amp=False), progress=record("fp32"))
    out = tmp_path / "mixed.pt"
    mixed = train_model(small_volumes, TrainConfig(**config), output=out, progress=record("mixed"))
    native = cpu_bf16_supported()
    assert mixed.training["cpu_bfloat16"] is native and mixed.training["amp"] is native
    assert fp32.training["cpu_bfloat16"] is False and fp32.training["amp"] is False
    for name, tensor in mixed.network.state_dict().items():
        assert tensor.dtype in (torch.float32, torch.int64), name
        assert tensor.is_contiguous(), name
    if not native:  # no native bf16: the float32 run exactly
        for name, tensor in fp32.network.state_dict().items():
            assert torch.equal(tensor, mixed.network.state_dict()[name]), name
    assert first_losses["mixed"] == pytest.approx(first_losses["fp32"], rel=2e-2)
    back = load_model(out)
    assert back.training["cpu_bfloat16"] is native and back.calibration is not None


def test_compile_falls_back_to_the_eager_step_when_compilation_fails(small_volumes, monkeypatch):
    """``compile=True`` where torch.compile cannot work (here: it raises on first use, as
    it does without a C++ compiler) trains exactly as without it and says so."""
    import AnomalySegLib.pipeline.training as training

    plain = train_model(small_volumes, TrainConfig(**FAST))

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(training.torch, "compile", broken_compile)
    events = []
    model = train_model(small_volumes, TrainConfig(**FAST, compile=True), progress=events.append)
    assert model.training["compiled"] is False and model.training["config"]["compile"] is True
    notes = model.training["compile_notes"]
    assert any("no working C++ compiler" in n and "training eagerly" in n for n in notes)
    assert any("training eagerly" in (e.message or "") for e in events)
    for key, value in _weights(plain).items():  # the failed attempt changed nothing
        torch.testing.assert_close(model.network.state_dict()[key], value, rtol=0, atol=0)


def test_compile_is_not_attempted_for_gradcamcons_and_dae_and_settings_are_checked(small_volumes, monkeypatch):
    import AnomalySegLib.pipeline.training as training

    called = []
    monkeypatch.setattr(training.torch, "compile", lambda *a, **k: called.append(1))
    model = train_model(small_volumes, TrainConfig(**{**FAST, "method": "gradcamcons", "epochs": 1}, compile=True))
    assert not called and model.training["compiled"] is False
    assert any("double backward" in n for n in model.training["compile_notes"])
    model = train_model(small_volumes, TrainConfig(**{**FAST, "method": "dae", "epochs": 1}, compile=True))
    assert not called and model.training["compiled"] is False
    assert any("measured slower" in n for n in model.training["compile_notes"])
    with pytest.raises(AnomalySegError, match="compile must be true or false"):
        train_model(small_volumes, TrainConfig(**FAST, compile="yes"))


def test_compiled_training_step_trains_like_the_eager_one(small_volumes):
    """The real torch.compile path (inductor; ~30-60 s to compile even this tiny network):
    the loss history follows the eager run's closely and the saved model is an ordinary one."""
    config = {**FAST, "method": "amcons", "epochs": 3, "amp": False}
    eager = train_model(small_volumes, TrainConfig(**config))
    compiled = train_model(small_volumes, TrainConfig(**config, compile=True))
    if not compiled.training["compiled"]:
        pytest.skip("torch.compile is not available here: " + "; ".join(compiled.training["compile_notes"]))
    assert any("compiling the training step" in n for n in compiled.training["compile_notes"])
    a = [h["loss"] for h in eager.training["history"]]
    b = [h["loss"] for h in compiled.training["history"]]
    assert b[-1] < b[0]  # it learns
    np.testing.assert_allclose(b, a, rtol=0.25)  # the same schedule; only the sampling noise differs
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in compiled.network.state_dict().values()
               if v.is_floating_point())


def test_checkpoint_written_before_the_lr_schedule_setting_resumes_as_constant(small_volumes, tmp_path):
    import json

    from AnomalySegLib.model.archive import read_payload, write_payload
    from AnomalySegLib.model.checkpoint import CHECKPOINT_FORMAT

    ckpt = tmp_path / "run.ckpt"
    _interrupt_after_first_epoch(small_volumes, TrainConfig(**FAST), ckpt)
    def as_written_before_the_setting():
        state = read_payload(ckpt, CHECKPOINT_FORMAT)
        config = json.loads(state["config"])
        del config["lr_schedule"]  # as an earlier version wrote it
        state["config"] = json.dumps(config)
        write_payload(state, ckpt)

    as_written_before_the_setting()
    resumed = train_model(small_volumes, TrainConfig(**FAST), checkpoint=ckpt, resume=True)
    assert [h["epoch"] for h in resumed.training["history"]] == [1, 2]
    # the same old checkpoint does not pass for a cosine run
    _interrupt_after_first_epoch(small_volumes, TrainConfig(**FAST), ckpt)
    as_written_before_the_setting()
    with pytest.raises(ModelFileError, match="different training run"):
        train_model(small_volumes, TrainConfig(**{**FAST, "lr_schedule": "cosine"}), checkpoint=ckpt, resume=True)


def test_calibrating_with_the_training_volumes_outside_the_position_statistics(small_volumes, monkeypatch):
    import AnomalySegLib.pipeline.training as training
    from AnomalySegLib.pipeline.calibrate import calibrate

    # 3 training volumes, statistics on every second one (0 and 2): volume 1 of the training
    # split calibrates too, with the held-out one
    assert training.position_stats_indices(32) == list(range(0, 32, 2))  # the CPU default: 16 of 32
    monkeypatch.setattr(training, "POSITION_STATS_MAX_VOLUMES", 2)
    assert training.position_stats_indices(3) == [0, 2]
    assert training.outside_position_stats(3) == [1] and training.outside_position_stats(3, False) == [0, 1, 2]
    config = TrainConfig(**{**FAST, "calibration_fraction": 0.25, "calibrate_with_training": True})
    model = train_model(small_volumes, config)
    train_idx, cal_idx = split_volumes(4, 0.25, FAST["seed"])
    extra = small_volumes[train_idx[1]]
    assert model.training["calibration_training_names"] == [extra.path.name]
    assert model.calibration.n_volumes == 2 and "1 training volume(s) outside the position statistics" in \
        model.calibration.source
    direct = calibrate(model, [small_volumes[cal_idx[0]], extra], device="cpu")
    np.testing.assert_allclose(model.calibration.values, direct.values, rtol=1e-6)
    assert model.calibration.operating_percentile == direct.operating_percentile
    # off: the held-out volume alone, as before
    plain = train_model(small_volumes, TrainConfig(**{**FAST, "calibration_fraction": 0.25,
                                                      "calibrate_with_training": False}))
    assert plain.calibration.n_volumes == 1 and plain.training["calibration_training_names"] == []


def test_bias_flatten_all_trains_the_network_on_the_flattened_images_it_sees_at_inference(small_volumes):
    from AnomalySegLib.data.bias_flatten import flatten_bias
    from AnomalySegLib.io.volume_io import Volume
    from AnomalySegLib.pipeline.training import Trainer

    # a strong left-right field on every scan, so flattening changes the images materially
    ramp = np.linspace(0.7, 1.4, small_volumes[0].data.shape[0])[:, None, None]
    biased = [Volume((v.data * ramp).astype(np.float32), v.affine, v.path) for v in small_volumes]
    config = TrainConfig(**{**FAST, "method": "dae", "calibration_fraction": 0.25,
                            "method_overrides": {"bias_flatten": "all"}})
    trainer = Trainer(config)
    trainer.setup(biased)
    training = [trainer.prepared[i] for i in trainer.train_idx]
    stats = trainer.intensity_stats
    assert stats is not None
    expected = np.concatenate([flatten_bias(v.images, v.masks, v.slice_indices, stats, "quadratic")
                               for v in training]).astype(np.float16)
    np.testing.assert_array_equal(trainer.images, expected)
    raw = np.concatenate([v.images for v in training]).astype(np.float16)
    assert np.abs(expected.astype(np.float32) - raw.astype(np.float32)).max() > 0.05  # not a no-op
    model = trainer.fit(biased)  # setup again (deterministic), train, statistics, calibrate
    # the stored statistics are the ones the training images were flattened against, so
    # inference (score_prepared) gives the network exactly what it was trained on
    np.testing.assert_array_equal(model.intensity_stats.to_dict()["mean"], stats.to_dict()["mean"])
    assert model.training["network_input"] == "bias-flattened"

    # 'intensity' leaves the network's input alone
    plain = Trainer(TrainConfig(**{**FAST, "method": "dae", "method_overrides": {"bias_flatten": "intensity"}}))
    plain.setup(biased)
    assert plain.intensity_stats is None
    np.testing.assert_array_equal(
        plain.images, np.concatenate([plain.prepared[i].images for i in plain.train_idx]).astype(np.float16))
