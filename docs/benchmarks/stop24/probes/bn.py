import time, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
bn = nn.BatchNorm2d(8).train()
def t(fn, n=20):
    x = torch.randn(32,8,96,96).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(32,8,96,96).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for _ in range(3): fn(x).backward(g)
    t0=time.perf_counter()
    for _ in range(n): fn(x).backward(g)
    return (time.perf_counter()-t0)/n*1000
print("cl bf16", t(lambda x: bn(x)))
print("nchw copy", t(lambda x: bn(x.contiguous()).contiguous(memory_format=torch.channels_last)))
print("fp32 cl", t(lambda x: bn(x.float()).to(torch.bfloat16)))
print("fp32 nchw", t(lambda x: bn(x.float().contiguous()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)))
def manual(x):
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(0,2,3), unbiased=False, keepdim=True)
    return ((xf-mean)*torch.rsqrt(var+1e-5)*bn.weight.view(1,-1,1,1)+bn.bias.view(1,-1,1,1)).to(x.dtype)
print("manual", t(manual))
def viewed(x):
    # channels-last [N,8,H,W] -> as [N*H*W/..., 64]? use reshape of NHWC memory as 2D [M, 8]
    n,c,h,w = x.shape
    flat = x.permute(0,2,3,1).reshape(-1, 64)  # 8 pixels x 8 channels per row
    ff = flat.float()
    s1 = ff.sum(0).view(8,8).sum(0); s2 = (ff*ff).sum(0).view(8,8).sum(0)
    M = flat.shape[0]*8
    mean = s1/M; var = s2/M - mean*mean
    sc = (torch.rsqrt(var+1e-5)*bn.weight); sh = bn.bias - mean*sc
    y = torch.addcmul(sh.repeat(8), ff, sc.repeat(8))
    return y.to(x.dtype).view(n,h,w,c).permute(0,3,1,2)
print("viewed64", t(viewed))

print("cl bf16 bn+relu", t(lambda x: F.relu(bn(x))))
t0=time.perf_counter()
cf = torch.compile(lambda x: F.relu(bn(x)), dynamic=False)
print("compiled bn+relu", t(cf), "incl", time.perf_counter()-t0)
