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
def mk(cl, amp, ref=False, nchw_last=False):
    torch.manual_seed(0)
    net = bs.reference_network(96,16,32) if ref else build_network(VAEConfig(image_size=96, base_width=16, latent_dim=32))
    if cl: net = net.to(memory_format=torch.channels_last)
    if nchw_last:
        blk = net.decoder.blocks[-1]
        orig = blk.forward
        def fwd(h, orig=orig): return orig(h.contiguous())
        blk.forward = fwd
        oo = net.decoder.out.forward
    net.train(); opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    def step():
        with training_autocast(torch.device("cpu"), amp):
            if ref: loss,_ = reference_losses(net, xx, m, beta=10.0, lambda_h=0.1, epoch=1, opts=RefOptions())
            else: loss, _ = training_loss(net, xx, m, amc, epoch=1)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return step
fns = {"ref": mk(False, False, ref=True), "cl_bf16": mk(True, True), "nchw_bf16": mk(False, True),
       "cl_bf16_lastnchw": mk(True, True, nchw_last=True), "cl_fp32": mk(True, False)}
r = bs.interleaved_medians(fns, int(sys.argv[1]) if len(sys.argv)>1 else 5)
for k,v in r.items(): print(f"{k:20s} {32/v:7.1f} img/s  x{r['ref']/v:.2f}")
