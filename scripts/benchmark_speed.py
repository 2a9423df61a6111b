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
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


METHODS = ("amcons", "gradcamcons", "vae")


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
    else:
        raise ValueError(f"unknown measurement {kind}")

    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["rss_before_mb"] = round(rss_before, 1)
    result["peak_rss_is_lifetime"] = not peak_reset
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return result


def _run_isolated(kind: str, method: Optional[str], cfg: dict) -> dict:
    payload = json.dumps({"kind": kind, "method": method, "cfg": cfg})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", payload],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"kind": kind, "method": method, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


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
                                          "distinct_volumes", "methods")}
    jobs = [("train", m) for m in args.methods] + [("score_volume", m) for m in args.methods] + [("network", None)]
    results = []
    for kind, method in jobs:
        print(f"measuring {kind} {method or ''}".rstrip(), file=sys.stderr, flush=True)
        if args.no_isolate:
            results.append(measure(kind, method, cfg))
        else:
            results.append(_run_isolated(kind, method, cfg))
    report = {"command": command_line(__file__, argv), "machine": machine_info(args.device), "config": cfg,
              "isolated": not args.no_isolate, "results": results}
    args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
