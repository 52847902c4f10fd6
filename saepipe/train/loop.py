"""The training loop: the SAEs of a pack (K >= 1) trained side by side on one stream of batches.

A :class:`Trainee` is one SAE being trained (model, Adam, LR schedule, checkpoint, log rows);
:func:`train_pack` reads each batch once and gives it to every trainee in turn. Each trainee
is exactly what it would be trained alone: its init is seeded the same way, it sees the same
batches, and nothing it does touches another's state (tests/test_packs.py checks bitwise).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from saepipe.devices import resolve_device
from saepipe.saes import build_sae, config_from_dict
from saepipe.train.checkpoint import CHECKPOINT_FILE, Checkpoint, job_key
from saepipe.train.config import MEMBER_FIELDS, RUNTIME_FIELDS, TrainConfig, lr_factor, resolve_lr
from saepipe.train.progress import Throughput, log_row, progress_bar, save_outputs, say
from saepipe.train.signals import TrainingPreempted, sigterm_flag
from saepipe.train.step import AUTOCAST_DTYPES, make_optimizer, train_step
from saepipe.train.trackers import finish_on_error, start_trackers

try:  # the shards need zarr 3; without it train_step/make_optimizer (benchmarks) still import
    from saepipe.data.loader import ShardStream
    from saepipe.data.shards import check_compatible, mean_norm, read_meta
except ImportError as err:
    DATA_LAYER_ERROR: ImportError | None = err
else:
    DATA_LAYER_ERROR = None


@dataclass
class Member:
    """One SAE of a pack: its architecture fields, its train settings and where it is saved."""

    sae_fields: dict
    """The SAE's config fields (``arch``, ``width``, ``k``, ...; the sweep point's ``sae``)."""
    cfg: TrainConfig
    """Its train settings; all but :data:`MEMBER_FIELDS` must equal the other members'."""
    out_dir: Path
    """sae.safetensors, config.json and train_log.jsonl go here."""
    checkpoint: Path | None = None
    """Its resume checkpoint (default ``out_dir/checkpoint.pt``)."""


class PackRun(NamedTuple):
    """What :func:`train_pack` returns."""

    rows: list[dict]
    """Each member's last train_log row, in member order."""
    steps: int
    """Optimizer steps of the run (each member's)."""
    bytes_read: int
    """Bytes of activations this attempt read from the shards (once for all members)."""
    shard_bytes: int | None
    """Size of the shards' activations (fp16), for comparison."""


class StepClock:
    """Seconds spent in one trainee's own steps: host time on the CPU; on a GPU, CUDA events
    read back in batches (no synchronisation per step, so the SAEs of a pack keep the device
    busy back to back). Splits a pack's wall time between its SAEs."""

    PENDING = 256  # event pairs kept before reading them (each read waits for the oldest only)

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total_s = 0.0
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        if not self.cuda:
            self.total_s += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end))
        if len(self.pending) >= self.PENDING:
            self.seconds()

    def seconds(self) -> float:
        """The total so far (waits for the device to finish the pending steps)."""
        for begin, end in self.pending:
            end.synchronize()
            self.total_s += begin.elapsed_time(end) / 1e3
        self.pending.clear()
        return self.total_s


class Trainee:
    """One SAE being trained: the model, its optimizer and schedule, checkpoint and log rows."""

    def __init__(self, member: Member, cfg: TrainConfig, shards: list[str], metas: list[dict], total: int):
        meta, d_in = metas[0], metas[0]["d_in"]
        self.member, self.cfg, self.total = member, cfg, total
        self.sae_cfg = config_from_dict(
            {
                **member.sae_fields,
                "d_in": d_in,
                "act_norm_factor": math.sqrt(d_in) / mean_norm(metas),
                "hook": meta["hook"],
                "model_id": meta["model"],
                "training_tokens": cfg.tokens,
                "seed": cfg.seed,
            }
        )
        torch.manual_seed(cfg.seed)  # the init of an SAE trained alone, whatever was built before
        self.sae = build_sae(self.sae_cfg).to(resolve_device(cfg.device))
        self.lr = resolve_lr(cfg.lr, self.sae_cfg.width)
        self.opt = make_optimizer(self.sae, self.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, cfg))
        self.ckpt_path = member.checkpoint or member.out_dir / CHECKPOINT_FILE
        key = job_key(member.sae_fields, cfg, shards, metas)
        self.ckpt = Checkpoint(self.ckpt_path, key, self.sae, self.opt, self.sched)
        self.start, self.log, self.resumes, self.elapsed_before = self.ckpt.restore()
        run_config = {"sae": self.sae_cfg.to_dict(), "train": asdict(cfg), "lr": self.lr}
        self.trackers = start_trackers(  # train.log_to: W&B / MLflow runs (resumed with the checkpoint)
            cfg.log_to, member.out_dir.name, run_config, self.ckpt_path, self.start > 0, self.log
        )
        self.clock = StepClock(next(self.sae.parameters()).device)  # this trainee's own steps (this attempt)
        self.last_loss: torch.Tensor | None = None
        self.throughput = Throughput(self.start * self.batch_size)

    @property
    def batch_size(self) -> int:
        assert isinstance(self.cfg.batch_size, int), "resolved() replaces 'auto'"
        return self.cfg.batch_size

    def step(self, step: int, x_BD: torch.Tensor, t_origin: float) -> None:
        """One optimizer step on batch `x_BD`, and a log row every ``log_every`` steps
        (``elapsed_s`` counted from the time.time() `t_origin`)."""
        started = self.clock.start()
        if step == 0:
            self.sae.init_from_batch(x_BD)
        out, loss = train_step(self.sae, self.opt, x_BD, AUTOCAST_DTYPES[self.cfg.precision], self.cfg.grad_clip)
        self.sched.step()
        self.last_loss = loss
        if step % self.cfg.log_every == 0 or step == self.total - 1:
            self.ckpt.check_finite(loss, step, state=False)
            tokens = (step + 1) * self.batch_size
            lr = self.sched.get_last_lr()[0]
            rate = self.throughput.since_last(tokens)
            self.log.append(log_row(step, tokens, lr, loss, self.sae, out, rate, time.time() - t_origin))
            self.trackers.log(self.log[-1])
        self.clock.stop(started)

    def save_checkpoint(self, steps_done: int, elapsed_s: float) -> None:
        """Checkpoint after `steps_done` steps, if the loss, weights and Adam state are finite
        (else FloatingPointError: the checkpoint on disk stays the last good one)."""
        if self.last_loss is not None:
            self.ckpt.check_finite(self.last_loss, steps_done - 1, state=True)
        self.ckpt.save(steps_done, self.log, self.resumes, elapsed_s)

    def finish(self, wall_s: float, device: torch.device) -> dict:
        """Save the outputs; returns the last log row. `wall_s`: this SAE's share of the job's time."""
        run = {
            "train": asdict(self.cfg),
            "lr": self.lr,
            "wall_time_s": wall_s,
            "resumed_at_steps": self.resumes,
            "train_tokens_per_s": self.cfg.tokens / wall_s,
            "device": str(device),
        }
        save_outputs(self.sae, self.member.out_dir, run, self.log)
        self.trackers.finish()
        return self.log[-1]


def check_pack(members: list[Member]) -> None:
    """Every member shares the stream: all TrainConfig fields but MEMBER_FIELDS are equal."""
    if not members:
        raise ValueError("a pack needs at least one SAE")
    first = asdict(members[0].cfg)
    for m in members[1:]:
        differ = sorted(
            k for k, v in asdict(m.cfg).items() if k not in MEMBER_FIELDS + RUNTIME_FIELDS and v != first[k]
        )
        if differ:
            raise ValueError(
                f"SAEs {members[0].out_dir.name} and {m.out_dir.name} cannot share a pack: their "
                f"train settings differ in {differ} (only {list(MEMBER_FIELDS)} may differ within a pack)"
            )


def train_pack(members: list[Member], shards: list[str], name: str | None = None) -> PackRun:
    """Train the SAEs of `members` on one stream of batches and save each (see :class:`PackRun`).

    Each member resumes from its own checkpoint when it was written for this same SAE, train
    settings, shards and trainer code (see :class:`Checkpoint`); a member whose checkpoint
    says it is done is not trained again. Checkpoints are written every
    ``checkpoint_every_s`` seconds and at the step boundary after a SIGTERM (then
    :class:`TrainingPreempted` is raised), and deleted once every member is saved.
    """
    if DATA_LAYER_ERROR is not None:
        raise ImportError(
            f"training reads Zarr v3 shards: {DATA_LAYER_ERROR}; install saepipe's "
            "dependencies (pip install -c constraints.txt -e .)"
        ) from DATA_LAYER_ERROR
    check_pack(members)
    name = name or members[0].out_dir.name
    metas = [read_meta(p) for p in shards]
    check_compatible(metas, shards)
    device = resolve_device(members[0].cfg.device)
    cfgs = [m.cfg.resolved(device) for m in members]
    cfg = cfgs[0]
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.device_cache_gb, float), "resolved() replaces 'auto'"
    stream = ShardStream(
        shards,
        cfg.batch_size,
        cfg.tokens,
        seed=cfg.seed,
        buffer_shards=cfg.buffer_shards,
        device=device,
        prefetch=cfg.prefetch_windows,
        cache_bytes=cfg.device_cache_gb * 2**30,
    )
    total = len(stream)
    if total == 0:
        raise ValueError(f"train.tokens ({cfg.tokens}) is smaller than one batch ({cfg.batch_size})")
    if total < max(c.warmup_steps for c in cfgs):
        say(
            name,
            f"warning: only {total} steps (tokens {cfg.tokens:,} / batch {cfg.batch_size:,}) but "
            f"warmup_steps is {max(c.warmup_steps for c in cfgs)}: the learning rate never reaches "
            "train.lr; raise train.tokens or lower train.batch_size / warmup_steps",
        )
    trainees = [Trainee(m, c, shards, metas, total) for m, c in zip(members, cfgs)]
    start = min(t.start for t in trainees)
    t_job = time.time()
    elapsed_before = max(t.elapsed_before for t in trainees)  # the pack's earlier attempts
    source = (
        "activations cached on the device"
        if stream.cached
        else f"streaming {len(shards)} shards (prefetch {cfg.prefetch_windows})"
    )
    pack = f", {len(trainees)} SAEs on each batch" if len(trainees) > 1 else ""
    say(name, f"{device}, batch {cfg.batch_size}, {cfg.precision}, {source}{pack}")
    bar = progress_bar(name, total, start)
    t_ckpt = time.monotonic()
    with sigterm_flag() as sigterm, finish_on_error([t.trackers for t in trainees]):
        for step, x_BD in enumerate(stream.batches(start), start):
            for t in trainees:
                if step >= t.start:
                    t.step(step, x_BD, t_job - elapsed_before)
            bar.update()
            if len(trainees) == 1 and trainees[0].log and trainees[0].log[-1]["step"] == step:
                row = trainees[0].log[-1]
                bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", refresh=False)
            due = time.monotonic() - t_ckpt >= cfg.checkpoint_every_s
            if step + 1 < total and (due or sigterm.is_set()):
                for t in trainees:
                    t.save_checkpoint(step + 1, elapsed_before + time.time() - t_job)
                t_ckpt = time.monotonic()
                if sigterm.is_set():
                    where = ", ".join(str(t.ckpt_path) for t in trainees)
                    raise TrainingPreempted(
                        f"train {name}: SIGTERM received; {step + 1} of {total} steps done "
                        f"and saved to {where}. Rerun the same job to resume from there."
                    )
    bar.close()
    wall = elapsed_before + time.time() - t_job
    if len(trainees) > 1:  # a crash while saving the members below retrains none of them
        for t in trainees:
            t.save_checkpoint(total, wall)
    own = [t.clock.seconds() for t in trainees]
    own_total = sum(own)
    rows = []
    for t, own_t in zip(trainees, own):  # each SAE's wall time: the job's, split by its own steps
        wall_t = wall * (own_t / own_total if own_total > 0 else 1 / len(trainees))
        rows.append(t.finish(wall_t, device))
        resumed = f", resumed after step(s) {t.resumes}" if t.resumes else ""
        say(
            t.member.out_dir.name,
            f"{total} steps in {wall_t:.1f}s ({cfg.tokens / wall_t:,.0f} tok/s){resumed}, "
            f"final loss {rows[-1]['loss']:.4f}",
        )
    for t in trainees:  # every member is saved: nothing left to resume
        t.ckpt_path.unlink(missing_ok=True)
    return PackRun(rows, total, stream.bytes_read, stream.data_bytes)


def train_sae(
    sae_fields: dict, cfg: TrainConfig, shards: list[str], out_dir: str | Path, checkpoint: str | Path | None = None
) -> dict:
    """Train and save one SAE (sae.safetensors, config.json, train_log.jsonl) in `out_dir`
    (a pack of one, :func:`train_pack`); returns its last log row.

    Resumes from `checkpoint` (default `out_dir/checkpoint.pt`) when it was written for
    this same job, and deletes it once the outputs are saved.
    """
    member = Member(sae_fields, cfg, Path(out_dir), Path(checkpoint) if checkpoint else None)
    return train_pack([member], shards).rows[0]
