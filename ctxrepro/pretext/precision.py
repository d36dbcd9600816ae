"""Mixed precision, the same on every device: one autocast helper for every stage that runs a network.

`amp` names the autocast dtype a stage's forward passes run in: "bf16", "fp16" (with a gradient scaler
when training) or "none" (float32). Parameters, gradients and optimiser state stay float32 whatever it
is; only the forward's matrix products and convolutions run in the low precision (torch.autocast).

- CUDA: bf16 and fp16 as asked.
- CPU: bf16 where the processor multiplies bf16 natively (AMX-BF16 or AVX-512 BF16, as the kernel's
  /proc/cpuinfo flags and oneDNN report them): measured 1.5-2.7x faster than float32 here
  (bench/README.md, "bf16 autocast on the CPU"). A CPU without it would emulate bf16 more slowly than
  float32, so it runs float32 and says so once in the log. fp16 runs wherever torch's CPU autocast
  takes it (torch >= 2.3); it is there for the tests of the scaler path, not for speed.

CPU results under a fixed amp stay bit-identical from run to run on one machine (oneDNN's bf16 kernels
are deterministic at a fixed thread count); they differ from float32's in the last bits, so a profile's
amp is part of a run's identity (checkpoints record it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

AMP_CHOICES = ("none", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")

_log = logging.getLogger(__name__)


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first processor's feature flags from /proc/cpuinfo (empty where the file is absent: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware: a cpuinfo flag, and oneDNN agrees it can use it."""
    if not set(NATIVE_BF16_FLAGS) & cpu_flags():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_type(device: str | torch.device) -> str:
    """'cuda' for any CUDA device string ('cuda', 'cuda:1'), else 'cpu'."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def check_amp(amp: str) -> str:
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp {amp!r} is not one of {', '.join(AMP_CHOICES)} (none = float32)")
    return amp


def effective_amp(device: str | torch.device, amp: str) -> str:
    """The precision a forward on `device` actually runs in: `amp`, or "none" on a CPU without native bf16."""
    check_amp(amp)
    if amp == "bf16" and device_type(device) == "cpu" and not cpu_has_native_bf16():
        _say_float32_once(amp)
        return "none"
    return amp


@functools.lru_cache(maxsize=None)
def _say_float32_once(amp: str) -> None:
    _log.info("amp %s: this CPU has no native bf16 (no %s in /proc/cpuinfo): running float32",
              amp, " or ".join(NATIVE_BF16_FLAGS))


def autocast(device: str | torch.device, amp: str):
    """The autocast context for a forward on `device` under `amp` (module docstring); float32 when "none"."""
    amp = effective_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=DTYPES[amp])


def grad_scaler(device: str | torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (small gradients underflow fp16), else None."""
    if effective_amp(device, amp) != "fp16":
        return None
    return torch.amp.GradScaler(device_type(device))


def describe(device: str | torch.device, amp: str) -> str:
    """One log line's worth: what the forward passes run in here."""
    eff = effective_amp(device, amp)
    if eff == "none":
        return "float32" if amp == "none" else f"float32 (amp {amp} needs native bf16, absent on this CPU)"
    return f"{eff} autocast on {device_type(device)} (parameters and gradients float32)"


def use_channels_last(device: str | torch.device, amp: str, wanted: bool) -> bool:
    """Whether a `channels_last: true` profile gets NHWC here: on CUDA, and on a CPU under bf16 autocast, where
    oneDNN's bf16 convolutions prefer it (measured 1.4x over bf16 NCHW for the tiny tower); CPU float32 is
    slower in NHWC (issue 25), so a float32 CPU run keeps NCHW."""
    return wanted and (device_type(device) == "cuda" or effective_amp(device, amp) != "none")
