"""Does this machine compute bf16 natively, or emulate it?

bf16 autocast speeds a CPU step up only where the CPU has bf16 instructions (AVX512-BF16, AMX
on x86; the BF16 extension on Arm). Without them oneDNN and ATen convert every operand to fp32
and back: an MLM step of MiniLM at 1,024 tokens took 31 s in fp32 and 170 s under bf16
autocast on an AVX2-only CPU. So nothing in surgeon assumes the developer's CPU: training asks
this module before choosing bf16, and warns when bf16 is requested where it is emulated.
"""

from __future__ import annotations

import functools
import platform

# /proc/cpuinfo feature flags that mean bf16 arithmetic in hardware
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FLAGS = ("bf16",)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (read from /proc/cpuinfo; False where unknown)."""
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return any(flag in flags for flag in _ARM_BF16_FLAGS)
    return any(flag in flags for flag in _X86_BF16_FLAGS)


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast runs natively (not emulated) on this device type."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False


def describe_cpu() -> str:
    """A short name for the CPU's vector capability, for messages (e.g. 'AVX2')."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
