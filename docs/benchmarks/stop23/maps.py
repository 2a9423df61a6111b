"""Figure of stop 23 (docs/BENCHMARKS.md): voxel-grid maps of one model under three scorings.

    PYTHONPATH=. python docs/benchmarks/stop23/maps.py MODEL DATA OUT.png CASE [CASE ...]

CASE is a path under DATA without .nii.gz (its label is CASE_label.nii.gz). Columns: the image
with the label (red), the model's own scoring (the default: bright-position fusion), the network's
residual alone (fusion weight 1e-4) and the two-sided abs-position fusion; each map on its own
colour scale up to its brain p99.99. Analysis script kept with its output, not product.
"""

import copy
import sys

import matplotlib
import nibabel as nib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from AnomalySegLib.io.volume_io import read_volume  # noqa: E402
from AnomalySegLib.model.bundle import load_model  # noqa: E402
from AnomalySegLib.pipeline.inference import score_volume  # noqa: E402

model = load_model(sys.argv[1])
data, out, cases = sys.argv[2], sys.argv[3], sys.argv[4:]
variants = {"default (bright-position)": model}
for name, change in (("residual alone", dict(fuse_intensity=1e-4)), ("abs-position", dict(intensity_term="abs-position"))):
    v = copy.copy(model)
    v.method = type(model.method).from_dict({**model.method.to_dict(), **change})
    variants[name] = v
fig, ax = plt.subplots(len(cases), 1 + len(variants), figsize=(4 * (1 + len(variants)), 4 * len(cases)), squeeze=False)
for i, case in enumerate(cases):
    image = nib.load(f"{data}/{case}.nii.gz").get_fdata()
    label = nib.load(f"{data}/{case}_label.nii.gz").get_fdata() > 0
    z = int(np.argmax(label.sum((0, 1))))
    ax[i, 0].imshow(image[:, :, z].T, origin="lower", cmap="gray")
    ax[i, 0].contour(label[:, :, z].T, [0.5], colors="r", origin="lower")
    ax[i, 0].set_title(case)
    volume = read_volume(f"{data}/{case}.nii.gz")
    for j, (name, v) in enumerate(variants.items()):
        scores = score_volume(v, volume)
        h, brain = scores.heatmap, image > 0
        ax[i, j + 1].imshow(h[:, :, z].T, origin="lower", cmap="magma", vmin=0, vmax=np.percentile(h[brain], 99.99))
        ax[i, j + 1].contour(label[:, :, z].T, [0.5], colors="c", origin="lower")
        ax[i, j + 1].set_title(f"{name}\nlesion median {np.median(h[label]):.2f}, brain p99.9 {np.percentile(h[brain], 99.9):.2f}",
                               fontsize=9)
for a in ax.ravel():
    a.set_xticks([])
    a.set_yticks([])
plt.tight_layout()
plt.savefig(out, dpi=55)
