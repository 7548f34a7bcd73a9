"""Model FLOPs utilisation: achieved FLOP/s over the devices' dense bf16 peak.

Peaks are vendor datasheet numbers (dense, no sparsity) per chip; unknown devices (CPUs) have
none, and MFU is then not reported rather than guessed.
"""

from __future__ import annotations

import jax

PEAK_TFLOPS: dict[str, float] = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device: jax.Device) -> float | None:
    """One device's dense bf16 peak in TFLOP/s, or None when unknown."""
    kind = device.device_kind.lower()
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind:
            return peak
    return None


def mfu(flops_per_second: float, devices: list[jax.Device] | None = None) -> float | None:
    """Achieved / peak over ``devices`` (default: all), or None on devices without a known peak."""
    devices = jax.devices() if devices is None else devices
    peak = peak_tflops(devices[0])
    return None if peak is None else flops_per_second / (peak * 1e12 * len(devices))
