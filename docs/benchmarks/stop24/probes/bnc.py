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
print("cl bf16 bn+relu", t(lambda x: F.relu(bn(x))))
t0=time.perf_counter()
cf = torch.compile(lambda x: F.relu(bn(x)), dynamic=False)
print("compiled bn+relu", t(cf), "incl", time.perf_counter()-t0)
