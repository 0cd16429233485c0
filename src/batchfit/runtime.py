"""Where and how reproducibly a measurement runs: the device and the seeds.

The foundation every measurement shares (train, the finder, the noise probe, branching, step timing, the sweep and
tune): it imports nothing above :mod:`batchfit.errors`, so none of them has to import another for these.
"""

from __future__ import annotations

import torch

from batchfit.errors import ConfigError

__all__ = ["resolve_device", "seed_everything"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not understood; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda":
        if dev.index is None:  # some CUDA APIs (memory fraction) need the index spelled out
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed torch's CPU generator and, where CUDA is available, every GPU's."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
