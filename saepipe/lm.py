"""The language model whose activations the SAEs learn, through TransformerLens 4.x.

The embedded default is a small TL-native transformer (`TransformerBridge.boot_native`),
trained briefly on the corpus by the `lm` stage and saved as `model.safetensors` plus
`model.json`. Everything downstream goes through `load_lm`, `capture` and `ce_loss`,
so a pretrained model only needs another loader here.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saepipe.io import atomic_path, read_json, write_json


@dataclass
class LMConfig:
    d_model: int = 128
    """Residual stream width (the SAEs' d_in)."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (d_head = d_model / n_heads)."""
    d_mlp: int = 512
    """MLP hidden width."""
    steps: int = 400
    """Optimizer steps of the brief pre-training."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 40
    """Linear warm-up steps."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""


def _bridge_config(arch: dict):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(**arch, act_fn="gelu", normalization_type="LN")


def build_native(cfg: LMConfig, vocab_size: int, n_ctx: int):
    """A randomly initialised TL-native transformer (no download)."""
    from transformer_lens.model_bridge.sources.native import boot

    arch = _native_arch(cfg, vocab_size, n_ctx)
    return boot(_bridge_config(arch)), arch


def _native_arch(cfg: LMConfig, vocab_size: int, n_ctx: int) -> dict:
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"lm.d_model ({cfg.d_model}) must be divisible by lm.n_heads ({cfg.n_heads})")
    return dict(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads, d_mlp=cfg.d_mlp, d_vocab=vocab_size,
        n_ctx=n_ctx, seed=cfg.seed,
    )


def _lr_at(step: int, cfg: LMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _mean_loss(model, tokens: np.ndarray, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).long()
        total += model(batch, return_type="loss").item() * len(batch)
        count += len(batch)
    return total / max(count, 1)


def train_lm(cfg: LMConfig, corpus_dir: str | Path, out_dir: str | Path) -> dict:
    """The `lm` stage: pre-train the default model briefly and save it."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    corpus = read_json(corpus_dir / "corpus.json")
    train = np.load(corpus_dir / "train.npy")
    model, arch = build_native(cfg, corpus["vocab_size"], corpus["seq_len"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="lm", file=sys.stderr, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = torch.from_numpy(train[rng.integers(0, len(train), cfg.batch_size)]).long()
        loss = model(batch, return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    eval_tokens = np.load(corpus_dir / "eval.npy")[:256]
    info = {
        "kind": "native",
        "arch": arch,
        "train_config": asdict(cfg),
        "tokenizer": "tokenizer.json",
        "train_loss_first": float(np.mean(losses[:10])),
        "train_loss_last": float(np.mean(losses[-10:])),
        "eval_loss": _mean_loss(model, eval_tokens, cfg.batch_size),
        "uniform_loss": math.log(corpus["vocab_size"]),
        "seconds": time.time() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tmp.write_bytes((corpus_dir / "tokenizer.json").read_bytes())
    write_json(out_dir / "model.json", info)
    print(f"lm: loss {info['train_loss_first']:.2f} -> {info['train_loss_last']:.2f}, "
          f"eval {info['eval_loss']:.2f} (uniform {info['uniform_loss']:.2f})", file=sys.stderr)
    return info


def load_lm(model_dir: str | Path, device: torch.device | str = "cpu"):
    """Load a model saved by `train_lm` as a TransformerBridge in eval mode."""
    from transformer_lens.model_bridge.sources.native import boot

    model_dir = Path(model_dir)
    info = read_json(model_dir / "model.json")
    model = boot(_bridge_config(info["arch"]))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path):
    """`decode(ids) -> str` with the tokenizer saved next to the model."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


def model_id(model_dir: str | Path) -> str:
    """A readable id for metadata: the model directory's name plus a hash of its weights."""
    path = Path(model_dir) / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{Path(model_dir).name}@{digest}"


def hook_names(model) -> list[str]:
    """Every hook name the model accepts (canonical names and TransformerLens aliases)."""
    names = set(model.hook_dict)
    names.update(getattr(model, "hook_aliases", {}) or {})
    return sorted(names)


def check_hook(model, hook: str) -> None:
    valid = hook_names(model)
    if hook not in valid:
        raise ValueError(
            f"hook {hook!r} does not exist in this model. Set extract.hook in config.yaml "
            f"to one of these {len(valid)} names:\n  " + "\n  ".join(valid)
        )


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model, tokens_BS: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations at `hook` [B, S, d]; the forward pass stops right after the hook fires."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act, hook):  # noqa: ARG001 - TransformerLens hook signature
        captured["act"] = act.detach()
        raise _StopForward

    try:
        model.run_with_hooks(tokens_BS, fwd_hooks=[(hook, grab)])
    except _StopForward:
        pass
    if "act" not in captured:
        raise RuntimeError(f"hook {hook!r} never fired during the forward pass")
    return captured["act"]


@torch.no_grad()
def ce_loss(model, tokens_BS: torch.Tensor, hook: str | None = None,
            replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean next-token cross-entropy, optionally with the activation at `hook` replaced."""
    if replace is None:
        return model(tokens_BS, return_type="loss").item()

    def patch(act, hook):  # noqa: ARG001
        return replace(act).to(act.dtype)

    return model.run_with_hooks(tokens_BS, return_type="loss", fwd_hooks=[(hook, patch)]).item()
