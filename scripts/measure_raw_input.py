#!/usr/bin/env python
"""Measure the raw-scan building blocks of :mod:`AnomalySegLib.data.raw_input` on this machine.

Prints markdown tables: the machine; wall times of skull check, deepbet brain extraction
and N4 bias correction on Colin27 (``ch2.nii.gz``, 1 mm, 181x217x181) and on the same head
resampled to a rotated sagittal 256x256x176 1 mm grid; Dice of the deepbet mask against
Colin27's skull-stripped ``ch2bet.nii.gz`` (compared in physical space); Dice on inputs
deepbet was not trained for (contrast-inverted Colin27, generated T2/FLAIR-like heads
with a synthetic skull); and the skull-check classification of every test volume.

Needs deepbet (``pip install "anomalyseg[raw]"``) and Debian's mricron-data; optional:
nimare's wheel (``pip install --no-deps nimare``) for an MNI152 head with its skull.
Offline. Example::

    OMP_NUM_THREADS=2 python scripts/measure_raw_input.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnomalySegLib.data.raw_input import (correct_bias_field, dice, dice_physical, extract_brain,  # noqa: E402
                                     resample_mask, skull_check)
from AnomalySegLib.data.synthetic import add_synthetic_skull, package_data_file  # noqa: E402
from AnomalySegLib.io.volume_io import Volume, read_volume  # noqa: E402

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def rotation_x(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def oblique_sagittal(volume: Volume, shape=(256, 256, 176), tilt_deg: float = 10.0) -> Volume:
    """``volume`` resampled (linear) to a 1 mm grid of ``shape`` whose index axes run
    Anterior->Posterior, Superior->Inferior and Right->Left, tilted ``tilt_deg`` about x,
    centred on the head: a sagittal-MPRAGE-like layout that deepbet must reorient."""
    axes = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: i, j, k directions
    affine = np.eye(4)
    affine[:3, :3] = rotation_x(tilt_deg) @ axes
    centre = volume.affine[:3, :3] @ ((np.asarray(volume.shape) - 1) / 2.0) + volume.affine[:3, 3]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    vox = np.linalg.inv(volume.affine) @ affine
    data = ndimage.affine_transform(volume.data, vox[:3, :3], offset=vox[:3, 3], output_shape=shape, order=1,
                                    mode="constant", cval=0.0)
    return Volume(data=data.astype(np.float32), affine=affine)




def inverted_contrast(volume: Volume) -> Volume:
    """T2-like Colin27: intensities inverted inside the head (background stays 0)."""
    from AnomalySegLib.data.raw_input import _foreground_threshold, _head_mask

    head = _head_mask(volume.data > _foreground_threshold(volume.data))
    hi = float(np.percentile(volume.data[head], 99.5))
    data = np.where(head, np.clip(hi - volume.data, 0.0, None) + 0.05 * hi, 0.0).astype(np.float32)
    return Volume(data=data, affine=volume.affine)


def fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch and ITK threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats; the tables give median (min)")
    ap.add_argument("--skip-extra", action="store_true", help="only the two timing cases")
    args = ap.parse_args(argv)
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if not (CH2.is_file() and CH2BET.is_file()):
        print("needs Debian's mricron-data (ch2.nii.gz, ch2bet.nii.gz)", file=sys.stderr)
        return 2
    from importlib.metadata import version

    load0 = os.getloadavg()
    print("## Machine\n")
    print("| item | value |\n|---|---|")
    print(f"| CPU | {cpu_model()} |")
    print(f"| cores visible / used | {len(os.sched_getaffinity(0))} / {args.threads} (torch and ITK threads) |")
    print(f"| load average at start (1/5/15 min) | {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} |")
    print(f"| python / torch / SimpleITK / deepbet | {platform.python_version()} / {torch.__version__} / "
          f"{sitk.Version_VersionString()} / {version('deepbet')} |")

    ch2, ch2bet = read_volume(CH2), read_volume(CH2BET)
    ref_brain = ndimage.binary_fill_holes(ch2bet.data > 0)

    # ----------------------------------------------------------------- timings
    print(f"\n## Skull check + brain extraction + N4 (wall seconds, median (min) of {args.repeats})\n")
    print("| input | grid | skull check | extraction | of which bbox net / main net | N4 (shrink 4) | "
          "extraction + N4 | Dice vs ch2bet |")
    print("|---|---|---|---|---|---|---|---|")
    extract_brain(Volume(ch2.data[::2, ::2, ::2], ch2.affine @ np.diag([2, 2, 2, 1])), threads=args.threads)  # warm-up
    cases = [("Colin27 ch2.nii.gz", ch2), ("ch2 on a tilted sagittal grid", oblique_sagittal(ch2))]
    for name, vol in cases:
        rows = {"sc": [], "ex": [], "bbox": [], "main": [], "n4": [], "sum": []}
        for _ in range(max(1, args.repeats)):
            stamps = {}

            def progress(ev, stamps=stamps):
                stamps[ev.message] = time.perf_counter()

            sc, t_sc = timed(skull_check, vol)
            mask, t_ex = timed(extract_brain, vol, threads=args.threads, progress=progress)
            _, t_n4 = timed(correct_bias_field, vol.data, mask, vol.spacing, threads=args.threads)
            rows["sc"].append(t_sc)
            rows["ex"].append(t_ex)
            rows["bbox"].append(stamps["segmenting the brain"] - stamps["locating the head"])
            rows["main"].append(stamps["cleaning the mask"] - stamps["segmenting the brain"])
            rows["n4"].append(t_n4)
            rows["sum"].append(t_ex + t_n4)
        d = dice_physical(mask, vol.affine, ref_brain, ch2bet.affine)

        def mm(key, nd=1):
            v = rows[key]
            return f"{np.median(v):.{nd}f} ({min(v):.{nd}f})"

        print(f"| {name} | {'x'.join(map(str, vol.shape))} | {mm('sc', 2)} | {mm('ex')} | "
              f"{np.median(rows['bbox']):.1f} / {np.median(rows['main']):.1f} | {mm('n4')} | {mm('sum')} | {d:.4f} |")
    if args.skip_extra:
        return 0

    # ----------------------------------------------------------------- threads
    print(f"\n## Extraction and N4 time vs threads (ch2, wall seconds, median (min) of {args.repeats})\n")
    print("| threads | extraction | N4 |\n|---|---|---|")
    for n in sorted({1, args.threads}):
        te, tn = [], []
        for _ in range(max(1, args.repeats)):
            m, t = timed(extract_brain, ch2, threads=n)
            te.append(t)
            tn.append(timed(correct_bias_field, ch2.data, m, ch2.spacing, threads=n)[1])
        print(f"| {n} | {np.median(te):.1f} ({min(te):.1f}) | {np.median(tn):.1f} ({min(tn):.1f}) |")

    print("\n## N4 on a known field (ch2bet x smooth multiplicative field, +-25 %)\n")
    print("| shrink | s | corr(estimated, true log field) | WM CV true / biased / corrected |\n|---|---|---|---|")
    axes = [np.linspace(-1.0, 1.0, n) for n in ch2bet.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    true_log = (0.25 * x + 0.2 * y ** 2 - 0.15 * z + 0.1 * x * z).astype(np.float32)
    biased = (ch2bet.data * np.exp(true_log)).astype(np.float32)
    inside = ref_brain & (ch2bet.data > 0.2 * ch2bet.data[ref_brain].max())
    wm = inside & (ch2bet.data > np.percentile(ch2bet.data[ref_brain], 80))
    for shrink in (4, 6):
        corrected, t = timed(correct_bias_field, biased, ref_brain, ch2bet.spacing, shrink=shrink, threads=args.threads)
        r = np.corrcoef(np.log(biased[inside]) - np.log(corrected[inside]), true_log[inside])[0, 1]
        cvs = [float(a[wm].std() / a[wm].mean()) for a in (ch2bet.data, biased, corrected)]
        print(f"| {shrink} | {t:.1f} | {r:.3f} | {cvs[0]:.3f} / {cvs[1]:.3f} / {cvs[2]:.3f} |")

    # ----------------------------------------------------------------- other inputs
    print("\n## deepbet on other inputs (Dice in physical space)\n")
    print("| input | reference mask | Dice | mask / reference volume | extraction s |")
    print("|---|---|---|---|---|")

    def row(label, ref_label, mask, vol, ref, ref_affine, t):
        ref_on_grid = resample_mask(ref, ref_affine, vol.shape, vol.affine)
        print(f"| {label} | {ref_label} | {dice(mask, ref_on_grid):.4f} | {mask.sum() / max(ref_on_grid.sum(), 1):.2f} | "
              f"{t:.1f} |")

    extra: list = []
    inv = inverted_contrast(ch2)
    m, t = timed(extract_brain, inv, threads=args.threads)
    row("ch2, contrast inverted inside the head (T2-like)", "ch2bet", m, inv, ref_brain, ch2bet.affine, t)
    extra.append(("ch2, contrast inverted (T2-like)", inv))
    nim = package_data_file("nimare", "resources", "templates", "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")
    nim_mask = package_data_file("nimare", "resources", "templates", "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
    if nim is not None and nim_mask is not None:
        v, r = read_volume(nim), read_volume(nim_mask)
        m, t = timed(extract_brain, v, threads=args.threads)
        row("MNI152NLin6Asym T1w 2 mm with skull (nimare)", "its desc-brain_mask", m, v, r.data > 0, r.affine, t)
        extra.append(("MNI152NLin6Asym T1w 2 mm, head (nimare)", v))
    from AnomalySegLib.data.synthetic import load_template, synthesize_case

    tpl = load_template("mni152", 1.0)
    for contrast in ("t1", "t2", "flair"):
        case = synthesize_case(tpl, 5, contrast=contrast)
        head = Volume(add_synthetic_skull(case.image, case.affine), case.affine)
        m, t = timed(extract_brain, head, threads=args.threads)
        row(f"generated {contrast.upper()} 1 mm (MNI152) + synthetic skull", "generated brain", m, head, case.brain,
            case.affine, t)
        extra.append((f"generated {contrast.upper()} 1 mm", Volume(case.image, case.affine)))
        extra.append((f"generated {contrast.upper()} 1 mm + synthetic skull", head))

    # ----------------------------------------------------------------- classification
    print("\n## Skull check\n")
    print("| volume | has_skull | ring | gap | ring/gap | dark shell | head mL | s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)

    def rician(a: np.ndarray, sigma: float) -> np.ndarray:
        return np.sqrt((a + rng.normal(0, sigma, a.shape)) ** 2 + rng.normal(0, sigma, a.shape) ** 2).astype(np.float32)

    pad = 25
    padded_affine = ch2.affine.copy()
    padded_affine[:3, 3] -= padded_affine[:3, :3] @ np.full(3, float(pad))
    vols = [("Colin27 ch2 (skull)", ch2), ("Colin27 ch2bet (stripped)", ch2bet),
            ("ch2 + Rician noise (sigma 3), zero-padded 25 voxels", Volume(np.pad(rician(ch2.data, 3.0), pad),
                                                                           padded_affine)),
            ("ch2bet + Rician noise background (sigma 3)", Volume(rician(ch2bet.data, 3.0), ch2bet.affine))]
    mni = package_data_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if mni is not None:
        vols.append(("MNI152 2009a T1 (nilearn, brain-masked)", read_volume(mni)))
    vols += extra
    tpl2 = load_template("mni152", 2.0)
    for contrast in ("t1", "t2", "flair"):
        case = synthesize_case(tpl2, 7, contrast=contrast, n_slices=32)
        vols.append((f"generated {contrast.upper()} 2 mm, 32 slices (fixture-like)", Volume(case.image, case.affine)))
    for name, v in vols:
        sc, t = timed(skull_check, v)
        print(f"| {name} | {sc.has_skull} | {fmt(sc.ring_level)} | {fmt(sc.gap_level)} | {fmt(sc.ring_to_gap)} | "
              f"{fmt(sc.dark_shell_fraction)} | {sc.head_volume_ml:.0f} | {t:.2f} |")
    load1 = os.getloadavg()
    print(f"\nLoad average at the end: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
