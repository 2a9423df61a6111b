import time, torch, torch.nn.functional as F
torch.manual_seed(0)
x = torch.randn(16,64,112,112).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
w = (torch.randn(64,64,3,3)*0.05).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
b = torch.randn(64).to(torch.bfloat16)
op = torch.ops.mkldnn._convolution_pointwise
print(op.overloads() if hasattr(op, "overloads") else op)
def eager(): return F.relu(F.conv2d(x, w, b, padding=1))
def eager_inplace(): return F.conv2d(x, w, b, padding=1).relu_()
def fused(): return op(x, w, b, [1,1], [1,1], [1,1], 1, "relu", [], "")
other = torch.randn_like(x)
def eager_add(): return F.relu(F.conv2d(x, w, b, padding=1) + other)
def fused_add(): 
    y = torch.ops.mkldnn._convolution_pointwise.binary(x, other, w, b, [1,1], [1,1], [1,1], 1, "add", None, "relu", [], "")
    return y
with torch.inference_mode():
    print((eager().float()-fused().float()).abs().max(), (eager_add().float()-fused_add().float()).abs().max())
    for name, f in (("eager", eager), ("inplace", eager_inplace), ("fused", fused), ("eager_add", eager_add), ("fused_add", fused_add)):
        for _ in range(2): f()
        t=time.perf_counter()
        for _ in range(10): f()
        print(name, (time.perf_counter()-t)/10*1000)
