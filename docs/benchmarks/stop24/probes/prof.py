import sys, time, torch
sys.path.insert(0, "scripts")
import benchmark_speed as bs
from AnomalySegLib.nn.methods import MethodParams, training_loss
from AnomalySegLib.nn.networks import VAEConfig, build_network
from AnomalySegLib.nn.device import training_autocast
cfg = dict(device="cpu", resolution=1.0, slices=None, distinct_volumes=1)
x, m = bs._slice_batch(cfg, 96, 32)
reps = -(-32 // len(x)); x, m = x.repeat(reps,1,1,1)[:32], m.repeat(reps,1,1)[:32]
torch.manual_seed(0)
net = build_network(VAEConfig(image_size=96, base_width=16, latent_dim=32)).to(memory_format=torch.channels_last).train()
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
xx = x.contiguous(memory_format=torch.channels_last)
amc = MethodParams.defaults("amcons")
def step():
    with training_autocast(torch.device("cpu"), True):
        loss, _ = training_loss(net, xx, m, amc, epoch=1)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for _ in range(3): step()
t=time.perf_counter(); [step() for _ in range(5)]; print("step s", (time.perf_counter()-t)/5)
from torch.profiler import profile
with profile() as p:
    for _ in range(3): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
with profile(record_shapes=True) as p:
    for _ in range(3): step()
print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=70))
