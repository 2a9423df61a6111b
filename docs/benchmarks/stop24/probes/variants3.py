import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, "scripts")
import benchmark_speed as bs
from study_attention import RefOptions, reference_losses
from AnomalySegLib.nn.methods import MethodParams, training_loss
from AnomalySegLib.nn.networks import VAEConfig, build_network, UpBlock
from AnomalySegLib.nn.device import training_autocast
cfg = dict(device="cpu", resolution=1.0, slices=None, distinct_volumes=1)
x, m = bs._slice_batch(cfg, 96, 32)
reps = -(-32 // len(x)); x, m = x.repeat(reps,1,1,1)[:32], m.repeat(reps,1,1)[:32]
amc = MethodParams.defaults("amcons")
def lowres_fwd(self, x):
    b = self.block
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = F.relu(b.bn1(b.conv1(up)))
    y = b.bn2(b.conv2(y))
    s = F.interpolate(b.shortcut(x), scale_factor=2.0, mode="nearest")
    return F.relu(y + s)
def mk(ref=False, low=False, prec=False):
    torch.manual_seed(0)
    net = bs.reference_network(96,16,32) if ref else build_network(VAEConfig(image_size=96, base_width=16, latent_dim=32))
    cl = not ref
    if low:
        for mod in net.modules():
            if isinstance(mod, UpBlock): mod.forward = lowres_fwd.__get__(mod)
    if cl: net = net.to(memory_format=torch.channels_last)
    net.train(); opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    def step():
        if prec: torch.backends.mkldnn.conv.fp32_precision = "bf16"
        with training_autocast(torch.device("cpu"), cl and not prec):
            if ref: loss,_ = reference_losses(net, xx, m, beta=10.0, lambda_h=0.1, epoch=1, opts=RefOptions())
            else: loss, _ = training_loss(net, xx, m, amc, epoch=1)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if prec: torch.backends.mkldnn.conv.fp32_precision = "none"
        return float(loss)
    return step
fns = {"ref": mk(ref=True), "cl_bf16": mk(), "lowshort": mk(low=True)}
print(fns["cl_bf16"](), fns["lowshort"]())
r = bs.interleaved_medians(fns, 15)
for k,v in r.items(): print(f"{k:20s} {32/v:7.1f} img/s  x{r['ref']/v:.2f}")
def shipped(step):
    def f():
        torch.autograd.set_detect_anomaly(True)
        try: return step()
        finally: torch.autograd.set_detect_anomaly(False)
    return f
fns = {"ref": mk(ref=True), "ref_shipped": shipped(mk(ref=True)), "cl_bf16": mk(), "lowshort": mk(low=True)}
r = bs.interleaved_medians(fns, 15)
for k,v in r.items(): print(f"{k:20s} {32/v:7.1f} img/s  x{r['ref']/v:.2f}  vs shipped x{r['ref_shipped']/v:.2f}")
