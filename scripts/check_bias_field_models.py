"""Compare bias-field models (data/bias_flatten.py) on a benchmark cohort, without a network.

Prints, per field model and spline setting: the robust sigma of the log ratio between
lesion-free scans and the healthy mean intensity after flattening (lower = more of the field
removed), and per lesion kind the lesion contrast flattening keeps (lesion-vs-shell log
contrast after / before; < 1 = the field bent into the lesion). Statistics from 16 healthy
volumes, 6 lesion-free and 5 lesions per kind, 96 px (the CPU profile).

    python scripts/check_bias_field_models.py DATA_DIR     # ~10 min on 2 cores
"""
import glob
import sys
import time

import numpy as np
from scipy import ndimage
import AnomalySegLib.data.bias_flatten as bf
from AnomalySegLib.data.preprocessing import prepare_volume, PreprocessConfig, to_volume_grid
from AnomalySegLib.io.volume_io import read_volume
from AnomalySegLib.evaluation.labels import read_label
from AnomalySegLib.model.position_stats import PositionStats
if len(sys.argv) != 2:
    sys.exit(__doc__)
d = sys.argv[1]
cfg = PreprocessConfig(image_size=96)
prep = lambda p: prepare_volume(read_volume(p), cfg)
imgs = lambda sub: [p for p in sorted(glob.glob(f"{d}/{sub}/*.nii.gz")) if "_label" not in p]
healthy = [prep(p) for p in imgs("healthy")[:16]]
lf = [prep(p) for p in imgs("lesion_free")[:6]]
cases = {}
for kind in ("bright", "tumour", "low_contrast", "dark"):
    cases[kind] = []
    for p in imgs(kind)[:5]:
        vol = read_volume(p)
        lab = read_label(p.replace(".nii.gz", "_label.nii.gz"), vol) > 0
        shell = ndimage.binary_dilation(lab, iterations=5) & ~ndimage.binary_dilation(lab, iterations=2)
        cases[kind].append((prepare_volume(vol, cfg), lab, shell))
def spread(v, stats, model):
    img = bf.flatten_bias(v.images, v.masks, v.slice_indices, stats, model) if model else v.images
    e = stats.expected(img.shape[-1], v.slice_indices)
    use = v.masks & (e > np.quantile(e[v.masks], 0.25)) & (img > 1e-3)
    r = np.log(img[use]) - np.log(e[use])
    return 1.4826 * np.median(np.abs(r - np.median(r)))
def kept(v, lab, shell, stats, model):
    field = bf.fit_bias_field(v.images, v.masks, v.slice_indices, stats, model=model)
    lf_ = to_volume_grid(np.log(field), v)
    raw = to_volume_grid(v.images, v)
    c_before = np.log(np.mean(raw[lab]) / np.mean(raw[shell & (raw > 0)]))
    bulge = np.mean(lf_[lab]) - np.mean(lf_[shell])
    return 1 - bulge / c_before
configs = [("quadratic", "quadratic", None)] + [(f"spline k{k} s{s:g}", "spline", (k, s)) for k, s in
           [(4, 1e-4), (4, 1e-3), (4, 1e-5), (3, 1e-4)]]
ps = PositionStats.fit([v.images for v in healthy], [v.masks for v in healthy], [v.slice_indices for v in healthy])
print(f"{'none':20s} sigma {np.mean([spread(v, ps, None) for v in lf]):.4f}", flush=True)
for name, model, par in configs:
    if par:
        bf.SPLINE_INTERVALS, bf.SPLINE_SMOOTHNESS = par
    t = time.time()
    stats = bf.fit_flattened_intensity_stats(healthy, model=model)
    s = np.mean([spread(v, stats, model) for v in lf])
    k = {kind: np.mean([kept(*c, stats, model) for c in cs]) for kind, cs in cases.items()}
    print(f"{name:20s} sigma {s:.4f} contrast kept " + " ".join(f"{a} {b:.3f}" for a, b in k.items()) + f" ({time.time()-t:.0f}s)", flush=True)
