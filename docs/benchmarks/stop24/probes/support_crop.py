import sys, time, numpy as np
sys.path.insert(0, "scripts")
import benchmark_speed as bs
from AnomalySegLib.data import brain_mask as bm
from AnomalySegLib.data.preprocessing import PreprocessConfig, prepare_volume
cfg = dict(device="cpu", resolution=1.0, slices=None, distinct_volumes=1)
vol = bs._whole_brain_volume(cfg) if hasattr(bs, "_whole_brain_volume") else bs._volumes(cfg)[0]
p = prepare_volume(vol, PreprocessConfig(image_size=224))
imgs = p.images
print(imgs.shape)
for _ in range(2):
    t = time.perf_counter(); m = bm.tissue_masks(imgs, threads=1); print("masks 1 thread", time.perf_counter() - t)
t = time.perf_counter()
for im in imgs: bm.brain_support(im, np.ones_like(im, bool))
print("support only", time.perf_counter() - t)
np.save("/tmp/masks_%s.npy" % sys.argv[1], m)
