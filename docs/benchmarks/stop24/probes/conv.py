import time, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
def bench(cin, cout, k, label):
    conv = nn.Conv2d(cin, cout, k, padding=k//2)
    res = {}
    for name, dt, cl in (("cl_bf16", torch.bfloat16, True), ("nchw_bf16", torch.bfloat16, False), ("nchw_fp32", torch.float32, False), ("cl_fp32", torch.float32, True)):
        c = nn.Conv2d(cin, cout, k, padding=k//2); c.load_state_dict(conv.state_dict())
        if cl: c = c.to(memory_format=torch.channels_last)
        x = torch.randn(32,cin,96,96)
        if cl: x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dt).requires_grad_()
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(dt==torch.bfloat16)):
                y = c(x)
            y.float().sum().backward()
        for _ in range(3): f()
        t0=time.perf_counter()
        for _ in range(10): f()
        res[name]=(time.perf_counter()-t0)/10*1000
    print(label, {k: round(v,1) for k,v in res.items()})
bench(8,1,3,"out 8->1")
bench(8,8,3,"8->8")
bench(16,8,3,"16->8")
bench(16,8,1,"16->8 1x1")
