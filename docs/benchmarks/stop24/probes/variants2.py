import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, "scripts")
import benchmark_speed as bs
from study_attention import RefOptions, reference_losses
from AnomalySegLib.nn.methods import MethodParams, training_loss
from AnomalySegLib.nn.networks import VAEConfig, build_network
from AnomalySegLib.nn.device import training_autocast
cfg = dict(device="cpu", resolution=1.0, slices=None, distinct_volumes=1)
x, m = bs._slice_batch(cfg, 96, 32)
reps = -(-32 // len(x)); x, m = x.repeat(reps,1,1,1)[:32], m.repeat(reps,1,1)[:32]
amc = MethodParams.defaults("amcons")
def mk(ref=False, fused=False, compiled=False):
    torch.manual_seed(0)
    net = bs.reference_network(96,16,32) if ref else build_network(VAEConfig(image_size=96, base_width=16, latent_dim=32))
    cl = not ref
    if cl: net = net.to(memory_format=torch.channels_last)
    net.train(); opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused or None)
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    f = lambda a,b: training_loss(net, a, b, amc, epoch=1)
    if compiled:
        f = torch.compile(f, dynamic=False)
    def step():
        with training_autocast(torch.device("cpu"), cl):
            if ref: loss,_ = reference_losses(net, xx, m, beta=10.0, lambda_h=0.1, epoch=1, opts=RefOptions())
            else: loss, _ = f(xx, m)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if compiled:
        t=time.perf_counter(); step(); print("compile s", time.perf_counter()-t, flush=True)
    return step
fns = {"ref": mk(ref=True), "cl_bf16": mk(), "fusedadam": mk(fused=True)}
if "compile" in sys.argv: fns["compiled"] = mk(compiled=True)
r = bs.interleaved_medians(fns, 7)
for k,v in r.items(): print(f"{k:20s} {32/v:7.1f} img/s  x{r['ref']/v:.2f}")
