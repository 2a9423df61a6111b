"""Where do a model's false blobs sit on lesion-free scans? (stop-21 analysis, not product)

    python docs/benchmarks/stop21/false_blobs.py MODEL.pt DATA/lesion_free

Prints each component of the mask at the model's operating point: size, position relative to
the brain's bounding box, distance to the brain edge, peak score and mean intensity over the
scan's median brain intensity."""
import sys, glob
import numpy as np
from scipy import ndimage
from AnomalySegLib.model.bundle import load_model
from AnomalySegLib.io.volume_io import read_volume
from AnomalySegLib.io.geometry import voxel_volume_ml
model = load_model(sys.argv[1]); cal = model.calibration
op = cal.operating_percentile
paths = sorted(p for p in glob.glob(sys.argv[2] + "/*.nii.gz") if "_label" not in p)
tot = 0
for p in paths:
    v = read_volume(p)
    s = model.score_volume(v, device="cpu")
    mask, thr = cal.flag(s.heatmap, s.brain_mask, op, voxel_ml=voxel_volume_ml(v.affine))
    lab, n = ndimage.label(mask, np.ones((3, 3, 3)))
    tot += n
    # brain bounding box -> normalised position; distance to brain boundary
    idx = np.argwhere(s.brain_mask); lo, hi = idx.min(0), idx.max(0)
    dist = ndimage.distance_transform_edt(s.brain_mask)
    data = v.data
    med = np.median(data[s.brain_mask])
    for k in range(1, n + 1):
        c = lab == k
        cen = np.argwhere(c).mean(0)
        rel = (cen - lo) / np.maximum(hi - lo, 1)
        print(f"{p.split('/')[-1]} blob {k}: {c.sum()} vox, rel pos {np.round(rel,2)}, "
              f"min dist to edge {dist[c].min():.1f} vox, max score {s.heatmap[c].max():.2f} (thr {thr:.2f}), "
              f"intensity/median {data[c].mean()/med:.2f}", flush=True)
print("total", tot, "per scan", tot / len(paths))
