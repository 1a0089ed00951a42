"""Throughput accounting: FLOPs of a compiled step and model-FLOPs utilisation against the device's peak."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device (chip), by substring of `device.device_kind`, most specific first.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v4", 275e12),
)


def peak_flops(device: jax.Device) -> float | None:
    """Peak FLOP/s of `device`, or None when it is not in the table (then no MFU is shown)."""
    kind = device.device_kind.lower()
    return next((peak for key, peak in PEAK_FLOPS if key in kind), None)


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of a compiled (per-device SPMD) program, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def throughput(flops_per_device: float | None, seconds: float, peak: float | None) -> dict[str, float]:
    """{'tflops_per_device', 'mfu'} of a step, where known."""
    out = {}
    if flops_per_device and seconds > 0:
        out["tflops_per_device"] = flops_per_device / seconds / 1e12
        if peak:
            out["mfu"] = flops_per_device / seconds / peak
    return out
