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


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of a compiled (SPMD, per-device) program from XLA's cost analysis, or
    None when the backend reports none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops if flops > 0 else None


def step_scalars(flops_per_step: float | None, steps_per_second: float) -> dict[str, float]:
    """Per-device TFLOP/s achieved by a step of ``flops_per_step`` (per device, as compiled)
    and, where the device's peak is known, MFU. XLA counts every FLOP the compiled step runs
    (rematerialised ones included), so this is MFU by the compiled program's count."""
    if flops_per_step is None:
        return {}
    achieved = flops_per_step * steps_per_second
    out = {"tflops_per_device": achieved / 1e12}
    peak = peak_tflops(jax.devices()[0])
    if peak is not None:
        out["mfu"] = achieved / (peak * 1e12)
    return out
