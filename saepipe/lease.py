"""One GPU per job: a per-device lease for pipeline jobs on a multi-GPU workstation.

``snakemake --resources gpu=N`` only counts GPU jobs; it never says *which* GPU a job
should use. :func:`gpu_lease` does: it takes a non-blocking ``fcntl.flock`` on
``<lock dir>/gpu{i}.lock`` for the first free device i, sets ``CUDA_VISIBLE_DEVICES=i``
for the rest of the job (torch then sees that one GPU as ``cuda:0``) and holds the lock
until the job ends. The kernel drops the lock when the process exits, however it exits
(SIGKILL included), so a crashed job never keeps a GPU.

Decision order (the first that applies wins):

1. ``CUDA_VISIBLE_DEVICES`` is already set (by Slurm, or by you): used as is, no lease
   (source ``inherited``).
2. No GPU (``SAEPIPE_GPUS=0``, a CPU build of torch, no ``nvidia-smi`` device): no lease,
   the job runs on the CPU (source ``cpu``).
3. Otherwise the first free device is leased (source ``lease``); when every device is
   leased the job waits, polling, and says so in its log.

Environment variables:

- ``SAEPIPE_GPUS``: number of devices to share out (default: what ``nvidia-smi -L``
  lists, else ``torch.cuda.device_count()``). Tests use it to simulate devices.
- ``SAEPIPE_GPU_LOCK_DIR``: directory of the lock files (default
  ``/tmp/saepipe-gpu-leases``: one per machine, so that two pipelines on the same
  workstation share the GPUs instead of colliding).
- ``SAEPIPE_GPU_POLL_S``: seconds between two attempts while every device is busy (5).

Every job logs one line ``saepipe.lease: gpu=... source=... CUDA_VISIBLE_DEVICES=...
host=... pid=... start=<unix time>`` on entry and ``saepipe.lease: released gpu=...
end=<unix time>`` on exit; :func:`read_leases` reads them back from a job log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GPUS_ENV = "SAEPIPE_GPUS"
LOCK_DIR_ENV = "SAEPIPE_GPU_LOCK_DIR"
POLL_ENV = "SAEPIPE_GPU_POLL_S"
DEFAULT_LOCK_DIR = Path("/tmp/saepipe-gpu-leases")
LOG_PREFIX = "saepipe.lease:"


@dataclass(frozen=True)
class Lease:
    """What a job got: where it runs and why."""

    source: str
    """'lease' (a device leased here), 'inherited' (CUDA_VISIBLE_DEVICES was set) or 'cpu'."""
    cuda_visible_devices: str | None
    """The job's CUDA_VISIBLE_DEVICES (None: unset, the CPU case)."""
    gpu: int | None = None
    """The leased physical device index (source 'lease' only)."""
    lock_path: Path | None = None
    """The lock file held for the job (source 'lease' only)."""


def device_count() -> int:
    """How many GPUs to share out: $SAEPIPE_GPUS, else nvidia-smi, else torch.

    Neither nvidia-smi nor torch's NVML-based count initialises CUDA in this process, so
    CUDA_VISIBLE_DEVICES can still be set afterwards.
    """
    value = os.environ.get(GPUS_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{GPUS_ENV}={value!r}: expected a number of GPUs (0 means CPU only)")
        return int(value)
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return 0  # a CPU build of torch cannot use a GPU anyway
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if proc.returncode == 0:
            return sum(line.startswith("GPU ") for line in proc.stdout.splitlines())
    return torch.cuda.device_count()


def lock_dir() -> Path:
    """The directory of the per-device lock files ($SAEPIPE_GPU_LOCK_DIR or the default)."""
    path = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if path == DEFAULT_LOCK_DIR and path.stat().st_uid == os.getuid():
            path.chmod(0o1777)  # shared by every user of the machine, like /tmp
    except OSError as err:
        raise OSError(
            f"cannot create the GPU lock directory {path} ({err}); set {LOCK_DIR_ENV} to a writable directory"
        ) from err
    return path


def try_lease(index: int, directory: Path) -> int | None:
    """Lock ``gpu{index}.lock`` without waiting: the open descriptor holding it, None if busy.

    The lock lives as long as the descriptor: close it (or let the process die) to release.
    """
    path = directory / f"gpu{index}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: a read-only descriptor locks too
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    with contextlib.suppress(OSError):  # who holds it, for a human looking at the file
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    return fd


def _acquire(n_gpus: int, directory: Path, log: IO) -> tuple[int, int]:
    """Lease the first free device of 0..n_gpus-1, polling while all are busy: (fd, index)."""
    poll_s = float(os.environ.get(POLL_ENV) or 5)
    next_note = 0.0
    while True:
        for index in range(n_gpus):
            fd = try_lease(index, directory)
            if fd is not None:
                return fd, index
        if time.time() >= next_note:  # say it once a minute, not at every poll
            _log(
                log,
                f"all {n_gpus} GPUs are leased by other jobs (locks in {directory}); "
                f"waiting for one to be released, checking every {poll_s:g}s",
            )
            next_note = time.time() + 60
        time.sleep(poll_s)


def _check_cuda_not_initialised() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            "gpu_lease() was entered after CUDA was initialised, so "
            "CUDA_VISIBLE_DEVICES can no longer take effect; enter it at the "
            "start of the job, before any tensor is put on a GPU"
        )


def _log(log: IO, text: str) -> None:
    print(f"{LOG_PREFIX} {text}", file=log, flush=True)


@contextlib.contextmanager
def gpu_lease(log: IO | None = None) -> Iterator[Lease]:
    """Give this job one GPU (or its inherited devices, or the CPU) for the ``with`` block.

    Sets CUDA_VISIBLE_DEVICES when it leases a device (restored on exit) and logs what
    the job got to ``log`` (stderr by default, which ``saepipe.io.log_to`` copies into the
    job's log). Must be entered before torch initialises CUDA.
    """
    log = log or sys.stderr
    _check_cuda_not_initialised()
    asked = time.time()
    fd = None
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    n_gpus = 0 if inherited is not None else device_count()
    if inherited is not None:
        lease, note = Lease("inherited", inherited), ""
    elif n_gpus == 0:
        lease, note = Lease("cpu", None), f" (no GPU found by {GPUS_ENV}, nvidia-smi or torch: running on the CPU)"
    else:
        directory = lock_dir()
        fd, index = _acquire(n_gpus, directory, log)
        lease = Lease("lease", str(index), index, directory / f"gpu{index}.lock")
        note = f" lock={lease.lock_path} waited={time.time() - asked:.1f}s"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    gpu, start = lease.cuda_visible_devices or "none", time.time()
    _log(
        log,
        f"gpu={gpu} source={lease.source} CUDA_VISIBLE_DEVICES={lease.cuda_visible_devices or ''} "
        f"host={socket.gethostname()} pid={os.getpid()} start={start:.3f}{note}",
    )
    try:
        yield lease
    finally:
        if fd is not None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            os.close(fd)  # releases the lock
        _log(log, f"released gpu={gpu} end={time.time():.3f}")


def read_leases(log_text: str) -> list[dict]:
    """The leases recorded in a job log, one dict per ``gpu_lease()`` block, in order.

    Keys: ``gpu``, ``source``, ``CUDA_VISIBLE_DEVICES``, ``host``, ``pid`` (strings),
    ``start`` and ``end`` (unix times; ``end`` is None if the job died holding it).
    """
    leases: list[dict] = []
    for line in log_text.splitlines():
        if not line.startswith(LOG_PREFIX):
            continue
        words = line[len(LOG_PREFIX) :].split()
        fields = dict(word.partition("=")[::2] for word in words if "=" in word)
        if words[0] == "released":
            open_leases = [lease for lease in leases if lease["end"] is None]
            if open_leases:
                open_leases[-1]["end"] = float(fields["end"])
        elif "source" in fields:
            leases.append({**fields, "start": float(fields["start"]), "end": None})
    return leases
