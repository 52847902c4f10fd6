"""The `extract` stage: run the LM to the hook and write one activation shard.

Shard `i` of a split holds the activations of sequences [i*S, (i+1)*S) of that split's
token array (S = shard_tokens / seq_len), so every shard is an independent job.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saepipe.data.shards import write_shard
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

    def tokens(self, split: str) -> int:
        return {"train": self.train_tokens, "eval": self.eval_tokens}[split]

    def n_shards(self, split: str) -> int:
        return math.ceil(self.tokens(split) / self.shard_tokens)


def shard_sequences(cfg: ExtractConfig, split: str, index: int, seq_len: int,
                    available: int) -> slice:
    """The sequence rows of shard `index`; errors when the corpus is too small."""
    if cfg.shard_tokens % seq_len:
        raise ValueError(f"extract.shard_tokens ({cfg.shard_tokens}) must be a multiple of "
                         f"corpus.seq_len ({seq_len})")
    needed = math.ceil(cfg.tokens(split) / seq_len)
    if needed > available:
        raise ValueError(
            f"extract.{split}_tokens asks for {needed * seq_len:,} tokens but the corpus's {split} "
            f"split has only {available * seq_len:,}; lower extract.{split}_tokens or use a larger corpus"
        )
    per_shard = cfg.shard_tokens // seq_len
    start = index * per_shard
    return slice(start, min(start + per_shard, needed))


def extract_shard(cfg: ExtractConfig, model_dir: str | Path, corpus_dir: str | Path,
                  split: str, index: int, out_path: str | Path) -> dict:
    """Write shard `index` of `split`; returns its metadata."""
    device = resolve_device(cfg.device)
    model = load_lm(model_dir, device)
    check_hook(model, cfg.hook)
    corpus = read_json(Path(corpus_dir) / "corpus.json")
    tokens = np.load(Path(corpus_dir) / f"{split}.npy", mmap_mode="r")
    rows = shard_sequences(cfg, split, index, corpus["seq_len"], len(tokens))
    seqs = np.ascontiguousarray(tokens[rows])
    n_seq, seq_len = seqs.shape
    acts = None
    t0 = time.time()
    desc = f"extract {split}/{index:03d}"
    for start in tqdm(range(0, n_seq, cfg.batch_size), desc=desc, file=sys.stderr, mininterval=5):
        batch = torch.from_numpy(seqs[start : start + cfg.batch_size]).long().to(device)
        act_BSD = capture(model, batch, cfg.hook)
        flat = act_BSD.reshape(-1, act_BSD.shape[-1]).to(torch.float16).cpu().numpy()
        if acts is None:
            acts = np.empty((n_seq * seq_len, flat.shape[1]), np.float16)
        acts[start * seq_len : start * seq_len + len(flat)] = flat
    meta = {
        "model": model_id(model_dir),
        "hook": cfg.hook,
        "dtype": "float16",
        "d_in": int(acts.shape[1]),
        "token_count": int(len(acts)),
        "mean_norm": float(np.linalg.norm(acts.astype(np.float32), axis=1).mean()),
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
