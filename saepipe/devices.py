"""Device and thread selection for pipeline jobs."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but no CUDA GPU is visible; set `device: auto` (or `cpu`) in config.yaml"
        )
    return device


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads to what the scheduler gave this job."""
    if n:
        torch.set_num_threads(max(1, int(n)))
