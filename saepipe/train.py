"""The `train` stage: train one SAE on streamed, shuffled activation shards.

The trainer knows nothing about architectures: the SAE returns a dict of named,
already-weighted loss terms (reconstruction, AuxK, load balance, ...) which are summed
and logged one by one; the SAE's own hooks handle init and decoder constraints.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saepipe.data.loader import ShardStream
from saepipe.data.shards import check_compatible, mean_norm, read_meta
from saepipe.devices import resolve_device
from saepipe.io import atomic_path
from saepipe.saes import build_sae, config_from_dict, save_sae


@dataclass
class TrainConfig:
    tokens: int = 2_000_000
    """Training tokens (several epochs over the shards if they hold fewer)."""
    batch_size: int = 1024
    """Activations per optimizer step."""
    lr: float = 5e-4
    """Adam learning rate after warm-up."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    seed: int = 0
    """Seed of the initialisation and of the shuffling."""
    log_every: int = 25
    """Steps between two rows of train_log.jsonl."""
    buffer_shards: int = 2
    """Shards mixed in the shuffle buffer (memory: about this many + 1 shards)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = total * (1 - cfg.decay_fraction)
    decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1.0, total - decay_start))
    return warm * decay


def _routing_stats(sae, out) -> dict:
    """MoE SAEs: this batch's routed-token count per expert; Scale: the learned omega."""
    stats = {}
    if out.expert_B is not None:
        stats["expert_counts"] = torch.bincount(out.expert_B, minlength=sae.cfg.n_experts).tolist()
    omega = getattr(sae, "omega", None)
    if omega is not None:
        stats["omega"] = omega.detach().cpu().tolist()
    return stats


def train_sae(sae_fields: dict, cfg: TrainConfig, shards: list[str], out_dir: str | Path) -> dict:
    """Train and save an SAE (sae.safetensors, config.json, train_log.jsonl) in `out_dir`."""
    out_dir = Path(out_dir)
    metas = [read_meta(p) for p in shards]
    meta = check_compatible(metas, shards)
    d_in = meta["d_in"]
    sae_cfg = config_from_dict({
        **sae_fields, "d_in": d_in, "act_norm_factor": math.sqrt(d_in) / mean_norm(metas),
        "hook": meta["hook"], "model_id": meta["model"], "training_tokens": cfg.tokens,
        "seed": cfg.seed,
    })
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sae = build_sae(sae_cfg).to(device)
    stream = ShardStream(shards, cfg.batch_size, cfg.tokens, seed=cfg.seed,
                         buffer_shards=cfg.buffer_shards, device=device)
    total = len(stream)
    if total == 0:
        raise ValueError(f"train.tokens ({cfg.tokens}) is smaller than one batch ({cfg.batch_size})")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))
    log, t0, t_log, tokens_at_log = [], time.time(), time.time(), 0
    bar = tqdm(total=total, desc=f"train {out_dir.name}", file=sys.stderr, mininterval=5)
    for step, x_BD in enumerate(stream):
        if step == 0:
            sae.init_from_batch(x_BD)
        out = sae(x_BD)
        loss = sum(out.losses.values())
        loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        bar.update()
        if step % cfg.log_every == 0 or step == total - 1:  # the only host syncs of the loop
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr")
            now, tokens = time.time(), (step + 1) * cfg.batch_size
            row = {
                "step": step, "tokens": tokens, "lr": sched.get_last_lr()[0],
                "loss": loss.item(), **{k: v.item() for k, v in out.losses.items()},
                "l0": (out.acts_BK > 0).sum(-1).float().mean().item(),
                "dead_fraction": sae.dead_fraction(),
                "tokens_per_s": (tokens - tokens_at_log) / max(now - t_log, 1e-9),
                "elapsed_s": now - t0,
            }
            row.update(_routing_stats(sae, out))
            log.append(row)
            t_log, tokens_at_log = now, tokens
            bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", refresh=False)
    bar.close()
    wall = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_sae(sae, out_dir, run={"train": asdict(cfg), "wall_time_s": wall,
                                "train_tokens_per_s": cfg.tokens / wall, "device": str(device)})
    with atomic_path(out_dir / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    print(f"train {out_dir.name}: {total} steps in {wall:.1f}s "
          f"({cfg.tokens / wall:,.0f} tok/s), final loss {log[-1]['loss']:.4f}", file=sys.stderr)
    return log[-1]
