"""Fast inference copies of the networks: BatchNorm folded into the convolutions,
channels-last memory format, CPU thread count and the one reduced-precision path.

* :func:`fold_batchnorm` returns an inference copy of a :class:`~.networks.ConvVAE` or
  :class:`~.unet.UNet` in which every eval-mode BatchNorm that directly follows a
  convolution is folded into that convolution's weight and bias (``w' = w * g / sqrt(v + eps)``,
  ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaced by an identity. The copy is the
  same class, so every method's scoring code (including Grad-CAM's gradients through the
  later stages) runs on it unchanged; it is an eval-mode function only (no BatchNorm left
  to train). Float32 maps differ from the unfolded network's by rounding only
  (tests/test_speed_paths.py: <= 1e-4 of the map range).
* :func:`inference_network` = fold + channels-last (+ device), cached per network object
  and rebuilt when any parameter or buffer changes (tensor version counters), so
  ``score_prepared`` folds once per model, not once per volume.
* :func:`inference_autocast`: CUDA -> the usual mixed precision (:func:`.device.autocast_for`).
  :func:`inference_dtype`: on the CPU, a bfloat16 inference copy for the ``amcons``
  attention-only path only, and only on CPUs with native bfloat16 matrix units (AMX /
  AVX512-BF16; elsewhere it would be slower); the channel mean accumulates in float32. Its maps
  are within :data:`BF16_MAP_TOLERANCE` of the float32 maps (max abs difference / map range,
  tested); the residual methods (``vae``, ``dae``: small differences of two images) and
  Grad-CAM stay float32. ``ANOMALYSEG_INFERENCE_PRECISION=fp32`` forces float32 everywhere.
* :func:`configure_cpu_threads`: intra-op threads = physical cores (unless the user set
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` or called ``torch.set_num_threads``).
* :func:`configure_cpu_allocator`: on Linux with glibc, activations up to 32 MiB come from
  the heap and freed memory stays there (up to 512 MiB) instead of going back to the system
  at every free: each new activation otherwise costs one page fault per 4 KiB, which took
  about a quarter of the 224 px network stage on a 2-core CPU (docs/BENCHMARKS.md, stop 24).
  Outputs are unchanged. ``ANOMALYSEG_CPU_ALLOCATOR=off`` (or the user's own
  ``MALLOC_*`` / ``GLIBC_TUNABLES`` settings) leaves the allocator alone.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import sys
import weakref
from typing import Optional

import torch
from torch import nn

from ..cpus import usable_cpus
from .device import autocast_for
from .networks import BasicBlock

__all__ = ["fold_batchnorm", "inference_network", "inference_autocast", "inference_dtype", "cpu_bf16_supported",
           "mixed_precision_training", "configure_cpu_threads", "configure_cpu_allocator", "physical_cores",
           "BF16_MAP_TOLERANCE", "PRECISION_ENV", "ALLOCATOR_ENV"]

#: Max |bf16 map - fp32 map| / (max - min of the fp32 maps) allowed for the CPU bfloat16
#: amcons path (measured: ~0.007 max, ~0.0016 mean on random and trained networks).
BF16_MAP_TOLERANCE = 0.01

#: Environment variable: ``fp32`` disables the CPU bfloat16 path.
PRECISION_ENV = "ANOMALYSEG_INFERENCE_PRECISION"

#: Methods whose CPU inference may run in bfloat16 (the attention-only channel mean).
_BF16_METHODS = ("amcons",)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn(conv(x))`` into ``conv`` (in place, new parameter tensors)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    w = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def _fold_module(module: nn.Module) -> int:
    """Fold every conv -> BatchNorm pair below ``module``; returns how many were folded."""
    folded = 0
    for child in module.modules():
        if isinstance(child, nn.Sequential):
            items = list(child._modules.items())
            for (_, a), (name_b, b) in zip(items, items[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    _fold_pair(a, b)
                    child._modules[name_b] = nn.Identity()
                    folded += 1
        elif isinstance(child, BasicBlock):  # forward: bn1(conv1(x)), bn2(conv2(.)); shortcut is a Sequential
            for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2")):
                bn = getattr(child, bn_name)
                if isinstance(bn, nn.BatchNorm2d):
                    _fold_pair(getattr(child, conv_name), bn)
                    setattr(child, bn_name, nn.Identity())
                    folded += 1
    return folded


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An eval-mode inference copy of ``network`` with BatchNorm folded into the convolutions.

    ``network`` itself is not changed. Works for ConvVAE and UNet (and anything whose
    BatchNorms follow a convolution inside an ``nn.Sequential`` or a ``BasicBlock``);
    BatchNorms that do not directly follow a convolution are kept (eval mode).
    """
    net = getattr(network, "module", network)  # DDP-style wrapper
    with torch.inference_mode(False), torch.no_grad():
        out = copy.deepcopy(net).eval()
        _fold_module(out)
        for p in out.parameters():
            p.requires_grad_(False)
    return out


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_key(net: nn.Module, device: torch.device, channels_last: bool) -> tuple:
    tensors = list(net.parameters()) + [b for b in net.buffers() if b is not None]

    def version(t: torch.Tensor) -> int:
        try:
            return t._version  # bumped by every in-place change (optimiser steps, load_state_dict)
        except RuntimeError:  # inference tensors have no version counter (and cannot change)
            return -1

    return (str(device), channels_last) + tuple((t.data_ptr(), version(t), t.dtype) for t in tensors)


def inference_network(network: nn.Module, device: "Optional[torch.device]" = None, *,
                      channels_last: bool = True, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The folded, channels-last eval copy of ``network`` on ``device`` (default: where
    ``network`` is), in ``dtype`` (default: float32; see :func:`inference_dtype`), built
    once and reused while ``network``'s weights stay the same."""
    net = getattr(network, "module", network)
    if device is None:
        first = next(net.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    key = _state_key(net, device, channels_last) + (str(dtype),)
    cached = _CACHE.setdefault(net, {})
    hit = cached.get((str(device), channels_last, str(dtype)))
    if hit is not None and hit[0] == key:
        return hit[1]
    fast = fold_batchnorm(net).to(device)
    if dtype is not None:
        fast = fast.to(dtype)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    cached.clear()  # one copy per network: the weights changed, or another variant is asked for
    cached[(str(device), channels_last, str(dtype))] = (key, fast)
    return fast


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions oneDNN uses (AMX or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - old torch builds
            pass
    return False


def mixed_precision_training(device: torch.device, enabled: bool = True) -> bool:
    """Whether training on ``device`` runs in mixed precision: on CUDA, and on CPUs with
    native bfloat16 (AMX / AVX512-BF16; bf16 autocast + channels-last), when ``enabled``."""
    return bool(enabled) and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported()))


def _precision_override() -> str:
    return os.environ.get(PRECISION_ENV, "").strip().lower()


def inference_dtype(device: torch.device, method: str) -> torch.dtype:
    """Weights and inputs of a method's inference copy: bfloat16 for ``amcons`` on a CPU
    with native bfloat16 (unless ``ANOMALYSEG_INFERENCE_PRECISION=fp32``), else float32."""
    if (device.type == "cpu" and method in _BF16_METHODS and _precision_override() not in ("fp32", "float32")
            and cpu_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def inference_autocast(device: torch.device, method: str):
    """The precision context of a method's inference on ``device``: CUDA mixed precision
    (:func:`.device.autocast_for`); on the CPU the network runs in :func:`inference_dtype`
    itself (a bf16 copy, so weights are not cast again at every batch), no autocast."""
    if device.type == "cuda":
        return autocast_for(device)
    return contextlib.nullcontext()


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads not counted)."""
    allowed = usable_cpus()
    cores = set()
    try:
        cpu = phys = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in list(fh) + [""]:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and cpu is not None:
                    if cpu in allowed:
                        cores.add((phys, core if core is not None else cpu))
                    cpu = phys = core = None
    except (OSError, ValueError):
        cores = set()
    return max(1, len(cores) if cores else len(allowed))


_THREADS_SET = False


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads to the physical cores once per process when torch is
    at its default (one per logical CPU, i.e. hyper-threads included); a count the user
    chose (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``torch.set_num_threads``) is kept.
    Returns the count in use."""
    global _THREADS_SET
    if not _THREADS_SET:
        _THREADS_SET = True
        if not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
            n = physical_cores()
            if n < torch.get_num_threads() == (os.cpu_count() or 0):
                torch.set_num_threads(n)
    return torch.get_num_threads()


#: Environment variable: ``off`` leaves the C library's allocator as it is.
ALLOCATOR_ENV = "ANOMALYSEG_CPU_ALLOCATOR"

#: glibc's largest ``M_MMAP_THRESHOLD`` on 64-bit systems: blocks up to this size come from
#: the heap (a [16, 64, 112, 112] bf16 activation is 25 MiB), larger ones are mapped.
MMAP_THRESHOLD_BYTES = 32 * 2**20

#: Free memory kept at the top of the heap before glibc returns it to the system.
TRIM_THRESHOLD_BYTES = 512 * 2**20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_ALLOCATOR_SET: Optional[bool] = None


def configure_cpu_allocator() -> bool:
    """Keep freed activation buffers in the process heap (glibc on Linux), once per process.

    With glibc's defaults, a freed multi-megabyte activation is returned to the system and
    the next one is faulted in again page by page; with a fixed mmap threshold of
    :data:`MMAP_THRESHOLD_BYTES` and a trim threshold of :data:`TRIM_THRESHOLD_BYTES` the
    memory is reused. Returns True when the settings were applied. Skipped (False) on other
    systems or C libraries, when ``ANOMALYSEG_CPU_ALLOCATOR=off``, or when the user tuned
    the allocator through ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
    ``GLIBC_TUNABLES``.
    """
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET is not None:
        return _ALLOCATOR_SET
    _ALLOCATOR_SET = False
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    if not sys.platform.startswith("linux") or any(
            os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only (musl has a mallopt that does nothing)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _ALLOCATOR_SET = (mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
                      and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    return _ALLOCATOR_SET
