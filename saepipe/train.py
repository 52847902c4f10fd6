"""The `train` stage: train one SAE on streamed, shuffled activation shards.

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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saepipe.codeversion import fingerprint
from saepipe.devices import resolve_device
from saepipe.io import atomic_path
from saepipe.saes import build_sae, config_from_dict, save_sae

try:  # the shards need zarr 3; without it train_step/make_optimizer (benchmarks) still import
    from saepipe.data.loader import ShardStream
    from saepipe.data.shards import check_compatible, mean_norm, read_meta
except ImportError as err:
    _DATA_LAYER_ERROR: ImportError | None = err
else:
    _DATA_LAYER_ERROR = None

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
RESUME_NEUTRAL = frozenset({"device", "checkpoint_every_s", "prefetch_windows", "device_cache_gb"})
"""TrainConfig fields that may change between a checkpoint and the run resuming it."""


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
        if self.device_cache_gb != "auto" and not (
            isinstance(self.device_cache_gb, (int, float)) and self.device_cache_gb >= 0
        ):
            raise ValueError(f"train.device_cache_gb must be a number >= 0 or 'auto', got {self.device_cache_gb!r}")

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
RUNTIME_FIELDS = ("checkpoint_every_s", "prefetch_windows", "device_cache_gb")


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


def _routing_stats(sae, out) -> dict:
    """Routed SAEs: this batch's token count per expert (every selected expert, e per token);
    plus the SAE's learned extra statistics (Scale: omega); see ``SAE.expert_counts`` and
    ``SAE.extra_stats``."""
    stats = {}
    counts = sae.expert_counts(out)
    if counts is not None:
        stats["expert_counts"] = counts
    stats.update(sae.extra_stats())
    return stats


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def make_optimizer(sae: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the SAE's parameters with the fused kernel (one pass over all of them) on
    CUDA and on the CPU, where it is 3.8x faster than the default per-tensor loop (1.5 vs
    5.7 ms for the 2.1M parameters of a d=128, M=8192 Switch SAE, one thread)."""
    fused = next(sae.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


def train_step(
    sae, opt: torch.optim.Optimizer, x_BD: torch.Tensor, autocast: torch.dtype | None, grad_clip: float | None = None
):
    """One optimizer step of the protocol in saepipe/saes/base.py; returns (SAEOutput, loss).

    With `autocast` (e.g. torch.bfloat16) the forward runs under torch.autocast: matmuls in
    that dtype, parameters, gradients, Adam state and the losses in float32. `grad_clip`:
    the global gradient norm is clipped to it after the SAE's gradient hook (e.g. removing
    the decoder-parallel component) and before the step.
    """
    with torch.autocast(x_BD.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = sae(x_BD)
        loss = sum(out.losses.values())
    loss.backward()
    sae.before_optimizer_step()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip, foreach=True)
    opt.step()
    sae.after_optimizer_step()
    opt.zero_grad(set_to_none=True)
    return out, loss


def train_sae(
    sae_fields: dict, cfg: TrainConfig, shards: list[str], out_dir: str | Path, checkpoint: str | Path | None = None
) -> dict:
    """Train and save an SAE (sae.safetensors, config.json, train_log.jsonl) in `out_dir`.

    Resumes from `checkpoint` (default `out_dir/checkpoint.pt`) when it was written for
    this same job, and deletes it once the outputs are saved. See the module docstring.
    """
    if _DATA_LAYER_ERROR is not None:
        raise ImportError(
            f"training reads Zarr v3 shards: {_DATA_LAYER_ERROR}; install saepipe's "
            "dependencies (pip install -c constraints.txt -e .)"
        ) from _DATA_LAYER_ERROR
    out_dir = Path(out_dir)
    ckpt_path = Path(checkpoint) if checkpoint else out_dir / CHECKPOINT_FILE
    metas = [read_meta(p) for p in shards]
    meta = check_compatible(metas, shards)
    d_in = meta["d_in"]
    sae_cfg = config_from_dict(
        {
            **sae_fields,
            "d_in": d_in,
            "act_norm_factor": math.sqrt(d_in) / mean_norm(metas),
            "hook": meta["hook"],
            "model_id": meta["model"],
            "training_tokens": cfg.tokens,
            "seed": cfg.seed,
        }
    )
    device = resolve_device(cfg.device)
    cfg = cfg.resolved(device)
    batch_size, cache_gb = cfg.batch_size, cfg.device_cache_gb
    assert isinstance(batch_size, int) and isinstance(cache_gb, float), "resolved() replaces every 'auto'"
    torch.manual_seed(cfg.seed)
    sae = build_sae(sae_cfg).to(device)
    stream = ShardStream(
        shards,
        batch_size,
        cfg.tokens,
        seed=cfg.seed,
        buffer_shards=cfg.buffer_shards,
        device=device,
        prefetch=cfg.prefetch_windows,
        cache_bytes=cache_gb * 2**30,
    )
    total = len(stream)
    if total == 0:
        raise ValueError(f"train.tokens ({cfg.tokens}) is smaller than one batch ({cfg.batch_size})")
    if total < cfg.warmup_steps:
        print(
            f"train {out_dir.name}: warning: only {total} steps (tokens {cfg.tokens:,} / batch "
            f"{cfg.batch_size:,}) but warmup_steps is {cfg.warmup_steps}: the learning rate never "
            "reaches train.lr; raise train.tokens or lower train.batch_size / warmup_steps",
            file=sys.stderr,
        )
    lr = resolve_lr(cfg.lr, sae_cfg.width)
    opt = make_optimizer(sae, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))
    autocast = AUTOCAST_DTYPES[cfg.precision]
    ckpt = Checkpoint(ckpt_path, _job_key(sae_fields, cfg, shards, metas), sae, opt, sched)
    start, log, resumes, elapsed = ckpt.restore()
    t0 = time.time() - elapsed
    t_log, tokens_at_log, t_ckpt = time.time(), start * batch_size, time.monotonic()
    bar = tqdm(total=total, initial=start, desc=f"train {out_dir.name}", file=sys.stderr, mininterval=5)
    print(
        f"train {out_dir.name}: {device}, batch {cfg.batch_size}, {cfg.precision}, "
        + (
            "activations cached on the device"
            if stream.cached
            else f"streaming {len(shards)} shards (prefetch {cfg.prefetch_windows})"
        ),
        file=sys.stderr,
    )
    with _sigterm_flag() as sigterm:
        for step, x_BD in enumerate(stream.batches(start), start):
            if step == 0:
                sae.init_from_batch(x_BD)
            out, loss = train_step(sae, opt, x_BD, autocast, cfg.grad_clip)
            sched.step()
            bar.update()
            if step % cfg.log_every == 0 or step == total - 1:  # the only host syncs of the loop
                ckpt.check_finite(loss, step, state=False)
                now, tokens = time.time(), (step + 1) * batch_size
                row = {
                    "step": step,
                    "tokens": tokens,
                    "lr": sched.get_last_lr()[0],
                    "loss": loss.item(),
                    **{k: v.item() for k, v in out.losses.items()},
                    "l0": (out.acts_BK > 0).sum(-1).float().mean().item(),
                    "dead_fraction": sae.dead_fraction(),
                    "tokens_per_s": (tokens - tokens_at_log) / max(now - t_log, 1e-9),
                    "elapsed_s": now - t0,
                }
                row.update(_routing_stats(sae, out))
                log.append(row)
                t_log, tokens_at_log = now, tokens
                bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", refresh=False)
            due = time.monotonic() - t_ckpt >= cfg.checkpoint_every_s
            if step + 1 < total and (due or sigterm.is_set()):
                ckpt.check_finite(loss, step, state=True)
                ckpt.save(step + 1, log, resumes, time.time() - t0)
                t_ckpt = time.monotonic()
                if sigterm.is_set():
                    raise TrainingPreempted(
                        f"train {out_dir.name}: SIGTERM received; {step + 1} of {total} steps done "
                        f"and saved to {ckpt_path}. Rerun the same job to resume from there."
                    )
    bar.close()
    wall = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_sae(
        sae,
        out_dir,
        run={
            "train": asdict(cfg),
            "lr": lr,
            "wall_time_s": wall,
            "resumed_at_steps": resumes,
            "train_tokens_per_s": cfg.tokens / wall,
            "device": str(device),
        },
    )
    with atomic_path(out_dir / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    ckpt_path.unlink(missing_ok=True)
    resumed = f", resumed after step(s) {resumes}" if resumes else ""
    print(
        f"train {out_dir.name}: {total} steps in {wall:.1f}s ({cfg.tokens / wall:,.0f} tok/s)"
        f"{resumed}, final loss {log[-1]['loss']:.4f}",
        file=sys.stderr,
    )
    return log[-1]


class TrainingPreempted(RuntimeError):
    """SIGTERM arrived during training; a checkpoint was saved and a rerun resumes from it."""


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """Inside, SIGTERM only sets the yielded flag; the loop acts on it at a step boundary."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach only main
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _job_key(sae_fields: dict, cfg: TrainConfig, shards: list[str], metas: list[dict]) -> dict:
    """What a checkpoint must have been written for to be resumed (JSON-normalised)."""
    train = {k: v for k, v in asdict(cfg).items() if k not in RESUME_NEUTRAL}
    key = {
        "sae": sae_fields,
        "train": train,
        "code": fingerprint("saepipe.train"),
        "shards": [{"path": str(p), **m} for p, m in zip(shards, metas)],
    }
    return json.loads(json.dumps(key, sort_keys=True))


def _key_diff(old: dict, new: dict) -> str:
    """'train.lr: 0.001 -> 0.002, shards' style summary of what differs."""
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(section)
    return ", ".join(diffs)


class Checkpoint:
    """The resume state of one training job at `path`, written atomically.

    Holds the SAE's parameters and buffers, the Adam and LR-schedule state, the torch RNG
    (CPU and the training GPU), the log rows so far, the steps done and the wall time.
    The data cursor needs no state: ShardStream.batches(step) rebuilds it from the seed.
    """

    def __init__(self, path: Path, key: dict, sae, opt, sched):
        self.path, self.key, self.sae, self.opt, self.sched = path, key, sae, opt, sched
        self.device = next(sae.parameters()).device
        self.last_good: int | None = None  # steps done in the newest checkpoint on disk

    def restore(self) -> tuple[int, list[dict], list[int], float]:
        """Load a matching checkpoint into the SAE/optimizer/schedule/RNG.

        Returns (steps done, log rows, steps at which earlier runs resumed, seconds spent);
        (0, [], [], 0.0) without a usable checkpoint.
        """
        state = self._read()
        if state is None:
            return 0, [], [], 0.0
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.last_good = state["step"]
        print(f"resuming from {self.path}: {state['step']} steps done", file=sys.stderr)
        return state["step"], state["log"], state["resumes"] + [state["step"]], state["elapsed_s"]

    def _read(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            print(f"checkpoint {self.path} is unreadable ({e}); starting fresh", file=sys.stderr)
            return None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
            diff = _key_diff(state.get("key") or {}, self.key) or "checkpoint format"
            print(
                f"checkpoint {self.path} is stale (written for a different job: {diff}); "
                "ignoring it and starting fresh",
                file=sys.stderr,
            )
            return None
        return state

    def save(self, step: int, log: list[dict], resumes: list[int], elapsed_s: float) -> None:
        """Write the state after `step` steps; a kill mid-write leaves the previous file intact."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": CHECKPOINT_FORMAT,
            "key": self.key,
            "step": step,
            "sae": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng,
            "log": log,
            "resumes": resumes,
            "elapsed_s": elapsed_s,
        }
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        self.last_good = step

    def check_finite(self, loss: torch.Tensor, step: int, state: bool) -> None:
        """Raise FloatingPointError on a non-finite loss (and, if `state`, weights or Adam state).

        Called before each save, so the checkpoint on disk is always a good one.
        """
        if not math.isfinite(loss.item()):
            what = f"loss became {loss.item()}"
        elif not state:
            return
        else:
            opt_state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
            tensors = [*self.sae.state_dict().values(), *opt_state]
            if all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
                return
            what = "the weights or optimizer state became non-finite"
        kept = (
            "no checkpoint was written"
            if self.last_good is None
            else f"the last good checkpoint ({self.last_good} steps done) is kept in {self.path}"
        )
        raise FloatingPointError(
            f"{what} at step {step}; lower train.lr and rerun (a changed config starts fresh); {kept}"
        )
