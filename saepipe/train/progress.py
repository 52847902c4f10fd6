"""What a training job reports: the rows of train_log.jsonl, the progress bar, the lines of
the job's log (start, end) and the saved outputs of an SAE."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saepipe.io import atomic_path
from saepipe.saes import save_sae


def log_row(
    step: int,
    tokens: int,
    lr: float | torch.Tensor,
    loss: torch.Tensor,
    sae,
    out,
    tokens_per_s: float,
    elapsed_s: float,
) -> dict:
    """One row of train_log.jsonl: every named loss term, L0, dead fraction, throughput and,
    for routed SAEs, this batch's tokens per expert and learned statistics (Scale: omega).

    Reads tensors with ``.item()``: the only host syncs of the training loop."""
    row = {
        "step": step,
        "tokens": tokens,
        "lr": float(lr),
        "loss": loss.item(),
        **{k: v.item() for k, v in out.losses.items()},
        "l0": (out.acts_BK > 0).sum(-1).float().mean().item(),
        "dead_fraction": sae.dead_fraction(),
        "tokens_per_s": tokens_per_s,
        "elapsed_s": elapsed_s,
    }
    counts = sae.expert_counts(out)
    if counts is not None:
        row["expert_counts"] = counts
    row.update(sae.extra_stats())
    return row


class Throughput:
    """Tokens per second of the batch stream between two log rows (shared by a pack)."""

    def __init__(self, tokens: int) -> None:
        self.t, self.tokens = time.time(), tokens

    def since_last(self, tokens: int) -> float:
        now = time.time()
        rate = (tokens - self.tokens) / max(now - self.t, 1e-9)
        self.t, self.tokens = now, tokens
        return rate


def progress_bar(name: str, total: int, initial: int) -> tqdm:
    """The job's progress bar (stderr, at most one refresh every 5 s)."""
    return tqdm(total=total, initial=initial, desc=f"train {name}", file=sys.stderr, mininterval=5)


def say(name: str, message: str) -> None:
    """A line of the job's log."""
    print(f"train {name}: {message}", file=sys.stderr)


def save_outputs(sae, out_dir: Path, run: dict, log: list[dict]) -> None:
    """sae.safetensors + config.json (with `run`) and train_log.jsonl in `out_dir`, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_sae(sae, out_dir, run=run)
    with atomic_path(out_dir / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
