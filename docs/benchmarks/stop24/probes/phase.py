import torch, torch.nn.functional as F
def phase_kernels(w):
    """w [co, ci, 3, 3] -> [co, 4, ci, 2, 2]: kernels of the four output phases (a, b) of a 3x3
    conv applied to a x2 nearest-upsampled input, as 2x2 kernels on the input."""
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),   # a=0: input rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))   # a=1: input rows i, i+1
    out = []
    for r in rows:
        out.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))
        out.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
    return out  # order (0,0),(0,1),(1,0),(1,1)
def upconv(x, w):
    ks = phase_kernels(w)
    ys = []
    for idx, k in enumerate(ks):
        a, b = divmod(idx, 2)
        ys.append(F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), k))
    y = torch.stack(ys, 2)  # [B, co, 4, H, W]
    B, co, _, H, W = y.shape
    return F.pixel_shuffle(y.reshape(B, co * 4, H, W), 2)
def upconv_one(x, w):
    # one conv with all 4 phase kernels on x padded by 1, then per-phase offset slices
    ks = torch.cat([k for k in phase_kernels(w)], 0)  # [4co, ci, 2, 2] phase-major
    co = w.shape[0]
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), ks)  # [B, 4co, H+1, W+1]
    H, W = x.shape[-2:]
    parts = [y[:, i*co:(i+1)*co, a:a+H, b:b+W] for i,(a,b) in enumerate(((0,0),(0,1),(1,0),(1,1)))]
    yy = torch.stack(parts, 2).reshape(x.shape[0], co*4, H, W)
    return F.pixel_shuffle(yy, 2)
if __name__ == "__main__":
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64); w = torch.randn(3, 5, 3, 3, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    print((upconv(x, w) - ref).abs().max(), (upconv_one(x, w) - ref).abs().max())
    import time
    for dt, cl in ((torch.bfloat16, True),):
        x = torch.randn(32,16,48,48).to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(8,16,3,3).requires_grad_()
        def base():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w.to(memory_format=torch.channels_last), padding=1)
            y.float().sum().backward()
        def ph(fn):
            def f():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = fn(x, w)
                y.float().sum().backward()
            return f
        for name, f in (("base", base), ("phase4", ph(upconv)), ("phase1", ph(upconv_one))):
            for _ in range(3): f()
            t0=time.perf_counter()
            for _ in range(10): f()
            print(name, (time.perf_counter()-t0)/10*1000)
