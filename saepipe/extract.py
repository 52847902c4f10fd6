"""The `extract` stage: run the LM to the hook and write one activation shard.

Shard `i` of a split holds the activations of sequences [i*S, (i+1)*S) of that split's
token array (S = shard_tokens / seq_len), so every shard is an independent job.

Memory is bounded by one shard: the token array is memory-mapped, only this shard's
sequences are read, activations go batch by batch into one preallocated fp16 shard buffer,
and statistics are accumulated per batch. Before the forward passes the job prints the
disk the split's shards need (tokens x d x 2 bytes + 8 bytes of token/position per token)
and stops with an error when the shard's file system has less free space than this shard.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saepipe.data.shards import keep_mask, write_shard
from saepipe.devices import resolve_device
from saepipe.io import read_json
from saepipe.lm import capture, check_hook, load_lm, model_id


@dataclass
class ExtractConfig:
    hook: str = "blocks.1.hook_resid_pre"
    """TransformerLens hook whose output the SAEs reconstruct."""
    train_tokens: int = 1_048_576
    """Tokens of training activations (rounded up to whole sequences)."""
    eval_tokens: int = 131_072
    """Tokens of held-out activations, from the corpus's eval split."""
    shard_tokens: int = 262_144
    """Tokens per shard (a multiple of corpus.seq_len); one extraction job per shard."""
    batch_size: int = 64
    """Sequences per forward pass."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    exclude_positions: list[int] = field(default_factory=list)
    """Sequence positions to keep out of the SAE statistics (GPT-2 with BOS: `[0]`, whose
    residual norm is ~50x the others). Every position is still stored, so CE evaluation and
    MaxAct see whole sequences; the list is recorded in each shard's metadata (with
    `kept_token_count`), `Shard.kept_acts()` returns the kept rows, and the shard's
    `mean_norm` (the SAEs' input normalisation) is computed over kept positions only.
    Honoured by the normalisation, the training stream (saepipe/data/loader.py), the
    reconstruction metrics and the MaxAct scan (`Shard.kept_acts()`), and the CE splices of
    evaluation: the SAE reconstruction and the zero-ablation baseline both leave these
    positions as the clean activation (saepipe.lm.keep_positions_clean), so no SAE is charged
    for a token it never saw."""

    def tokens(self, split: str) -> int:
        return {"train": self.train_tokens, "eval": self.eval_tokens}[split]

    def n_shards(self, split: str) -> int:
        return math.ceil(self.tokens(split) / self.shard_tokens)


def shard_sequences(cfg: ExtractConfig, split: str, index: int, seq_len: int, available: int) -> slice:
    """The sequence rows of shard `index`; errors when the corpus is too small."""
    if cfg.shard_tokens % seq_len:
        raise ValueError(f"extract.shard_tokens ({cfg.shard_tokens}) must be a multiple of corpus.seq_len ({seq_len})")
    needed = math.ceil(cfg.tokens(split) / seq_len)
    if needed > available:
        raise ValueError(
            f"extract.{split}_tokens asks for {needed * seq_len:,} tokens but the corpus's {split} "
            f"split has only {available * seq_len:,}; lower extract.{split}_tokens or use a larger corpus"
        )
    per_shard = cfg.shard_tokens // seq_len
    start = index * per_shard
    return slice(start, min(start + per_shard, needed))


def shard_bytes(tokens: int, d: int) -> int:
    """Disk bytes of `tokens` activations of width `d`: fp16 acts + int32 token + int32 position."""
    return tokens * (2 * d + 8)


def check_disk_space(out_path: str | Path, needed: int, what: str) -> None:
    """Raise `OSError` when the file system of `out_path` has less than `needed` bytes free."""
    probe = Path(out_path).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(
            f"not enough disk for {what}: it needs {needed / 1e9:.2f} GB but {probe} has "
            f"{free / 1e9:.2f} GB free. Free space there, lower extract.train_tokens / "
            "eval_tokens, or run from a larger file system"
        )


def extract_shard(
    cfg: ExtractConfig, model_dir: str | Path, corpus_dir: str | Path, split: str, index: int, out_path: str | Path
) -> dict:
    """Write shard `index` of `split`; returns its metadata."""
    device = resolve_device(cfg.device)
    model = load_lm(model_dir, device)
    check_hook(model, cfg.hook)
    corpus = read_json(Path(corpus_dir) / "corpus.json")
    tokens = np.load(Path(corpus_dir) / f"{split}.npy", mmap_mode="r")
    if corpus["seq_len"] > model.cfg.n_ctx:
        raise ValueError(
            f"corpus.seq_len ({corpus['seq_len']}) exceeds the model's context "
            f"({model.cfg.n_ctx}); lower corpus.seq_len"
        )
    rows = shard_sequences(cfg, split, index, corpus["seq_len"], len(tokens))
    seqs = np.ascontiguousarray(tokens[rows])
    n_seq, seq_len = seqs.shape
    d = int(model.cfg.d_model)
    split_tokens = math.ceil(cfg.tokens(split) / seq_len) * seq_len
    print(
        f"extract: {split} split {split_tokens:,} tokens x d={d} -> "
        f"{shard_bytes(split_tokens, d) / 1e9:.2f} GB in {cfg.n_shards(split)} shards; this shard "
        f"{shard_bytes(n_seq * seq_len, d) / 1e9:.3f} GB",
        file=sys.stderr,
    )
    check_disk_space(out_path, shard_bytes(n_seq * seq_len, d), f"shard {out_path}")
    acts = np.empty((n_seq * seq_len, d), np.float16)
    keep_S = keep_mask(np.arange(seq_len), cfg.exclude_positions)
    norm_sum, kept = 0.0, 0
    t0 = time.time()
    desc = f"extract {split}/{index:03d}"
    for start in tqdm(range(0, n_seq, cfg.batch_size), desc=desc, file=sys.stderr, mininterval=5):
        batch = torch.from_numpy(seqs[start : start + cfg.batch_size].astype(np.int64)).to(device)
        act_BSD = capture(model, batch, cfg.hook)
        norm_sum += act_BSD[:, torch.from_numpy(keep_S).to(act_BSD.device)].float().norm(dim=-1).sum().item()
        kept += len(batch) * int(keep_S.sum())
        flat = act_BSD.reshape(-1, d).to(torch.float16).cpu().numpy()
        acts[start * seq_len : start * seq_len + len(flat)] = flat
    meta = {
        "model": model_id(model_dir),
        "hook": cfg.hook,
        "dtype": "float16",
        "d_in": d,
        "token_count": int(len(acts)),
        "kept_token_count": kept,
        "mean_norm": norm_sum / max(kept, 1),
        "exclude_positions": sorted(set(cfg.exclude_positions)),
        "prepend_bos": bool(corpus.get("prepend_bos", False)),
        "seq_len": int(seq_len),
        "split": split,
        "index": index,
        "n_shards": cfg.n_shards(split),
        "first_sequence": rows.start,
        "seconds": time.time() - t0,
    }
    positions = np.tile(np.arange(seq_len, dtype=np.int32), n_seq)
    write_shard(out_path, acts, seqs.reshape(-1), positions, meta)
    print(f"{desc}: {len(acts):,} tokens, {len(acts) / meta['seconds']:,.0f} tok/s", file=sys.stderr)
    return meta
