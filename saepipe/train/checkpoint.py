"""Resume checkpoints: the full training state of one SAE, written atomically, resumed only by
the job it was written for (same SAE fields, train settings, shards and trainer code)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from saepipe.codeversion import fingerprint
from saepipe.io import atomic_path
from saepipe.train.config import RUNTIME_FIELDS, TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
RESUME_NEUTRAL = frozenset({"device", *RUNTIME_FIELDS})
"""TrainConfig fields that may change between a checkpoint and the run resuming it: the device
and the runtime fields (checkpoint interval, prefetch, device cache, pack, log_to)."""


def job_key(sae_fields: dict, cfg: TrainConfig, shards: list[str], metas: list[dict]) -> dict:
    """What a checkpoint must have been written for to be resumed (JSON-normalised)."""
    train = {k: v for k, v in asdict(cfg).items() if k not in RESUME_NEUTRAL}
    key = {
        "sae": sae_fields,
        "train": train,
        "code": fingerprint("saepipe.train"),
        "shards": [{"path": str(p), **m} for p, m in zip(shards, metas)],
    }
    return json.loads(json.dumps(key, sort_keys=True))


def key_diff(old: dict, new: dict) -> str:
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
            diff = key_diff(state.get("key") or {}, self.key) or "checkpoint format"
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
