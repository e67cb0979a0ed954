"""Where and how tensors run: the device, bf16 autocast, channels-last and the backend flags.

One home for what training, inference and the benchmarks share, so that neither the training
loop nor prediction reaches into the other for it (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from hiercls.errors import ConfigError

__all__ = ["autocast_context", "configure_backends", "resolve_device", "use_channels_last"]

# The names `fit` accepts (config.FitConfig) are the names every other command accepts.
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a wrong or unavailable device is a ConfigError."""
    name = str(name)
    if not _DEVICE_NAME.fullmatch(name):
        # torch.device() would take e.g. 'meta' or 'xla' and fail later, or raise a RuntimeError on 'gpu'
        raise ConfigError(f"--device: '{name}' is not a device; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)"
            )
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
    return torch.device(name)


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA, unless bit-stable reruns are asked for."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        # cuBLAS reads this when it starts; torch warns where an op has no deterministic kernel
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (or when asked for), plain fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``auto``: channels-last memory on CUDA (faster convolutions there), not elsewhere."""
    return device.type == "cuda" if setting == "auto" else bool(setting)
