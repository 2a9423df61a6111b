#!/usr/bin/env python
"""Speed and memory: training images/s, inference seconds per volume, attention-only vs full forward.

Measurements (each in its own Python process by default, so peak memory is its own):

* ``train``: ``training.train_model`` (the real loop: Adam, AMP on CUDA), images/s over
  the steps after the first; GradCAMCons with its size constraint active (double backprop).
* ``score_volume``: ``inference.score_volume`` end to end for one volume (preprocessing,
  network, mapping back to the voxel grid), median over repeats after a warm-up.
* ``network``: the network alone on the volume's prepared slices: AMCons attention
  (encoder up to the attention stage), GradCAMCons map (encoder + gradient of mu), VAE
  residual (encoder + decoder) and a plain full forward pass (encoder + decoder).

Against the authors' network and per stage (``--measure compare train_compare stages``; each
in one process, the paths run alternately and the median is kept, so the ratios hold on a
loaded machine):

* ``compare``: at each ``--compare-sizes`` (224 128), one inference batch of real slices:
  the authors' attention-only path (their network, ``reference_network``: channel mean of
  layer1, bilinear upsampling) and their shipped inference (the full network with autograd
  on), against ours before (plain network) and as ``score_prepared`` runs it (``nn/speed.py``:
  BatchNorm folded, channels-last, amcons in bfloat16 on CPUs with native bf16); speed
  ratios = reference seconds / ours, and the max map difference to the plain network.
* ``train_compare``: training steps at ``--train-size`` / ``--train-width`` / ``--batch-size``
  (default: the CPU profile, 96 px, width 16, batch 32): the dae U-Net NCHW vs channels-last,
  and AMCons ours vs the authors' network and loss; with ``--compile-train`` also the
  ``torch.compile``'d steps (amcons, dae) and their one-off compilation seconds.
* ``stages``: one 1 mm 256 x 256 x 176 volume end to end (read, preprocess, network, map
  back, threshold + lesions, write), seconds per stage, ``--e2e-method`` (amcons).

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident set size
of the process during the measurement (Linux VmHWM, reset just before it; elsewhere
``resource.getrusage``, the process lifetime peak), next to the resident size before it.

Timing uses synthetic volumes from the MNI152 template; weights are random for inference
(the time does not depend on them). Example::

    python scripts/benchmark_speed.py --output speed.json --markdown speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


METHODS = ("amcons", "gradcamcons", "vae")
MEASUREMENTS = ("train", "score_volume", "network", "compare", "train_compare", "stages")


def _status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak is this measurement's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set size: VmHWM (resettable) on Linux, else ru_maxrss (process lifetime)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1024.0 ** 2 if sys.platform == "darwin" else 1024.0  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _volumes(cfg: dict):
    from AnomalySegLib.data.synthetic import load_template, synthesize_case
    from AnomalySegLib.io.volume_io import Volume

    tpl = load_template("mni152", cfg["resolution"])
    out = []
    for i in range(cfg["distinct_volumes"]):
        case = synthesize_case(tpl, 1000 + i, contrast="flair", n_slices=cfg["slices"])
        out.append(Volume(case.image, case.affine))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _untrained_model(method: str, cfg: dict):
    from AnomalySegLib.nn.methods import MethodParams
    from AnomalySegLib.model.bundle import AnomalyModel
    from AnomalySegLib.nn.networks import ConvVAE, VAEConfig
    from AnomalySegLib.data.preprocessing import PreprocessConfig

    net_cfg = VAEConfig(image_size=cfg["image_size"], base_width=cfg["width"], latent_dim=cfg["latent_dim"])
    return AnomalyModel(network=ConvVAE(net_cfg).eval(), network_config=net_cfg,
                        preprocessing=PreprocessConfig(image_size=cfg["image_size"]),
                        method=MethodParams.defaults(method))


def measure(kind: str, method: Optional[str], cfg: dict) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    import torch

    from AnomalySegLib.nn.device import autocast_for, resolve_device

    torch.manual_seed(0)
    device = resolve_device(cfg["device"])
    volumes = _volumes(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    import gc

    gc.collect()
    rss_before = _status_mb("VmRSS") or _peak_rss_mb()
    peak_reset = _reset_peak_rss()
    result: dict = {"kind": kind, "method": method, "device": str(device)}

    if kind == "train":
        from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume
        from AnomalySegLib.pipeline.training import TrainConfig, train_model

        per_volume = len(prepare_volume(volumes[0], PreprocessConfig(image_size=cfg["image_size"])).images)
        needed = (cfg["train_steps"] + 1) * cfg["batch_size"]
        copies = max(1, -(-needed // per_volume))
        data = [volumes[i % len(volumes)] for i in range(copies)]
        times: list[float] = []
        config = TrainConfig(method=method, epochs=1, batch_size=cfg["batch_size"], image_size=cfg["image_size"],
                             base_width=cfg["width"], latent_dim=cfg["latent_dim"], device=cfg["device"],
                             calibration_fraction=0.0, method_overrides={"warmup_epochs": 0})
        train_model(data, config, progress=lambda e: times.append(time.perf_counter()) if e.stage == "train" else None)
        steps = len(times) - 1  # the first step carries one-off costs
        result.update(steps_timed=steps, batch_size=cfg["batch_size"],
                      images_per_second=cfg["batch_size"] * steps / (times[-1] - times[0]) if steps > 0 else None)
    elif kind == "score_volume":
        from AnomalySegLib.pipeline.inference import score_volume

        model = _untrained_model(method, cfg)
        score_volume(model, volumes[0], device=device, batch_size=cfg["eval_batch_size"])  # warm-up
        runs = []
        for r in range(cfg["repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            score_volume(model, volumes[r % len(volumes)], device=device, batch_size=cfg["eval_batch_size"])
            _sync(device)
            runs.append(time.perf_counter() - t0)
        result.update(seconds_per_volume=statistics.median(runs), runs=runs,
                      volume_shape=list(volumes[0].shape))
    elif kind == "network":
        from AnomalySegLib.nn.methods import anomaly_scores
        from AnomalySegLib.data.preprocessing import prepare_volume

        model = _untrained_model("amcons", cfg)
        net = model.network.to(device).eval()
        prepared = prepare_volume(volumes[0], model.preprocessing)
        x_all = torch.from_numpy(prepared.images).unsqueeze(1)
        m_all = torch.from_numpy(prepared.masks)
        bs = cfg["eval_batch_size"]

        def run(fn) -> float:
            times = []
            for _ in range(cfg["repeats"] + 1):  # first = warm-up
                _sync(device)
                t0 = time.perf_counter()
                for s in range(0, len(x_all), bs):
                    x = x_all[s:s + bs].to(device)
                    m = m_all[s:s + bs].to(device)
                    with autocast_for(device):
                        out = fn(x, m)
                    float(out.float().sum())  # forces the result (and a device sync)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

        def full_forward(x, m):
            with torch.inference_mode():
                return net(x).logits

        timings = {
            "amcons_attention_only": run(lambda x, m: anomaly_scores(net, x, m, "amcons")),
            "gradcamcons_encoder_and_gradient": run(lambda x, m: anomaly_scores(net, x, m, "gradcamcons")),
            "vae_residual": run(lambda x, m: anomaly_scores(net, x, m, "vae")),
            "full_forward": run(full_forward),
        }
        result.update(slices=int(len(x_all)), seconds_per_volume=timings,
                      attention_speedup_vs_full_forward=timings["full_forward"] / timings["amcons_attention_only"],
                      parameters={p: net.num_parameters(p) for p in ("attention", "encoder", "all")})
    elif kind == "compare":
        result.update(measure_compare(cfg))
    elif kind == "train_compare":
        result.update(measure_train_compare(cfg))
    elif kind == "stages":
        result.update(measure_stages(cfg))
    else:
        raise ValueError(f"unknown measurement {kind}")

    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["rss_before_mb"] = round(rss_before, 1)
    result["peak_rss_is_lifetime"] = not peak_reset
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return result


# ============================================================================ against the authors' network

def _scripts_on_path() -> None:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)


def reference_network(image_size: int, width: int, latent_dim: int):
    """The authors' network as they ship it (scripts/study_attention.py ``ReferenceVAE``): a bare
    7x7/2 convolution (no BN, no ReLU), ResNet-18 layer1-4 (torchvision-style BasicBlocks), dense
    latent, their decoder; eval mode, plain float32 NCHW."""
    _scripts_on_path()
    from study_attention import ReferenceVAE

    from AnomalySegLib.nn.networks import VAEConfig

    return ReferenceVAE(VAEConfig(image_size=image_size, base_width=width, latent_dim=latent_dim)).eval()


def interleaved_medians(fns: dict, repeats: int, device=None) -> dict:
    """Median seconds of each callable, run alternately (forward, then reverse order each
    round) after one warm-up each, so a loaded machine slows all of them alike."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(list(fns)))):
            if device is not None:
                _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            if device is not None:
                _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _slice_batch(cfg: dict, size: int, batch: int):
    """``batch`` central kept slices of the synthetic volume prepared at ``size`` px."""
    import torch

    from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume

    prepared = prepare_volume(_volumes(cfg)[0], PreprocessConfig(image_size=size))
    start = max(0, (len(prepared.images) - batch) // 2)
    x = torch.from_numpy(prepared.images[start:start + batch].copy()).unsqueeze(1)
    return x, torch.from_numpy(prepared.masks[start:start + batch].copy())


def measure_compare(cfg: dict) -> dict:
    """Inference, ours vs the authors' network, interleaved in this process, per image size."""
    import torch
    import torch.nn.functional as F

    from AnomalySegLib.nn.device import resolve_device
    from AnomalySegLib.nn.methods import anomaly_scores
    from AnomalySegLib.nn.networks import ConvVAE, VAEConfig
    from AnomalySegLib.nn.speed import configure_cpu_threads, inference_autocast, inference_dtype, inference_network

    device = resolve_device(cfg["device"])
    if device.type == "cpu":
        configure_cpu_threads()
    out: dict = {"kind": "compare", "method": None, "device": str(device), "threads": torch.get_num_threads(),
                 "batch": cfg["eval_batch_size"], "sizes": {}}
    for size in cfg["compare_sizes"]:
        torch.manual_seed(0)
        net_cfg = VAEConfig(image_size=size, base_width=cfg["width"], latent_dim=cfg["latent_dim"])
        ours = ConvVAE(net_cfg).eval().to(device)
        ref = reference_network(size, cfg["width"], cfg["latent_dim"]).to(device)
        low = inference_dtype(device, "amcons")  # what score_prepared uses for amcons here
        fast_low = inference_network(ours, device, dtype=low)
        fast = inference_network(ours, device)
        x, m = _slice_batch(cfg, size, cfg["eval_batch_size"])
        x, m = x.to(device), m.to(device)
        x_low = x.to(low)

        def ref_attention():
            with torch.inference_mode():  # the authors' attention-only path: channel mean, bilinear upsampling
                am = ref.attention_features(x).mean(dim=1, keepdim=True)
                return F.interpolate(am, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

        def ref_shipped():
            return ref(x).logits  # the authors' shipped inference: full network, autograd on (no no_grad)

        def fast_default(method="amcons"):  # as score_prepared runs it
            with inference_autocast(device, method):
                if method == "amcons":
                    return anomaly_scores(fast_low, x_low, m, method)
                return anomaly_scores(fast, x, m, method)

        fns = {
            "reference_attention_only": ref_attention,
            "reference_shipped_full_network": ref_shipped,
            "ours_attention_only_plain": lambda: anomaly_scores(ours, x, m, "amcons"),
            "ours_attention_only_fast_fp32": lambda: anomaly_scores(fast, x, m, "amcons"),
            "ours_attention_only_fast": fast_default,
            "ours_gradcamcons_fast": lambda: fast_default("gradcamcons"),
            "ours_vae_residual_fast": lambda: fast_default("vae"),
        }
        seconds = interleaved_medians(fns, cfg["repeats"], device)
        plain = fns["ours_attention_only_plain"]()
        span = float(plain.max() - plain.min())
        err = {name: float((fns[name]().float() - plain).abs().max()) / span
               for name in ("ours_attention_only_fast_fp32", "ours_attention_only_fast")}
        ref_att, ref_full = seconds["reference_attention_only"], seconds["reference_shipped_full_network"]
        out["sizes"][str(size)] = {
            "seconds_per_batch": seconds,
            "speed_vs_reference_attention": {k: ref_att / v for k, v in seconds.items() if k.startswith("ours_attention")},
            "speed_vs_reference_shipped": {k: ref_full / v for k, v in seconds.items() if k.startswith("ours_")},
            "map_error_vs_plain": err,
            "amcons_bf16": low == torch.bfloat16,
        }
    return out


def measure_train_compare(cfg: dict) -> dict:
    """Training steps, interleaved in this process: the dae U-Net before (NCHW) / after
    (channels-last, as ``Trainer`` now builds it), and AMCons ours vs the authors' network
    and loss (study_attention.reference_losses), at the same image size, width and batch."""
    import torch

    from AnomalySegLib.nn.device import resolve_device
    from AnomalySegLib.nn.methods import MethodParams, training_loss
    from AnomalySegLib.nn.networks import VAEConfig, build_network

    _scripts_on_path()
    from study_attention import RefOptions, reference_losses

    device = resolve_device(cfg["device"])
    if device.type == "cpu":  # as the Trainer does (both networks share this process's allocator)
        from AnomalySegLib.nn.speed import configure_cpu_allocator

        configure_cpu_allocator()
    size, width, batch = cfg["train_size"], cfg["train_width"], cfg["batch_size"]
    x, m = _slice_batch(cfg, size, batch)
    if len(x) < batch:  # repeat slices to fill the batch
        reps = -(-batch // len(x))
        x, m = x.repeat(reps, 1, 1, 1)[:batch], m.repeat(reps, 1, 1)[:batch]
    x, m = x.to(device), m.to(device)
    setups: dict = {}

    from AnomalySegLib.nn.device import training_autocast
    from AnomalySegLib.nn.speed import mixed_precision_training

    # the Trainer's default precision here: bf16 autocast + channels-last on a CPU with
    # native bf16 (or CUDA mixed precision); float32 elsewhere
    mixed = mixed_precision_training(device)

    compile_seconds: dict = {}

    def add(name, arch, channels_last, loss_fn, net=None, amp=False, compiled=False, anomaly_mode=False):
        torch.manual_seed(0)
        net = net if net is not None else build_network(
            VAEConfig(image_size=size, base_width=width, latent_dim=cfg["latent_dim"], architecture=arch))
        net = net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        # as the Trainer compiles it (TrainConfig.compile): the loss of (x, mask), dynamic=False
        run = (torch.compile(lambda a, b: loss_fn(net, a, b), dynamic=False) if compiled
               else (lambda a, b: loss_fn(net, a, b)))

        def step():
            torch.manual_seed(1)
            # the authors' trainer module (code/methods/train.py) calls
            # torch.autograd.set_detect_anomaly(True) at import: their steps run in that mode
            previous = torch.is_anomaly_enabled()
            torch.autograd.set_detect_anomaly(anomaly_mode)
            try:
                with training_autocast(device, amp):
                    loss, _ = run(xx, m)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            finally:
                torch.autograd.set_detect_anomaly(previous)
            return float(loss.detach())

        setups[name] = step
        if compiled:  # the one-off compilation, timed apart from the steady-state steps
            t0 = time.perf_counter()
            step()
            compile_seconds[name] = time.perf_counter() - t0

    dae, amc = MethodParams.defaults("dae"), MethodParams.defaults("amcons")
    add("dae_before_nchw", "unet", False, lambda n, a, b: training_loss(n, a, b, dae, epoch=0))
    add("dae_after_channels_last", "unet", True, lambda n, a, b: training_loss(n, a, b, dae, epoch=0))
    add("amcons_ours", "vae", True, lambda n, a, b: training_loss(n, a, b, amc, epoch=1))
    if mixed:
        add("dae_mixed", "unet", device.type == "cpu", lambda n, a, b: training_loss(n, a, b, dae, epoch=0), amp=True)
        add("amcons_ours_mixed", "vae", device.type == "cpu", lambda n, a, b: training_loss(n, a, b, amc, epoch=1),
            amp=True)
    if cfg.get("compile_train") and hasattr(torch, "compile"):
        for name, arch, params in (("amcons_ours_compiled", "vae", amc), ("dae_compiled", "unet", dae)):
            try:
                add(name, arch, mixed and device.type == "cpu",
                    lambda n, a, b, p=params: training_loss(n, a, b, p, epoch=1), amp=mixed, compiled=True)
            except Exception as exc:  # noqa: BLE001 -- no compiler here: report, measure the rest
                setups.pop(name, None)
                compile_seconds[name] = f"failed: {str(exc).strip().splitlines()[0][:120]}"
    ref = reference_network(size, width, cfg["latent_dim"])
    opts = RefOptions()
    add("amcons_reference", "vae", False,
        lambda n, a, b: reference_losses(n, a, b, beta=10.0, lambda_h=0.1, epoch=1, opts=opts), net=ref)
    # the same network and loss as the authors ship their trainer: autograd anomaly detection on
    add("amcons_reference_shipped", "vae", False,
        lambda n, a, b: reference_losses(n, a, b, beta=10.0, lambda_h=0.1, epoch=1, opts=opts),
        net=reference_network(size, width, cfg["latent_dim"]), anomaly_mode=True)
    first = {}
    for name in ("dae_before_nchw", "dae_after_channels_last"):
        first[name] = setups[name]()  # same initial weights and noise: the first losses must agree
    seconds = interleaved_medians(setups, cfg["train_repeats"], device)
    ips = {k: batch / v for k, v in seconds.items()}
    return {"kind": "train_compare", "method": None, "device": str(device), "image_size": size, "width": width,
            "batch_size": batch, "images_per_second": ips,
            "ratios": {"dae_after_vs_before": ips["dae_after_channels_last"] / ips["dae_before_nchw"],
                       "amcons_ours_vs_reference": ips["amcons_ours"] / ips["amcons_reference"],
                       "amcons_ours_vs_reference_shipped": ips["amcons_ours"] / ips["amcons_reference_shipped"],
                       "reference_shipped_vs_reference": ips["amcons_reference_shipped"] / ips["amcons_reference"],
                       **({"dae_mixed_vs_float32_nchw": ips["dae_mixed"] / ips["dae_before_nchw"],
                           "amcons_ours_mixed_vs_reference": ips["amcons_ours_mixed"] / ips["amcons_reference"],
                           "amcons_ours_mixed_vs_reference_shipped":
                               ips["amcons_ours_mixed"] / ips["amcons_reference_shipped"]}
                          if mixed else {})},
            "compile_seconds": compile_seconds,
            "compiled_ratios": {label: ips[k] / ips[base] for label, k, base in (
                ("amcons_compiled_vs_reference", "amcons_ours_compiled", "amcons_reference"),
                ("amcons_compiled_vs_eager", "amcons_ours_compiled", "amcons_ours_mixed" if mixed else "amcons_ours"),
                ("dae_compiled_vs_eager", "dae_compiled", "dae_mixed" if mixed else "dae_after_channels_last"))
                if k in ips},
            "dae_first_loss_rel_diff": abs(first["dae_after_channels_last"] - first["dae_before_nchw"])
            / abs(first["dae_before_nchw"])}


def _whole_brain_volume(cfg: dict):
    """The synthetic 1 mm volume embedded in a 256 x 256 x 176 grid (a typical 1 mm T1/FLAIR)."""
    import numpy as np

    from AnomalySegLib.io.volume_io import Volume

    vol = _volumes(dict(cfg, resolution=1.0, slices=None, distinct_volumes=1))[0]
    target = (256, 256, 176)
    data = np.zeros(target, dtype=np.float32)
    src, dst, shift = [], [], []
    for n, t in zip(vol.data.shape, target):
        if n <= t:
            o = (t - n) // 2
            src.append(slice(0, n)); dst.append(slice(o, o + n)); shift.append(-o)
        else:
            o = (n - t) // 2
            src.append(slice(o, o + t)); dst.append(slice(0, t)); shift.append(o)
    data[tuple(dst)] = vol.data[tuple(src)]
    affine = vol.affine.copy()
    affine[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, :3] @ np.array(shift, dtype=float)
    return Volume(data, affine)


def measure_stages(cfg: dict) -> dict:
    """End to end for one 1 mm 256x256x176 volume, seconds per stage (median over repeats):
    read, preprocess, network, map back (+ smoothing), threshold + lesions, write."""
    import tempfile

    import torch

    from AnomalySegLib.data.preprocessing import prepare_volume
    from AnomalySegLib.io.geometry import voxel_volume_ml
    from AnomalySegLib.io.volume_io import read_volume, write_nifti
    from AnomalySegLib.nn.device import resolve_device
    from AnomalySegLib.pipeline.inference import score_prepared, scores_on_volume_grid, threshold_scores
    from AnomalySegLib.pipeline.outputs import write_case_outputs
    from AnomalySegLib.segmentation.calibration import Calibration

    device = resolve_device(cfg["device"])
    method = cfg["e2e_method"]
    model = _untrained_model(method, cfg)
    volume = _whole_brain_volume(cfg)
    stages = ("read", "preprocess", "network", "map_back", "threshold_lesions", "write")
    runs: dict = {k: [] for k in stages + ("total",)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.nii.gz"
        write_nifti(path, volume.data, volume)
        # untimed warm-up (folds the network, loads libraries) and a calibration table from
        # this volume's own map, so that thresholding has one
        vol = read_volume(path)
        prepared = prepare_volume(vol, model.preprocessing)
        scores = scores_on_volume_grid(score_prepared(model, prepared, device=device,
                                                      batch_size=cfg["eval_batch_size"]),
                                       prepared, vol, smoothing_mm=model.method.smoothing_mm)
        model.calibration = Calibration.from_healthy_maps(
            [(scores.heatmap, scores.brain_mask, voxel_volume_ml(vol.affine))],
            start_percentile=model.method.default_percentile, n_images=len(prepared.images), source="benchmark")
        for _ in range(cfg["repeats"]):
            t = [time.perf_counter()]
            vol = read_volume(path); t.append(time.perf_counter())
            prepared = prepare_volume(vol, model.preprocessing); t.append(time.perf_counter())
            maps = score_prepared(model, prepared, device=device, batch_size=cfg["eval_batch_size"])
            _sync(device); t.append(time.perf_counter())
            scores = scores_on_volume_grid(maps, prepared, vol, smoothing_mm=model.method.smoothing_mm)
            t.append(time.perf_counter())
            result = threshold_scores(scores, model); t.append(time.perf_counter())
            write_case_outputs(Path(tmp) / "out", "case", vol, result, overwrite=True,
                               brain_mask=scores.brain_mask)
            t.append(time.perf_counter())
            for i, k in enumerate(stages):
                runs[k].append(t[i + 1] - t[i])
            runs["total"].append(t[-1] - t[0])
    return {"kind": "stages", "method": method, "device": str(device), "threads": torch.get_num_threads(),
            "volume_shape": list(volume.shape), "slices": int(len(maps)),
            "seconds": {k: statistics.median(v) for k, v in runs.items()}, "runs": runs}


def _run_isolated(kind: str, method: Optional[str], cfg: dict) -> dict:
    payload = json.dumps({"kind": kind, "method": method, "cfg": cfg})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", payload],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"kind": kind, "method": method, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def compare_markdown(report: dict) -> list:
    """Tables of the compare / train_compare / stages measurements (ratios next to seconds)."""
    lines: list = []
    if report.get("load_average_after"):
        lines += ["", "Load average (1, 5, 15 min) when the run ended: "
                  + ", ".join(str(v) for v in report["load_average_after"])
                  + f" on {report['machine'].get('cpu_cores_usable')} cores."]
    for r in report["results"]:
        if r.get("kind") == "compare" and "sizes" in r:
            lines += ["", f"Inference against the authors' network, batch {r['batch']}, {r['threads']} threads, "
                          "interleaved in one process (median seconds per batch; speed = reference s / ours s):", "",
                      "| image size | path | s / batch | speed vs reference attention-only | "
                      "speed vs reference shipped (full, autograd on) | max map error / range vs plain |",
                      "|---|---|---|---|---|---|"]
            for size, d in r["sizes"].items():
                for name, sec in d["seconds_per_batch"].items():
                    att = d["speed_vs_reference_attention"].get(name)
                    full = d["speed_vs_reference_shipped"].get(name)
                    err = d["map_error_vs_plain"].get(name)
                    lines.append(f"| {size} | {name.replace('_', ' ')} | {sec:.4f} | "
                                 f"{'1.00 (reference)' if name == 'reference_attention_only' else (f'{att:.2f}x' if att else '')} | "
                                 f"{'1.00 (reference)' if name == 'reference_shipped_full_network' else (f'{full:.2f}x' if full else '')} | "
                                 f"{'' if err is None else f'{err:.1e}'} |")
            lines.append("")
            lines.append("`fast` = BatchNorm folded + channels-last (what `score_prepared` runs); amcons in bfloat16 "
                         "where the CPU has native bf16: " + ", ".join(
                             f"{s}: {'yes' if d['amcons_bf16'] else 'no'}" for s, d in r["sizes"].items()) + ".")
        elif r.get("kind") == "train_compare" and "images_per_second" in r:
            lines += ["", f"Training steps, {r['image_size']} px, width {r['width']}, batch {r['batch_size']}, "
                          "interleaved in one process:", "", "| network | images/s |", "|---|---|"]
            lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in r["images_per_second"].items()]
            ratios = r["ratios"]
            lines += ["", f"dae after / before: {ratios['dae_after_vs_before']:.2f}x (first-step loss relative "
                          f"difference {r['dae_first_loss_rel_diff']:.1e}); amcons ours (float32) / authors': "
                          f"{ratios['amcons_ours_vs_reference']:.2f}x."]
            if "reference_shipped_vs_reference" in ratios:
                lines += ["", "`amcons reference shipped` = the authors' network and loss in autograd anomaly-detection "
                              "mode, as their trainer module sets it at import: "
                              f"{ratios['reference_shipped_vs_reference']:.2f}x the bare reference's speed."]
            if "amcons_ours_mixed_vs_reference" in ratios:
                shipped = ratios.get("amcons_ours_mixed_vs_reference_shipped")
                lines += ["", "Mixed precision as the `Trainer` runs it by default here (bf16 autocast + channels-last "
                              f"on a CPU with native bf16): dae {ratios['dae_mixed_vs_float32_nchw']:.2f}x its "
                              f"float32 NCHW step; amcons ours / authors' network and loss: "
                              f"**{ratios['amcons_ours_mixed_vs_reference']:.2f}x**"
                          + (f"; / the authors' shipped trainer (anomaly mode): **{shipped:.2f}x**." if shipped
                             else ".")]
            if r.get("compile_seconds"):
                comp = r.get("compiled_ratios", {})
                lines += ["", "torch.compile'd steps (`train --compile`), steady state after a one-off compilation of "
                          + ", ".join(f"{k}: {v:.0f} s" if isinstance(v, float) else f"{k}: {v}"
                                      for k, v in r["compile_seconds"].items()) + "; "
                          + ", ".join(f"{k.replace('_', ' ')} **{v:.2f}x**" for k, v in comp.items()) + "."]
        elif r.get("kind") == "stages" and "seconds" in r:
            sec = r["seconds"]
            lines += ["", f"End to end, {r['method']}, one {'x'.join(map(str, r['volume_shape']))} 1 mm volume "
                          f"({r['slices']} slices kept), {r['threads']} threads, median of "
                          f"{len(r['runs']['total'])} runs:", "", "| stage | seconds | share |", "|---|---|---|"]
            for k, v in sec.items():
                share = "" if k == "total" else f"{100 * v / sec['total']:.0f} %"
                lines.append(f"| {k.replace('_', ' ')} | {v:.3f} | {share} |")
    return lines


def markdown(report: dict) -> str:
    """Tables of a speed report."""
    m = report["machine"]
    cfg = report["config"]
    lines = ["# AnomalySeg speed", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m.get('cpu')} ({m.get('cpu_cores_usable')} usable cores, {m.get('memory_gb')} GB), device "
             f"`{m.get('device')}`" + (f" ({m.get('gpu')})" if m.get("gpu") else "")
             + f", torch {m.get('torch')} ({m.get('torch_threads')} threads), {m.get('date_utc')}"
             + ("" if report["isolated"] else "; all measurements in one process"), "",
             f"Image size {cfg['image_size']}, width {cfg['width']}, latent {cfg['latent_dim']}, training batch "
             f"{cfg['batch_size']}, inference batch {cfg['eval_batch_size']}; synthetic volume "
             f"{cfg['resolution']} mm, " + ("whole brain" if not cfg["slices"] else f"{cfg['slices']} slices") + ".", ""]
    rows = {(r["kind"], r.get("method")): r for r in report["results"]}
    mem = "CUDA peak MB" if any("cuda_peak_allocated_mb" in r for r in report["results"]) else "peak RSS MB"

    def memory(r: dict) -> str:
        if "cuda_peak_allocated_mb" in r:
            return f"{r['cuda_peak_allocated_mb']:.0f}"
        return f"{r.get('peak_rss_mb', float('nan')):.0f} (before {r.get('rss_before_mb', float('nan')):.0f})"

    lines += ["| method | training images/s | inference s/volume (end to end) | " + mem + " train / infer |",
              "|---|---|---|---|"]
    for method in cfg["methods"]:
        tr, sv = rows.get(("train", method), {}), rows.get(("score_volume", method), {})
        ips = tr.get("images_per_second")
        spv = sv.get("seconds_per_volume")
        lines.append(f"| {method} | {'n/a' if ips is None else f'{ips:.1f}'} | "
                     f"{'n/a' if spv is None else f'{spv:.3f}'} | {memory(tr) if tr else 'n/a'} / "
                     f"{memory(sv) if sv else 'n/a'} |")
    net = rows.get(("network", None))
    if net and "seconds_per_volume" in net:
        lines += ["", f"Network only, {net['slices']} slices of one volume (seconds per volume):", "",
                  "| computation | s / volume |", "|---|---|"]
        for name, value in net["seconds_per_volume"].items():
            lines.append(f"| {name.replace('_', ' ')} | {value:.4f} |")
        lines += ["", f"Attention-only inference is {net['attention_speedup_vs_full_forward']:.1f}x faster than a full "
                  f"forward pass ({net['parameters']['attention']:,} of {net['parameters']['all']:,} parameters run)."]
    lines += compare_markdown(report)
    errors = [r for r in report["results"] if "error" in r]
    if errors:
        lines += ["", "Failed measurements:"] + [f"- {r['kind']} {r.get('method')}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=False, help="JSON report to write")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="training batch")
    p.add_argument("--eval-batch-size", type=int, default=16, help="inference batch (the CLI default)")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=float, default=1.0, help="synthetic volume voxel size (mm)")
    p.add_argument("--slices", type=int, default=None, help="central slices per volume (default: whole brain)")
    p.add_argument("--distinct-volumes", type=int, default=2)
    p.add_argument("--no-isolate", action="store_true", help="run every measurement in this process")
    p.add_argument("--measure", nargs="+", default=list(MEASUREMENTS), choices=MEASUREMENTS,
                   help="which measurements (compare / train_compare / stages: against the authors' network "
                        "and per stage, each interleaved in one process)")
    p.add_argument("--compare-sizes", type=int, nargs="+", default=[224, 128],
                   help="image sizes of the inference comparison with the authors' network")
    p.add_argument("--train-size", type=int, default=96, help="train_compare image size (CPU profile: 96)")
    p.add_argument("--train-width", type=int, default=16, help="train_compare width (CPU profile: 16)")
    p.add_argument("--train-repeats", type=int, default=5, help="timed steps per network in train_compare")
    p.add_argument("--compile-train", action="store_true",
                   help="train_compare: also time the torch.compile'd training steps (amcons, dae; ~1-2 min "
                        "of compilation each on a 2-core CPU, reported apart)")
    p.add_argument("--e2e-method", default="amcons", choices=("amcons", "gradcamcons", "vae", "dae"),
                   help="method of the per-stage end-to-end profile")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        print("RESULT " + json.dumps(measure(job["kind"], job["method"], job["cfg"])), flush=True)
        return 0
    if args.output is None:
        p.error("--output is required")

    from AnomalySegLib.evaluation.machine import machine_info

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_benchmark import command_line

    cfg = {k: getattr(args, k) for k in ("device", "image_size", "width", "latent_dim", "batch_size",
                                          "eval_batch_size", "train_steps", "repeats", "resolution", "slices",
                                          "distinct_volumes", "methods", "compare_sizes", "train_size",
                                          "train_width", "train_repeats", "e2e_method", "measure",
                                          "compile_train")}
    jobs = []
    for kind in args.measure:
        jobs += [(kind, m) for m in args.methods] if kind in ("train", "score_volume") else [(kind, None)]
    results = []
    for kind, method in jobs:
        print(f"measuring {kind} {method or ''}".rstrip(), file=sys.stderr, flush=True)
        if args.no_isolate:
            results.append(measure(kind, method, cfg))
        else:
            results.append(_run_isolated(kind, method, cfg))
    report = {"command": command_line(__file__, argv), "machine": machine_info(args.device), "config": cfg,
              "isolated": not args.no_isolate, "results": results}
    if hasattr(os, "getloadavg"):  # a shared machine slows everything; ratios stay comparable (interleaved)
        report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
