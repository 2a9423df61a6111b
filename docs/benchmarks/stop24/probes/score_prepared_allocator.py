import sys, time, ctypes
if "mallopt" in sys.argv:
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]; print(libc.mallopt(-1, 512 * 2**20), libc.mallopt(-3, 32 * 2**20))
import torch
sys.path.insert(0, "scripts")
import benchmark_speed as bs
from AnomalySegLib.data.preprocessing import prepare_volume
from AnomalySegLib.pipeline.inference import score_prepared
cfg = dict(device="cpu", resolution=1.0, slices=None, distinct_volumes=1, image_size=224, width=64, latent_dim=32, eval_batch_size=16)
model = bs._untrained_model("amcons", cfg)
vol = bs._whole_brain_volume(cfg)
p = prepare_volume(vol, model.preprocessing)
dev = torch.device("cpu")
score_prepared(model, p, device=dev, batch_size=16)
for _ in range(2):
    t = time.perf_counter(); score_prepared(model, p, device=dev, batch_size=16); print("score_prepared", time.perf_counter() - t, len(p.images))
from torch.profiler import profile
with profile() as pr:
    score_prepared(model, p, device=dev, batch_size=16)
print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
