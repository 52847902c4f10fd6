"""The `train:` section of the config: :class:`TrainConfig`, its "auto" values and the
learning-rate rules (width rule, warm-up and decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from saepipe.train.trackers import TRACKERS


@dataclass
class TrainConfig:
    tokens: int = 2_000_000
    """Training tokens (several epochs over the shards if they hold fewer)."""
    batch_size: int | str = "auto"
    """Activations per optimizer step; "auto": 1024 on the CPU, 16384 on a GPU (GPUs need
    large batches to approach their peak; see bench/train_throughput.py)."""
    lr: float | str = 5e-4
    """Adam learning rate after warm-up, or "auto": the width rule of the Switch/TopK/Scale
    reference code (after Gao et al. 2024), ``2e-4 / sqrt(M / 2**14)`` with M the SAE's
    TOTAL latents (``width``; for Switch and Scale all N experts' latents together, not the
    M/N of one expert nor the active e*M/N), see :func:`auto_lr`."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value before each step (the reference recipe
    uses 1.0); None: no clipping."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    seed: int = 0
    """Seed of the initialisation and of the shuffling."""
    log_every: int = 25
    """Steps between two rows of train_log.jsonl."""
    buffer_shards: int = 2
    """Shards mixed in the shuffle buffer (memory: about (prefetch_windows + 1) x this + 1 shards)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    precision: str = "auto"
    """Matmul precision: "fp32", or "bf16" (autocast; weights, Adam and losses stay fp32);
    "auto": bf16 on a GPU, fp32 on the CPU (where resumed runs are then bitwise identical)."""
    checkpoint_every_s: float = 300.0
    """Seconds between resume checkpoints (0: after every step); SIGTERM always writes one."""
    prefetch_windows: int = 1
    """Shuffle windows read ahead by a background thread, which a second one cuts into
    ready batches (0: no threads, everything when needed); the batches are the same."""
    device_cache_gb: float | str = "auto"
    """Keep all training activations on the device when they fit in this many GB (fp16) and
    sample batches there (same batches as streaming); 0: never; "auto": 0 on the CPU, a
    quarter of the GPU's memory on a GPU."""
    pack: int = 1
    """SAEs trained together in one job on the same batches (one read, one shuffle, one
    host-to-device copy per batch for all of them); 1: one SAE per job. Which SAEs share a
    pack: :func:`saepipe.train.packs.form_packs` (same sweep group, same stream settings)."""
    log_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get every train_log.jsonl row, one run per SAE: "wandb"
    and/or "mlflow" (:data:`saepipe.train.trackers.TRACKERS`; configured by their own
    environment variables, see :mod:`saepipe.train.trackers`); []: none. Changes no weights:
    a runtime field (editing it retrains nothing, checkpoints stay resumable)."""

    def __post_init__(self) -> None:
        if self.lr != "auto" and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"train.lr must be a positive number or 'auto', got {self.lr!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"train.grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"train.batch_size must be a positive int or 'auto', got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not (isinstance(self.prefetch_windows, int) and self.prefetch_windows >= 0):
            raise ValueError(f"train.prefetch_windows must be an int >= 0, got {self.prefetch_windows!r}")
        if not (isinstance(self.pack, int) and not isinstance(self.pack, bool) and self.pack >= 1):
            raise ValueError(f"train.pack must be an int >= 1 (SAEs per training job), got {self.pack!r}")
        if self.device_cache_gb != "auto" and not (
            isinstance(self.device_cache_gb, (int, float)) and self.device_cache_gb >= 0
        ):
            raise ValueError(f"train.device_cache_gb must be a number >= 0 or 'auto', got {self.device_cache_gb!r}")
        choices = sorted(TRACKERS)
        if not (isinstance(self.log_to, (list, tuple)) and all(isinstance(n, str) for n in self.log_to)):
            raise ValueError(f"train.log_to must be a list of tracker names {choices}, got {self.log_to!r}")
        unknown = [n for n in self.log_to if n not in TRACKERS]
        if unknown or len(set(self.log_to)) < len(self.log_to):
            what = f"unknown tracker(s) {unknown}" if unknown else f"a tracker listed twice in {list(self.log_to)}"
            raise ValueError(f"train.log_to: {what}; valid choices: {choices}")

    def resolved(self, device: torch.device) -> TrainConfig:
        """This config with every "auto" replaced by its value on `device`."""
        gpu = device.type == "cuda"
        batch = self.batch_size if self.batch_size != "auto" else (GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE)
        precision = self.precision if self.precision != "auto" else ("bf16" if gpu else "fp32")
        cache = self.device_cache_gb
        if cache == "auto":
            cache = round(torch.cuda.get_device_properties(device).total_memory / 4 / 2**30, 1) if gpu else 0.0
        return replace(self, batch_size=batch, precision=precision, device_cache_gb=float(cache))


PRECISIONS = ("auto", "fp32", "bf16")
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 1024, 16384
"""train.batch_size "auto" on the CPU and on a GPU."""

# TrainConfig fields that cannot change the trained weights: kept out of the Snakemake
# params (editing them reruns nothing) and read from the top-level `train:` section.
RUNTIME_FIELDS = ("checkpoint_every_s", "prefetch_windows", "device_cache_gb", "pack", "log_to")

MEMBER_FIELDS = ("lr", "grad_clip", "warmup_steps", "decay_fraction", "log_every")
"""TrainConfig fields that may differ between the SAEs of one pack (each has its own
optimizer, schedule and log); every other field defines the shared batch stream."""


def split_runtime(fields: dict) -> tuple[dict, dict]:
    """(fields that define the result, runtime-only fields) of a train config dict."""
    return (
        {k: v for k, v in fields.items() if k not in RUNTIME_FIELDS},
        {k: v for k, v in fields.items() if k in RUNTIME_FIELDS},
    )


AUTO_LR_BASE, AUTO_LR_WIDTH = 2e-4, 2**14
"""lr "auto" = AUTO_LR_BASE / sqrt(M / AUTO_LR_WIDTH) (reference recipe, after Gao et al. 2024)."""


def auto_lr(width: int) -> float:
    """The reference width rule ``2e-4 / sqrt(M / 2**14)``, M = total latents (all experts)."""
    return AUTO_LR_BASE / math.sqrt(width / AUTO_LR_WIDTH)


def resolve_lr(lr: float | str, width: int) -> float:
    """``lr`` itself, or :func:`auto_lr` of the SAE's width for "auto"."""
    return auto_lr(width) if lr == "auto" else float(lr)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = total * (1 - cfg.decay_fraction)
    decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1.0, total - decay_start))
    return warm * decay
