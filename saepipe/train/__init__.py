"""The `train` stage: train SAEs on streamed, shuffled activation shards, one or a pack at a time.

The trainer knows nothing about architectures: the SAE returns a dict of named,
already-weighted loss terms (reconstruction, AuxK, load balance, ...) which are summed
and logged one by one; the SAE's own hooks handle init and decoder constraints.

Preemption and resume: every `checkpoint_every_s` seconds, and at the step boundary
after a SIGTERM (what Slurm sends before preempting or killing a job), the full training
state is written atomically to `checkpoint.pt` (see `Checkpoint`); after a SIGTERM the
trainer then raises `TrainingPreempted`. Rerunning the same job resumes from that
checkpoint and ends with the same weights as an uninterrupted run (bitwise on CPU). A
checkpoint written for different SAE fields, train settings, shards or trainer code is
reported as stale and ignored. The checkpoint is deleted once the outputs are saved.

Speed (GPU): `precision` bf16 runs the forward's matmuls under autocast (weights, Adam
state and losses stay fp32), Adam is the fused CUDA kernel, `batch_size` "auto" is 16384,
and the loader prefetches in background threads with pinned memory or, when the shards
fit in `device_cache_gb`, samples them on the device. None of this is on by default on
the CPU, where runs stay bitwise reproducible. Measured: bench/train_throughput.py.

Packs: ``train.pack: K`` trains K SAEs of one sweep group in one job on the same batches
(:func:`train_pack`; which SAEs share a pack: :mod:`saepipe.train.packs`). Each gets exactly
the weights it gets trained alone, its own checkpoint, log and outputs.

Parts: :mod:`.config` (TrainConfig, learning-rate rules), :mod:`.step` (one optimizer step),
:mod:`.loop` (Trainee, train_pack, train_sae), :mod:`.checkpoint` (resume state),
:mod:`.signals` (SIGTERM), :mod:`.progress` (log rows, progress, saved outputs),
:mod:`.packs` (pack formation), :mod:`.trackers` (``train.log_to``: W&B / MLflow runs).
"""

from saepipe.train.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, RESUME_NEUTRAL, Checkpoint
from saepipe.train.config import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    MEMBER_FIELDS,
    PRECISIONS,
    RUNTIME_FIELDS,
    TrainConfig,
    auto_lr,
    lr_factor,
    resolve_lr,
    split_runtime,
)
from saepipe.train.loop import Member, PackRun, Trainee, train_pack, train_sae
from saepipe.train.signals import TrainingPreempted
from saepipe.train.step import AUTOCAST_DTYPES, make_optimizer, train_step
from saepipe.train.trackers import TRACKERS, Tracker

__all__ = [
    "AUTOCAST_DTYPES",
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZE",
    "MEMBER_FIELDS",
    "PRECISIONS",
    "RESUME_NEUTRAL",
    "RUNTIME_FIELDS",
    "TRACKERS",
    "Checkpoint",
    "Member",
    "PackRun",
    "TrainConfig",
    "Trainee",
    "Tracker",
    "TrainingPreempted",
    "auto_lr",
    "lr_factor",
    "make_optimizer",
    "resolve_lr",
    "split_runtime",
    "train_pack",
    "train_sae",
    "train_step",
]
